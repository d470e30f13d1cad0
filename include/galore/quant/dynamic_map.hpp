// galore: bitsandbytes' dynamic 8-bit code maps (create_dynamic_map) and their
// nearest-code search, used by the 8-bit blockwise Adam state (bitsandbytes'
// blockwise 8-bit optimizers, one float32 absmax per block of 256).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "../config.hpp"

namespace galore::quant {
using CodeMap = std::array<float, 256>;
}

namespace galore::detail {

// torch.linspace(start, end, steps) in float32 as PyTorch's CPU kernel computes it
// on x86 (the AVX2 build bitsandbytes runs on): the first half counts up from
// start, the second half down from end, each point by a fused multiply-add; runs
// of 16 points are vectorized as two 8-lane arange(base, step), whose lanes are
// base + j * step with two roundings. Matching this makes the maps bit-identical.
inline float torch_linspace_at(float start, float end, int steps, int idx) {
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int halfway = steps / 2;
  const auto scalar = [&](int i) {
    return i < halfway ? std::fma(step, static_cast<float>(i), start)
                       : -std::fma(step, static_cast<float>(steps - i - 1), -end);
  };
  if (idx >= steps / 16 * 16) return scalar(idx);
  const int lane = idx % 8;
  const float base = scalar(idx - lane);
  // Two separately rounded operations (no contraction into an FMA): the product
  // and the sum are exact in double, and each is rounded to float once.
  const float product = static_cast<float>(static_cast<double>(lane) * static_cast<double>(step));
  return static_cast<float>(static_cast<double>(base) + static_cast<double>(product));
}

// bitsandbytes' create_dynamic_map(signed, max_exponent_bits = 7, total_bits = 8):
// for exponent i = 0..6 the 2^i (signed) or 2^(i+1) (unsigned) interval midpoints
// of linspace(0.1, 1, .) scaled by 10^(i-6), their negatives when signed, then 0
// and 1, sorted. Every operation in float32, as the reference.
inline quant::CodeMap make_dynamic_map(bool is_signed) {
  quant::CodeMap map{};
  int n = 0;
  for (int i = 0; i < 7; ++i) {
    const int items = (is_signed ? (1 << i) : (1 << (i + 1))) + 1;
    const float scale = static_cast<float>(std::pow(10.0, i - 6));
    for (int k = 0; k + 1 < items; ++k) {
      const float mean = (torch_linspace_at(0.1f, 1.0f, items, k) +
                          torch_linspace_at(0.1f, 1.0f, items, k + 1)) / 2.0f;
      map[n++] = scale * mean;
      if (is_signed) map[n++] = -(scale * mean);
    }
  }
  map[n++] = 0.0f;
  map[n++] = 1.0f;
  std::sort(map.begin(), map.begin() + n);
  return map;
}

}  // namespace galore::detail

namespace galore::quant {

// The signed map (for Adam's first moment): 0 at index 127, smallest -0.99297.
inline const CodeMap& dynamic_map_signed() {
  static const CodeMap map = detail::make_dynamic_map(true);
  return map;
}

// The unsigned map (for Adam's second moment): 0 at index 0, 1 at index 255.
inline const CodeMap& dynamic_map_unsigned() {
  static const CodeMap map = detail::make_dynamic_map(false);
  return map;
}

// Nearest code of x (already divided by the block's absmax) by bitsandbytes'
// binary search (dQuantize<0> / quantize_2D): seven halvings from index 127, then
// the nearer of the two neighbours, ties decided as the reference decides them.
GALORE_HOST_DEVICE std::uint8_t nearest_code(const float* code, float x, bool is_signed) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = is_signed ? -1.0f : 0.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return static_cast<std::uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = (lower + val) * 0.5f;
  return static_cast<std::uint8_t>(x < midpoint ? lower_pivot : pivot);
}

// Fast nearest-code search. The nearest code of x is the number of midpoints
// between neighbouring codes that lie below x (bitsandbytes decides with the
// same midpoints). A table over the top 17 bits of a float (sign, exponent and 8
// mantissa bits) holds, for each bucket of floats, the number of midpoints below
// the bucket; no bucket of these maps holds more than one midpoint (the
// constructor checks it), so one comparison finishes the search: a table load
// and a compare, no branches. Equal to nearest_code except where x lies within
// rounding of a midpoint (a few in a million random inputs).
//
// Every midpoint lies at a magnitude in [2^-23, 2), so a compact table with one
// row of 256 buckets per exponent there, and one row each for all smaller and
// all larger exponents (clamped to), gives the same counts in 13 KiB instead of
// 128 KiB: the GPU keeps it in shared memory (backend/cuda/adam8bit.cuh). On
// the CPU the full table is faster (the hot part of it stays cached, and its
// index is a shift).
class CodeIndex {
 public:
  static constexpr int kExpLo = 103;  // exponent fields below 2^-23 share this row
  static constexpr int kExpHi = 128;  // and those of 2 and above this one
  static constexpr int kRows = kExpHi - kExpLo + 1;
  static constexpr int kCompactBytes = 2 * kRows * 256;

