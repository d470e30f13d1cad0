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

#include <cstdint>

#include "../detail/elementwise.hpp"
#include "../projection.hpp"
#include "../projector.hpp"
#include "../types.hpp"
#include "adam_config.hpp"
#include "step_result.hpp"
#include "weight_access.hpp"

namespace galore {

// `step` is the layer's count of applied steps (galore_torch's state["step"]); it
// is the refresh clock before the update and Adam's t - 1.
template <class ProjectorT, class AdamT, class WeightT, class GradT>
StepResult galore_step(ProjectorT& projector, const AdamT& adam, typename AdamT::Moments& moments,
                       std::int64_t& step, WeightT&& W, const ConstMatrixRef<GradT>& G) {
  const Shape shape = projector.shape(), low = projector.low_rank_shape();
  detail::require(shape_of(G) == shape && detail::weight_shape(W) == shape, "the projector is for ", shape.rows,
                  "x", shape.cols, " but got W ", detail::weight_shape(W).rows, "x", detail::weight_shape(W).cols,
                  " and G ", G.rows(), "x", G.cols());
  detail::require(moments.shape() == low, "moments are ", moments.shape().rows, "x", moments.shape().cols,
                  " but the projected gradient is ", low.rows, "x", low.cols);
  detail::require(step >= 0, "the step counter must be >= 0 (got ", step, ")");
  constexpr StepResult skipped{StepStatus::SkippedNonFinite, false};

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
  BasisScratch scratch;
  BasisView basis = projector.basis(pending, scratch);
  MatrixF R;
  detail::project_gradient(basis, G, R);
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
        basis = projector.basis(pending, scratch);
        detail::project_gradient(basis, G, R);
        if (!detail::adam_input_in_range<float>(R)) return skipped;
      }
    }
  }

  // The step applies: R is in range, so the moments stay finite and D is clamped.
  MatrixF D;
  adam.update_in_range(moments, R, step + 1, D);
  const bool new_basis = pending.has_basis;
  projector.commit(pending);
  ++step;
  if (new_basis) basis = projector.basis(scratch);  // the committed storage (the view pointed into `pending`)
  MatrixF PN;
  const BackFactors factors = back_factors(basis, D, PN);
  const float decay = adam.config().decay_factor();
  const float alpha = -decay * projector.scale();
  detail::update_in_float(std::forward<WeightT>(W), [&](MatrixRef<float> rows, Index row0) {
    add_back_rows(factors, alpha, decay, rows, row0);
  });
  return result;
}

// Plain AdamW (R = G) for parameters that are not projected.
template <class AdamT, class T>
StepResult adamw_step(const AdamT& adam, typename AdamT::Moments& moments, std::int64_t& step,
                      MatrixRef<T> W, const ConstMatrixRef<T>& G) {
  detail::require(shape_of(W) == shape_of(G) && moments.shape() == shape_of(G), "W is ", W.rows(), "x", W.cols(),
                  ", G ", G.rows(), "x", G.cols(), " and the moments ", moments.shape().rows, "x",
                  moments.shape().cols, "; all three must match");
  detail::require(step >= 0, "the step counter must be >= 0 (got ", step, ")");
  // The one pass over G before the update: NaN, Inf, or a square that could overflow.
  if (!detail::adam_input_in_range(G)) return {StepStatus::SkippedNonFinite, false};
  const float decay = adam.config().decay_factor();
  const Index cols = W.cols();
  detail::with_float(G, [&](ConstMatrixRef<float> Gf) {
    adam.update_in_range(moments, Gf, step + 1, [&](Index off, const float* d, Index len) {
      detail::for_each_row_segment(cols, off, len, [&](Index row, Index col0, Index k0, Index n) {
        T* w = &W(row, col0);
        for (Index k = 0; k < n; ++k)
          w[k] = static_cast<T>((static_cast<float>(w[k]) - d[k0 + k]) * decay);
      });
    });
  });
  ++step;
  return {};
}

}  // namespace galore
