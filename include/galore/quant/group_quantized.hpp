// galore: group-wise min-max codes as both backends store them (quant::MinMax
// in minmax.hpp quantizes into them on the CPU; the CUDA backend keeps the same
// codes, scales and zeros in device memory and checkpoints them in this form),
// and the settings of quant::MinMax. No Eigen.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../config.hpp"
#include "../core/shape.hpp"

namespace galore::quant {

// Group-wise quantized values of a matrix, packed.
template <int Bits>
struct GroupQuantized {
  static_assert(Bits == 1 || Bits == 2 || Bits == 4 || Bits == 8, "codes of 1, 2, 4 or 8 bits pack into bytes");
  static constexpr int bits = Bits;
  static constexpr int per_byte = 8 / Bits;
  static constexpr std::uint8_t mask = static_cast<std::uint8_t>((1u << Bits) - 1);
  static constexpr float max_code = static_cast<float>((1 << Bits) - 1);

  Shape shape_;
  Index group_size = 0;              // resolved: always > 0
  std::vector<std::uint8_t> codes;   // ceil(size * Bits / 8) bytes
  std::vector<float> scales;         // one per group
  std::vector<std::uint8_t> zeros;   // one per group; integers in [0, 2^Bits - 1]

  Shape shape() const { return shape_; }
  Index size() const { return shape_.size(); }
  Index num_groups() const { return static_cast<Index>(scales.size()); }

  static Index groups_for(Index size, Index group) {
    detail::require(group > 0, "GroupQuantized: group size must be positive (got ", group, ")");
    return size / group + (size % group != 0);  // ceil(size / group) without overflow for any group
  }
  static std::size_t bytes_for(Shape s, Index group) {
    const auto n = static_cast<std::size_t>(s.size());
    const auto g = static_cast<std::size_t>(groups_for(s.size(), group));
    return (n + per_byte - 1) / per_byte + g * (sizeof(float) + 1);
  }
  std::size_t bytes() const { return codes.size() + scales.size() * sizeof(float) + zeros.size(); }

  // Throws galore::invalid_argument, changing nothing, for a group size below 1
  // or a negative shape.
  void resize(Shape s, Index group) {
    detail::require(s.rows >= 0 && s.cols >= 0, "GroupQuantized: negative shape ", s.rows, "x", s.cols);
    const auto groups = static_cast<std::size_t>(groups_for(s.size(), group));
    shape_ = s;
    group_size = group;
    codes.assign((static_cast<std::size_t>(s.size()) + per_byte - 1) / per_byte, 0);
    scales.assign(groups, 0.0f);
    zeros.assign(groups, 0);
  }

  std::uint8_t code(Index i) const {
    if constexpr (Bits == 8) return codes[static_cast<std::size_t>(i)];
    else return (codes[static_cast<std::size_t>(i / per_byte)] >> ((i % per_byte) * Bits)) & mask;
  }
  void set_code(Index i, std::uint8_t c) {
    if constexpr (Bits == 8) {
      codes[static_cast<std::size_t>(i)] = c;
    } else {
      std::uint8_t& byte = codes[static_cast<std::size_t>(i / per_byte)];
      const int shift = static_cast<int>(i % per_byte) * Bits;
      byte = static_cast<std::uint8_t>((byte & ~(mask << shift)) | ((c & mask) << shift));
    }
  }
};

// -1 means one group per row (a group of 1 for a matrix without columns, which
// holds no element); anything else must be positive.
inline Index resolve_group_size(Index group_size, Shape s) {
  if (group_size == -1) return s.cols > 0 ? s.cols : 1;
  detail::require(group_size > 0, "group size must be positive or -1 for one group per row (got ",
                  group_size, ")");
  return group_size;
}

// The settings of quant::MinMax<Bits> (minmax.hpp): what the CUDA facade
// takes for a quantized basis, without the CPU policy's Eigen code.
struct MinMaxSettings {
  Index group_size = -1;  // -1: one group per row of the stored factor; otherwise >= 1

  // Throws galore::invalid_argument unless group_size is -1 or positive.
  void validate() const {
    detail::require(group_size == -1 || group_size > 0,
                    "quant::MinMax: group size must be positive, or -1 for one group per row (got ", group_size, ")");
  }
};

}  // namespace galore::quant
