// galore (CUDA backend): row-major GEMM on device views through cuBLAS.
//
//   C = alpha * op(A) * op(B) + beta * C        (A, B, C row-major device views)
//
// cuBLAS is column-major; a row-major matrix is its transpose in column-major
// order, so the product is issued as C^T = op(B)^T op(A)^T. A and B share one
// element type (float or bf16); C is float or bf16; the accumulation is float32
// (CUBLAS_COMPUTE_32F: true float32 for float inputs, tensor cores for bf16).
// float and bf16 products go through cuBLASLt with the heuristic's first
// algorithm, planned once per problem and cached in the context (for the skinny
// products of a GaLore step it picks faster kernels than cublasGemmEx's
// default: 10 against 15 us for 2048 x 2048 x 512 on an H200), or with the
// fastest of its first few timed on the first call (Context::
// select_gemm_algorithms(GemmSelection::Measured)); double ones through
// cublasGemmEx.
// alpha and beta are host values, or device pointers (read when the GEMM runs,
// so a kernel earlier on the stream may set them: that is how a skipped step
// turns the back-projection into W = 1 * W + 0 without a host synchronization).
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

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

// The largest power of two up to 256 that divides the address: the alignment
// cuBLASLt may assume of a matrix (its heuristic assumes 256 unless told).
inline std::uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t b = 256;
  while (b > 1 && a % b != 0) b /= 2;
  return b;
}

