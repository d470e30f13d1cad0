// galore (CUDA backend): kernels that turn computed singular vectors into a
// stored basis: eigenvector extraction, normalization, canonical signs, storage.
//
// Vectors travel between stages "vector-major": r vectors of length len, each
// contiguous (an r x len row-major float matrix). A stored basis is row-major in
// the layer's element type: the right factor (r x n) holds vector i in row i, the
// left factor (m x r) holds vector j in column j.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../rounding/philox.hpp"
#include "adam.cuh"
#include "error.cuh"

namespace galore::cuda::impl {

constexpr int kVectorThreads = 256;

// Block-wide sum of a double over kVectorThreads threads.
__device__ inline double block_sum(double x) {
  __shared__ double partial[kVectorThreads / 32];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kVectorThreads / 32; ++w) total += partial[w];
  return total;
}

// Index of the entry of largest magnitude, the first one on ties (as the CPU's
// make_largest_entry_positive), over a block.
__device__ inline std::int64_t block_argmax_abs(float best, std::int64_t idx) {
  __shared__ float best_s[kVectorThreads / 32];
  __shared__ long long idx_s[kVectorThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    const float b2 = __shfl_xor_sync(0xffffffffu, best, o);
    const long long i2 = __shfl_xor_sync(0xffffffffu, static_cast<long long>(idx), o);
    if (b2 > best || (b2 == best && i2 < idx)) {
      best = b2;
      idx = i2;
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    best_s[warp] = best;
    idx_s[warp] = idx;
  }
  __syncthreads();
  float b = -1.0f;
  long long i = 0;
  for (int w = 0; w < kVectorThreads / 32; ++w)
    if (best_s[w] > b || (best_s[w] == b && idx_s[w] < i)) {
      b = best_s[w];
      i = idx_s[w];
    }
  return i;
}

template <class In, class Out>
__global__ void convert(const In* __restrict__ in, Out* __restrict__ out, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    if constexpr (std::is_same_v<Out, double>) out[i] = static_cast<double>(to_float(in[i]));
    else if constexpr (std::is_same_v<In, double>) out[i] = from_float<Out>(static_cast<float>(in[i]));
    else out[i] = from_float<Out>(to_float(in[i]));
  }
}

// out (rows x cols, contiguous) = in (rows x cols, leading dimension ld), converted.
template <class In, class Out>
__global__ void convert_rows(const In* __restrict__ in, std::int64_t ld, std::int64_t rows, std::int64_t cols,
                             Out* __restrict__ out) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<Out>(to_float(in[strided_index(i, ld, cols)]));
}

// Vector i of the result = eigenvector k-1-i (cuSOLVER sorts eigenvalues in
// ascending order; column j of the column-major k x k output is eigenvector j).
template <class E>
__global__ void top_eigenvectors(const E* __restrict__ evecs, int k, int r, float* __restrict__ vecs) {
  const int i = blockIdx.y;
  const E* col = evecs + static_cast<std::int64_t>(k - 1 - i) * k;
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < k; e += gridDim.x * blockDim.x)
    vecs[static_cast<std::int64_t>(i) * k + e] = static_cast<float>(col[e]);
}

// Scales each vector to unit norm (a zero vector stays zero). One block per vector.
__global__ void normalize_vectors(float* vecs, std::int64_t len) {
  float* v = vecs + blockIdx.x * len;
  double s = 0.0;
  for (std::int64_t e = threadIdx.x; e < len; e += blockDim.x) s += static_cast<double>(v[e]) * v[e];
  const double norm = sqrt(block_sum(s));
  const float inv = norm > 0.0 ? static_cast<float>(1.0 / norm) : 0.0f;
  for (std::int64_t e = threadIdx.x; e < len; e += blockDim.x) v[e] *= inv;
}

