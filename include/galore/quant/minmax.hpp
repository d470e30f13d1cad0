// galore: group-wise asymmetric min-max quantization (Q-GaLore, arXiv 2407.08296;
// q_galore_torch's group-wise quantizer), with real packed storage, and the
// projector policies Int4 / Int8 built on it.
//
// Groups are consecutive runs of `group_size` elements of the row-major
// flattening (-1: one group per row). Per group, in float32 as the reference:
//   scale = max(max(w) - min(w), 1e-5) / (2^b - 1)
//   zero  = clamp(round(-min(w) / scale), 0, 2^b - 1)
//   q     = clamp(round(w / scale) + zero, 0, 2^b - 1)       (round half to even)
//   w'    = scale * (q - zero)
// with w / scale a true float32 division, as torch computes it (a reciprocal
// changes a few codes per thousand). Codes of fewer than 8 bits are packed,
// 8 / b per byte, lowest bits first. The reference requires the element count to
// be a multiple of the group size; here the last group may be shorter.
//
// The kernels are total: NaN or Inf in w never reaches a float-to-integer
// conversion out of range (undefined behaviour in C++). Every clamp happens in
// float before the conversion and sends NaN to 0, so a NaN element gets code 0,
// +-Inf saturate, and a group whose extremes are not finite gets some defined
// scale and a zero point of 0. The codes of such a group mean nothing, which is
// why QuantizedWeight rejects non-finite weights before quantizing them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../detail/elementwise.hpp"
#include "../math/quant_codes.hpp"
#include "group_quantized.hpp"
#include "../types.hpp"

namespace galore::detail {

// Whether x[0, n) holds only finite values: the largest magnitude bit pattern
// is below the exponent of Inf (NaN and Inf have it all ones), an integer max
// that vectorizes.
inline bool all_finite(const float* x, Index n) {
  std::uint32_t worst = 0;
  for (Index k = 0; k < n; ++k) {
    std::uint32_t b;
    std::memcpy(&b, x + k, sizeof b);
    b &= 0x7FFFFFFFu;
    worst = b > worst ? b : worst;
  }
  return worst < 0x7F800000u;
}

// Index of the first NaN or Inf of x[0, n), or n when all are finite.
inline Index first_non_finite(const float* x, Index n) {
  if (all_finite(x, n)) return n;
  Index k = 0;
  while (k < n && std::isfinite(x[k])) ++k;
  return k;
}

// Smallest and largest of x[0, n) (n > 0), vectorized. With NaN among the values
// the result is defined but depends on where the NaN sits (Eigen's reduction).
inline void min_max(const float* x, Index n, float& lo, float& hi) {
  const Eigen::Map<const Eigen::ArrayXf> a(x, n);
  lo = a.minCoeff();
  hi = a.maxCoeff();
}

}  // namespace galore::detail

