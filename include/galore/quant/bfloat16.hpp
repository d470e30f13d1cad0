// galore: a projector quantization policy that keeps P in bfloat16.
#pragma once

#include <cstddef>

#include "../types.hpp"

namespace galore::quant {

// Keeps P in bfloat16, as galore_torch does when the gradients are bf16.
struct BFloat16 {
  struct Storage {
    Matrix<bfloat16> matrix;
    std::size_t bytes() const { return sizeof(bfloat16) * static_cast<std::size_t>(matrix.size()); }
    Shape shape() const { return shape_of(matrix); }
  };
  void store(const MatrixF& P, Storage& out) const { out.matrix = P.cast<bfloat16>(); }
  const MatrixF& load(const Storage& s, MatrixF& scratch) const {
    scratch = s.matrix.cast<float>();
    return scratch;
  }
  std::size_t storage_bytes(Shape s) const { return sizeof(bfloat16) * static_cast<std::size_t>(s.size()); }
};

}  // namespace galore::quant
