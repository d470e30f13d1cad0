// galore: NF4 (QLoRA's 4-bit NormalFloat) as a projector quantization policy.
//
// Blocks of `block_size` consecutive elements (row-major) share one float32
// absmax; each element keeps the index of the nearest of the 16 NF4 values of
// x * (1 / absmax), two indices per byte (nf4_codes.hpp, which the CUDA backend
// shares). No step converts a float to an integer, so NaN or Inf input gives
// defined (meaningless) codes: NaN compares false and gets index 0.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../types.hpp"
#include "nf4_codes.hpp"

namespace galore::quant {

// The 16 levels as an array (nf4_codes.hpp's nf4_value, which both backends use).
inline constexpr std::array<float, 16> kNF4Values = [] {
  std::array<float, 16> v{};
  for (int k = 0; k < 16; ++k) v[static_cast<std::size_t>(k)] = nf4_value(k);
  return v;
}();

// Its settings (block_size) are NF4Settings and its storage NF4Codes
// (nf4_codes.hpp), which the CUDA facade shares.
struct NF4 : NF4Settings {
  NF4() = default;
  // Throws galore::invalid_argument unless block_size >= 1 (0 would divide by
  // zero in storage_bytes, which a projector calls before any store).
  explicit NF4(Index block_size_) : NF4Settings{block_size_} { validate(); }

  using Storage = NF4Codes;

  void store(const MatrixF& P, Storage& out) const {
    validate();  // block_size is a public member: it may have changed since construction
    const Index n = P.size();
    out.resize(shape_of(P), block_size);
    const Index blocks = NF4Codes::blocks_for(n, block_size);
    const float* w = P.data();
    for (Index b = 0; b < blocks; ++b) {
      const Index lo = b * block_size, hi = lo + std::min(block_size, n - lo);
      float amax = 0.0f;
      for (Index i = lo; i < hi; ++i) amax = std::max(amax, std::abs(w[i]));
      out.absmax[static_cast<std::size_t>(b)] = amax;
      const float inv = nf4_inverse(amax);
      for (Index i = lo; i < hi; ++i) {
        const std::uint8_t c = nf4_code(w[i] * inv);
        out.codes[static_cast<std::size_t>(i / 2)] |= static_cast<std::uint8_t>(c << ((i % 2) * 4));
      }
    }
  }

  const MatrixF& load(const Storage& s, MatrixF& scratch) const {
    scratch.resize(s.shape().rows, s.shape().cols);
    float* out = scratch.data();
    for (Index i = 0; i < scratch.size(); ++i) {
      const std::uint8_t c = (s.codes[static_cast<std::size_t>(i / 2)] >> ((i % 2) * 4)) & 0xF;
      out[i] = nf4_value(c) * s.absmax[static_cast<std::size_t>(i / s.block_size)];
    }
    return scratch;
  }

  std::size_t storage_bytes(Shape s) const {
    validate();
    return NF4Codes::bytes_for(s, block_size);
  }
};

}  // namespace galore::quant
