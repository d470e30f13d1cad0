// galore (CUDA backend): the element types the GPU steps, as a value.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "gemm.cuh"

namespace galore::cuda {

enum class DType : std::uint8_t { Float32, BFloat16 };

template <class T>
constexpr DType dtype_of() {
  static_assert(is_device_scalar_v<T>, "galore: the CUDA backend steps float or __nv_bfloat16 weights");
  return std::is_same_v<T, float> ? DType::Float32 : DType::BFloat16;
}
inline std::size_t size_of(DType t) { return t == DType::Float32 ? 4 : 2; }
inline const char* to_string(DType t) { return t == DType::Float32 ? "float32" : "bfloat16"; }

}  // namespace galore::cuda
