// galore (CUDA backend): computing a layer's basis on the GPU for the SVD
// policies both backends share (svd/*.hpp: hyperparameters only; the CPU's
// overloads are in backend/eigen/svd.hpp).
//
// - svd::Exact: the eigenvectors of the smaller Gram matrix (G^T G or G G^T,
//   formed in float64 from the float or bf16 G) from cuSOLVER's syevd in
//   float64; the other side's vectors are G v / |G v|. The float64 Gram
//   matrix (error about sqrt(k) 1e-16 of the largest eigenvalue) resolves the
//   vectors of singular values down to about 2e-4 of the largest to float
//   precision; the other side's, computed in G's type, lose a factor s_1 / s_i.
// - svd::Randomized: the Gaussian sketch of the CPU (same Philox numbers),
//   power iterations, then Rayleigh-Ritz.
// - svd::WarmStart: subspace iteration from the previous basis, then
//   Rayleigh-Ritz (or the orthonormalized iterate, with rayleigh_ritz off).
// Orthonormalization is CholeskyQR in float64, three passes, each Gram matrix
// shifted (orthonormalize below says why).
// Signs are canonical and oriented like the previous basis, as on the CPU.
//
// Nothing here synchronizes the host. The result goes to `out` (which may be
// the layer's own storage or a candidate buffer); `previous` may alias `out`.
#pragma once

#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "../../core/matrix_view.hpp"
#include "../../core/span.hpp"
#include "../../projection_type.hpp"
#include "../../rounding/philox.hpp"
#include "../../svd/exact.hpp"
#include "../../svd/randomized.hpp"
#include "../../svd/warm_start.hpp"
#include "basis_kernels.cuh"
#include "context.cuh"
#include "gemm.cuh"

