// galore: one GaLore step of one layer, and one plain AdamW step, as free functions.
//
// These are the building blocks of the optimizer facades; a trainer that keeps
// its own per-layer state can call them directly.
//
//   GaLore (galore_torch's GaLoreProjector and AdamW):
//     refresh the basis if due; R = project(G); D = Adam(R)
//     W = (1 - lr*wd) * (W - scale * back(D))     (one GEMM with alpha and beta)
//   AdamW: the same with R = G and no projection.
//
// A step either applies, or is skipped (StepStatus::SkippedNonFinite) with W, the
// moments, the projector (basis, SVD count, schedule state) and the step counter
// untouched. It is skipped when G holds NaN or Inf, when R (G for AdamW) holds an
// element beyond +-AdamConfig::max_input (whose square could overflow the second
// moment), or when a due refresh cannot compute a finite basis. A step that throws
// (shapes, step < 0, an exception from a policy) changes nothing either: every
// check runs first, and a new basis is computed and stored aside, then put in
// force only once the step is sure to apply.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../detail/elementwise.hpp"
#include "../projection.hpp"
#include "../projector.hpp"
#include "../types.hpp"
#include "adam_config.hpp"
#include "step_result.hpp"
#include "step_workspace.hpp"
#include "weight_access.hpp"