// The cached cuBLASLt plan of C^T = op(B)^T op(A)^T in column-major terms, for
// matrices aligned to at least `alignment` bytes; batch > 0: that many products
// whose matrices are read from device arrays of pointers
// (CUBLASLT_BATCH_MODE_POINTER_ARRAY), all with one shape.
template <class In, class Out>
LtPlan& lt_plan(Context& ctx, Op opa, Op opb, bool device_scalars, Index lda, Index ldb, Index ldc, Index M,
                      Index N, Index K, int batch, std::uint32_t alignment) {
  // Column-major problem: C^T (N x M) = X (N x K) * Y (K x M), X from B, Y from A.
  const LtPlanKey key{static_cast<std::int64_t>(opa), static_cast<std::int64_t>(opb), M, N, K, lda, ldb, ldc,
                      static_cast<std::int64_t>(data_type<In>()), static_cast<std::int64_t>(data_type<Out>()),
                      device_scalars ? 1 : 0, batch, alignment};
  auto& plans = ctx.lt_plans();
  auto it = plans.find(key);
  if (it != plans.end()) return *it->second;
  auto plan = std::make_unique<LtPlan>();
  check(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t tx = to_cublas(opb), ty = to_cublas(opa);
  check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &tx, sizeof tx), "cublasLtMatmulDescSetAttribute");
  check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &ty, sizeof ty), "cublasLtMatmulDescSetAttribute");
  const cublasLtPointerMode_t pm = device_scalars ? CUBLASLT_POINTER_MODE_DEVICE : CUBLASLT_POINTER_MODE_HOST;
  check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof pm),
        "cublasLtMatmulDescSetAttribute");
  // Stored (column-major) shapes: X is N x K (or K x N when transposed), Y is K x M (or M x K).
  check(cublasLtMatrixLayoutCreate(&plan->a, data_type<In>(), opb == Op::N ? N : K, opb == Op::N ? K : N, ldb),
        "cublasLtMatrixLayoutCreate");
  check(cublasLtMatrixLayoutCreate(&plan->b, data_type<In>(), opa == Op::N ? K : M, opa == Op::N ? M : K, lda),
        "cublasLtMatrixLayoutCreate");
  check(cublasLtMatrixLayoutCreate(&plan->c, data_type<Out>(), N, M, ldc), "cublasLtMatrixLayoutCreate");
  if (batch > 0) {
    const std::uint32_t mode = CUBLASLT_BATCH_MODE_POINTER_ARRAY;
    for (cublasLtMatrixLayout_t l : {plan->a, plan->b, plan->c}) {
      check(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch),
            "cublasLtMatrixLayoutSetAttribute(BATCH_COUNT)");
      check(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode, sizeof mode),
            "cublasLtMatrixLayoutSetAttribute(BATCH_MODE)");
    }
  }
  cublasLtMatmulPreference_t pref = nullptr;
  check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
  const std::size_t ws = Context::kLtWorkspaceBytes;
  cublasLtMatmulHeuristicResult_t results[kGemmCandidates]{};
  int found = 0;
  cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                           sizeof ws);
  for (cublasLtMatmulPreferenceAttributes_t a :
       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulPreferenceSetAttribute(pref, a, &alignment, sizeof alignment);
  if (st == CUBLAS_STATUS_SUCCESS)
    cublasLtMatmulAlgoGetHeuristic(ctx.blas_lt(), plan->op, plan->a, plan->b, plan->c, plan->c, pref, kGemmCandidates,
                                   results, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  check(st, "cublasLtMatmulPreferenceSetAttribute");
  plan->has_algo = found > 0;
  plan->to_measure = ctx.gemm_selection() == GemmSelection::Measured;
  if (plan->has_algo) plan->algo = results[0].algo;
  for (int i = 0; i < found; ++i)
    if (results[i].state == CUBLAS_STATUS_SUCCESS) plan->candidates.push_back(results[i].algo);
  return *plans.emplace(key, std::move(plan)).first->second;
}

inline bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t e = cudaStreamIsCapturing(stream, &status);
  if (e == cudaErrorStreamCaptureImplicit) {  // the legacy stream while a blocking stream captures
    (void)cudaGetLastError();
    return true;
  }
  check(e, "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

// The timing of measure_plan (below); throws on a CUDA error.
template <class Out>
void time_candidates(Context& ctx, LtPlan& p, bool device_scalars, const void* x, const void* y,
                     std::size_t c_elements, int batch, float beta) {
  if (p.candidates.size() < 2) return;
  constexpr std::size_t kScratchBytes = std::size_t{256} << 20;
  const std::size_t c_bytes = WorkspaceArena::align(sizeof(Out) * c_elements);
  const std::size_t distinct = batch > 0 ? std::clamp<std::size_t>(kScratchBytes / c_bytes, 1, batch) : 1;
  DeviceBuffer<unsigned char> scratch(c_bytes * distinct);
  check(cudaMemsetAsync(scratch.data(), 0, scratch.bytes(), ctx.stream()), "cudaMemsetAsync");
  DeviceBuffer<void*> outputs(batch > 0 ? static_cast<std::size_t>(batch) : 0);
  std::vector<void*> host_outputs(outputs.size());
  for (std::size_t i = 0; i < host_outputs.size(); ++i) host_outputs[i] = scratch.data() + (i % distinct) * c_bytes;
  if (batch > 0)
    check(cudaMemcpyAsync(outputs.data(), host_outputs.data(), outputs.bytes(), cudaMemcpyHostToDevice, ctx.stream()),
          "cudaMemcpyAsync");
  void* const c = batch > 0 ? static_cast<void*>(outputs.data()) : static_cast<void*>(scratch.data());
  const float host_scalars[2] = {1.0f, beta};
  DeviceBuffer<float> device_scalar_values(2);
  check(cudaMemcpyAsync(device_scalar_values.data(), host_scalars, sizeof host_scalars, cudaMemcpyHostToDevice,
                        ctx.stream()),
        "cudaMemcpyAsync");
  const float* scalars = device_scalars ? device_scalar_values.data() : host_scalars;
  struct Events {  // destroyed on every way out
    cudaEvent_t start = nullptr, stop = nullptr;
    ~Events() {
      if (start) cudaEventDestroy(start);
      if (stop) cudaEventDestroy(stop);
    }
  } ev;
  check(cudaEventCreate(&ev.start), "cudaEventCreate");
  check(cudaEventCreate(&ev.stop), "cudaEventCreate");
  auto run = [&](const cublasLtMatmulAlgo_t& algo) {
    return cublasLtMatmul(ctx.blas_lt(), p.op, scalars, x, p.a, y, p.b, scalars + 1, c, p.c, c, p.c, &algo,
                          ctx.lt_workspace(), Context::kLtWorkspaceBytes, ctx.stream());
  };
  float best = std::numeric_limits<float>::infinity(), heuristic = best;
  const cublasLtMatmulAlgo_t* chosen = &p.candidates.front();
  for (const cublasLtMatmulAlgo_t& algo : p.candidates) {
    if (run(algo) != CUBLAS_STATUS_SUCCESS) continue;  // warm-up; a candidate that cannot run is passed over
    check(cudaEventRecord(ev.start, ctx.stream()), "cudaEventRecord");
    for (int i = 0; i < 3; ++i) check(run(algo), "cublasLtMatmul (timing a candidate)");
    check(cudaEventRecord(ev.stop, ctx.stream()), "cudaEventRecord");
    check(cudaEventSynchronize(ev.stop), "cudaEventSynchronize");
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, ev.start, ev.stop), "cudaEventElapsedTime");
    if (&algo == &p.candidates.front()) heuristic = ms;
    if (ms < best) {
      best = ms;
      chosen = &algo;
    }
  }
  if (best < 0.97f * heuristic) p.algo = *chosen;
}

