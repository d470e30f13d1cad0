// galore: the element-wise math of quantization, for both backends: min-max
// scale, zero point and codes (Q-GaLore, arXiv 2407.08296; q_galore_torch's
// group-wise quantizer), stochastic rounding, and the random bits it draws.
//
// Every function here is exact or rounds once per operation with no product
// feeding a sum, so a compiler cannot contract anything (fp.hpp): the host and
// the device give the same codes for the same inputs. They are total: NaN and Inf
// never reach a float-to-integer conversion out of range.
// No Eigen, no CUDA headers: host code and device code share this text.
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.hpp"
#include "../rounding/philox.hpp"

namespace galore::math {

// x rounded half to even, in the default rounding mode, as a vectorizable
// expression (adding and removing 1.5 * 2^23; two separate float additions, no
// contraction possible). Exact for |x| < 2^22; beyond, the result stays beyond
// +-2^21, so a clamp to a code range gives the same code. NaN stays NaN.
GALORE_HOST_DEVICE float round_half_even(float x) {
  constexpr float magic = 12582912.0f;  // 1.5 * 2^23
  return (x + magic) - magic;
}

// The code of an integer-valued v: clamp(v, 0, max_code) in float, NaN to 0, then
// converted through int32 (so the conversion vectorizes). The comparisons are
// written out because std::max(NaN, 0) is NaN: the value converted is always in
// [0, max_code], for every input.
GALORE_HOST_DEVICE std::uint8_t to_code(float v, float max_code) {
  const float c = v > 0.0f ? (v < max_code ? v : max_code) : 0.0f;
  return static_cast<std::uint8_t>(static_cast<std::int32_t>(c));
}

// The reference's scale and zero point of a group with extremes lo <= hi:
//   scale = max(hi - lo, 1e-5) / max_code,  zero = clamp(round(-lo / scale), 0, max_code)
// zero is an integer value in [0, max_code] for every input (NaN gives 0), so its
// conversion to a byte is always defined; a NaN range keeps a NaN scale, so the
// group dequantizes to NaN rather than to finite noise.
GALORE_HOST_DEVICE void minmax_scale_zero(float lo, float hi, float max_code, float& scale, float& zero) {
  const float range = hi - lo;
  scale = (range < 1e-5f ? 1e-5f : range) / max_code;
  const float z = round_half_even(-lo / scale);  // as torch.round: exact below 2^22, clamped below
  zero = z > 0.0f ? (z < max_code ? z : max_code) : 0.0f;
}

// The nearest-rounding code of w: clamp(round(w / scale) + zero, 0, max_code),
// with a true float division as torch computes it (a reciprocal changes a few
// codes per thousand).
GALORE_HOST_DEVICE std::uint8_t minmax_code(float w, float scale, float zero, float max_code) {
  return to_code(round_half_even(w / scale) + zero, max_code);
}

// The value a code stands for: scale * (code - zero).
GALORE_HOST_DEVICE float minmax_value(std::uint8_t code, float scale, float zero) {
  return scale * (static_cast<float>(code) - zero);
}

// x rounded stochastically to an integer value with the 32 random bits u:
//   a = |x|, f = a - floor(a), r = floor(a) + (u < ceil(f * 2^32)), result copysign(r, x).
// Every operation is exact: f = a - floor(a) (Sterbenz, or floor(a) = 0); f - 1/2
// for f >= 1/2 (Sterbenz); the scaling by 2^32 (a power of two); ceil of a value
// in [0, 2^31 - 128], an integer that int32 holds; floor(a) + 1 (f > 0 only when
// a < 2^23). For f >= 1/2 the threshold ceil(f * 2^32) = ceil((f - 1/2) * 2^32) +
// 2^31 still fits 32 bits (at most 2^32 - 256). A NaN or infinite x gives NaN or
// x (f is taken as 0, so no conversion sees a non-finite value). Only fabs,
// floor, ceil, copysign, compares and one multiplication by a power of two:
// nothing an FMA could contract.
GALORE_HOST_DEVICE float stochastic_round(float x, std::uint32_t u) {
  const float a = fabsf(x);
  const float whole = floorf(a);
  float frac = a - whole;
  frac = frac > 0.0f ? frac : 0.0f;  // NaN (x NaN or infinite) -> 0
  const bool high = frac >= 0.5f;
  const float rest = high ? frac - 0.5f : frac;  // in [0, 1/2)
  const auto t = static_cast<std::int32_t>(ceilf(rest * 4294967296.0f));
  const std::uint32_t threshold = static_cast<std::uint32_t>(t) + (high ? 0x80000000u : 0u);  // ceil(f * 2^32)
  return copysignf(whole + (u < threshold ? 1.0f : 0.0f), x);
}

// The stochastic-rounding code of w with the random bits u:
// clamp(stochastic_round(w / scale, u) + zero, 0, max_code).
GALORE_HOST_DEVICE std::uint8_t stochastic_code(float w, float scale, float zero, float max_code, std::uint32_t u) {
  return to_code(stochastic_round(w / scale, u) + zero, max_code);
}

// The 32 random bits element i of (layer, step) is rounded with (layout in
// rounding/stochastic_rounder.hpp): Philox4x32-10 with key = seed, counter =
// ((i >> 6) * 16 + (i & 15), step, layer), word (i >> 4) & 3.
GALORE_HOST_DEVICE std::uint32_t stochastic_bits(std::uint64_t seed, std::uint32_t layer, std::uint32_t step,
                                                 std::uint64_t i) {
  const std::uint64_t counter = (i >> 6) * 16 + (i & 15);
  const Philox4x32 p = philox4x32_10(static_cast<std::uint32_t>(counter), static_cast<std::uint32_t>(counter >> 32),
                                     step, layer, static_cast<std::uint32_t>(seed),
                                     static_cast<std::uint32_t>(seed >> 32));
  return p.v[(i >> 4) & 3];
}

}  // namespace galore::math
