// galore: GaLoreOptimizer, the per-layer optimizer facade.
//
// It owns every layer's state (projector, moments, step counter). A trainer
// registers its parameters once, then calls step(layer, W, G) for each layer as
// soon as that layer's gradient exists, possibly from several threads for
// different layers (docs/api.md says what is thread-safe). Projected layers run
// GaLore; layers added with add_dense run plain AdamW with the same settings.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../projector.hpp"
#include "../quant/minmax.hpp"
#include "../quantized_weight.hpp"
#include "../rounding/stochastic_rounder.hpp"
#include "../schedule/lazy.hpp"
#include "../types.hpp"
#include "blockwise8bit_state.hpp"
#include "galore_step.hpp"
#include "low_rank_adam.hpp"
#include "step_result.hpp"
#include "step_workspace.hpp"

namespace galore {

namespace checkpoint {
struct Access;  // galore/checkpoint.hpp: saves and restores a facade's layers
}

// RounderT re-quantizes QuantizedWeight layers after their update (Q-GaLore); it
// is unused for float and bf16 weights.
template <class ProjectorT = Projector<>, class AdamT = LowRankAdam<>, class RounderT = StochasticRounder<8>>
class GaLoreOptimizer {
 public:
  using projector_type = ProjectorT;
  using adam_type = AdamT;
  using rounder_type = RounderT;
  static constexpr int weight_bits = RounderT::bits;
  using Moments = typename AdamT::Moments;
  using SVDPolicy = typename ProjectorT::svd_policy;
  using QuantPolicy = typename ProjectorT::quant_policy;
  using SchedulePolicy = typename ProjectorT::schedule_policy;

  explicit GaLoreOptimizer(ProjectorOptions projection = {}, AdamT adam = AdamT{},
                           SchedulePolicy schedule = {}, SVDPolicy svd = {}, QuantPolicy quant = {},
                           RounderT rounder = RounderT{})
      : projection_(projection),
        adam_(std::move(adam)),
        schedule_(std::move(schedule)),
        svd_(std::move(svd)),
        quant_(std::move(quant)),
        rounder_(std::move(rounder)) {
    // Every setting is checked here, before any layer exists: projection options
    // (those that do not depend on a shape), the schedule, and the SVD, quant and
    // rounding policies that provide validate(). The Adam policy checked its own.
    validate_projector_options(projection_);
    (void)schedule_.init();
    detail::validate_policy(svd_);
    detail::validate_policy(quant_);
    detail::validate_policy(rounder_);
  }

  // A GaLore-projected matrix, with the optimizer's projection options.
  LayerId add_layer(Shape shape, std::string name = {}) {
    return add_layer(shape, projection_, std::move(name));
  }

  // A GaLore-projected matrix with its own projection options (rank, type, scale).
  LayerId add_layer(Shape shape, const ProjectorOptions& options, std::string name = {}) {
    Layer layer = make_layer(shape, std::move(name));
    layer.projector.emplace(shape, options, schedule_, svd_, quant_);
    layer.moments = adam_.init(layer.projector->low_rank_shape());
    return push(std::move(layer));
  }

  // A parameter trained by plain AdamW (biases, norms, embeddings).
  LayerId add_dense(Shape shape, std::string name = {}) {
    Layer layer = make_layer(shape, std::move(name));
    layer.moments = adam_.init(shape);
    return push(std::move(layer));
  }

  StepResult step(LayerId id, MatrixRef<float> W, ConstMatrixRef<float> G) {
    return step_impl<float>(id, W, G);
  }
  StepResult step(LayerId id, MatrixRef<bfloat16> W, ConstMatrixRef<bfloat16> G) {
    return step_impl<bfloat16>(id, W, G);
  }
  // A weight held as Bits-bit codes (Q-GaLore): dequantized a panel at a time,
  // updated, and re-quantized with the rounder; the rounding of element i is a
  // function of (rounder seed, layer index, step, i). Projected layers only.
  StepResult step(LayerId id, QuantizedWeight<weight_bits>& W, ConstMatrixRef<float> G) {
    return step_quantized<float>(id, W, G);
  }
  StepResult step(LayerId id, QuantizedWeight<weight_bits>& W, ConstMatrixRef<bfloat16> G) {
    return step_quantized<bfloat16>(id, W, G);
  }

