// galore (CUDA backend): row-major GEMM on device views through cuBLAS.
//
//   C = alpha * op(A) * op(B) + beta * C        (A, B, C row-major device views)
//
// cuBLAS is column-major; a row-major matrix is its transpose in column-major
// order, so the product is issued as C^T = op(B)^T op(A)^T. A and B share one
// element type (float or bf16); C is float or bf16; the accumulation is float32
// (CUBLAS_COMPUTE_32F: true float32 for float inputs, tensor cores for bf16).
// alpha and beta are host values, or device pointers (read when the GEMM runs,
// so a kernel earlier on the stream may set them: that is how a skipped step
// turns the back-projection into W = 1 * W + 0 without a host synchronization).
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <type_traits>

#include "../../core/matrix_view.hpp"
#include "context.cuh"
#include "error.cuh"

namespace galore::cuda {

using bf16 = __nv_bfloat16;

template <class T>
inline constexpr bool is_device_scalar_v = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

template <class T>
constexpr cudaDataType_t data_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, double>,
                "galore: the CUDA backend's matrices hold float, __nv_bfloat16 (or double, internally)");
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
  else return CUDA_R_16BF;
}

enum class Op { N, T };

namespace impl {
inline Shape op_shape(Op op, Index rows, Index cols) { return op == Op::N ? Shape{rows, cols} : Shape{cols, rows}; }
inline cublasOperation_t to_cublas(Op op) { return op == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T; }

template <class TA, class TB, class TC>
void gemm_impl(Context& ctx, Op opa, Op opb, const void* alpha, DeviceView<const TA> A, DeviceView<const TB> B,
               const void* beta, DeviceView<TC> C) {
  static_assert(std::is_same_v<std::remove_const_t<TA>, std::remove_const_t<TB>>,
                "galore: both GEMM operands must have one element type");
  const Shape a = op_shape(opa, A.rows, A.cols), b = op_shape(opb, B.rows, B.cols);
  galore::detail::require(a.cols == b.rows && C.rows == a.rows && C.cols == b.cols, "GEMM shapes do not agree: op(A) is ",
                          a.rows, "x", a.cols, ", op(B) ", b.rows, "x", b.cols, ", C ", C.rows, "x", C.cols);
  if (C.rows == 0 || C.cols == 0) return;
  using In = std::remove_const_t<TA>;
  const cublasComputeType_t compute = std::is_same_v<In, double> ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  check(cublasGemmEx(ctx.blas(), to_cublas(opb), to_cublas(opa), static_cast<int>(C.cols), static_cast<int>(C.rows),
                     static_cast<int>(a.cols), alpha, B.data, data_type<In>(), static_cast<int>(B.ld), A.data,
                     data_type<In>(), static_cast<int>(A.ld), beta, C.data, data_type<std::remove_const_t<TC>>(),
                     static_cast<int>(C.ld), compute, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
}
}  // namespace impl

// Scalars given on the host.
template <class TA, class TB, class TC, class S>
void gemm(Context& ctx, Op opa, Op opb, S alpha, DeviceView<const TA> A, DeviceView<const TB> B, S beta,
          DeviceView<TC> C) {
  using Scalar = std::conditional_t<std::is_same_v<std::remove_const_t<TA>, double>, double, float>;
  const Scalar a = static_cast<Scalar>(alpha), b = static_cast<Scalar>(beta);
  check(cublasSetPointerMode(ctx.blas(), CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  impl::gemm_impl(ctx, opa, opb, &a, A, B, &b, C);
}

// Scalars read from device memory when the GEMM runs.
template <class TA, class TB, class TC>
void gemm_device_scalars(Context& ctx, Op opa, Op opb, const float* alpha, DeviceView<const TA> A,
                         DeviceView<const TB> B, const float* beta, DeviceView<TC> C) {
  check(cublasSetPointerMode(ctx.blas(), CUBLAS_POINTER_MODE_DEVICE), "cublasSetPointerMode");
  impl::gemm_impl(ctx, opa, opb, alpha, A, B, beta, C);
  check(cublasSetPointerMode(ctx.blas(), CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
}

}  // namespace galore::cuda
