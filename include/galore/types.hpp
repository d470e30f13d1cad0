// galore: the matrix types of the Eigen CPU backend.
//
// Weights and gradients are row-major, as in PyTorch and most C/C++ trainers: the
// quantizers group consecutive elements of the row-major flattening, exactly as
// the reference does. Callers pass Eigen::Ref views, so a Map over their own
// buffers works without a copy.
#pragma once

#include <Eigen/Core>
#include <cstdint>

#include "config.hpp"
#include "core/shape.hpp"

namespace galore {

static_assert(std::is_same_v<Index, Eigen::Index>, "galore::Index must be Eigen's index type");
using bfloat16 = Eigen::bfloat16;

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixF = Matrix<float>;
using VectorF = Eigen::VectorXf;

// A writable view of a row-major matrix (a Matrix, a Map, or a block of rows).
template <class T>
using MatrixRef = Eigen::Ref<Matrix<T>>;
// A read-only view. Passing an expression of another type makes a copy, so pass
// row-major storage of the right scalar to stay copy-free.
template <class T>
using ConstMatrixRef = Eigen::Ref<const Matrix<T>>;

template <class Derived>
Shape shape_of(const Eigen::EigenBase<Derived>& m) {
  return {m.rows(), m.cols()};
}

// Weight and gradient scalars the optimizers accept; the math is float32.
template <class T>
inline constexpr bool is_supported_scalar_v =
    std::is_same_v<T, float> || std::is_same_v<T, bfloat16>;

}  // namespace galore
