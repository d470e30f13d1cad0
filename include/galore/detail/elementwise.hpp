// galore (internal): small element-wise helpers shared by the optimizers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__SSE2__) || defined(__AVX__)
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "../math/adam.hpp"
#include "../types.hpp"

namespace galore::detail {

// Finite test on the bit pattern (exponent not all ones), so that it vectorizes
// and stays correct under -ffast-math: math::is_finite for float, and the same
// test on bfloat16's bits.
inline bool is_finite_bits(float x) { return math::is_finite(x); }
inline bool is_finite_bits(bfloat16 x) { return (x.value & 0x7f80u) != 0x7f80u; }

// |x| <= AdamConfig::max_input (2^60), false for NaN and Inf: math::in_adam_range
// for float, and the same bound on bfloat16's bits (2^60 is 0x5d80 there).
inline bool in_adam_range(float x) { return math::in_adam_range(x); }
inline bool in_adam_range(bfloat16 x) { return (x.value & 0x7fffu) <= (math::kMaxInputBits >> 16); }

// Whether test(x) holds for every element of A, a row at a time; each row is one
// branch-free pass (test is a bit test), so that it vectorizes.
template <class T, class Test>
bool every_element(const ConstMatrixRef<T>& A, Test test) {
  for (Index i = 0; i < A.rows(); ++i) {
    const T* row = A.row(i).data();
    bool ok = true;
    for (Index j = 0; j < A.cols(); ++j) ok &= test(row[j]);
    if (!ok) return false;
  }
  return true;
}

// Whether every element of A is a gradient an Adam step accepts.
template <class T>
bool adam_input_in_range(const ConstMatrixRef<T>& A) {
  return every_element(A, [](T x) { return in_adam_range(x); });
}

template <class T>
bool all_finite(const ConstMatrixRef<T>& A) {
  return every_element(A, [](T x) { return is_finite_bits(x); });
}

// out[k] = sqrt(in[k]) correctly rounded, as std::sqrt, torch.sqrt and CUDA's
// sqrtf give it, vectorized. Eigen's .sqrt() is not: with EIGEN_FAST_MATH (its
// default) it takes an approximate reciprocal square root and a Newton step,
// which changes about a third of Adam's steps in the last bit.
inline void sqrt_exact(const float* in, float* out, Index n) {
  Index k = 0;
#if defined(__AVX__)
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(out + k, _mm256_sqrt_ps(_mm256_loadu_ps(in + k)));
#endif
#if defined(__SSE2__)
  for (; k + 4 <= n; k += 4) _mm_storeu_ps(out + k, _mm_sqrt_ps(_mm_loadu_ps(in + k)));
#elif defined(__ARM_NEON) && defined(__aarch64__)
  for (; k + 4 <= n; k += 4) vst1q_f32(out + k, vsqrtq_f32(vld1q_f32(in + k)));
#endif
  for (; k < n; ++k) out[k] = std::sqrt(in[k]);
}

// Calls f with a pointer to A's elements in row-major order, copying A only when
// it is a strided view.
template <class F>
void with_contiguous(const ConstMatrixRef<float>& A, F&& f) {
  if (A.outerStride() == A.cols() || A.rows() <= 1) {
    f(A.data());
    return;
  }
  const MatrixF copy = A;
  f(copy.data());
}

// Squared Frobenius norm, accumulated in double.
template <class T>
double squared_norm(const ConstMatrixRef<T>& A) {
  double s = 0.0;
  for (Index i = 0; i < A.rows(); ++i) {
    const T* row = A.row(i).data();
    float acc = 0.0f;
    for (Index j = 0; j < A.cols(); ++j) {
      const float x = static_cast<float>(row[j]);
      acc += x * x;
    }
    s += acc;
  }
  return s;
}

// Rows per panel when a bf16 or quantized matrix is converted to float a panel
// at a time: about 64 Ki elements (256 KiB of floats), at least one row.
inline Index panel_rows(Index cols, Index multiple_of = 1) {
  const Index rows = std::max<Index>(1, (Index{1} << 16) / std::max<Index>(cols, 1));
  return std::max(multiple_of, rows / multiple_of * multiple_of);
}

// Calls f(row0, nrows) over consecutive panels of `rows` rows.
template <class F>
void for_each_panel(Index rows, Index panel, F&& f) {
  for (Index r0 = 0; r0 < rows; r0 += panel) f(r0, std::min(panel, rows - r0));
}

// Calls f(row, col0, offset, length) for the row segments that the flat
// (row-major) range [off, off + len) covers in a matrix with `cols` columns.
template <class F>
void for_each_row_segment(Index cols, Index off, Index len, F&& f) {
  Index done = 0;
  while (done < len) {
    const Index flat = off + done;
    const Index row = flat / cols, col = flat % cols;
    const Index seg = std::min(cols - col, len - done);
    f(row, col, done, seg);
    done += seg;
  }
}

}  // namespace galore::detail