// GemmSelection::Measured: times plan p's candidates on the operands x and y
// (cuBLASLt's order: x from B, y from A; with batch > 0 device arrays of
// pointers) into zeroed scratch output of c_elements elements per product, with
// alpha 1 and the given beta (0 or not decides whether the kernels read C), and
// keeps the fastest; the heuristic's choice stays unless
// another is more than 3% faster (timing noise must not change the algorithm
// for nothing). Synchronizes; a no-op while the stream is being captured. Up
// to kScratchBytes of distinct outputs: a larger batch writes some twice.
// Never throws: a measurement that fails (no memory for the scratch, say)
// keeps the heuristic's choice, so that the GEMM it precedes runs (in a step,
// after Adam has updated the moments) as without it.
template <class Out>
void measure_plan(Context& ctx, LtPlan& p, bool device_scalars, const void* x, const void* y, std::size_t c_elements,
                  int batch, float beta) noexcept {
  try {
    if (!p.to_measure || p.measured || !p.has_algo || capturing(ctx.stream())) return;
    p.measured = true;
    time_candidates<Out>(ctx, p, device_scalars, x, y, c_elements, batch, beta);
  } catch (...) {
    p.algo = p.candidates.empty() ? p.algo : p.candidates.front();
    (void)cudaGetLastError();  // a failed allocation is not sticky; a kernel fault would be, and shows at the next call
  }
}

