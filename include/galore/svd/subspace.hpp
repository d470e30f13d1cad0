// galore (internal to the SVD policies): orthonormalization, Gaussian test
// matrices and the Rayleigh-Ritz step that turns an approximate range into
// sorted singular vectors. Shared by svd::Randomized and svd::WarmStart.
#pragma once

#include <Eigen/Eigenvalues>
#include <Eigen/QR>
#include <cmath>
#include <cstdint>

#include "../basis.hpp"
#include "../rounding/philox.hpp"

namespace galore::svd::detail {

// Y <- an orthonormal basis of its column space (thin Householder QR).
inline void orthonormalize(MatrixF& Y) {
  const Index n = Y.rows(), l = Y.cols();
  Eigen::HouseholderQR<Eigen::MatrixXf> qr(Y);
  Y = qr.householderQ() * Eigen::MatrixXf::Identity(n, l);
}

// A rows x cols matrix of standard normal numbers from Philox (Box-Muller):
// a pure function of (seed, shape).
inline MatrixF gaussian(Index rows, Index cols, std::uint64_t seed) {
  MatrixF A(rows, cols);
  const Index n = A.size();
  for (Index i = 0; i < n; i += 4) {
    const Philox4x32 r = philox4x32_10(static_cast<std::uint32_t>(i >> 2), static_cast<std::uint32_t>(rows),
                                       static_cast<std::uint32_t>(cols), 0x5eedu, static_cast<std::uint32_t>(seed),
                                       static_cast<std::uint32_t>(seed >> 32));
    for (int k = 0; k < 4 && i + k < n; k += 2) {
      const float u1 = 1.0f - uniform_from_bits(r.v[k]);  // (0, 1]
      const float u2 = uniform_from_bits(r.v[k + 1]);
      const float radius = std::sqrt(-2.0f * std::log(u1));
      A.data()[i + k] = radius * std::cos(6.2831853f * u2);
      if (i + k + 1 < n) A.data()[i + k + 1] = radius * std::sin(6.2831853f * u2);
    }
  }
  return A;
}

// Eigenvectors of a small symmetric Gram matrix (in double), largest first.
inline Eigen::MatrixXd top_eigenvectors(const MatrixF& gram, Eigen::VectorXd& eigenvalues) {
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(gram.cast<double>());
  const Index l = gram.rows();
  eigenvalues = es.eigenvalues().reverse();
  return es.eigenvectors().rowwise().reverse().eval().leftCols(l);
}

// Rayleigh-Ritz: given Q (orthonormal columns) spanning an approximation of G's
// column space (column_space) or row space, the top-`rank` singular vectors of
// G within that span, sorted, with canonical signs oriented like `previous`.
inline void finish_from_range(ConstMatrixRef<float> G, const MatrixF& Q, bool column_space, Index rank, Side side,
                              const BasisView* previous, Basis& out) {
  out.side = side;
  Eigen::VectorXd ev;
  if (column_space) {
    const MatrixF B = Q.transpose() * G;                // l x n
    const MatrixF gram = B * B.transpose();             // l x l
    const Eigen::MatrixXd W = top_eigenvectors(gram, ev);
    const MatrixF Wr = W.leftCols(rank).cast<float>();
    if (side != Side::Right) out.left = Q * Wr;
    if (side != Side::Left) {
      // v_i = B^T w_i / s_i
      MatrixF V = B.transpose() * Wr;                   // n x r
      for (Index i = 0; i < rank; ++i) {
        const float s = static_cast<float>(std::sqrt(std::max(ev(i), 0.0)));
        V.col(i) /= s > 0.0f ? s : 1.0f;
      }
      out.right = V.transpose();
    }
  } else {
    const MatrixF B = G * Q;                            // m x l
    const MatrixF gram = B.transpose() * B;             // l x l
    const Eigen::MatrixXd W = top_eigenvectors(gram, ev);
    const MatrixF Wr = W.leftCols(rank).cast<float>();
    if (side != Side::Left) out.right = (Q * Wr).transpose();
    if (side != Side::Right) {
      MatrixF U = B * Wr;                               // m x r
      for (Index i = 0; i < rank; ++i) {
        const float s = static_cast<float>(std::sqrt(std::max(ev(i), 0.0)));
        U.col(i) /= s > 0.0f ? s : 1.0f;
      }
      out.left = U;
    }
  }
  fix_signs(out, previous);
}

}  // namespace galore::svd::detail
