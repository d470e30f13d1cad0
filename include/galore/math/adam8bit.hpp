// galore: the Adam update of one element as bitsandbytes' 8-bit blockwise
// optimizers compute it (kOptimizer32bit2State / kOptimizerStatic8bit2StateBlockwise),
// for both backends:
//
//   m' = m*b1 + (1-b1)*g        v' = v*b2 + (1-b2)*g*g
//   d  = step * (m' / (sqrt(v') + eps * c2))
//   c1 = 1 - b1^t,  c2 = sqrt(1 - b2^t),  step = lr * c2 / c1     (float32, as bitsandbytes)
//
// with bias correction; without it c1 = c2 = 1. Unlike galore_torch's AdamW
// (adam.hpp), the correction scales eps and is computed in float32. Products
// that feed sums go through mul/add (fp.hpp), so both backends round alike.
// bitsandbytes takes b^t from powf, which is not correctly rounded everywhere
// (CUDA's has 2 ulp of error, glibc's 0.8); here b^t is a product of squares in
// float64 rounded once to float32 (power_of below): within an ulp of powf, and
// the same bits on every backend, so a GPU kernel computes the coefficients from
// its own step count.
// No Eigen, no CUDA headers: host code and device code share this text.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "../config.hpp"
#include "adam.hpp"
#include "fp.hpp"

namespace galore::math {

struct Adam8bitCoefficients {
  float b1, a1;  // beta1 and 1 - beta1 (in float, as bitsandbytes)
  float b2, a2;  // beta2 and 1 - beta2
  float step;    // lr * c2 / c1, at most FLT_MAX (an Inf step would make 0 * Inf = NaN)
  float eps;     // eps * c2 (> 0 for every valid AdamConfig: eps >= 1e-30, c2 >= 2^-12)
};

// b^t (t >= 0) by binary powering in float64: multiplications only (nothing a
// compiler may contract), each correctly rounded on every backend, so the result
// is the same bits everywhere. Relative error before the final rounding at most
// about t * 2^-52, far below float32's 2^-24 at the step counts where 1 - b^t
// differs from 1.
GALORE_HOST_DEVICE float power_of(float b, std::int64_t t) {
  double result = 1.0, square = static_cast<double>(b);
  for (; t > 0; t >>= 1) {
    if (t & 1) result *= square;
    square *= square;
  }
  return static_cast<float>(result);
}

GALORE_HOST_DEVICE Adam8bitCoefficients adam8bit_coefficients(double lr, double beta1, double beta2, double eps,
                                                               std::int64_t t, bool correct_bias) {
  Adam8bitCoefficients c;
  c.b1 = static_cast<float>(beta1);
  c.b2 = static_cast<float>(beta2);
  c.a1 = 1.0f - c.b1;
  c.a2 = 1.0f - c.b2;
  const float corr1 = correct_bias ? 1.0f - power_of(c.b1, t) : 1.0f;
  const float corr2 = correct_bias ? sqrtf(1.0f - power_of(c.b2, t)) : 1.0f;
  c.step = static_cast<float>(lr) * corr2 / corr1;
  if (!(c.step <= FLT_MAX)) c.step = FLT_MAX;
  c.eps = corr2 * static_cast<float>(eps);
  return c;
}

// One element on an accepted input (in_adam_range(g)); d is not yet clamped
// (the CPU clamps in a separate pass, which vectorizes better).
GALORE_HOST_DEVICE AdamElement adam8bit_element(float g, float m, float v, const Adam8bitCoefficients& c) {
  AdamElement e;
  e.m = add(mul(m, c.b1), mul(c.a1, g));
  e.v = add(mul(v, c.b2), mul(mul(c.a2, g), g));
  e.d = c.step * (e.m / (sqrtf(e.v) + c.eps));
  return e;
}

}  // namespace galore::math