  // Contiguous row-major buffers of the registered shape.
  StepResult step(LayerId id, float* W, const float* G) { return step_raw(id, W, G); }
  StepResult step(LayerId id, bfloat16* W, const bfloat16* G) { return step_raw(id, W, G); }

  // For learning-rate schedules; not to be called while steps run on other threads.
  void set_lr(double lr) { adam_.set_lr(lr); }
  const AdamConfig& adam_config() const { return adam_.config(); }
  const AdamT& adam() const { return adam_; }
  const RounderT& rounder() const { return rounder_; }
  const SchedulePolicy& schedule_policy() const { return schedule_; }
  const SVDPolicy& svd_policy() const { return svd_; }
  const QuantPolicy& quant_policy() const { return quant_; }
  const ProjectorOptions& projection_options() const { return projection_; }

  std::size_t num_layers() const { return layers_.size(); }
  bool is_projected(LayerId id) const { return layer(id).projector.has_value(); }
  const ProjectorT& projector(LayerId id) const {
    const Layer& l = layer(id);
    detail::require(l.projector.has_value(), "layer ", describe(l), " is dense; it has no projector");
    return *l.projector;
  }
  const Moments& moments(LayerId id) const { return layer(id).moments; }
  std::int64_t steps(LayerId id) const { return layer(id).step; }

  LayerStats stats(LayerId id) const {
    const Layer& l = layer(id);
    LayerStats s;
    s.name = l.name;
    s.shape = l.shape;
    s.projected = l.projector.has_value();
    s.steps = l.step;
    s.skipped_steps = l.skipped;
    if (l.projector) {
      s.svd_count = l.projector->svd_count();
      s.update_gap = l.projector->update_gap();
    }
    s.state_bytes = layer_bytes(l);
    return s;
  }

  // Predictions, without allocating: what a layer registered with add_layer
  // (projection options as given, default the optimizer's) or add_dense will
  // hold once it has stepped. The memory planner is built on these.
  std::size_t predict_moments_bytes(Shape s) const { return adam_.moments_bytes(s); }
  std::size_t predict_projected_moments_bytes(Shape s, const ProjectorOptions& o) const {
    return adam_.moments_bytes(galore::low_rank_shape(resolve_side(o.type, s.rows, s.cols), s, o.rank));
  }
  std::size_t predict_projector_bytes(Shape s, const ProjectorOptions& o) const {
    return ProjectorT::footprint(s, o, quant_, schedule_);
  }
  std::size_t predict_layer_bytes(Shape s) const { return predict_layer_bytes(s, projection_); }
  std::size_t predict_layer_bytes(Shape s, const ProjectorOptions& o) const {
    return predict_projected_moments_bytes(s, o) + predict_projector_bytes(s, o);
  }
  std::size_t predict_dense_bytes(Shape s) const { return predict_moments_bytes(s); }

  // Bytes of optimizer state held now: moments and projectors of every layer.
  std::size_t state_bytes() const {
    std::size_t b = 0;
    for (const Layer& l : layers_) b += layer_bytes(l);
    return b;
  }

  // Bytes of step scratch held (not state): one workspace per step that ran
  // concurrently with others, each grown to the largest layer it served: R and
  // D of the low-rank shape, m x r floats on two-sided projections, a float
  // panel of about 64 Ki elements for bf16 or quantized weights (all of G for a
  // bf16 dense layer), and the dequantized basis of a quantizing projector.
  std::size_t workspace_bytes() const { return workspaces_.bytes(); }

 private:
  friend struct checkpoint::Access;

  struct Layer {
    std::string name;
    Shape shape;
    std::optional<ProjectorT> projector;
    Moments moments;
    std::int64_t step = 0;
    std::int64_t skipped = 0;
  };

  Layer make_layer(Shape shape, std::string name) const {
    detail::require(shape.rows > 0 && shape.cols > 0, "layer '", name, "' needs a positive shape (got ",
                    shape.rows, "x", shape.cols, ")");
    Layer l;
    l.name = std::move(name);
    l.shape = shape;
    return l;
  }

