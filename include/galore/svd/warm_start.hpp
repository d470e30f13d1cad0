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

  // Throws galore::invalid_argument for fewer than one iteration or invalid cold-start options.
  void validate() const {
    galore::detail::require(iterations >= 1, "warm-start SVD iterations must be >= 1 (got ", iterations, ")");
    cold.validate();
  }

  void compute(ConstMatrixRef<float> G, Index rank, Side side, const BasisView* previous, Basis& out) const {
    if (previous == nullptr || previous->rank() != rank) {
      cold.compute(G, rank, side, previous, out);
      return;
    }
    detail::compute_with_rescaling(G, out, [&](ConstMatrixRef<float> g, Basis& b) {
      compute_unscaled(g, rank, side, *previous, b);
    });
  }

 private:
  void compute_unscaled(ConstMatrixRef<float> G, Index rank, Side side, const BasisView& previous, Basis& out) const {
    const bool column_space = previous.side != Side::Right;
    MatrixF X = column_space ? *previous.left : MatrixF(previous.right->transpose());
    for (int it = 0; it < iterations; ++it) {
      // Y is normalized in magnitude between the two products, so that G^T G X
      // neither overflows nor underflows float32.
      if (column_space) {
        MatrixF Y = G.transpose() * X;  // n x r
        detail::normalize_magnitude(Y);
        X.noalias() = G * Y;            // m x r
      } else {
        MatrixF Y = G * X;              // m x r
        detail::normalize_magnitude(Y);
        X.noalias() = G.transpose() * Y;  // n x r
      }
      detail::orthonormalize(X);
    }
    detail::finish_from_range(G, X, column_space, rank, side, &previous, out);
  }
};

}  // namespace galore::svd
