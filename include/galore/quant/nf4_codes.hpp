// galore: QLoRA's 4-bit NormalFloat (NF4) codes as both backends store them
// (quant::NF4 in nf4.hpp quantizes into them on the CPU, the CUDA backend on the
// device), and the settings of quant::NF4. No Eigen.
//
// Blocks of `block_size` consecutive elements (row-major) share one float32
// absmax; each element keeps the index of the nearest of the 16 NF4 values of
// x * (1 / absmax) (0 for an all-zero block), two indices per byte, low half
// first. The functions are GALORE_HOST_DEVICE: both backends run the same float
// operations, so they write the same codes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../config.hpp"
#include "../core/shape.hpp"

namespace galore::quant {

// NF4 value k (k in [0, 15]), the 16 levels in [-1, 1].
GALORE_HOST_DEVICE constexpr float nf4_value(int k) {
  switch (k) {
    case 0: return -1.0f;
    case 1: return -0.6962f;
    case 2: return -0.5251f;
    case 3: return -0.3949f;
    case 4: return -0.2844f;
    case 5: return -0.1848f;
    case 6: return -0.0911f;
    case 7: return 0.0f;
    case 8: return 0.0796f;
    case 9: return 0.1609f;
    case 10: return 0.2461f;
    case 11: return 0.3379f;
    case 12: return 0.4407f;
    case 13: return 0.5626f;
    case 14: return 0.7230f;
    default: return 1.0f;
  }
}

// Index of the NF4 value nearest to x in [-1, 1]; a tie goes to the lower value.
// NaN compares false everywhere and gets index 0.
GALORE_HOST_DEVICE std::uint8_t nf4_code(float x) {
  std::uint8_t c = 0;
  for (int k = 1; k < 16; ++k)
    if (x > 0.5f * (nf4_value(k - 1) + nf4_value(k))) c = static_cast<std::uint8_t>(k);
  return c;
}

// The multiplier of a block with absmax `amax`: 1 / amax, or 0 for an all-zero block.
GALORE_HOST_DEVICE float nf4_inverse(float amax) { return amax > 0.0f ? 1.0f / amax : 0.0f; }

// A matrix in NF4: codes two per byte and an absmax per block.
struct NF4Codes {
  Shape shape_;
  Index block_size = 64;
  std::vector<std::uint8_t> codes;  // two per byte, low nibble first
  std::vector<float> absmax;        // one per block
  Shape shape() const { return shape_; }
  std::size_t bytes() const { return codes.size() + absmax.size() * sizeof(float); }
  static Index blocks_for(Index size, Index block) { return size / block + (size % block != 0); }
  static std::size_t bytes_for(Shape s, Index block) {
    const auto n = static_cast<std::size_t>(s.size());
    return (n + 1) / 2 + sizeof(float) * static_cast<std::size_t>(blocks_for(s.size(), block));
  }
  void resize(Shape s, Index block) {
    detail::require(block > 0, "quant::NF4: block size must be positive (got ", block, ")");
    shape_ = s;
    block_size = block;
    codes.assign((static_cast<std::size_t>(s.size()) + 1) / 2, 0);
    absmax.assign(static_cast<std::size_t>(blocks_for(s.size(), block)), 0.0f);
  }
};

// The settings of quant::NF4 (nf4.hpp): what the CUDA facade takes for an NF4
// basis, without the CPU policy's Eigen code.
struct NF4Settings {
  Index block_size = 64;  // >= 1

  // Throws galore::invalid_argument unless block_size >= 1.
  void validate() const {
    detail::require(block_size > 0, "quant::NF4: block size must be positive (got ", block_size, ")");
  }
};

}  // namespace galore::quant
