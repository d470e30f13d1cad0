// galore (internal): small element-wise helpers shared by the optimizers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../types.hpp"

namespace galore::detail {

// Finite test on the bit pattern (exponent not all ones), so that it vectorizes
// and stays correct under -ffast-math.
inline bool is_finite_bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x7f800000u) != 0x7f800000u;
}
inline bool is_finite_bits(bfloat16 x) { return (x.value & 0x7f80u) != 0x7f80u; }

template <class T>
bool all_finite(const ConstMatrixRef<T>& A) {
  for (Index i = 0; i < A.rows(); ++i) {
    const T* row = A.row(i).data();
    bool ok = true;
    for (Index j = 0; j < A.cols(); ++j) ok &= is_finite_bits(row[j]);
    if (!ok) return false;
  }
  return true;
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