  explicit CodeIndex(const CodeMap& map)
      : midpoints_(257, INFINITY), base_(std::size_t{1} << 17), compact_(kCompactBytes) {
    for (std::size_t k = 0; k + 1 < map.size(); ++k) midpoints_[k] = (map[k] + map[k + 1]) * 0.5f;
    for (std::uint32_t key = 0; key < (1u << 17); ++key)
      base_[key] = below(bucket_edge(key << 15), bucket_edge((key << 15) | 0x7fffu));
    for (std::uint32_t sign = 0; sign < 2; ++sign)
      for (int row = 0; row < kRows; ++row)
        for (std::uint32_t m8 = 0; m8 < 256; ++m8) {
          // The bucket's extremes; the clamped rows reach to 0, or beyond every midpoint.
          const std::uint32_t first = sign << 31 | static_cast<std::uint32_t>(kExpLo + row) << 23 | m8 << 15;
          const float a = row == 0 ? (sign ? -0.0f : 0.0f) : bucket_edge(first);
          const float b = row == kRows - 1 ? (sign ? -2.0f : 2.0f) : bucket_edge(first | 0x7fffu);
          compact_[compact_index(first)] = below(a, b);
        }
  }

  // The midpoints between neighbouring codes, ascending (255), then +inf.
  const std::vector<float>& midpoints() const { return midpoints_; }

  std::uint8_t nearest(float x) const {
    const std::uint32_t bits = bits_of(x);
    const int b = base_[bits >> 15];
    return static_cast<std::uint8_t>(b + (midpoints_[static_cast<std::size_t>(b)] < x));
  }

  // The compact table (kCompactBytes, at compact_index(x's bits)), and the
  // same search through it.
  const std::vector<std::uint8_t>& compact_table() const { return compact_; }
  // A float's compact bucket: sign, exponent field clamped to [kExpLo, kExpHi],
  // top 8 mantissa bits.
  GALORE_HOST_DEVICE static std::uint32_t compact_index(std::uint32_t bits) {
    std::uint32_t e = (bits >> 23) & 0xffu;
    e = e < kExpLo ? kExpLo : (e > kExpHi ? kExpHi : e);
    return ((bits >> 31) * kRows + (e - kExpLo)) * 256 + ((bits >> 15) & 0xffu);
  }
  std::uint8_t nearest_compact(float x) const {
    const int b = compact_[compact_index(bits_of(x))];
    return static_cast<std::uint8_t>(b + (midpoints_[static_cast<std::size_t>(b)] < x));
  }

 private:
  static std::uint32_t bits_of(float x) {
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return bits;
  }
  static float bucket_edge(std::uint32_t bits) {
    float v;
    std::memcpy(&v, &bits, sizeof v);
    if (!std::isfinite(v)) v = std::signbit(v) ? -2.0f : 2.0f;  // beyond every code
    return v;
  }
  // The midpoints below the bucket whose extremes are a and b (in either
  // order), which must hold at most one.
  std::uint8_t below(float a, float b) const {
    const auto end = midpoints_.begin() + 255;
    const auto first = std::lower_bound(midpoints_.begin(), end, std::min(a, b));
    if (std::upper_bound(midpoints_.begin(), end, std::max(a, b)) - first > 1)
      throw std::logic_error("galore: CodeIndex needs at most one midpoint per bucket");
    return static_cast<std::uint8_t>(first - midpoints_.begin());
  }

  std::vector<float> midpoints_;        // 255 midpoints, then +inf
  std::vector<std::uint8_t> base_;      // midpoints below each bucket
  std::vector<std::uint8_t> compact_;   // the same over the compact buckets
};

inline const CodeIndex& signed_code_index() {
  static const CodeIndex index(dynamic_map_signed());
  return index;
}
inline const CodeIndex& unsigned_code_index() {
  static const CodeIndex index(dynamic_map_unsigned());
  return index;
}

}  // namespace galore::quant
