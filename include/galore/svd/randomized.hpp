// galore: the randomized range finder (Halko, Martinsson and Tropp 2011) as an
// SVD policy: a Gaussian sketch with `oversample` extra columns, `power_iterations`
// rounds of G G^T (re-orthonormalized each time), then Rayleigh-Ritz. About
// 2 (1 + 2 q) + 1 products of G with a thin matrix, instead of a full SVD.
#pragma once

#include <algorithm>
#include <cstdint>

#include "subspace.hpp"

namespace galore::svd {

struct Randomized {
  Index oversample = 16;
  int power_iterations = 2;
  std::uint64_t seed = 0x67a1043eULL;  // the sketch is a pure function of (seed, shape)

  // Throws galore::invalid_argument for a negative oversampling or iteration count.
  void validate() const {
    galore::detail::require(oversample >= 0, "randomized SVD oversampling must be >= 0 (got ", oversample, ")");
    galore::detail::require(power_iterations >= 0, "randomized SVD power iterations must be >= 0 (got ",
                            power_iterations, ")");
  }

  void compute(ConstMatrixRef<float> G, Index rank, Side side, const BasisView* previous, Basis& out) const {
    detail::compute_with_rescaling(G, out, [&](ConstMatrixRef<float> g, Basis& b) {
      compute_unscaled(g, rank, side, previous, b);
    });
  }

 private:
  void compute_unscaled(ConstMatrixRef<float> G, Index rank, Side side, const BasisView* previous, Basis& out) const {
    const Index m = G.rows(), n = G.cols();
    const Index l = std::min(rank + std::max<Index>(oversample, 0), std::min(m, n));
    // Sketch the smaller side's space: for a right basis the row space, for a
    // left one the column space; both sides come out of Rayleigh-Ritz.
    const bool column_space = side == Side::Left || (side == Side::Both && m <= n);
    MatrixF Y;
    if (column_space) {
      Y.noalias() = G * detail::gaussian(n, l, seed);  // m x l
      detail::orthonormalize(Y);
      for (int q = 0; q < power_iterations; ++q) {
        MatrixF Z = G.transpose() * Y;  // n x l
        detail::orthonormalize(Z);
        Y.noalias() = G * Z;
        detail::orthonormalize(Y);
      }
    } else {
      Y.noalias() = G.transpose() * detail::gaussian(m, l, seed);  // n x l
      detail::orthonormalize(Y);
      for (int q = 0; q < power_iterations; ++q) {
        MatrixF Z = G * Y;  // m x l
        detail::orthonormalize(Z);
        Y.noalias() = G.transpose() * Z;
        detail::orthonormalize(Y);
      }
    }
    detail::finish_from_range(G, Y, column_space, rank, side, previous, out);
  }
};

}  // namespace galore::svd
