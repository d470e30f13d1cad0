// Test support: reproducible random matrices and gradients with realistic spectra.
#pragma once

#include <Eigen/QR>
#include <cmath>
#include <cstdint>
#include <random>

#include <galore/types.hpp>

namespace galore_test {

using galore::Index;
using galore::MatrixF;

inline MatrixF gaussian(Index rows, Index cols, std::uint64_t seed, float sigma = 1.0f) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  MatrixF A(rows, cols);
  for (Index i = 0; i < A.size(); ++i) A.data()[i] = d(gen);
  return A;
}

// An m x k matrix with orthonormal columns.
inline MatrixF orthonormal_columns(Index m, Index k, std::uint64_t seed) {
  const Eigen::MatrixXf A = gaussian(m, k, seed);
  Eigen::HouseholderQR<Eigen::MatrixXf> qr(A);
  return Eigen::MatrixXf(qr.householderQ()).leftCols(k);
}

// A gradient-like matrix: singular values decaying as `decay`^i, plus noise.
inline MatrixF decaying_spectrum(Index m, Index n, std::uint64_t seed, float decay = 0.8f,
                                 float noise = 0.01f) {
  const Index k = std::min(m, n);
  const MatrixF U = orthonormal_columns(m, k, seed);
  const MatrixF V = orthonormal_columns(n, k, seed + 1);
  Eigen::VectorXf s(k);
  for (Index i = 0; i < k; ++i) s(i) = std::pow(decay, static_cast<float>(i));
  return U * s.asDiagonal() * V.transpose() + gaussian(m, n, seed + 2, noise);
}

}  // namespace galore_test