namespace galore::cuda {

// A basis in device memory, in element type T (row-major): left m x r (column j
// is singular vector j), right r x n (row i is singular vector i).
template <class T>
struct DeviceBasis {
  Side side = Side::Right;
  T* left = nullptr;
  T* right = nullptr;
  Index rows = 0, cols = 0, rank = 0;
};


namespace impl {

inline int grid_for(std::int64_t n) { return blocks_for(n); }

template <class In, class Out>
void convert(Context& ctx, const In* in, Out* out, std::int64_t n) {
  convert<<<grid_for(n), kThreads, 0, ctx.stream()>>>(in, out, n);
  check_launch("galore::cuda::convert");
}

// Bytes of cuSOLVER device workspace for a k x k symmetric eigenproblem (E = float or double).
template <class E>
std::size_t syevd_bytes(Context& ctx, Index k, std::size_t* host_bytes = nullptr) {
  std::size_t dev = 0, host = 0;
  check(cusolverDnXsyevd_bufferSize(ctx.solver(), ctx.solver_params(), CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER,
                                    k, data_type<E>(), nullptr, k, data_type<E>(), nullptr, data_type<E>(), &dev, &host),
        "cusolverDnXsyevd_bufferSize");
  if (host_bytes) *host_bytes = host;
  return dev;
}

inline std::size_t potrf_bytes(Context& ctx, Index k, std::size_t* host_bytes = nullptr) {
  std::size_t dev = 0, host = 0;
  check(cusolverDnXpotrf_bufferSize(ctx.solver(), ctx.solver_params(), CUBLAS_FILL_MODE_LOWER, k, CUDA_R_64F, nullptr,
                                    k, CUDA_R_64F, &dev, &host),
        "cusolverDnXpotrf_bufferSize");
  if (host_bytes) *host_bytes = host;
  return dev;
}

// Top-r eigenvectors (largest first) of the k x k symmetric float64 matrix `a`
// (overwritten), solved by cuSOLVER's syevd, vector-major into vecs (r x k float).
inline void top_eigenvectors(Context& ctx, WorkspaceArena& ws, double* a, Index k, Index r, float* vecs) {
  std::size_t host_bytes = 0;
  const std::size_t dev_bytes = syevd_bytes<double>(ctx, k, &host_bytes);
  int* info = ws.take<int>(1);
  double* w = ws.take<double>(static_cast<std::size_t>(k));
  void* dwork = ws.take<unsigned char>(dev_bytes);
  auto& h = ctx.host_scratch();
  if (h.size() < host_bytes) h.resize(host_bytes);
  check(cusolverDnXsyevd(ctx.solver(), ctx.solver_params(), CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, k,
                         CUDA_R_64F, a, k, CUDA_R_64F, w, CUDA_R_64F, dwork, dev_bytes,
                         host_bytes ? h.data() : nullptr, host_bytes, info),
        "cusolverDnXsyevd");
  top_eigenvectors<<<dim3(static_cast<unsigned>(std::max<Index>(1, std::min<Index>((k + 255) / 256, 64))),
                          static_cast<unsigned>(r)),
                     256, 0, ctx.stream()>>>(a, static_cast<int>(k), static_cast<int>(r), vecs);
  check_launch("galore::cuda::top_eigenvectors");
}
inline std::size_t top_eigenvectors_f64_bytes(Context& ctx, Index k) {
  using A = WorkspaceArena;
  return A::align(sizeof(int)) + A::align(sizeof(double) * k) + A::align(syevd_bytes<double>(ctx, k));
}

// The same for a float matrix, solved in float64.
inline void top_eigenvectors(Context& ctx, WorkspaceArena& ws, const float* gram, Index k, Index r, float* vecs) {
  double* a = ws.take<double>(static_cast<std::size_t>(k * k));
  convert(ctx, gram, a, k * k);
  top_eigenvectors(ctx, ws, a, k, r, vecs);
}
inline std::size_t top_eigenvectors_bytes(Context& ctx, Index k) {
  return WorkspaceArena::align(sizeof(double) * k * k) + top_eigenvectors_f64_bytes(ctx, k);
}

// The smaller Gram matrix of G in float64 (k x k): G^T G when G has at least as
// many rows as columns, else G G^T. G goes to float64 a block of at most
// kGramBlock rows (or columns) at a time, so the workspace stays small; the
// float64 products resolve the singular vectors of small singular values,
// which a float32 Gram matrix (relative error 1e-7 of the largest eigenvalue)
// rotates into each other when rank approaches min(m, n).
constexpr Index kGramBlock = 1024;
template <class T>
void gram_f64(Context& ctx, WorkspaceArena& ws, DeviceView<const T> G, double* gram) {
  const bool rows_side = G.rows >= G.cols;
  const Index k = rows_side ? G.cols : G.rows, other = rows_side ? G.rows : G.cols;
  const Index block = std::min(other, kGramBlock);
  double* b = ws.take<double>(static_cast<std::size_t>(block * k));
  for (Index at = 0; at < other; at += block) {
    const Index len = std::min(block, other - at);
    const double beta = at == 0 ? 0.0 : 1.0;
    if (rows_side) {  // rows [at, at + len) of G: len x k
      convert_rows<<<grid_for(len * k), kThreads, 0, ctx.stream()>>>(G.data + at * G.ld, G.ld, len, k, b);
      check_launch("galore::cuda::convert_rows");
      gemm(ctx, Op::T, Op::N, 1.0, DeviceView<const double>(b, len, k), DeviceView<const double>(b, len, k), beta,
           DeviceView<double>(gram, k, k));
    } else {  // columns [at, at + len) of G: k x len
      convert_rows<<<grid_for(k * len), kThreads, 0, ctx.stream()>>>(G.data + at, G.ld, k, len, b);
      check_launch("galore::cuda::convert_rows");
      gemm(ctx, Op::N, Op::T, 1.0, DeviceView<const double>(b, k, len), DeviceView<const double>(b, k, len), beta,
           DeviceView<double>(gram, k, k));
    }
  }
}
inline std::size_t gram_f64_bytes(Index m, Index n) {
  return WorkspaceArena::align(sizeof(double) * std::min(std::max(m, n), kGramBlock) * std::min(m, n));
}

// Canonical signs, orientation and storage of vector-major vecs (r x len) as
// the left (m x r) or right (r x n) factor.
template <class T>
void store(Context& ctx, const float* vecs, Index r, Index len, bool left, T* out, const T* previous) {
  const std::int64_t vec_stride = left ? 1 : len, elem_stride = left ? r : 1;
  store_vectors<<<static_cast<unsigned>(r), kVectorThreads, 0, ctx.stream()>>>(vecs, len, out, vec_stride, elem_stride,
                                                                               previous);
  check_launch("galore::cuda::store_vectors");
}

inline void normalize(Context& ctx, float* vecs, Index r, Index len) {
  normalize_vectors<<<static_cast<unsigned>(r), kVectorThreads, 0, ctx.stream()>>>(vecs, len);
  check_launch("galore::cuda::normalize_vectors");
}

// A device view of T elements, converted from float when T is not float (the
// GEMMs with G need both operands in G's type).
template <class T>
const T* as_type(Context& ctx, WorkspaceArena& ws, const float* x, std::int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    T* y = ws.take<T>(static_cast<std::size_t>(n));
    convert(ctx, x, y, n);
    return y;
  }
}
template <class T>
std::size_t as_type_bytes(std::int64_t n) {
  return std::is_same_v<T, float> ? 0 : WorkspaceArena::align(sizeof(T) * n);
}

// X (len x l, row-major float) <- an orthonormal basis of its columns by
// CholeskyQR in float64, three passes: Gram matrix (DGEMM), Cholesky (potrf),
// then X L^-T as a GEMM with the explicit inverse L^-1 (a triangular solve
// against the identity: on 512 x 512 problems cuBLAS' trsm against 2048
// right-hand sides took 160 us on an H200, the Gram GEMM 24 us;
// tools/probe/refresh_probe.cu). Each Gram matrix is shifted by 1e-12 of its
// mean diagonal (plus 1e-300, for an all-zero X): that keeps the factorization
// defined when the columns are dependent (a gradient of rank below l), where
// the dependent directions come out as an arbitrary orthonormal completion or
// as zero vectors, never as NaN. The shift also flattens directions below
// 1e-6 of the largest in the first pass; the second pass restores them and the
// third orthonormality. (One pass and Newton-Schulz steps instead was faster
// but left such directions short and not orthogonal: kappa(X) >= 1e6, which a
// warm start's X = G^T G P^T reaches when the top r singular values of G span
// a factor 1000.)
//
// With count > 1, X holds `count` such matrices one after the other, and every
// call is batched: strided DGEMMs, cuSOLVER's potrfBatched and cuBLAS'
// trsmBatched. A single 512 x 512 float64 Cholesky (blocked potrf) takes
// 200 us on an H100, latency-bound; batched, 29 us per matrix at 24 and 12 us
// at 96 (same probe). One matrix keeps the blocked potrf, which is faster alone.
inline void orthonormalize(Context& ctx, WorkspaceArena& ws, float* X, Index len, Index l, Index count = 1) {
  const std::int64_t per_x = len * l, per_c = l * l;
  double* xd = ws.take<double>(static_cast<std::size_t>(count * per_x));
  double* yd = ws.take<double>(static_cast<std::size_t>(count * per_x));
  double* c = ws.take<double>(static_cast<std::size_t>(count * per_c));
  double* z = ws.take<double>(static_cast<std::size_t>(count * per_c));
  int* info = ws.take<int>(static_cast<std::size_t>(count));
  const bool batched = count > 1;
  std::size_t host_bytes = 0;
  const std::size_t dev_bytes = batched ? 0 : potrf_bytes(ctx, l, &host_bytes);
  void* dwork = batched ? nullptr : ws.take<unsigned char>(dev_bytes);
  double** c_ptrs = batched ? ws.take<double*>(static_cast<std::size_t>(count)) : nullptr;
  double** z_ptrs = batched ? ws.take<double*>(static_cast<std::size_t>(count)) : nullptr;
  const int li = static_cast<int>(l), leni = static_cast<int>(len), n = static_cast<int>(count);
  if (batched) {
    strided_pointers<<<1, kThreads, 0, ctx.stream()>>>(c, per_c, n, c_ptrs);
    strided_pointers<<<1, kThreads, 0, ctx.stream()>>>(z, per_c, n, z_ptrs);
    check_launch("galore::cuda::strided_pointers");
  }
  auto& h = ctx.host_scratch();
  if (h.size() < host_bytes) h.resize(host_bytes);
  convert(ctx, X, xd, count * per_x);
  // Column-major, X's memory is X^T (l x len, ld l); the products are in those terms.
  const double one = 1.0, zero = 0.0;
  const unsigned identity_grid =
      static_cast<unsigned>(std::min<std::int64_t>((count * per_c + kThreads - 1) / kThreads, 4096));
  check(cublasSetPointerMode(ctx.blas(), CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  for (int pass = 0; pass < 3; ++pass) {
    check(cublasDgemmStridedBatched(ctx.blas(), CUBLAS_OP_N, CUBLAS_OP_T, li, li, leni, &one, xd, li, per_x, xd, li,
                                    per_x, &zero, c, li, per_c, n),
          "cublasDgemmStridedBatched");  // c = X^T X
    shift_diagonal<<<static_cast<unsigned>(count), kVectorThreads, 0, ctx.stream()>>>(c, li, 1e-12, 1e-300);
    check_launch("galore::cuda::shift_diagonal");
    if (batched)
      check(cusolverDnDpotrfBatched(ctx.solver(), CUBLAS_FILL_MODE_LOWER, li, c_ptrs, li, info, n),
            "cusolverDnDpotrfBatched");
    else
      check(cusolverDnXpotrf(ctx.solver(), ctx.solver_params(), CUBLAS_FILL_MODE_LOWER, l, CUDA_R_64F, c, l,
                             CUDA_R_64F, dwork, dev_bytes, host_bytes ? h.data() : nullptr, host_bytes, info),
            "cusolverDnXpotrf");
    // z = L^-1, then X^T <- L^-1 X^T (into yd; the buffers swap).
    set_identity<<<identity_grid, kThreads, 0, ctx.stream()>>>(z, li, n);
    check_launch("galore::cuda::set_identity");
    if (batched)
      check(cublasDtrsmBatched(ctx.blas(), CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N,
                               CUBLAS_DIAG_NON_UNIT, li, li, &one, c_ptrs, li, z_ptrs, li, n),
            "cublasDtrsmBatched");
    else
      check(cublasDtrsm(ctx.blas(), CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, li,
                        li, &one, c, li, z, li),
            "cublasDtrsm");
    check(cublasDgemmStridedBatched(ctx.blas(), CUBLAS_OP_N, CUBLAS_OP_N, li, leni, li, &one, z, li, per_c, xd, li,
                                    per_x, &zero, yd, li, per_x, n),
          "cublasDgemmStridedBatched");
    std::swap(xd, yd);
  }
  convert(ctx, xd, X, count * per_x);
}
inline std::size_t orthonormalize_bytes(Context& ctx, Index l, Index len, Index count = 1) {
  using A = WorkspaceArena;
  const std::size_t per_call = count > 1 ? 2 * A::align(sizeof(double*) * count) : A::align(potrf_bytes(ctx, l));
  return 2 * A::align(sizeof(double) * count * len * l) + 2 * A::align(sizeof(double) * count * l * l) +
         A::align(sizeof(int) * count) + per_call;
}

// Rayleigh-Ritz from an orthonormal Q (len x l) spanning G's column space
// (column_space, len = m) or row space (len = n): the top-r singular vectors
// within the span, stored into `out` with canonical, oriented signs.
template <class T>
void finish_from_range(Context& ctx, WorkspaceArena& ws, DeviceView<const T> G, const float* Q, Index l,
                       bool column_space, Index r, const DeviceBasis<T>& out, const DeviceBasis<T>* previous) {
  const Index m = G.rows, n = G.cols, len = column_space ? m : n, other = column_space ? n : m;
  const T* Qt = as_type<T>(ctx, ws, Q, len * l);
  float* B = ws.take<float>(static_cast<std::size_t>(other * l));  // B^T as l x other, vector-major
  // column space: B = Q^T G (l x n); row space: B^T = Q^T G^T (l x m).
  if (column_space) gemm(ctx, Op::T, Op::N, 1.0f, DeviceView<const T>(Qt, m, l), G, 0.0f, DeviceView<float>(B, l, n));
  else gemm(ctx, Op::T, Op::T, 1.0f, DeviceView<const T>(Qt, n, l), G, 0.0f, DeviceView<float>(B, l, m));
  float* gram = ws.take<float>(static_cast<std::size_t>(l * l));
  const DeviceView<const float> Bv(B, l, other);
  gemm(ctx, Op::N, Op::T, 1.0f, Bv, Bv, 0.0f, DeviceView<float>(gram, l, l));
  float* w = ws.take<float>(static_cast<std::size_t>(r * l));  // top-r eigenvectors of the l x l Gram, vector-major
  top_eigenvectors(ctx, ws, gram, l, r, w);
  const DeviceView<const float> Wv(w, r, l);
  const bool want_in_span = column_space ? out.side != Side::Right : out.side != Side::Left;
  const bool want_other = column_space ? out.side != Side::Left : out.side != Side::Right;
  if (want_in_span) {  // vectors Q w_i: (r x len) = W (r x l) Q^T
    float* v = ws.take<float>(static_cast<std::size_t>(r * len));
    gemm(ctx, Op::N, Op::T, 1.0f, Wv, DeviceView<const float>(Q, len, l), 0.0f, DeviceView<float>(v, r, len));
    store(ctx, v, r, len, column_space, column_space ? out.left : out.right,
          previous ? (column_space ? previous->left : previous->right) : static_cast<const T*>(nullptr));
  }
  if (want_other) {  // vectors B^T w_i / |.|: (r x other) = W (r x l) B (l x other)
    float* v = ws.take<float>(static_cast<std::size_t>(r * other));
    gemm(ctx, Op::N, Op::N, 1.0f, Wv, Bv, 0.0f, DeviceView<float>(v, r, other));
    normalize(ctx, v, r, other);
    store(ctx, v, r, other, !column_space, column_space ? out.right : out.left,
          previous ? (column_space ? previous->right : previous->left) : static_cast<const T*>(nullptr));
  }
}
template <class T>
std::size_t finish_from_range_bytes(Context& ctx, Index m, Index n, Index l, bool column_space, Index r) {
  const Index len = column_space ? m : n, other = column_space ? n : m;
  using A = WorkspaceArena;
  return as_type_bytes<T>(len * l) + A::align(sizeof(float) * other * l) + A::align(sizeof(float) * l * l) +
         A::align(sizeof(float) * r * l) + top_eigenvectors_bytes(ctx, l) + A::align(sizeof(float) * r * len) +
         A::align(sizeof(float) * r * other);
}

}  // namespace impl

// Each policy's compute_basis writes the top-r basis of G into `out`, with signs
// oriented like `previous` (null at the first refresh; common_type_t keeps it
// out of template deduction, so a plain nullptr works). compute_basis_bytes
// is the workspace it takes.

// ---- Exact -------------------------------------------------------------------------------------

template <class T>
void compute_basis(Context& ctx, WorkspaceArena& ws, const svd::Exact&, DeviceView<const T> G, Index r,
                   const DeviceBasis<T>& out, const DeviceBasis<std::common_type_t<T>>* previous) {
  const Index m = G.rows, n = G.cols;
  const bool rows_side = m >= n;  // eigenvectors of G^T G (right vectors) when m >= n
  const Index k = rows_side ? n : m, other = rows_side ? m : n;
  double* gram = ws.take<double>(static_cast<std::size_t>(k * k));
  impl::gram_f64(ctx, ws, G, gram);
  float* native = ws.take<float>(static_cast<std::size_t>(r * k));
  impl::top_eigenvectors(ctx, ws, gram, k, r, native);
  const bool want_right = out.side != Side::Left, want_left = out.side != Side::Right;
  const bool want_native = rows_side ? want_right : want_left;
  const bool want_other = rows_side ? want_left : want_right;
  if (want_other) {
    // rows_side: u_i = G v_i -> (r x m) = V (r x n) G^T; else v_i = G^T u_i -> (r x n) = U (r x m) G.
    const T* nt = impl::as_type<T>(ctx, ws, native, r * k);
    float* o = ws.take<float>(static_cast<std::size_t>(r * other));
    gemm(ctx, Op::N, rows_side ? Op::T : Op::N, 1.0f, DeviceView<const T>(nt, r, k), G, 0.0f,
         DeviceView<float>(o, r, other));
    impl::normalize(ctx, o, r, other);
    impl::store(ctx, o, r, other, rows_side, rows_side ? out.left : out.right,
                previous ? (rows_side ? previous->left : previous->right) : static_cast<const T*>(nullptr));
  }
  if (want_native)
    impl::store(ctx, native, r, k, !rows_side, rows_side ? out.right : out.left,
                previous ? (rows_side ? previous->right : previous->left) : static_cast<const T*>(nullptr));
}

template <class T>
std::size_t compute_basis_bytes(Context& ctx, const svd::Exact&, Index m, Index n, Index r, Side) {
  const Index k = std::min(m, n), other = std::max(m, n);
  using A = WorkspaceArena;
  return A::align(sizeof(double) * k * k) + impl::gram_f64_bytes(m, n) + A::align(sizeof(float) * r * k) +
         impl::top_eigenvectors_f64_bytes(ctx, k) + impl::as_type_bytes<T>(r * k) + A::align(sizeof(float) * r * other);
}

// ---- Randomized ----------------------------------------------------------------------------------

template <class T>
void compute_basis(Context& ctx, WorkspaceArena& ws, const svd::Randomized& p, DeviceView<const T> G, Index r,
                   const DeviceBasis<T>& out, const DeviceBasis<std::common_type_t<T>>* previous) {
  const Index m = G.rows, n = G.cols;
  const Index l = std::min(r + std::max<Index>(p.oversample, 0), std::min(m, n));
  const bool column_space = out.side == Side::Left || (out.side == Side::Both && m <= n);
  const Index len = column_space ? m : n, other = column_space ? n : m;
  float* omega = ws.take<float>(static_cast<std::size_t>(other * l));
  impl::gaussian<<<impl::grid_for((other * l + 3) / 4), impl::kThreads, 0, ctx.stream()>>>(omega, other, l, p.seed);
  check_launch("galore::cuda::gaussian");
  float* Y = ws.take<float>(static_cast<std::size_t>(len * l));
  float* Z = ws.take<float>(static_cast<std::size_t>(other * l));
  // Y = G Omega (column space) or G^T Omega (row space).
  const Op to_len = column_space ? Op::N : Op::T, to_other = column_space ? Op::T : Op::N;
  gemm(ctx, to_len, Op::N, 1.0f, G, DeviceView<const T>(impl::as_type<T>(ctx, ws, omega, other * l), other, l), 0.0f,
       DeviceView<float>(Y, len, l));
  impl::orthonormalize(ctx, ws, Y, len, l);
  for (int q = 0; q < p.power_iterations; ++q) {
    gemm(ctx, to_other, Op::N, 1.0f, G, DeviceView<const T>(impl::as_type<T>(ctx, ws, Y, len * l), len, l), 0.0f,
         DeviceView<float>(Z, other, l));
    impl::orthonormalize(ctx, ws, Z, other, l);
    gemm(ctx, to_len, Op::N, 1.0f, G, DeviceView<const T>(impl::as_type<T>(ctx, ws, Z, other * l), other, l), 0.0f,
         DeviceView<float>(Y, len, l));
    impl::orthonormalize(ctx, ws, Y, len, l);
  }
  impl::finish_from_range(ctx, ws, G, Y, l, column_space, r, out, previous);
}

template <class T>
std::size_t compute_basis_bytes(Context& ctx, const svd::Randomized& p, Index m, Index n, Index r, Side side) {
  const Index l = std::min(r + std::max<Index>(p.oversample, 0), std::min(m, n));
  const bool column_space = side == Side::Left || (side == Side::Both && m <= n);
  const Index len = column_space ? m : n, other = column_space ? n : m;
  using A = WorkspaceArena;
  // Conversions to T are taken afresh for every product (at most 1 + 2q of them).
  const std::size_t conversions = static_cast<std::size_t>(1 + p.power_iterations) *
                                  (impl::as_type_bytes<T>(other * l) + impl::as_type_bytes<T>(len * l));
  return A::align(sizeof(float) * other * l) * 2 + A::align(sizeof(float) * len * l) + conversions +
         impl::orthonormalize_bytes(ctx, l, std::max(len, other)) * static_cast<std::size_t>(1 + 2 * p.power_iterations) +
         impl::finish_from_range_bytes<T>(ctx, m, n, l, column_space, r);
}

// ---- WarmStart ---------------------------------------------------------------------------------

// Workspace of compute_bases for `count` m x n matrices (their previous bases
// on `side`).
template <class T>
std::size_t compute_bases_bytes(Context& ctx, const svd::WarmStart& p, Index m, Index n, Index r, Side side,
                                Index count) {
  const bool column_space = side != Side::Right;
  const Index len = column_space ? m : n, other = column_space ? n : m;
  using A = WorkspaceArena;
  const std::size_t warm = A::align(sizeof(float) * count * len * r) + A::align(sizeof(float) * count * other * r) +
                           A::align(sizeof(float) * r * n) +
                           static_cast<std::size_t>(p.iterations) *
                               (impl::as_type_bytes<T>(count * len * r) + impl::as_type_bytes<T>(count * other * r) +
                                impl::orthonormalize_bytes(ctx, r, len, count)) +
                           std::max(impl::finish_from_range_bytes<T>(ctx, m, n, r, column_space, r),
                                    A::align(sizeof(float) * r * len));
  return std::max(warm, compute_basis_bytes<T>(ctx, p.cold, m, n, r, side));
}

// compute_bases: the warm start of `count` same-shape matrices at once (a
// group of layers that refresh together), with their orthonormalizations
// batched (orthonormalize above); the products with each G stay per matrix
// (large enough to fill the GPU alone). previous: one basis per matrix, or
// empty for none (each then takes the cold policy). compute_basis is the
// count-1 case.
template <class T>
void compute_bases(Context& ctx, WorkspaceArena& ws, const svd::WarmStart& p, Span<const DeviceView<const T>> G,
                   Index r, Span<const DeviceBasis<T>> out, Span<const DeviceBasis<T>> previous) {
  const Index count = G.size();
  detail::require(out.size() == count && (previous.empty() || previous.size() == count),
                  "galore::cuda::compute_bases: ", count, " gradients, ", out.size(), " outputs and ", previous.size(),
                  " previous bases (expected as many outputs, and as many previous bases or none)");
  if (count == 0) return;
  const Index m = G[0].rows, n = G[0].cols;
  for (Index b = 0; b < count; ++b)
    detail::require(G[b].rows == m && G[b].cols == n && out[b].side == out[0].side &&
                        (previous.empty() || previous[b].side == previous[0].side),
                    "galore::cuda::compute_bases: matrix ", b, " is ", G[b].rows, " x ", G[b].cols,
                    " or has another side than matrix 0 (", m, " x ", n, "): a batch holds one shape and one side");
  // Checked before the first launch, so that a short workspace changes nothing.
  const std::size_t need =
      compute_bases_bytes<T>(ctx, p, m, n, r, previous.empty() ? out[0].side : previous[0].side, count);
  detail::require(ws.available() >= need, "the CUDA workspace is too small (", ws.available(),
                  " bytes left; this refresh needs ", need, "); size it with compute_bases_bytes()");
  if (previous.empty()) {
    for (Index b = 0; b < count; ++b) {
      WorkspaceArena scratch = ws;
      compute_basis(ctx, scratch, p.cold, G[b], r, out[b], nullptr);
    }
    return;
  }
  const bool column_space = previous[0].side != Side::Right;
  const Index len = column_space ? m : n, other = column_space ? n : m;
  const std::int64_t per_x = len * r, per_y = other * r;
  float* X = ws.take<float>(static_cast<std::size_t>(count * per_x));
  float* Y = ws.take<float>(static_cast<std::size_t>(count * per_y));
  float* Pf = ws.take<float>(static_cast<std::size_t>(r * n));
  check(cublasSetPointerMode(ctx.blas(), CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  const float one = 1.0f, zero = 0.0f;
  // X_b = the previous vectors as columns (len x r): the left factor as stored,
  // or the right one transposed (cuBLAS geam; column-major, Pf is P^T, n x r
  // with ld n, and X_b row-major n x r is X_b^T, r x n with ld r, = P).
  for (Index b = 0; b < count; ++b) {
    float* Xb = X + b * per_x;
    if (column_space) {
      impl::convert(ctx, previous[b].left, Xb, per_x);
    } else {
      impl::convert(ctx, previous[b].right, Pf, r * n);
      check(cublasSgeam(ctx.blas(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(r), static_cast<int>(n), &one, Pf,
                        static_cast<int>(n), &zero, Xb, static_cast<int>(r), Xb, static_cast<int>(r)),
            "cublasSgeam");
    }
  }
  const Op to_len = column_space ? Op::N : Op::T, to_other = column_space ? Op::T : Op::N;
  for (int it = 0; it < p.iterations; ++it) {
    const T* Xt = impl::as_type<T>(ctx, ws, X, count * per_x);
    for (Index b = 0; b < count; ++b)
      gemm(ctx, to_other, Op::N, 1.0f, G[b], DeviceView<const T>(Xt + b * per_x, len, r), 0.0f,
           DeviceView<float>(Y + b * per_y, other, r));
    const T* Yt = impl::as_type<T>(ctx, ws, Y, count * per_y);
    for (Index b = 0; b < count; ++b)
      gemm(ctx, to_len, Op::N, 1.0f, G[b], DeviceView<const T>(Yt + b * per_y, other, r), 0.0f,
           DeviceView<float>(X + b * per_x, len, r));
    impl::orthonormalize(ctx, ws, X, len, r, count);
  }
  if (!p.rayleigh_ritz && out[0].side != Side::Both) {
    float* v = ws.take<float>(static_cast<std::size_t>(r * len));  // vector-major copy of X_b's columns
    for (Index b = 0; b < count; ++b) {
      check(cublasSgeam(ctx.blas(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(len), static_cast<int>(r), &one,
                        X + b * per_x, static_cast<int>(r), &zero, v, static_cast<int>(len), v, static_cast<int>(len)),
            "cublasSgeam");
      impl::store(ctx, v, r, len, column_space, column_space ? out[b].left : out[b].right,
                  column_space ? previous[b].left : previous[b].right);
    }
    return;
  }
  for (Index b = 0; b < count; ++b) {
    WorkspaceArena scratch = ws;
    impl::finish_from_range(ctx, scratch, G[b], X + b * per_x, r, column_space, r, out[b], &previous[b]);
  }
}

template <class T>
void compute_basis(Context& ctx, WorkspaceArena& ws, const svd::WarmStart& p, DeviceView<const T> G, Index r,
                   const DeviceBasis<T>& out, const DeviceBasis<std::common_type_t<T>>* previous) {
  compute_bases(ctx, ws, p, Span<const DeviceView<const T>>(&G, 1), r, Span<const DeviceBasis<T>>(&out, 1),
                previous ? Span<const DeviceBasis<T>>(previous, 1) : Span<const DeviceBasis<T>>());
}

template <class T>
std::size_t compute_basis_bytes(Context& ctx, const svd::WarmStart& p, Index m, Index n, Index r, Side side) {
  return compute_bases_bytes<T>(ctx, p, m, n, r, side, 1);
}

// ---- Any policy, many matrices ---------------------------------------------------------------

// compute_bases for the policies without a batched form (svd::Exact,
// svd::Randomized): one matrix after another, each in the same scratch, so the
// workspace is one matrix's. (svd::WarmStart's overload above batches.)
template <class T, class Policy>
std::size_t compute_bases_bytes(Context& ctx, const Policy& p, Index m, Index n, Index r, Side side, Index count) {
  (void)count;
  return compute_basis_bytes<T>(ctx, p, m, n, r, side);
}

template <class T, class Policy>
void compute_bases(Context& ctx, WorkspaceArena& ws, const Policy& p, Span<const DeviceView<const T>> G, Index r,
                   Span<const DeviceBasis<T>> out, Span<const DeviceBasis<T>> previous) {
  detail::require(out.size() == G.size() && (previous.empty() || previous.size() == G.size()),
                  "galore::cuda::compute_bases: ", G.size(), " gradients, ", out.size(), " outputs and ",
                  previous.size(), " previous bases (expected as many outputs, and as many previous bases or none)");
  for (Index b = 0; b < G.size(); ++b) {
    WorkspaceArena scratch = ws;
    compute_basis(ctx, scratch, p, G[b], r, out[b], previous.empty() ? nullptr : &previous[b]);
  }
}

}  // namespace galore::cuda
