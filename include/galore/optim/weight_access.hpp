// galore: float32 access to weights and gradients held in other formats.
//
// The optimizers do their math in float32. A float matrix is used in place; a
// bf16 one is converted a row panel at a time, so no m x n float temporary
// exists. A QuantizedWeight is dequantized a panel at a time, updated, and
// re-quantized through an encoder (stochastic rounding), panels starting on
// quantization-group boundaries.
#pragma once

#include <algorithm>
#include <exception>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../detail/elementwise.hpp"
#include "../projection.hpp"
#include "../quantized_weight.hpp"
#include "../types.hpp"

namespace galore {

// A quantized weight together with the encoder its update is re-quantized with.
template <int Bits, class Encoder>
struct QuantizedUpdate {
  QuantizedWeight<Bits>& weight;
  Encoder encode;
};

template <int Bits, class Encoder>
QuantizedUpdate<Bits, Encoder> requantize_with(QuantizedWeight<Bits>& weight, Encoder encode) {
  return {weight, std::move(encode)};
}

}  // namespace galore

namespace galore::detail {

// The shape of a weight as galore_step receives it.
template <class Derived>
Shape weight_shape(const Eigen::EigenBase<Derived>& W) {
  return shape_of(W);
}
template <int Bits, class Encoder>
Shape weight_shape(const QuantizedUpdate<Bits, Encoder>& W) {
  return W.weight.shape();
}

// Floats of panel scratch update_in_float and project_gradient need for a weight
// or gradient: none for float (used in place), one panel of rows otherwise.
inline Index panel_floats(const MatrixRef<float>&) { return 0; }
inline Index panel_floats(const ConstMatrixRef<float>&) { return 0; }
inline Index panel_floats(const MatrixRef<bfloat16>& W) {
  return std::min(panel_rows(W.cols()), W.rows()) * W.cols();
}
inline Index panel_floats(const ConstMatrixRef<bfloat16>& G) {
  return std::min(panel_rows(G.cols()), G.rows()) * G.cols();
}
// A quantized weight is updated in row panels that start on group boundaries,
// `threads` of them at once, each in a buffer of `floats` floats of its own.
struct PanelPlan {
  Index rows, count, threads, floats;
};
template <int Bits, class Encoder>
PanelPlan panel_plan(const QuantizedUpdate<Bits, Encoder>& W) {
  const QuantizedWeight<Bits>& q = W.weight;
  PanelPlan p;
  p.rows = panel_rows(q.cols(), q.row_alignment());
  p.count = (q.rows() + p.rows - 1) / p.rows;
#if defined(_OPENMP)
  p.threads = std::min<Index>(p.count, omp_get_max_threads());
#else
  p.threads = 1;
#endif
  p.floats = std::min(p.rows, q.rows()) * q.cols();
  return p;
}
template <int Bits, class Encoder>
Index panel_floats(const QuantizedUpdate<Bits, Encoder>& W) {
  const PanelPlan p = panel_plan(W);
  return p.threads * p.floats;
}

// Calls f(W_rows_as_float, row0) over W and stores what f left there; `panel`
// holds panel_floats(W) floats.
template <class F>
void update_in_float(MatrixRef<float> W, float* /*panel*/, F&& f) {
  f(W, Index{0});
}

template <class F>
void update_in_float(MatrixRef<bfloat16> W, float* panel, F&& f) {
  for_each_panel(W.rows(), panel_rows(W.cols()), [&](Index r0, Index k) {
    Eigen::Map<MatrixF> buf(panel, k, W.cols());
    buf = W.middleRows(r0, k).template cast<float>();
    f(MatrixRef<float>(buf), r0);
    W.middleRows(r0, k) = buf.template cast<bfloat16>();
  });
}

// Panels start on group boundaries and are independent, so with OpenMP each
// thread takes whole panels (dequantize, f, re-quantize in a buffer of its own):
// one parallel region per layer instead of one per phase of every panel, and
// the same codes on any number of threads as long as f's result for a panel
// does not depend on them (the rounding bits are a function of the element
// index). Eigen runs f's products single-threaded inside the region. An
// exception from a panel is rethrown after the region.
template <int Bits, class Encoder, class F>
void update_in_float(QuantizedUpdate<Bits, Encoder> W, float* panel, F&& f) {
  QuantizedWeight<Bits>& q = W.weight;
  const PanelPlan plan = panel_plan(W);
  std::exception_ptr error;
GALORE_OMP(omp parallel for schedule(static) num_threads(static_cast<int>(plan.threads)))
  for (Index p = 0; p < plan.count; ++p) {
    try {
      const Index r0 = p * plan.rows, k = std::min(plan.rows, q.rows() - r0);
#if defined(_OPENMP)
      float* const mine = panel + static_cast<Index>(omp_get_thread_num()) * plan.floats;
#else
      float* const mine = panel;
#endif
      Eigen::Map<MatrixF> buf(mine, k, q.cols());
      q.dequantize_rows(r0, buf);
      f(MatrixRef<float>(buf), r0);
      q.quantize_rows(r0, buf, W.encode);
    } catch (...) {
GALORE_OMP(omp critical(galore_panel_error))
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

// R (presized to the low-rank shape) = projection of G, converting G to float a
// panel at a time if needed. `panel` holds panel_floats(G) floats; on both
// sides `both_scratch` holds G.rows() x rank floats (see project_rows).
inline void project_gradient(const BasisView& b, ConstMatrixRef<float> G, MatrixRef<float> R, float* /*panel*/,
                             float* both_scratch) {
  if (b.side != Side::Right) R.setZero();
  project_rows(b, G, 0, R, both_scratch);
}

inline void project_gradient(const BasisView& b, ConstMatrixRef<bfloat16> G, MatrixRef<float> R, float* panel,
                             float* both_scratch) {
  if (b.side != Side::Right) R.setZero();
  for_each_panel(G.rows(), panel_rows(G.cols()), [&](Index r0, Index k) {
    Eigen::Map<MatrixF> buf(panel, k, G.cols());
    buf = G.middleRows(r0, k).template cast<float>();
    project_rows(b, buf, r0, R, both_scratch);
  });
}

// Calls f with a float view of the whole of G (a copy only for bf16).
template <class F>
void with_float(ConstMatrixRef<float> G, F&& f) {
  f(G);
}
template <class F>
void with_float(ConstMatrixRef<bfloat16> G, F&& f) {
  const MatrixF copy = G.template cast<float>();
  f(ConstMatrixRef<float>(copy));
}

}  // namespace galore::detail
