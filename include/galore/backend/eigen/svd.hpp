// galore, Eigen backend: the SVD policies computed on the CPU.
//
//   eigen::compute_basis(policy, G, rank, side, previous, out)
//
// fills `out` with the top-`rank` singular vectors of G on `side`, sorted, with
// canonical signs oriented like `previous` (the basis in use, null at the first
// refresh); svd/exact.hpp describes the contract. The CUDA backend's overloads of
// the same policies are in backend/cuda/refresh.cuh.
#pragma once

#include <Eigen/SVD>
#include <algorithm>
#include <cmath>

#include "../../basis.hpp"
#include "../../svd/exact.hpp"
#include "../../svd/randomized.hpp"
#include "../../svd/warm_start.hpp"
#include "subspace.hpp"

namespace galore::eigen {

// svd::Exact: Eigen's divide-and-conquer SVD (BDCSVD) in float32.
inline void compute_basis(const svd::Exact&, ConstMatrixRef<float> G, Index rank, Side side,
                          const BasisView* previous, Basis& out) {
  unsigned flags = 0;
  if (side != Side::Right) flags |= Eigen::ComputeThinU;
  if (side != Side::Left) flags |= Eigen::ComputeThinV;
  Eigen::BDCSVD<Eigen::MatrixXf> svd(G, flags);
  out.side = side;
  if (svd.info() != Eigen::Success) {
    if (side != Side::Right) out.left = MatrixF::Constant(G.rows(), rank, NAN);
    if (side != Side::Left) out.right = MatrixF::Constant(rank, G.cols(), NAN);
    return;
  }
  if (side != Side::Right) out.left = svd.matrixU().leftCols(rank);
  if (side != Side::Left) out.right = svd.matrixV().leftCols(rank).transpose();
  fix_signs(out, previous);
}

// svd::Randomized: the Gaussian sketch (detail::gaussian, a pure function of the
// seed and the shape), power iterations, Rayleigh-Ritz.
inline void compute_basis(const svd::Randomized& p, ConstMatrixRef<float> G, Index rank, Side side,
                          const BasisView* previous, Basis& out) {
  detail::compute_with_rescaling(G, out, [&](ConstMatrixRef<float> g, Basis& b) {
    const Index m = g.rows(), n = g.cols();
    const Index l = std::min(rank + std::max<Index>(p.oversample, 0), std::min(m, n));
    const bool column_space = side == Side::Left || (side == Side::Both && m <= n);
    MatrixF Y;
    if (column_space) {
      Y.noalias() = g * detail::gaussian(n, l, p.seed);  // m x l
      detail::orthonormalize(Y);
      for (int q = 0; q < p.power_iterations; ++q) {
        MatrixF Z = g.transpose() * Y;  // n x l
        detail::orthonormalize(Z);
        Y.noalias() = g * Z;
        detail::orthonormalize(Y);
      }
    } else {
      Y.noalias() = g.transpose() * detail::gaussian(m, l, p.seed);  // n x l
      detail::orthonormalize(Y);
      for (int q = 0; q < p.power_iterations; ++q) {
        MatrixF Z = g * Y;  // m x l
        detail::orthonormalize(Z);
        Y.noalias() = g.transpose() * Z;
        detail::orthonormalize(Y);
      }
    }
    detail::finish_from_range(g, Y, column_space, rank, side, previous, b);
  });
}

// svd::WarmStart: subspace iteration from the previous basis, then Rayleigh-Ritz
// (or, one-sided with rayleigh_ritz off, the orthonormalized iterate itself).
inline void compute_basis(const svd::WarmStart& p, ConstMatrixRef<float> G, Index rank, Side side,
                          const BasisView* previous, Basis& out) {
  if (previous == nullptr || previous->rank() != rank) {
    compute_basis(p.cold, G, rank, side, previous, out);
    return;
  }
  detail::compute_with_rescaling(G, out, [&](ConstMatrixRef<float> g, Basis& b) {
    const bool column_space = previous->side != Side::Right;
    MatrixF X = column_space ? *previous->left : MatrixF(previous->right->transpose());
    for (int it = 0; it < p.iterations; ++it) {
      // Y is normalized in magnitude between the two products, so that G^T G X
      // neither overflows nor underflows float32.
      if (column_space) {
        MatrixF Y = g.transpose() * X;  // n x r
        detail::normalize_magnitude(Y);
        X.noalias() = g * Y;            // m x r
      } else {
        MatrixF Y = g * X;              // m x r
        detail::normalize_magnitude(Y);
        X.noalias() = g.transpose() * Y;  // n x r
      }
      detail::orthonormalize(X);
    }
    if (!p.rayleigh_ritz && side != Side::Both) {
      b.side = side;
      if (column_space) b.left = X;
      else b.right = X.transpose();
      fix_signs(b, previous);
      return;
    }
    detail::finish_from_range(g, X, column_space, rank, side, previous, b);
  });
}

}  // namespace galore::eigen
