// galore: one GaLore step of one layer, and one plain AdamW step, as free functions.
//
// These are the building blocks of the optimizer facades; a trainer that keeps
// its own per-layer state can call them directly.
//
//   GaLore (DESIGN.md 2.1, 2.2):
//     refresh the basis if due; R = project(G); D = Adam(R)
//     W = (1 - lr*wd) * (W - scale * back(D))     (one GEMM with alpha and beta)
//   AdamW: the same with R = G and no projection.
//
// A gradient holding NaN or Inf leaves W, the moments, the projector and the step
// counter untouched and reports StepStatus::SkippedNonFinite.
#pragma once

#include <cstdint>

#include "../detail/elementwise.hpp"
#include "../projection.hpp"
#include "../projector.hpp"
#include "../types.hpp"
#include "step_result.hpp"
#include "weight_access.hpp"

namespace galore {

// `step` is the layer's count of applied steps (galore_torch's state["step"]); it
// is the refresh clock before the update and Adam's t - 1.
template <class ProjectorT, class AdamT, class WeightT, class GradT>
StepResult galore_step(ProjectorT& projector, const AdamT& adam, typename AdamT::Moments& moments,
                       std::int64_t& step, WeightT&& W, const ConstMatrixRef<GradT>& G) {
  StepResult result;
  if (projector.refresh_due(step)) {
    // A refresh must not see NaN: check G itself only then (the SVD costs far more).
    if (!detail::all_finite(G)) return {StepStatus::SkippedNonFinite, false};
    detail::with_float(G, [&](ConstMatrixRef<float> Gf) { projector.refresh(Gf, step); });
    result.refreshed = true;
  }
  BasisScratch scratch;
  BasisView basis = projector.basis(scratch);
  MatrixF R;
  detail::project_gradient(basis, G, R);
  // NaN and Inf in G reach R through the product, so R's check covers G's.
  if (!detail::all_finite<float>(R)) return {StepStatus::SkippedNonFinite, result.refreshed};

  // A drift-watching schedule sees the fraction of G's energy the basis captured
  // (|R|^2 / |G|^2 for an orthonormal basis: one extra read of G) and may ask
  // for a refresh now.
  if constexpr (ProjectorT::watches_drift) {
    if (projector.wants_measurement(step, result.refreshed)) {
      const double g2 = detail::squared_norm(G);
      auto captured = [&] { return g2 > 0.0 ? static_cast<double>(R.squaredNorm()) / g2 : 1.0; };
      if (projector.report_captured(step, captured(), result.refreshed)) {
        detail::with_float(G, [&](ConstMatrixRef<float> Gf) { projector.refresh(Gf, step); });
        result.refreshed = true;
        basis = projector.basis(scratch);
        detail::project_gradient(basis, G, R);
      }
    }
  }

  MatrixF D;
  adam.update(moments, R, step + 1, D);
  MatrixF PN;
  const BackFactors factors = back_factors(basis, D, PN);
  const float decay = adam.config().decay_factor();
  const float alpha = -decay * projector.scale();
  detail::update_in_float(std::forward<WeightT>(W), [&](MatrixRef<float> rows, Index row0) {
    add_back_rows(factors, alpha, decay, rows, row0);
  });
  ++step;
  return result;
}

// Plain AdamW (R = G) for parameters that are not projected.
template <class AdamT, class T>
StepResult adamw_step(const AdamT& adam, typename AdamT::Moments& moments, std::int64_t& step,
                      MatrixRef<T> W, const ConstMatrixRef<T>& G) {
  if (!detail::all_finite(G)) return {StepStatus::SkippedNonFinite, false};
  const float decay = adam.config().decay_factor();
  const Index cols = W.cols();
  detail::with_float(G, [&](ConstMatrixRef<float> Gf) {
    adam.update(moments, Gf, step + 1, [&](Index off, const float* d, Index len) {
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
