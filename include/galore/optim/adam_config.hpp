// galore: Adam's hyperparameters, kept apart from any state (DESIGN.md 2.2).
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.hpp"

namespace galore {

struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-6;           // galore_torch's default; inside the denominator
  double weight_decay = 0.0;   // decoupled, applied after the update
  bool correct_bias = true;

  // Same checks as galore_torch's AdamW, plus finiteness.
  void validate() const {
    detail::require(std::isfinite(lr) && lr >= 0.0, "learning rate must be finite and >= 0 (got ", lr, ")");
    detail::require(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1) (got ", beta1, ")");
    detail::require(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1) (got ", beta2, ")");
    detail::require(std::isfinite(eps) && eps >= 0.0, "eps must be finite and >= 0 (got ", eps, ")");
    detail::require(std::isfinite(weight_decay) && weight_decay >= 0.0,
                    "weight decay must be finite and >= 0 (got ", weight_decay, ")");
  }

  // galore_torch's step size at step t (1-based): lr * sqrt(1 - b2^t) / (1 - b1^t).
  double step_size(std::int64_t t) const {
    if (!correct_bias) return lr;
    const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(t));
    return lr * std::sqrt(bc2) / bc1;
  }

  // The factor decoupled weight decay multiplies the updated weight by.
  float decay_factor() const { return static_cast<float>(1.0 - lr * weight_decay); }
};

}  // namespace galore
