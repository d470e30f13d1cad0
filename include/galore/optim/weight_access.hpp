// galore: float32 access to weights and gradients held in other formats.
//
// The optimizers do their math in float32. A float matrix is used in place; a
// bf16 one is converted a row panel at a time, so no m x n float temporary
// exists. A QuantizedWeight is dequantized a panel at a time, updated, and
// re-quantized through an encoder (stochastic rounding), panels starting on
// quantization-group boundaries.
#pragma once

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

// Calls f(W_rows_as_float, row0) over W and stores what f left there.
template <class F>
void update_in_float(MatrixRef<float> W, F&& f) {
  f(W, Index{0});
}

template <class F>
void update_in_float(MatrixRef<bfloat16> W, F&& f) {
  MatrixF buf;
  for_each_panel(W.rows(), panel_rows(W.cols()), [&](Index r0, Index k) {
    buf = W.middleRows(r0, k).template cast<float>();
    f(MatrixRef<float>(buf), r0);
    W.middleRows(r0, k) = buf.template cast<bfloat16>();
  });
}

template <int Bits, class Encoder, class F>
void update_in_float(QuantizedUpdate<Bits, Encoder> W, F&& f) {
  QuantizedWeight<Bits>& q = W.weight;
  MatrixF buf;
  for_each_panel(q.rows(), panel_rows(q.cols(), q.row_alignment()), [&](Index r0, Index k) {
    buf.resize(k, q.cols());
    q.dequantize_rows(r0, buf);
    f(MatrixRef<float>(buf), r0);
    q.quantize_rows(r0, buf, W.encode);
  });
}

// R = projection of G, converting G to float a panel at a time if needed.
inline void project_gradient(const BasisView& b, ConstMatrixRef<float> G, MatrixF& R) {
  project(b, G, R);
}

inline void project_gradient(const BasisView& b, ConstMatrixRef<bfloat16> G, MatrixF& R) {
  const Shape s = low_rank_shape(b.side, shape_of(G), b.rank());
  R.resize(s.rows, s.cols);
  if (b.side != Side::Right) R.setZero();
  MatrixF buf;
  for_each_panel(G.rows(), panel_rows(G.cols()), [&](Index r0, Index k) {
    buf = G.middleRows(r0, k).template cast<float>();
    project_rows(b, buf, r0, R);
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
