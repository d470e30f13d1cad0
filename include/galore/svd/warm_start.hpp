// galore: warm-started subspace iteration as an SVD policy. From the layer's
// previous basis X: `iterations` rounds of X <- orth(G^T G X) (or G G^T X on the
// left), then Rayleigh-Ritz to sort the vectors. One round is one product pair
// plus the Rayleigh-Ritz product: between refreshes the gradient's subspace
// moves little, so the stale basis is an excellent start. Without a previous
// basis (the first refresh) it falls back to `cold`.
// Hyperparameters only (svd/exact.hpp says how policies are computed).
#pragma once

#include "../config.hpp"
#include "randomized.hpp"

namespace galore::svd {

struct WarmStart {
  int iterations = 1;
  Randomized cold{};  // the first refresh
  // Rayleigh-Ritz sorts the vectors by singular value and rotates them to the
  // singular vectors within the subspace. Without it (one-sided projections
  // only; two-sided ones always use it) the new basis is the orthonormalized
  // iterate: the same subspace, vectors near the previous ones, and no r x r
  // eigensolver, which dominates the refresh at large ranks.
  bool rayleigh_ritz = true;

  void validate() const {
    galore::detail::require(iterations >= 1, "warm-start SVD iterations must be >= 1 (got ", iterations, ")");
    cold.validate();
  }
};

}  // namespace galore::svd
