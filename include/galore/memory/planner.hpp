// galore: predicting a training run's memory without allocating it.
//
// Given a model's parameters and an optimizer facade (used as a prototype: no
// layer is registered), the planner adds up what the facade's own formulas say
// its layers will hold, so a plan equals what state_bytes() reports after the
// first step. Weights and gradients are added from their formats.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "../quantized_weight.hpp"
#include "../types.hpp"
#include "llama.hpp"

namespace galore::memory {

enum class WeightFormat { Float32, BFloat16, Int8 };

inline std::size_t bytes_per_element(WeightFormat f) {
  return f == WeightFormat::Float32 ? 4 : f == WeightFormat::BFloat16 ? 2 : 1;
}

struct PlanOptions {
  WeightFormat weights = WeightFormat::BFloat16;            // parameters that are not projected (not Int8)
  WeightFormat projected_weights = WeightFormat::BFloat16;  // Int8: QuantizedWeight<8> with int8_group (Q-GaLore)
  Index int8_group = 256;
  std::size_t gradient_bytes = 2;   // per element (bf16 gradients)
  bool per_layer_updates = false;   // step each layer in the backward pass and free its gradient
};

struct Footprint {
  std::size_t weights = 0;
  std::size_t gradients = 0;        // peak bytes of gradients held at once
  std::size_t optimizer_state = 0;  // Adam moments (and the lazy schedule's small state)
  std::size_t projections = 0;      // stored projection matrices
  std::size_t total() const { return weights + gradients + optimizer_state + projections; }
};

inline std::size_t weight_bytes(const Parameter& p, const PlanOptions& o) {
  if (p.projected && o.projected_weights == WeightFormat::Int8)
    return QuantizedWeight<8>::bytes_for(p.shape, o.int8_group);
  const WeightFormat f = p.projected ? o.projected_weights : o.weights;
  detail::require(f != WeightFormat::Int8, "only projected weights can be planned as INT8 (parameter '", p.name, "')");
  return bytes_per_element(f) * static_cast<std::size_t>(p.shape.size());
}

// `opt` is any GaLoreOptimizer; projected parameters are planned as add_layer
// with the optimizer's projection options, the others as add_dense. With
// `all_dense`, every parameter is planned as add_dense (full-rank AdamW).
template <class Optimizer>
Footprint plan(const Optimizer& opt, const std::vector<Parameter>& params, const PlanOptions& o,
               bool all_dense = false) {
  Footprint f;
  std::size_t largest_gradient = 0;
  for (const Parameter& p : params) {
    const bool projected = p.projected && !all_dense;
    f.weights += weight_bytes(p, o);
    const std::size_t g = o.gradient_bytes * static_cast<std::size_t>(p.shape.size());
    f.gradients += g;
    largest_gradient = std::max(largest_gradient, g);
    if (projected) {
      const auto& po = opt.projection_options();
      f.optimizer_state += opt.predict_projected_moments_bytes(p.shape, po);
      const std::size_t proj = opt.predict_projector_bytes(p.shape, po);
      const std::size_t basis = Optimizer::projector_type::basis_footprint(p.shape, po, opt.quant_policy());
      f.projections += basis;
      f.optimizer_state += proj - basis;  // the schedule's state
    } else {
      f.optimizer_state += opt.predict_dense_bytes(p.shape);
    }
  }
  if (o.per_layer_updates) f.gradients = largest_gradient;
  return f;
}

}  // namespace galore::memory
