// galore: how much of a gradient a basis captures, to judge any SVD policy.
//
//   captured_energy(G, basis) = |projection of G|_F^2 / (s_1^2 + ... + s_r^2)
//
// with s the exact singular values of G: 1 for the exact top-r subspace, less
// for any other r-dimensional one (for an orthonormal basis).
#pragma once

#include <Eigen/SVD>

#include "../basis.hpp"
#include "../projection.hpp"

namespace galore::svd {

// The exact singular values of G, largest first (no vectors computed).
inline Eigen::VectorXf singular_values(ConstMatrixRef<float> G) {
  Eigen::BDCSVD<Eigen::MatrixXf> svd(G);
  return svd.singularValues();
}

// With singular values computed once (for several bases of the same G).
inline double captured_energy(ConstMatrixRef<float> G, const BasisView& b, const Eigen::VectorXf& singular) {
  MatrixF R;
  project(b, G, R);
  const double top = singular.head(b.rank()).cast<double>().squaredNorm();
  return top > 0.0 ? static_cast<double>(R.squaredNorm()) / top : 1.0;
}

inline double captured_energy(ConstMatrixRef<float> G, const BasisView& b) {
  return captured_energy(G, b, singular_values(G));
}
inline double captured_energy(ConstMatrixRef<float> G, const Basis& b) { return captured_energy(G, BasisView(b)); }

}  // namespace galore::svd
