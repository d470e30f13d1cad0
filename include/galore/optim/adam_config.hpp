// galore: Adam's hyperparameters, kept apart from any state (galore_torch's AdamW).
// Backend-free: the CPU and CUDA optimizers take the same AdamConfig, and the
// formulas it names live in math/adam.hpp, shared by both.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "../config.hpp"
#include "../math/adam.hpp"

namespace galore {

struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-6;           // galore_torch's default; inside the denominator
  double weight_decay = 0.0;   // decoupled, applied after the update
  bool correct_bias = true;

  // The largest |g| an Adam step accepts (2^60, about 1.2e18). Beyond it g*g, and so
  // the second moment, can overflow float32 (at 1.8e19); steps skip such gradients.
  static constexpr float max_input = math::kMaxInput;  // 2^60
  // Every element of the step d = step_size * m / (sqrt(v) + eps) is clamped to
  // +-max_update (2^64, about 1.8e19), so no finite input makes it Inf.
  static constexpr float max_update = math::kMaxUpdate;  // 2^64
  // The smallest eps accepted: with eps = 0 a zero or tiny gradient gives 0/0 or x/0,
  // and an eps that is 0 or subnormal in float32 does the same.
  static constexpr double min_eps = 1e-30;

  // galore_torch's checks (0 <= lr, 0 <= beta < 1, 0 <= eps), tightened to what
  // float32 math holds: lr representable in float32, beta below 1 after rounding
  // to float32, eps >= min_eps, and 1 - lr * weight_decay >= 0.
  void validate() const {
    detail::require(std::isfinite(lr) && lr >= 0.0 && lr <= static_cast<double>(FLT_MAX),
                    "learning rate must be >= 0 and finite in float32 (got ", lr, ")");
    detail::require(beta1 >= 0.0 && beta1 < 1.0 && static_cast<float>(beta1) < 1.0f,
                    "beta1 must be in [0, 1), and below 1 once rounded to float32 (got ", beta1, ")");
    detail::require(beta2 >= 0.0 && beta2 < 1.0 && static_cast<float>(beta2) < 1.0f,
                    "beta2 must be in [0, 1), and below 1 once rounded to float32 (got ", beta2, ")");
    detail::require(std::isfinite(eps) && eps >= min_eps, "eps must be finite and at least ", min_eps, " (got ", eps,
                    "); with eps = 0 a zero or tiny gradient divides by zero");
    detail::require(std::isfinite(weight_decay) && weight_decay >= 0.0,
                    "weight decay must be finite and >= 0 (got ", weight_decay, ")");
    detail::require(lr * weight_decay <= 1.0, "lr * weight decay must be at most 1 (got ", lr * weight_decay,
                    "); the decoupled weight decay multiplies W by 1 - lr * weight_decay");
  }

  // galore_torch's step size at step t (1-based): lr * sqrt(1 - b2^t) / (1 - b1^t).
  double step_size(std::int64_t t) const { return math::adam_step_size(lr, beta1, beta2, t, correct_bias); }

  // The step size as the float32 kernels use it, at most FLT_MAX (an Inf step size
  // would turn m = 0 into 0 * Inf = NaN).
  float step_size_float(std::int64_t t) const {
    return math::adam_step_size_float(lr, beta1, beta2, t, correct_bias);
  }

  // The factor decoupled weight decay multiplies the updated weight by, in [0, 1].
  float decay_factor() const { return static_cast<float>(1.0 - lr * weight_decay); }
};

}  // namespace galore
