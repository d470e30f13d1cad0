// galore: QuantizedWeight<Bits>, a weight matrix stored only as Bits-bit
// group-wise min-max codes (Q-GaLore's INT8 weights, group 256).
//
// It holds the codes plus one float32 scale and one zero point per group, nothing
// else: no full-precision copy persists. A training step dequantizes a row panel
// at a time, updates it in float32, and re-quantizes it with fresh scales and
// zeros through an encoder (stochastic rounding for training, as Q-GaLore does:
// with round-to-nearest the paper reports +2 to +8 perplexity).
//
// Weights must be finite: NaN or Inf has no min-max code (it would poison its
// group's scale), so both the constructor and quantize_rows reject them with
// galore::invalid_argument before changing anything.
#pragma once

#include <cstddef>
#include <numeric>

#include "detail/elementwise.hpp"
#include "quant/minmax.hpp"
#include "types.hpp"

namespace galore {

template <int Bits = 8>
class QuantizedWeight {
 public:
  using Codes = quant::GroupQuantized<Bits>;

  QuantizedWeight() = default;

  // Quantizes W with round-to-nearest (the reference's initial quantization).
  // Throws galore::invalid_argument for an empty W, a group size that is neither
  // positive nor -1, or a W holding NaN or Inf.
  explicit QuantizedWeight(ConstMatrixRef<float> W, Index group_size = 256)
      : q_(quant::quantize_minmax<Bits>(W, checked_group(W, group_size))) {}

  Shape shape() const { return q_.shape(); }
  Index rows() const { return q_.shape().rows; }
  Index cols() const { return q_.shape().cols; }
  Index group_size() const { return q_.group_size; }
  const Codes& codes() const { return q_; }
  Codes& codes() { return q_; }

  // Bytes held: one code per weight (packed below 8 bits), a float32 scale and a
  // one-byte zero point per group.
  std::size_t bytes() const { return q_.bytes(); }
  static std::size_t bytes_for(Shape s, Index group_size = 256) {
    return Codes::bytes_for(s, quant::resolve_group_size(group_size, s));
  }

  MatrixF dequantize() const { return quant::dequantize_minmax(q_); }

  // out = rows [row0, row0 + out.rows()) in float32.
  void dequantize_rows(Index row0, MatrixRef<float> out) const {
    check_rows(row0, out.rows(), out.cols());
    for (Index r = 0; r < out.rows(); ++r) quant::dequantize_range(q_, (row0 + r) * cols(), cols(), &out(r, 0));
  }

  // Re-quantizes rows [row0, row0 + rows.rows()) from float values; the rows must
  // start and end on group boundaries (a multiple of row_alignment(), or the end)
  // and be finite. Otherwise throws galore::invalid_argument, changing nothing.
  template <class Encoder>
  void quantize_rows(Index row0, ConstMatrixRef<float> rows, const Encoder& encode) {
    check_rows(row0, rows.rows(), rows.cols());
    const Index first = row0 * cols(), n = rows.rows() * cols();
    detail::require(first % group_size() == 0 && (n % group_size() == 0 || first + n == shape().size()),
                    "quantize_rows: rows ", row0, "..", row0 + rows.rows(),
                    " do not start and end on quantization group boundaries");
    check_finite(rows, row0, "quantize_rows: the new values hold NaN or Inf");
    detail::with_contiguous(rows, [&](const float* x) { quant::quantize_range(x, first, n, encode, q_); });
  }

  // Row panels that start on group boundaries are multiples of this many rows.
  Index row_alignment() const {
    const Index g = group_size(), c = cols();
    return g / std::gcd(g, c);
  }

 private:
  static Index checked_group(const ConstMatrixRef<float>& W, Index group_size) {
    const Shape s = shape_of(W);
    detail::require(s.rows > 0 && s.cols > 0, "a quantized weight needs a positive shape (got ", s.rows, "x",
                    s.cols, ")");
    const Index g = quant::resolve_group_size(group_size, s);
    check_finite(W, 0, "QuantizedWeight: W holds NaN or Inf");
    return g;
  }
  // Throws with the position (in the whole weight) of the first NaN or Inf of M.
  static void check_finite(const ConstMatrixRef<float>& M, Index row0, const char* what) {
    for (Index r = 0; r < M.rows(); ++r) {
      const Index c = detail::first_non_finite(M.data() + r * M.outerStride(), M.cols());
      detail::require(c == M.cols(), what, ", first at (", row0 + r, ", ", c, "): ", M(r, c == M.cols() ? 0 : c),
                      "; min-max codes exist only for finite values");
    }
  }
  void check_rows(Index row0, Index nrows, Index ncols) const {
    detail::require(ncols == cols() && row0 >= 0 && row0 + nrows <= rows(), "rows ", row0, "..", row0 + nrows,
                    " x ", ncols, " do not fit a ", rows(), "x", cols(), " quantized weight");
  }

  Codes q_;
};

using Int8Weight = QuantizedWeight<8>;

}  // namespace galore
