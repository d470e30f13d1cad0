// galore: RoundingMode, how StochasticRounder rounds to integer codes. Backend-free:
// a checkpoint's configuration names it (checkpoint/describe.hpp).
#pragma once

#include <cstdint>

namespace galore {

enum class RoundingMode : std::uint8_t {
  Nearest,     // round half to even (torch.round)
  Stochastic,  // floor(x) + (u < frac(x)), exactly as stochastic_round
};

// The settings of a rounder of weight codes: what StochasticRounder<Bits>(seed,
// mode) holds on the CPU, and what the GPU facade (cuda::GaLoreOptimizer) takes.
struct WeightRounding {
  std::uint64_t seed = 0;
  RoundingMode mode = RoundingMode::Stochastic;
};

inline const char* to_string(RoundingMode m) {
  switch (m) {
    case RoundingMode::Nearest: return "nearest";
    case RoundingMode::Stochastic: return "stochastic";
  }
  return "unknown";
}

}  // namespace galore
