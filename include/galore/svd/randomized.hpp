// galore: the randomized range finder (Halko, Martinsson and Tropp 2011) as an
// SVD policy: a Gaussian sketch with `oversample` extra columns, `power_iterations`
// rounds of G G^T (re-orthonormalized each time), then Rayleigh-Ritz. About
// 2 (1 + 2 q) + 1 products of G with a thin matrix, instead of a full SVD.
// Hyperparameters only (svd/exact.hpp says how policies are computed).
#pragma once

#include <cstdint>

#include "../config.hpp"
#include "../core/shape.hpp"

namespace galore::svd {

struct Randomized {
  Index oversample = 16;
  int power_iterations = 2;
  std::uint64_t seed = 0x67a1043eULL;  // the sketch is a pure function of (seed, shape), on every backend

  void validate() const {
    galore::detail::require(oversample >= 0, "randomized SVD oversampling must be >= 0 (got ", oversample, ")");
    galore::detail::require(power_iterations >= 0, "randomized SVD power iterations must be >= 0 (got ",
                            power_iterations, ")");
  }
};

}  // namespace galore::svd
