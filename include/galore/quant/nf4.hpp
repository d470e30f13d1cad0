// galore: NF4 (QLoRA's 4-bit NormalFloat) as a projector quantization policy.
//
// Blocks of `block_size` consecutive elements (row-major) share one float32
// absmax; each element keeps the index of the nearest of the 16 NF4 values of
// x / absmax, two indices per byte. No step converts a float to an integer, so
// NaN or Inf input gives defined (meaningless) codes: NaN compares false and
// gets index 0.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../types.hpp"

namespace galore::quant {

inline constexpr std::array<float, 16> kNF4Values = {
    -1.0f,     -0.6962f, -0.5251f, -0.3949f, -0.2844f, -0.1848f, -0.0911f, 0.0f,
    0.0796f,   0.1609f,  0.2461f,  0.3379f,  0.4407f,  0.5626f,  0.7230f,  1.0f};

// Index of the NF4 value nearest to x in [-1, 1]; a tie goes to the lower value.
inline std::uint8_t nf4_code(float x) {
  std::uint8_t c = 0;
  for (std::uint8_t k = 1; k < 16; ++k)
    if (x > 0.5f * (kNF4Values[k - 1] + kNF4Values[k])) c = k;
  return c;
}

struct NF4 {
  Index block_size = 64;  // >= 1

  NF4() = default;
  // Throws galore::invalid_argument unless block_size >= 1 (0 would divide by
  // zero in storage_bytes, which a projector calls before any store).
  explicit NF4(Index block_size_) : block_size(block_size_) { check(); }

  struct Storage {
    Shape shape_;
    Index block_size = 64;
    std::vector<std::uint8_t> codes;  // two per byte, low nibble first
    std::vector<float> absmax;        // one per block
    Shape shape() const { return shape_; }
    std::size_t bytes() const { return codes.size() + absmax.size() * sizeof(float); }
  };

  void store(const MatrixF& P, Storage& out) const {
    check();  // block_size is a public member: it may have changed since construction
    const Index n = P.size();
    out.shape_ = shape_of(P);
    out.block_size = block_size;
    out.codes.assign(static_cast<std::size_t>((n + 1) / 2), 0);
    const Index blocks = n / block_size + (n % block_size != 0);
    out.absmax.assign(static_cast<std::size_t>(blocks), 0.0f);
    const float* w = P.data();
    for (Index b = 0; b < blocks; ++b) {
      const Index lo = b * block_size, hi = lo + std::min(block_size, n - lo);
      float amax = 0.0f;
      for (Index i = lo; i < hi; ++i) amax = std::max(amax, std::abs(w[i]));
      out.absmax[static_cast<std::size_t>(b)] = amax;
      const float inv = amax > 0.0f ? 1.0f / amax : 0.0f;
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
      out[i] = kNF4Values[c] * s.absmax[static_cast<std::size_t>(i / s.block_size)];
    }
    return scratch;
  }

  std::size_t storage_bytes(Shape s) const {
    check();
    const auto n = static_cast<std::size_t>(s.size());
    const auto block = static_cast<std::size_t>(block_size);
    return (n + 1) / 2 + sizeof(float) * (n / block + (n % block != 0));
  }

 private:
  void check() const {
    detail::require(block_size > 0, "quant::NF4: block size must be positive (got ", block_size, ")");
  }
};

}  // namespace galore::quant