namespace galore {

// `step` is the layer's count of applied steps (galore_torch's state["step"]); it
// is the refresh clock before the update and Adam's t - 1. Scratch comes from
// `ws`, which a caller keeps between steps: a step that does not refresh then
// allocates nothing (a refresh allocates inside the SVD policy).
template <class ProjectorT, class AdamT, class WeightT, class GradT>
StepResult galore_step(ProjectorT& projector, const AdamT& adam, typename AdamT::Moments& moments,
                       std::int64_t& step, WeightT&& W, const ConstMatrixRef<GradT>& G, StepWorkspace& ws) {
  const Shape shape = projector.shape(), low = projector.low_rank_shape();
  detail::require(shape_of(G) == shape && detail::weight_shape(W) == shape, "the projector is for ", shape.rows,
                  "x", shape.cols, " but got W ", detail::weight_shape(W).rows, "x", detail::weight_shape(W).cols,
                  " and G ", G.rows(), "x", G.cols());
  detail::require(moments.shape() == low, "moments are ", moments.shape().rows, "x", moments.shape().cols,
                  " but the projected gradient is ", low.rows, "x", low.cols);
  detail::require(step >= 0, "the step counter must be >= 0 (got ", step, ")");
  constexpr StepResult skipped{StepStatus::SkippedNonFinite, false};

  // One buffer for R, D, the both-sided scratch (G Q^T, then P D: m x r each)
  // and one panel of G or W in float.
  const Index both = projector.side() == Side::Both ? shape.rows * projector.options().rank : 0;
  const Index panel = std::max(detail::panel_floats(W), detail::panel_floats(G));
  float* const buffer = ws.floats(static_cast<std::size_t>(2 * low.size() + both + panel));
  Eigen::Map<MatrixF> R(buffer, low.rows, low.cols);
  Eigen::Map<MatrixF> D(buffer + low.size(), low.rows, low.cols);
  float* const both_scratch = both > 0 ? buffer + 2 * low.size() : nullptr;
  float* const panel_scratch = buffer + 2 * low.size() + both;

  // Nothing below changes any state until the step is sure to apply: a new basis
  // waits in `pending`.
  typename ProjectorT::Pending pending;
  StepResult result;
  auto prepare_refresh = [&] {
    bool ok = false;
    detail::with_float(G, [&](ConstMatrixRef<float> Gf) { ok = projector.prepare_refresh(Gf, step, pending); });
    return ok;
  };
  if (projector.refresh_due(step)) {
    // A refresh must not see NaN: check G itself only then (the SVD costs far more).
    if (!detail::all_finite(G) || !prepare_refresh()) return skipped;
    result.refreshed = true;
  }
  BasisView basis = projector.basis(pending, ws.basis());
  detail::project_gradient(basis, G, R, panel_scratch, both_scratch);
  // NaN and Inf in G reach R through the product, so R's check covers G's; R's
  // range bounds the moments (a pass over the small R only).
  if (!detail::adam_input_in_range<float>(R)) return skipped;

  // A drift-watching schedule sees the fraction of G's energy the basis captured
  // (|R|^2 / |G|^2 for an orthonormal basis: one extra read of G) and may ask
  // for a refresh now.
  if constexpr (ProjectorT::watches_drift) {
    if (projector.wants_measurement(step, result.refreshed)) {
      const double g2 = detail::squared_norm(G);
      const double r2 = R.template cast<double>().squaredNorm();
      const double captured = g2 > 0.0 ? r2 / g2 : 1.0;
      if (projector.prepare_measurement(step, captured, result.refreshed, pending)) {
        if (!prepare_refresh()) return skipped;
        result.refreshed = true;
        basis = projector.basis(pending, ws.basis());
        detail::project_gradient(basis, G, R, panel_scratch, both_scratch);
        if (!detail::adam_input_in_range<float>(R)) return skipped;
      }
    }
  }

  // The step applies: R is in range, so the moments stay finite and D is clamped.
  adam.update_in_range(moments, R, step + 1, [&D](Index off, const float* d, Index len) {
    std::copy(d, d + len, D.data() + off);
  });
  const bool new_basis = pending.has_basis;
  projector.commit(pending);
  ++step;
  if (new_basis) basis = projector.basis(ws.basis());  // the committed storage (the view pointed into `pending`)
  Eigen::Map<MatrixF> PN(both_scratch, both > 0 ? shape.rows : 0, both > 0 ? projector.options().rank : 0);
  const BackFactors factors = back_factors(basis, D, PN);
  const float decay = adam.config().decay_factor();
  const float alpha = -decay * projector.scale();
  detail::update_in_float(std::forward<WeightT>(W), panel_scratch, [&](MatrixRef<float> rows, Index row0) {
    add_back_rows(factors, alpha, decay, rows, row0);
  });
  return result;
}

// The same with a workspace of its own (allocated for this call).
template <class ProjectorT, class AdamT, class WeightT, class GradT>
StepResult galore_step(ProjectorT& projector, const AdamT& adam, typename AdamT::Moments& moments,
                       std::int64_t& step, WeightT&& W, const ConstMatrixRef<GradT>& G) {
  StepWorkspace ws;
  return galore_step(projector, adam, moments, step, std::forward<WeightT>(W), G, ws);
}

// Plain AdamW (R = G) for parameters that are not projected. A bf16 G is
// converted to float in `ws` (a steady step allocates nothing).
template <class AdamT, class T>
StepResult adamw_step(const AdamT& adam, typename AdamT::Moments& moments, std::int64_t& step,
                      MatrixRef<T> W, const ConstMatrixRef<T>& G, StepWorkspace& ws) {
  detail::require(shape_of(W) == shape_of(G) && moments.shape() == shape_of(G), "W is ", W.rows(), "x", W.cols(),
                  ", G ", G.rows(), "x", G.cols(), " and the moments ", moments.shape().rows, "x",
                  moments.shape().cols, "; all three must match");
  detail::require(step >= 0, "the step counter must be >= 0 (got ", step, ")");
  // The one pass over G before the update: NaN, Inf, or a square that could overflow.
  if (!detail::adam_input_in_range(G)) return {StepStatus::SkippedNonFinite, false};
  const float decay = adam.config().decay_factor();
  const Index cols = W.cols();
  auto update = [&](ConstMatrixRef<float> Gf) {
    adam.update_in_range(moments, Gf, step + 1, [&](Index off, const float* d, Index len) {
      detail::for_each_row_segment(cols, off, len, [&](Index row, Index col0, Index k0, Index n) {
        T* w = &W(row, col0);
        for (Index k = 0; k < n; ++k)
          w[k] = static_cast<T>((static_cast<float>(w[k]) - d[k0 + k]) * decay);
      });
    });
  };
  if constexpr (std::is_same_v<T, float>) {
    update(G);
  } else {
    Eigen::Map<MatrixF> Gf(ws.floats(static_cast<std::size_t>(G.size())), G.rows(), G.cols());
    Gf = G.template cast<float>();
    update(Gf);
  }
  ++step;
  return {};
}

// The same with a workspace of its own (allocated for this call).
template <class AdamT, class T>
StepResult adamw_step(const AdamT& adam, typename AdamT::Moments& moments, std::int64_t& step,
                      MatrixRef<T> W, const ConstMatrixRef<T>& G) {
  StepWorkspace ws;
  return adamw_step(adam, moments, step, W, G, ws);
}

}  // namespace galore
