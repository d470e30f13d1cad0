// galore: the two products of a GaLore step, on whole matrices or on row panels.
//
// Every weight update is written as W[rows] = beta * W[rows] + alpha * L[rows] * Rt,
// where (L, Rt) are the back-projection factors: right side (N, P), left side
// (P, N), both sides (P N, Q). Working on row panels lets bf16 and INT8 weights be
// converted a panel at a time, so no m x n float temporary is ever needed.
#pragma once

#include "basis.hpp"
#include "types.hpp"

namespace galore {

// R (low-rank shape) for the rows [row0, row0 + G_rows.rows()) of G. On the left
// and both sides the panels' contributions are summed into R, so R must be zero
// before the first panel; on the right side each panel writes its own rows of R.
// On both sides G_rows Q^T goes through `both_scratch` (k x r floats, k the
// panel's rows), or a temporary when it is null.
inline void project_rows(const BasisView& b, ConstMatrixRef<float> G_rows, Index row0,
                         MatrixRef<float> R, float* both_scratch = nullptr) {
  const Index k = G_rows.rows();
  switch (b.side) {
    case Side::Right:
      R.middleRows(row0, k).noalias() = G_rows * b.right->transpose();
      break;
    case Side::Left:
      R.noalias() += b.left->middleRows(row0, k).transpose() * G_rows;
      break;
    case Side::Both: {
      MatrixF temporary;
      if (!both_scratch) {
        temporary.resize(k, b.rank());
        both_scratch = temporary.data();
      }
      Eigen::Map<MatrixF> GQt(both_scratch, k, b.rank());
      GQt.noalias() = G_rows * b.right->transpose();
      R.noalias() += b.left->middleRows(row0, k).transpose() * GQt;
      break;
    }
  }
}

// R = projection of the whole of G, into R of the low-rank shape.
inline void project(const BasisView& b, ConstMatrixRef<float> G, MatrixRef<float> R) {
  if (b.side != Side::Right) R.setZero();
  project_rows(b, G, 0, R);
}
inline void project(const BasisView& b, ConstMatrixRef<float> G, MatrixF& R) {
  const Shape s = low_rank_shape(b.side, shape_of(G), b.rank());
  R.resize(s.rows, s.cols);
  project(b, G, MatrixRef<float>(R));
}

// The factors of back(N) = L * Rt, as views: N itself, a basis factor, or P N.
using ConstMatrixMap = Eigen::Map<const MatrixF, Eigen::Unaligned, Eigen::OuterStride<>>;
struct BackFactors {
  ConstMatrixMap L;
  ConstMatrixMap Rt;
};

inline ConstMatrixMap map_of(ConstMatrixRef<float> A) {
  return ConstMatrixMap(A.data(), A.rows(), A.cols(), Eigen::OuterStride<>(A.outerStride()));
}

// `scratch` receives P N on the both-sided path, and must then be m x r.
inline BackFactors back_factors(const BasisView& b, ConstMatrixRef<float> N, MatrixRef<float> scratch) {
  switch (b.side) {
    case Side::Right: return {map_of(N), map_of(*b.right)};
    case Side::Left: return {map_of(*b.left), map_of(N)};
    case Side::Both:
      scratch.noalias() = *b.left * N;
      return {map_of(scratch), map_of(*b.right)};
  }
  throw invalid_argument("galore: unknown projection side");
}

// out[rows] = beta * out[rows] + alpha * back(N)[rows], for the rows [row0, row0 + out_rows.rows()).
inline void add_back_rows(const BackFactors& f, float alpha, float beta,
                          MatrixRef<float> out_rows, Index row0) {
  if (beta != 1.0f) out_rows *= beta;
  out_rows.noalias() += alpha * (f.L.middleRows(row0, out_rows.rows()) * f.Rt);
}

// out = scale * back(N), as the reference's project_back (m x n).
inline void project_back(const BasisView& b, const MatrixF& N, float scale, Index rows, Index cols,
                         MatrixF& out) {
  MatrixF scratch(b.side == Side::Both ? b.left->rows() : 0, b.side == Side::Both ? N.cols() : 0);
  const BackFactors f = back_factors(b, N, scratch);
  out.resize(rows, cols);
  out.noalias() = scale * (f.L * f.Rt);
}

}  // namespace galore
