// galore, Eigen backend (internal to the SVD policies): orthonormalization,
// Gaussian test matrices and the Rayleigh-Ritz step that turns an approximate
// range into sorted singular vectors. Shared by svd::Randomized and svd::WarmStart.
#pragma once

#include <Eigen/Eigenvalues>
#include <Eigen/QR>
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../../basis.hpp"
#include "../../rounding/philox.hpp"

namespace galore::eigen::detail {

// The exponent e with max |A| in [2^(e-1), 2^e), or 0 when A is zero or holds NaN or Inf.
template <class Derived>
int magnitude_exponent(const Eigen::MatrixBase<Derived>& A) {
  if (A.size() == 0) return 0;
  const float mx = A.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>();
  if (!(mx > 0.0f) || !std::isfinite(mx)) return 0;
  int e = 0;
  (void)std::frexp(mx, &e);
  return e;
}

// A *= 2^e, in factors that are normal floats (2^-128 is not): exact but for
// entries that fall below float32's normal range.
inline void scale_by_power_of_two(MatrixF& A, int e) {
  while (e != 0) {
    const int part = std::max(-100, std::min(100, e));
    A *= std::ldexp(1.0f, part);
    e -= part;
  }
}

// Brings max |A| into [0.5, 1) by a power of two. Column spaces, singular vectors
// and Rayleigh quotients do not depend on the scale, and products and squares of
// a normalized A neither overflow nor underflow float32: without it a gradient of
// 1e20 overflows a Gram matrix (1e40) and one of 1e-25 underflows it to 0.
inline void normalize_magnitude(MatrixF& A) { scale_by_power_of_two(A, -magnitude_exponent(A)); }

// Runs compute(G, out); when out holds NaN or Inf because a product of G itself
// overflowed float32 (|G| near 1e38), runs it again on a copy of G normalized as
// above. A G holding NaN or Inf still gives a non-finite basis, which the
// projector refuses.
template <class F>
void compute_with_rescaling(ConstMatrixRef<float> G, Basis& out, F&& compute) {
  compute(G, out);
  if (galore::detail::basis_is_finite(out)) return;
  const int e = magnitude_exponent(G);
  if (e == 0) return;
  MatrixF scaled = G;
  scale_by_power_of_two(scaled, -e);
  compute(ConstMatrixRef<float>(scaled), out);
}

// Y <- an orthonormal basis of its column space (thin Householder QR), computed
// on Y normalized in magnitude.
inline void orthonormalize(MatrixF& Y) {
  normalize_magnitude(Y);
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
  // B is normalized in magnitude before its Gram matrix is formed; the singular
  // vectors below are those of the normalized B, which are G's.
  if (column_space) {
    MatrixF B = Q.transpose() * G;                      // l x n
    normalize_magnitude(B);
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
    MatrixF B = G * Q;                                  // m x l
    normalize_magnitude(B);
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

}  // namespace galore::eigen::detail
