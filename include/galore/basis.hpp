// galore: the orthonormal factors a projector holds, and their canonical signs.
#pragma once

#include <algorithm>
#include <cmath>

#include "detail/elementwise.hpp"
#include "projection_type.hpp"
#include "types.hpp"

namespace galore {

// Top-r singular vectors of a gradient, as float32. Which members are filled
// depends on the side: Left -> left (m x r, columns), Right -> right (r x n, rows),
// Both -> both.
struct Basis {
  Side side = Side::Right;
  MatrixF left;
  MatrixF right;

  Index rank() const { return side == Side::Right ? right.rows() : left.cols(); }
};

// A read-only view of a basis, so that a projector holding float32 factors can
// lend them without a copy and a quantizing one can lend dequantized scratch.
struct BasisView {
  Side side = Side::Right;
  const MatrixF* left = nullptr;
  const MatrixF* right = nullptr;

  BasisView() = default;
  explicit BasisView(const Basis& b) : side(b.side), left(&b.left), right(&b.right) {}
  Index rank() const { return side == Side::Right ? right->rows() : left->cols(); }
};

namespace detail {

// Whether the factors a basis holds (by its side) are free of NaN and Inf.
inline bool basis_is_finite(const Basis& b) {
  auto finite = [](const MatrixF& A) {
    bool ok = true;
    for (Index i = 0; i < A.size(); ++i) ok &= is_finite_bits(A.data()[i]);
    return ok;
  };
  return (b.side == Side::Right || finite(b.left)) && (b.side == Side::Left || finite(b.right));
}

// Flips v so that its entry of largest magnitude (the first one, on ties) is
// positive. Singular vectors are defined up to sign; fixing it makes results
// reproducible across SVD implementations and backends.
template <class Vec>
void make_largest_entry_positive(Vec&& v) {
  Index best = 0;
  float best_abs = -1.0f;
  for (Index i = 0; i < v.size(); ++i) {
    const float a = std::abs(v(i));
    if (a > best_abs) {
      best_abs = a;
      best = i;
    }
  }
  if (v.size() > 0 && v(best) < 0.0f) v = -v;
}

}  // namespace detail

// Canonical signs for every singular vector in the basis (columns of `left`,
// rows of `right`, each independently).
inline void canonicalize_signs(Basis& b) {
  if (b.side != Side::Right)
    for (Index j = 0; j < b.left.cols(); ++j) detail::make_largest_entry_positive(b.left.col(j));
  if (b.side != Side::Left)
    for (Index i = 0; i < b.right.rows(); ++i) detail::make_largest_entry_positive(b.right.row(i));
}

// Orients each singular vector of `fresh` like the same-index vector of the
// basis it replaces (flipped where their dot product is negative). The largest-
// entry rule alone flips a vector whenever its two largest entries trade places
// with opposite signs, which reads as a cosine of -1 for an unchanged subspace;
// following the previous basis keeps signs continuous across refreshes (and
// keeps the carried Adam moments meaningful). Deterministic given the previous
// basis, so every backend agrees. Vectors nearly orthogonal to their
// predecessor keep the canonical sign.
inline void orient_like(Basis& fresh, const BasisView& previous) {
  constexpr float kMinOverlap = 1e-3f;
  if (fresh.side != previous.side) return;
  if (fresh.side != Side::Right && previous.left && previous.left->rows() == fresh.left.rows())
    for (Index j = 0; j < std::min(fresh.left.cols(), previous.left->cols()); ++j) {
      const float dot = fresh.left.col(j).dot(previous.left->col(j));
      if (dot < -kMinOverlap * fresh.left.col(j).norm() * previous.left->col(j).norm()) fresh.left.col(j) *= -1.0f;
    }
  if (fresh.side != Side::Left && previous.right && previous.right->cols() == fresh.right.cols())
    for (Index i = 0; i < std::min(fresh.right.rows(), previous.right->rows()); ++i) {
      const float dot = fresh.right.row(i).dot(previous.right->row(i));
      if (dot < -kMinOverlap * fresh.right.row(i).norm() * previous.right->row(i).norm()) fresh.right.row(i) *= -1.0f;
    }
}

// Canonical signs, then continuity with the previous basis when there is one:
// what every built-in SVD policy applies to its result.
inline void fix_signs(Basis& fresh, const BasisView* previous) {
  canonicalize_signs(fresh);
  if (previous) orient_like(fresh, *previous);
}

// The first (dominant) singular vector: row 0 of `right` for Side::Right, column 0
// of `left` otherwise (the vector Q-GaLore's lazy schedule compares).
inline VectorF first_singular_vector(const BasisView& b) {
  if (b.side == Side::Right) return b.right->row(0).transpose();
  return b.left->col(0);
}

}  // namespace galore