namespace galore::quant {

using math::minmax_scale_zero;

// Round-to-nearest-even encoding, as torch.round: the quantizer's default.
// codes[k] = clamp(round(w[k] / scale) + zero, 0, 2^Bits - 1), with a true float
// division (a reciprocal would change a few codes per thousand). Total: NaN gives
// code 0, values beyond the code range (Inf included) saturate.
template <int Bits>
struct NearestEncoder {
  void operator()(const float* w, Index n, float scale, float zero, std::uint64_t /*first*/,
                  std::uint8_t* codes) const {
    constexpr float max_code = static_cast<float>((1 << Bits) - 1);
    const float* __restrict x = w;  // the byte-sized codes must not be taken to alias the floats
    std::uint8_t* __restrict q = codes;
    for (Index k = 0; k < n; ++k) q[k] = math::minmax_code(x[k], scale, zero, max_code);
  }
};

// Quantizes w[0, n), which are elements [first, first + n) of `out` (first must
// start a group; n must end one or reach the end), with fresh scales and zeros.
// Encoder(w, len, scale, zero, first_index, codes) writes one code per element.
template <int Bits, class Encoder>
void quantize_range(const float* w, Index first, Index n, const Encoder& encode, GroupQuantized<Bits>& out) {
  const Index g = out.group_size;
  const Index groups = GroupQuantized<Bits>::groups_for(n, g);
  // Groups are independent: with OpenMP they are spread over threads, unless
  // sub-byte codes of two groups could share a byte (g * Bits not a multiple of 8).
  const bool parallel = n >= (Index{1} << 16) && g % GroupQuantized<Bits>::per_byte == 0;
GALORE_OMP(omp parallel for schedule(static) if (parallel))
  for (Index gi = 0; gi < groups; ++gi) {
    const Index k0 = gi * g;
    const Index len = std::min(g, n - k0);
    const float* x = w + k0;
    float lo, hi;
    galore::detail::min_max(x, len, lo, hi);
    float scale, zero;
    minmax_scale_zero(lo, hi, GroupQuantized<Bits>::max_code, scale, zero);
    const Index group = (first + k0) / g;
    out.scales[static_cast<std::size_t>(group)] = scale;
    out.zeros[static_cast<std::size_t>(group)] = static_cast<std::uint8_t>(zero);
    if constexpr (Bits == 8) {
      encode(x, len, scale, zero, static_cast<std::uint64_t>(first + k0), out.codes.data() + first + k0);
    } else {
      std::uint8_t buf[256];
      for (Index c0 = 0; c0 < len; c0 += 256) {
        const Index clen = std::min<Index>(256, len - c0);
        encode(x + c0, clen, scale, zero, static_cast<std::uint64_t>(first + k0 + c0), buf);
        for (Index k = 0; k < clen; ++k) out.set_code(first + k0 + c0 + k, buf[k]);
      }
    }
  }
}

// out[0, n) = dequantized elements [first, first + n), on this thread.
template <int Bits>
void dequantize_serial(const GroupQuantized<Bits>& q, Index first, Index n, float* out) {
  const Index g = q.group_size;
  for (Index k = 0; k < n;) {
    const Index i = first + k;
    const Index group = i / g;
    const Index len = std::min(n - k, (group + 1) * g - i);
    const float scale = q.scales[static_cast<std::size_t>(group)];
    const float zero = q.zeros[static_cast<std::size_t>(group)];
    if constexpr (Bits == 8) {
      const std::uint8_t* c = q.codes.data() + i;
      for (Index j = 0; j < len; ++j) out[k + j] = math::minmax_value(c[j], scale, zero);
    } else {
      for (Index j = 0; j < len; ++j) out[k + j] = math::minmax_value(q.code(i + j), scale, zero);
    }
    k += len;
  }
}

// out[0, n) = dequantized elements [first, first + n); large ranges are split
// over the OpenMP threads.
template <int Bits>
void dequantize_range(const GroupQuantized<Bits>& q, Index first, Index n, float* out) {
  const Index g = q.group_size;
  if (n >= (Index{1} << 16)) {  // split into chunks of whole groups over the OpenMP threads
    const Index chunk = g * std::max<Index>(1, (Index{1} << 14) / g);
    const Index head = std::min(n, (g - first % g) % g);  // up to the first group boundary
    if (head > 0) dequantize_range(q, first, head, out);
    const Index rest = n - head, chunks = (rest + chunk - 1) / chunk;
GALORE_OMP(omp parallel for schedule(static))
    for (Index c = 0; c < chunks; ++c) {
      const Index off = head + c * chunk;
      dequantize_serial(q, first + off, std::min(chunk, n - off), out + off);
    }
    return;
  }
  dequantize_serial(q, first, n, out);
}


// Quantizes a whole row-major matrix with round-to-nearest.
template <int Bits>
GroupQuantized<Bits> quantize_minmax(ConstMatrixRef<float> w, Index group_size) {
  const Shape s = shape_of(w);
  GroupQuantized<Bits> q;
  q.resize(s, resolve_group_size(group_size, s));
  galore::detail::with_contiguous(
      w, [&](const float* x) { quantize_range(x, 0, s.size(), NearestEncoder<Bits>{}, q); });
  return q;
}

template <int Bits>
MatrixF dequantize_minmax(const GroupQuantized<Bits>& q) {
  MatrixF out(q.shape().rows, q.shape().cols);
  dequantize_range(q, 0, q.size(), out.data());
  return out;
}

// Projector quantization policy: the basis kept as Bits-bit min-max codes.
// Its settings (group_size) are MinMaxSettings, which the CUDA facade takes.
template <int Bits>
struct MinMax : MinMaxSettings {
  MinMax() = default;
  // Throws galore::invalid_argument unless group_size is -1 or positive, so a bad
  // value fails here rather than at the first store, inside a projector's refresh.
  explicit MinMax(Index group_size_) : MinMaxSettings{group_size_} { validate(); }

  using Storage = GroupQuantized<Bits>;
  void store(const MatrixF& P, Storage& out) const { out = quantize_minmax<Bits>(P, group_size); }
  const MatrixF& load(const Storage& s, MatrixF& scratch) const {
    scratch.resize(s.shape().rows, s.shape().cols);
    dequantize_range(s, 0, s.size(), scratch.data());
    return scratch;
  }
  std::size_t storage_bytes(Shape s) const { return Storage::bytes_for(s, resolve_group_size(group_size, s)); }
};

using Int4 = MinMax<4>;
using Int8 = MinMax<8>;

}  // namespace galore::quant
