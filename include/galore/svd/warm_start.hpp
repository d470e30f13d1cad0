// galore: warm-started subspace iteration as an SVD policy. From the layer's
// previous basis X: `iterations` rounds of X <- orth(G^T G X) (or G G^T X on the
// left), then Rayleigh-Ritz to sort the vectors. One round is one product pair
// plus the Rayleigh-Ritz product: between refreshes the gradient's subspace
// moves little, so the stale basis is an excellent start. Without a previous
// basis (the first refresh) it falls back to `cold`.
#pragma once

#include "randomized.hpp"
#include "subspace.hpp"

namespace galore::svd {

struct WarmStart {
  int iterations = 1;
  Randomized cold{};  // the first refresh

  void compute(ConstMatrixRef<float> G, Index rank, Side side, const BasisView* previous, Basis& out) const {
    if (previous == nullptr || previous->rank() != rank) {
      cold.compute(G, rank, side, previous, out);
      return;
    }
    const bool column_space = previous->side != Side::Right;
    MatrixF X = column_space ? *previous->left : MatrixF(previous->right->transpose());
    for (int it = 0; it < iterations; ++it) {
      if (column_space) {
        const MatrixF Y = G.transpose() * X;  // n x r
        X.noalias() = G * Y;                  // m x r
      } else {
        const MatrixF Y = G * X;              // m x r
        X.noalias() = G.transpose() * Y;      // n x r
      }
      detail::orthonormalize(X);
    }
    detail::finish_from_range(G, X, column_space, rank, side, previous, out);
  }
};

}  // namespace galore::svd