template <class In, class Out>
void lt_matmul(Context& ctx, Op opa, Op opb, bool device_scalars, const void* alpha, const In* A, Index lda,
               const In* B, Index ldb, const void* beta, Out* C, Index ldc, Index M, Index N, Index K) {
  const std::uint32_t alignment = std::min({alignment_of(A), alignment_of(B), alignment_of(C)});
  LtPlan& p = lt_plan<In, Out>(ctx, opa, opb, device_scalars, lda, ldb, ldc, M, N, K, 0, alignment);
  // Device scalars are the back-projection's, whose beta is not 0.
  const float measure_beta = device_scalars ? 1.0f : *static_cast<const float*>(beta);
  measure_plan<Out>(ctx, p, device_scalars, B, A, static_cast<std::size_t>((M - 1) * ldc + N), 0, measure_beta);
  if (!p.has_algo) {  // no cuBLASLt kernel for this problem: cublasGemmEx decides
    check(cublasSetPointerMode(ctx.blas(), device_scalars ? CUBLAS_POINTER_MODE_DEVICE : CUBLAS_POINTER_MODE_HOST),
          "cublasSetPointerMode");
    const cublasStatus_t st = cublasGemmEx(ctx.blas(), to_cublas(opb), to_cublas(opa), static_cast<int>(N),
                                           static_cast<int>(M), static_cast<int>(K), alpha, B, data_type<In>(),
                                           static_cast<int>(ldb), A, data_type<In>(), static_cast<int>(lda), beta, C,
                                           data_type<Out>(), static_cast<int>(ldc), CUBLAS_COMPUTE_32F,
                                           CUBLAS_GEMM_DEFAULT);
    check(cublasSetPointerMode(ctx.blas(), CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
    check(st, "cublasGemmEx");
    return;
  }
  check(cublasLtMatmul(ctx.blas_lt(), p.op, alpha, B, p.a, A, p.b, beta, C, p.c, C, p.c, &p.algo, ctx.lt_workspace(),
                       Context::kLtWorkspaceBytes, ctx.stream()),
        "cublasLtMatmul");
}

template <class TA, class TB, class TC>
void gemm_impl(Context& ctx, Op opa, Op opb, bool device_scalars, const void* alpha, DeviceView<const TA> A,
               DeviceView<const TB> B, const void* beta, DeviceView<TC> C) {
  static_assert(std::is_same_v<std::remove_const_t<TA>, std::remove_const_t<TB>>,
                "galore: both GEMM operands must have one element type");
  const Shape a = op_shape(opa, A.rows, A.cols), b = op_shape(opb, B.rows, B.cols);
  galore::detail::require(a.cols == b.rows && C.rows == a.rows && C.cols == b.cols, "GEMM shapes do not agree: op(A) is ",
                          a.rows, "x", a.cols, ", op(B) ", b.rows, "x", b.cols, ", C ", C.rows, "x", C.cols);
  if (C.rows == 0 || C.cols == 0) return;
  using In = std::remove_const_t<TA>;
  if constexpr (!std::is_same_v<In, double>) {
    lt_matmul<In, std::remove_const_t<TC>>(ctx, opa, opb, device_scalars, alpha, A.data, A.ld, B.data, B.ld, beta,
                                           C.data, C.ld, C.rows, C.cols, a.cols);
    return;
  }
  check(cublasSetPointerMode(ctx.blas(), CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
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
  impl::gemm_impl(ctx, opa, opb, false, &a, A, B, &b, C);
}

// Scalars read from device memory when the GEMM runs.
template <class TA, class TB, class TC>
void gemm_device_scalars(Context& ctx, Op opa, Op opb, const float* alpha, DeviceView<const TA> A,
                         DeviceView<const TB> B, const float* beta, DeviceView<TC> C) {
  static_assert(!std::is_same_v<std::remove_const_t<TA>, double>, "galore: device scalars are float");
  impl::gemm_impl(ctx, opa, opb, true, alpha, A, B, beta, C);
}

// The plan of gemm_batched's problem (below), its algorithm measured on A and B
// when the context measures (GemmSelection::Measured; synchronizes then; with
// beta 0 or 1 as `accumulate` says the calls will have it): host work only
// otherwise, so that a later call can be captured in a CUDA graph.
template <class In, class Out>
const LtPlan& prepare_gemm_batched(Context& ctx, Op opa, Op opb, Index rows, Index cols, Index inner,
                                   const In* const* A, Index lda, const In* const* B, Index ldb, Index ldc, int count,
                                   std::uint32_t alignment, bool accumulate = true) {
  LtPlan& p = impl::lt_plan<In, Out>(ctx, opa, opb, true, lda, ldb, ldc, rows, cols, inner, count, alignment);
  if (count > 0 && rows > 0 && cols > 0)
    impl::measure_plan<Out>(ctx, p, true, B, A, static_cast<std::size_t>((rows - 1) * ldc + cols), count,
                            accumulate ? 1.0f : 0.0f);
  return p;
}

// `count` products of one shape, C_i = alpha op(A_i) op(B_i) + beta C_i, the
// matrices read from device arrays of pointers (A, B, C: `count` entries each,
// in device memory, read when the GEMM runs: a kernel earlier on the stream may
// redirect them). C_i is rows x cols, the inner dimension `inner`; alpha and
// beta are device pointers; every matrix is aligned to at least `alignment`
// bytes (a power of two up to 256: cuBLASLt cannot see the pointers). The plan
// is made by the first call with a shape (host work only), so calls after it
// can be captured in a CUDA graph.
template <class In, class Out>
void gemm_batched(Context& ctx, Op opa, Op opb, Index rows, Index cols, Index inner, const float* alpha,
                  const In* const* A, Index lda, const In* const* B, Index ldb, const float* beta, Out* const* C,
                  Index ldc, int count, std::uint32_t alignment) {
  static_assert(is_device_scalar_v<In> && is_device_scalar_v<Out>, "galore: batched GEMMs take float or bf16");
  if (count <= 0 || rows == 0 || cols == 0) return;
  const LtPlan& p = prepare_gemm_batched<In, Out>(ctx, opa, opb, rows, cols, inner, A, lda, B, ldb, ldc, count, alignment);
  if (!p.has_algo) {  // no cuBLASLt kernel for it: cublasGemmBatchedEx decides
    check(cublasSetPointerMode(ctx.blas(), CUBLAS_POINTER_MODE_DEVICE), "cublasSetPointerMode");
    const cublasStatus_t st = cublasGemmBatchedEx(
        ctx.blas(), impl::to_cublas(opb), impl::to_cublas(opa), static_cast<int>(cols), static_cast<int>(rows),
        static_cast<int>(inner), alpha, reinterpret_cast<const void* const*>(B), data_type<In>(),
        static_cast<int>(ldb), reinterpret_cast<const void* const*>(A), data_type<In>(), static_cast<int>(lda), beta,
        reinterpret_cast<void* const*>(C), data_type<Out>(), static_cast<int>(ldc), count, CUBLAS_COMPUTE_32F,
        CUBLAS_GEMM_DEFAULT);
    check(cublasSetPointerMode(ctx.blas(), CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
    check(st, "cublasGemmBatchedEx");
    return;
  }
  // Pointer-array mode: A, B and C are the device arrays of pointers.
  void* const c_arrays = const_cast<Out**>(C);
  check(cublasLtMatmul(ctx.blas_lt(), p.op, alpha, B, p.a, A, p.b, beta, c_arrays, p.c, c_arrays, p.c, &p.algo,
                       ctx.lt_workspace(), Context::kLtWorkspaceBytes, ctx.stream()),
        "cublasLtMatmul");
}

}  // namespace galore::cuda
