// galore: StochasticRounder<Bits>, rounding to Bits-bit integer codes.
//
// Stochastic rounding replaces round(x) by floor(x) + (u < x - floor(x)) with u
// uniform in [0, 1), so that E[round(x)] = x: tiny updates to INT8 weights survive
// on average instead of vanishing (Q-GaLore, DESIGN.md 2.3). u comes from
// Philox4x32-10 at counter (i / 4, step, layer) and key seed, so the rounding of
// element i at step t of a layer is a pure function of (seed, layer, step, i):
// reproducible, independent of threading, and the same on any backend.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../types.hpp"
#include "philox.hpp"

namespace galore {

enum class RoundingMode : std::uint8_t {
  Nearest,     // round half to even (torch.round)
  Stochastic,  // floor(x) + (u < frac(x))
};

inline const char* to_string(RoundingMode m) {
  return m == RoundingMode::Nearest ? "nearest" : "stochastic";
}

template <int Bits>
class StochasticRounder {
  static_assert(Bits >= 1 && Bits <= 8, "StochasticRounder rounds to codes of 1 to 8 bits");

 public:
  static constexpr int bits = Bits;
  static constexpr float max_code = static_cast<float>((1 << Bits) - 1);

  explicit StochasticRounder(std::uint64_t seed = 0, RoundingMode mode = RoundingMode::Stochastic)
      : seed_(seed), mode_(mode) {}

  std::uint64_t seed() const { return seed_; }
  RoundingMode mode() const { return mode_; }

  // The uniform number in [0, 1) that element i of (layer, step) is rounded with.
  GALORE_HOST_DEVICE float uniform(std::uint32_t layer, std::uint32_t step, std::uint64_t i) const {
    const std::uint64_t block = i >> 2;
    const Philox4x32 r = philox4x32_10(static_cast<std::uint32_t>(block),
                                       static_cast<std::uint32_t>(block >> 32), step, layer,
                                       static_cast<std::uint32_t>(seed_),
                                       static_cast<std::uint32_t>(seed_ >> 32));
    return uniform_from_bits(r.v[i & 3]);
  }

  // x rounded to an integer value (not yet offset or clamped).
  float round(float x, std::uint32_t layer, std::uint32_t step, std::uint64_t i) const {
    if (mode_ == RoundingMode::Nearest) return std::nearbyint(x);
    const float f = std::floor(x);
    return f + (uniform(layer, step, i) < x - f ? 1.0f : 0.0f);
  }

  // Encodes group values for the min-max quantizer:
  //   codes[k] = clamp(round(w[k] / scale) + zero, 0, 2^Bits - 1),
  // element k being element `first + k` of the tensor (the random counter).
  struct Encoder {
    const StochasticRounder* rounder;
    std::uint32_t layer, step;

    void operator()(const float* w, Index n, float scale, float zero, std::uint64_t first,
                    std::uint8_t* codes) const {
      if (rounder->mode_ == RoundingMode::Nearest) {
        for (Index k = 0; k < n; ++k)
          codes[k] = static_cast<std::uint8_t>(
              std::clamp(std::nearbyint(w[k] / scale) + zero, 0.0f, max_code));
        return;
      }
      constexpr Index kChunk = 256;
      float u[kChunk + 4];
      for (Index k0 = 0; k0 < n; k0 += kChunk) {
        const Index len = std::min(kChunk, n - k0);
        rounder->fill_uniform(layer, step, first + static_cast<std::uint64_t>(k0), len, u);
        for (Index k = 0; k < len; ++k) {
          const float x = w[k0 + k] / scale;
          const float f = std::floor(x);
          const float up = u[k] < x - f ? 1.0f : 0.0f;
          codes[k0 + k] = static_cast<std::uint8_t>(std::clamp(f + up + zero, 0.0f, max_code));
        }
      }
    }
  };

  Encoder bind(std::uint32_t layer, std::uint32_t step) const { return {this, layer, step}; }

  // u[k] = uniform(layer, step, first + k) for k < n, one Philox call per 4 elements.
  void fill_uniform(std::uint32_t layer, std::uint32_t step, std::uint64_t first, Index n, float* u) const {
    const std::uint32_t k0 = static_cast<std::uint32_t>(seed_), k1 = static_cast<std::uint32_t>(seed_ >> 32);
    const std::uint64_t b_first = first >> 2, b_last = (first + static_cast<std::uint64_t>(n) + 3) >> 2;
    const Index skip = static_cast<Index>(first & 3);
    for (std::uint64_t b = b_first; b < b_last; ++b) {
      const Philox4x32 r = philox4x32_10(static_cast<std::uint32_t>(b), static_cast<std::uint32_t>(b >> 32),
                                         step, layer, k0, k1);
      const Index base = static_cast<Index>(b - b_first) * 4 - skip;
      for (int j = 0; j < 4; ++j)
        if (base + j >= 0 && base + j < n) u[base + j] = uniform_from_bits(r.v[j]);
    }
  }

 private:
  std::uint64_t seed_;
  RoundingMode mode_;
};

using Int8Rounder = StochasticRounder<8>;

}  // namespace galore
