// galore: the quantization policies for a projector's matrices that keep floats.
//
// A quantization policy stores a float32 factor and lends it back dequantized:
//
//   struct Storage { std::size_t bytes() const; Shape shape() const; ... };
//   void store(const MatrixF& P, Storage& out) const;
//   const MatrixF& load(const Storage& s, MatrixF& scratch) const;  // may return s's own matrix
//   std::size_t storage_bytes(Shape) const;                          // what store() will hold
#pragma once

#include <cstddef>

#include "../types.hpp"

namespace galore::quant {

// Keeps P in float32 and lends it without a copy.
struct None {
  struct Storage {
    MatrixF matrix;
    std::size_t bytes() const { return sizeof(float) * static_cast<std::size_t>(matrix.size()); }
    Shape shape() const { return shape_of(matrix); }
  };
  void store(const MatrixF& P, Storage& out) const { out.matrix = P; }
  const MatrixF& load(const Storage& s, MatrixF& /*scratch*/) const { return s.matrix; }
  std::size_t storage_bytes(Shape s) const { return sizeof(float) * static_cast<std::size_t>(s.size()); }
};

}  // namespace galore::quant