  LayerId push(Layer&& l) {
    layers_.push_back(std::move(l));
    return LayerId{layers_.size() - 1};
  }

  static std::string describe(const Layer& l) {
    return l.name.empty() ? std::string("(unnamed)") : "'" + l.name + "'";
  }

  const Layer& layer(LayerId id) const {
    detail::require(id.index < layers_.size(), "unknown layer id ", id.index, " (", layers_.size(),
                    " layers registered)");
    return layers_[id.index];
  }
  Layer& layer(LayerId id) { return const_cast<Layer&>(std::as_const(*this).layer(id)); }

  static std::size_t layer_bytes(const Layer& l) {
    return l.moments.bytes() + (l.projector ? l.projector->bytes() : 0);
  }

  template <class T>
  StepResult step_impl(LayerId id, MatrixRef<T> W, const ConstMatrixRef<T>& G) {
    Layer& l = layer(id);
    detail::require(shape_of(W) == l.shape && shape_of(G) == l.shape, "layer ", describe(l),
                    " was registered as ", l.shape.rows, "x", l.shape.cols, " but got W ", W.rows(),
                    "x", W.cols(), " and G ", G.rows(), "x", G.cols());
    const auto ws = workspaces_.acquire();
    const StepResult r = l.projector ? galore_step(*l.projector, adam_, l.moments, l.step, W, G, *ws)
                                     : adamw_step(adam_, l.moments, l.step, W, G, *ws);
    if (!r.applied()) ++l.skipped;
    return r;
  }

  template <class T>
  StepResult step_quantized(LayerId id, QuantizedWeight<weight_bits>& W, const ConstMatrixRef<T>& G) {
    Layer& l = layer(id);
    detail::require(l.projector.has_value(), "layer ", describe(l),
                    " is dense; quantized weights are supported on projected layers only");
    detail::require(W.shape() == l.shape && shape_of(G) == l.shape, "layer ", describe(l), " was registered as ",
                    l.shape.rows, "x", l.shape.cols, " but got W ", W.rows(), "x", W.cols(), " and G ", G.rows(),
                    "x", G.cols());
    const auto encoder = rounder_.bind(static_cast<std::uint32_t>(id.index), static_cast<std::uint32_t>(l.step + 1));
    const auto ws = workspaces_.acquire();
    const StepResult r = galore_step(*l.projector, adam_, l.moments, l.step, requantize_with(W, encoder), G, *ws);
    if (!r.applied()) ++l.skipped;
    return r;
  }

  template <class T>
  StepResult step_raw(LayerId id, T* W, const T* G) {
    detail::require(W != nullptr && G != nullptr, "step() got a null weight or gradient pointer");
    const Shape s = layer(id).shape;
    Eigen::Map<Matrix<T>> w(W, s.rows, s.cols);
    Eigen::Map<const Matrix<T>> g(G, s.rows, s.cols);
    return step_impl<T>(id, w, g);
  }

  ProjectorOptions projection_;
  AdamT adam_;
  SchedulePolicy schedule_;
  SVDPolicy svd_;
  QuantPolicy quant_;
  RounderT rounder_;
  std::vector<Layer> layers_;
  StepWorkspacePool workspaces_;
};

// The common combinations.
// galore_torch's GaLoreAdamW: float32 basis and moments, fixed refresh gap.
using GaLoreAdamW = GaLoreOptimizer<Projector<svd::Exact, quant::None, schedule::FixedGap>,
                                    LowRankAdam<state::Float32>>;
// galore_torch's GaLoreAdamW8bit: bitsandbytes 8-bit blockwise moments.
using GaLoreAdamW8bit = GaLoreOptimizer<Projector<svd::Exact, quant::None, schedule::FixedGap>,
                                        LowRankAdam<state::Blockwise8bit>>;
// q_galore_torch's QGaLoreAdamW8bit: INT4 basis, lazy layer-adaptive refresh,
// 8-bit moments, and INT8 weights re-quantized with stochastic rounding.
using QGaLoreAdamW8bit = GaLoreOptimizer<Projector<svd::Exact, quant::Int4, schedule::Lazy>,
                                         LowRankAdam<state::Blockwise8bit>, StochasticRounder<8>>;

}  // namespace galore
