// galore: the Adam update of one element (galore_torch's AdamW), for both backends.
//
//   m' = b1*m + (1-b1)*g        v' = b2*v + (1-b2)*g*g
//   d  = step * m' / (sqrt(v') + eps)          (the caller applies W -= scale * back(d))
//
// step is lr * sqrt(1-b2^t) / (1-b1^t) with bias correction, else lr; computed in
// double and rounded to float once, on the host (CPU) or per launch (GPU).
// No Eigen, no CUDA headers: host code and device code share this text.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../config.hpp"
#include "fp.hpp"

namespace galore::math {

struct AdamCoefficients {
  float b1, a1;  // beta1 and 1 - beta1
  float b2, a2;  // beta2 and 1 - beta2
  float eps;
};

struct AdamElement {
  float m, v, d;
};

// The range of inputs the float32 math holds. A gradient element beyond
// +-kMaxInput (2^60) could overflow g*g, and so v (float32 overflows at about
// 2^128): a step whose gradient holds one is skipped as a whole, like one
// holding NaN or Inf. Every element of d is clamped to +-kMaxUpdate (2^64), so
// no accepted input makes the update Inf.
inline constexpr float kMaxInput = 1152921504606846976.0f;     // 2^60
inline constexpr float kMaxUpdate = 18446744073709551616.0f;   // 2^64
inline constexpr std::uint32_t kMaxInputBits = 0x5d800000u;    // the bits of 2^60

// The bit pattern of x, on the host and on the device.
GALORE_HOST_DEVICE std::uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

// |x| <= kMaxInput, false for NaN and Inf; on the bit pattern, so that it is
// exact under -ffast-math and vectorizes.
GALORE_HOST_DEVICE bool in_adam_range(float x) {
  const std::uint32_t u = float_bits(x);
  return (u & 0x7fffffffu) <= kMaxInputBits;
}

// d clamped to +-kMaxUpdate, written with compares (as std::min(std::max(d, lo),
// hi)) rather than fminf/fmaxf: the same result on both backends, NaN included
// (it stays NaN), and a loop over it vectorizes on the host without
// -ffinite-math-only.
GALORE_HOST_DEVICE float clamp_update(float d) {
  const float lo = d < -kMaxUpdate ? -kMaxUpdate : d;
  return kMaxUpdate < lo ? kMaxUpdate : lo;
}

// One element of Adam on an accepted input (in_adam_range(g)). Products that
// feed sums go through mul/add (fp.hpp), so the GPU's result is the CPU's, bit
// for bit, whatever the compiler's contraction setting.
GALORE_HOST_DEVICE AdamElement adam_element(float g, float m, float v, float step, const AdamCoefficients& c) {
  AdamElement e;
  e.m = add(mul(c.b1, m), mul(c.a1, g));
  e.v = add(mul(c.b2, v), mul(c.a2, mul(g, g)));
  e.d = clamp_update(step * e.m / (sqrtf(e.v) + c.eps));
  return e;
}

// galore_torch's step size at step t (1-based).
GALORE_HOST_DEVICE double adam_step_size(double lr, double beta1, double beta2, std::int64_t t, bool correct_bias) {
  if (!correct_bias) return lr;
  const double bc1 = 1.0 - pow(beta1, static_cast<double>(t));
  const double bc2 = 1.0 - pow(beta2, static_cast<double>(t));
  return lr * sqrt(bc2) / bc1;
}

// The same as the float32 kernels use it, at most FLT_MAX (an Inf step size
// would turn m = 0 into 0 * Inf = NaN).
GALORE_HOST_DEVICE float adam_step_size_float(double lr, double beta1, double beta2, std::int64_t t, bool correct_bias) {
  const double s = adam_step_size(lr, beta1, beta2, t, correct_bias);
  return s < 3.4028234663852886e38 ? static_cast<float>(s) : 3.4028234663852886e38f;
}

// Finite test on the bit pattern (exponent not all ones): exact under
// -ffast-math and on both backends.
GALORE_HOST_DEVICE bool is_finite(float x) {
  const std::uint32_t u = float_bits(x);
  return (u & 0x7f800000u) != 0x7f800000u;
}

}  // namespace galore::math