// Canonical signs and storage, as the CPU's fix_signs: flip the vector so that
// its entry of largest magnitude (the first on ties) is positive, then, when a
// previous basis exists, flip it where its dot product with the previous
// vector is below -1e-3 |new| |previous|. A vector that is zero or not finite
// (a rank-deficient gradient) keeps the previous vector, or is stored as is.
// One block per vector; element e of vector i lives at out[i*vec_stride + e*elem_stride].
template <class T>
__global__ void store_vectors(const float* __restrict__ vecs, std::int64_t len, T* out, std::int64_t vec_stride,
                              std::int64_t elem_stride, const T* previous) {
  const int i = blockIdx.x;
  const float* v = vecs + static_cast<std::int64_t>(i) * len;
  float best = -1.0f;
  std::int64_t best_i = 0;
  double nn = 0.0, pp = 0.0, np = 0.0;
  bool finite = true;
  for (std::int64_t e = threadIdx.x; e < len; e += blockDim.x) {
    const float x = v[e];
    finite &= math::is_finite(x);
    const float a = fabsf(x);
    if (a > best) {
      best = a;
      best_i = e;
    }
    nn += static_cast<double>(x) * x;
    if (previous) {
      const float p = to_float(previous[i * vec_stride + e * elem_stride]);
      pp += static_cast<double>(p) * p;
      np += static_cast<double>(x) * p;
    }
  }
  finite = __syncthreads_and(finite);
  const std::int64_t arg = block_argmax_abs(best, best_i);
  nn = block_sum(nn);
  pp = block_sum(pp);
  np = block_sum(np);
  const bool keep_previous = previous != nullptr && (!finite || nn == 0.0);
  float sign = v[arg] < 0.0f ? -1.0f : 1.0f;
  if (previous && !keep_previous) {
    const double dot = sign * np;
    if (dot < -1e-3 * sqrt(nn) * sqrt(pp)) sign = -sign;
  }
  __syncthreads();  // every read of `previous` is done before `out` (which may alias it) is written
  if (keep_previous) {
    if (out != previous)
      for (std::int64_t e = threadIdx.x; e < len; e += blockDim.x)
        out[i * vec_stride + e * elem_stride] = previous[i * vec_stride + e * elem_stride];
    return;
  }
  for (std::int64_t e = threadIdx.x; e < len; e += blockDim.x)
    out[i * vec_stride + e * elem_stride] = from_float<T>(sign * v[e]);
}

// Adds relative * trace(C) / k + absolute to the diagonal of a k x k matrix (one block).
// One block per k x k matrix of a contiguous batch (blockIdx.x: the matrix).
__global__ void shift_diagonal(double* c, int k, double relative, double absolute) {
  c += static_cast<std::int64_t>(blockIdx.x) * k * k;
  double t = 0.0;
  for (int i = threadIdx.x; i < k; i += blockDim.x) t += c[static_cast<std::int64_t>(i) * k + i];
  t = block_sum(t);
  const double s = relative * (t / k) + absolute;
  for (int i = threadIdx.x; i < k; i += blockDim.x) c[static_cast<std::int64_t>(i) * k + i] += s;
}

// c <- `count` k x k identities, one after the other.
__global__ void set_identity(double* c, int k, int count) {
  const std::int64_t per = static_cast<std::int64_t>(k) * k, n = per * count;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    c[i] = (i % per) / k == i % k ? 1.0 : 0.0;
}

// ptrs[i] = base + i * stride for i < count: the pointer arrays that batched
// cuBLAS and cuSOLVER calls take, written on the stream (no host copy).
template <class T>
__global__ void strided_pointers(T* base, std::int64_t stride, int count, T** ptrs) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) ptrs[i] = base + i * stride;
}

// Gaussian numbers from Philox (Box-Muller), element for element the CPU's
// svd::detail::gaussian(rows, cols, seed) up to the last bits of log/cos/sin.
__global__ void gaussian(float* out, std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  const std::int64_t n = rows * cols;
  for (std::int64_t q = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; q * 4 < n;
       q += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = q * 4;
    const Philox4x32 r = philox4x32_10(static_cast<std::uint32_t>(i >> 2), static_cast<std::uint32_t>(rows),
                                       static_cast<std::uint32_t>(cols), 0x5eedu, static_cast<std::uint32_t>(seed),
                                       static_cast<std::uint32_t>(seed >> 32));
    for (int k = 0; k < 4 && i + k < n; k += 2) {
      const float u1 = 1.0f - uniform_from_bits(r.v[k]);
      const float u2 = uniform_from_bits(r.v[k + 1]);
      const float radius = sqrtf(-2.0f * logf(u1));
      out[i + k] = radius * cosf(6.2831853f * u2);
      if (i + k + 1 < n) out[i + k + 1] = radius * sinf(6.2831853f * u2);
    }
  }
}

}  // namespace galore::cuda::impl
