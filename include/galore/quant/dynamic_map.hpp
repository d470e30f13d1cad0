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
class CodeIndex {
 public:
  explicit CodeIndex(const CodeMap& map) : midpoints_(257, INFINITY), base_(std::size_t{1} << 17) {
    for (std::size_t k = 0; k + 1 < map.size(); ++k) midpoints_[k] = (map[k] + map[k + 1]) * 0.5f;
    const auto mid_end = midpoints_.begin() + static_cast<std::ptrdiff_t>(map.size() - 1);
    for (std::uint32_t key = 0; key < (1u << 17); ++key) {
      const float a = bucket_edge(key << 15), b = bucket_edge((key << 15) | 0x7fffu);
      const float lo = std::min(a, b), hi = std::max(a, b);
      const auto first = std::lower_bound(midpoints_.begin(), mid_end, lo);
      const auto last = std::upper_bound(midpoints_.begin(), mid_end, hi);
      if (last - first > 1) throw std::logic_error("galore: CodeIndex needs at most one midpoint per bucket");
      base_[key] = static_cast<std::uint8_t>(first - midpoints_.begin());
    }
  }

  // The midpoints between neighbouring codes, ascending (255), then +inf.
  const std::vector<float>& midpoints() const { return midpoints_; }

  std::uint8_t nearest(float x) const {
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const int b = base_[bits >> 15];
    return static_cast<std::uint8_t>(b + (midpoints_[static_cast<std::size_t>(b)] < x));
  }

 private:
  static float bucket_edge(std::uint32_t bits) {
    float v;
    std::memcpy(&v, &bits, sizeof v);
    if (!std::isfinite(v)) v = std::signbit(v) ? -2.0f : 2.0f;  // beyond every code
    return v;
  }

  std::vector<float> midpoints_;      // 255 midpoints, then +inf
  std::vector<std::uint8_t> base_;    // midpoints below each bucket
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
