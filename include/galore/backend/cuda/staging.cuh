// galore (CUDA backend): padded copies of matrices whose column count is not a
// multiple of 8, for the GEMMs.
//
// cuBLASLt's fast Hopper kernels need the contiguous dimension to be a multiple
// of 8 elements and every row stride a multiple of 16 bytes. LLaMA-1B's
// 2048 x 5461 down projection has neither, and its two products took 90 and
// 111 us on an H200; on copies padded to 5464 columns (zeros beyond 5461) they
// take 21 and 27 us, and a copy costs 15 to 26 us
// (tools/probe/unaligned_probe.cu). So a left-projected layer with such a
// shape steps on padded copies of G and W: staged, then unstaged.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../../core/matrix_view.hpp"
#include "adam.cuh"
#include "context.cuh"
#include "error.cuh"

namespace galore::cuda {

// cols rounded up to a multiple of 8 elements (16 bytes of bf16, 32 of float).
constexpr Index padded_cols(Index cols) { return (cols + 7) / 8 * 8; }

namespace impl {

// dst (rows x ld_dst, 16-byte aligned rows) = src, zero beyond src's cols up to
// a multiple of 16 bytes. One thread per 16 bytes of dst: element loads from
// src, one vector store.
template <class T>
__global__ void stage_rows(const T* __restrict__ src, std::int64_t src_ld, std::int64_t rows, std::int64_t cols,
                           T* __restrict__ dst, std::int64_t dst_ld, std::int64_t chunks) {
  constexpr int v = 16 / sizeof(T);
  for (std::int64_t row = blockIdx.y; row < rows; row += gridDim.y)
    for (std::int64_t c = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; c < chunks;
         c += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      uint4 out;
      T* e = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int k = 0; k < v; ++k) {
        const std::int64_t col = c * v + k;
        e[k] = col < cols ? src[row * src_ld + col] : T(0.0f);
      }
      reinterpret_cast<uint4*>(dst + row * dst_ld)[c] = out;
    }
}

// dst (contiguous rows x cols, 16-byte aligned base) = the first cols columns
// of src (rows x src_ld). One thread per 16 bytes of dst: element loads, one
// vector store; the tail of fewer than 16 bytes element by element.
template <class T>
__global__ void unstage_rows_contiguous(const T* __restrict__ src, std::int64_t src_ld, std::int64_t cols,
                                        std::int64_t n, T* __restrict__ dst) {
  constexpr int v = 16 / sizeof(T);
  const std::int64_t chunks = n / v;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t c = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; c < chunks; c += stride) {
    uint4 out;
    T* e = reinterpret_cast<T*>(&out);
    std::int64_t row = c * v / cols, col = c * v % cols;
#pragma unroll
    for (int k = 0; k < v; ++k) {
      e[k] = src[row * src_ld + col];
      if (++col == cols) {
        col = 0;
        ++row;
      }
    }
    reinterpret_cast<uint4*>(dst)[c] = out;
  }
  for (std::int64_t i = chunks * v + blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride)
    dst[i] = src[strided_index(i, src_ld, cols)];
}

// dst = the first cols columns of src, any leading dimensions, element by element.
template <class T>
__global__ void unstage_rows(const T* __restrict__ src, std::int64_t src_ld, std::int64_t rows, std::int64_t cols,
                             T* __restrict__ dst, std::int64_t dst_ld) {
  for (std::int64_t row = blockIdx.y; row < rows; row += gridDim.y)
    for (std::int64_t col = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; col < cols;
         col += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
      dst[row * dst_ld + col] = src[row * src_ld + col];
}

inline dim3 row_grid(std::int64_t rows, std::int64_t per_row) {
  const std::int64_t x = std::clamp<std::int64_t>((per_row + kThreads - 1) / kThreads, 1, 64);
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(std::clamp<std::int64_t>(4096 / x, 1, rows)));
}

}  // namespace impl

// dst (src's rows x padded_cols(src.cols), leading dimension dst.ld) = src padded with zeros.
template <class T>
void stage(cudaStream_t stream, MatrixView<const T, system::cuda> src, MatrixView<T, system::cuda> dst) {
  galore::detail::require(dst.rows == src.rows && dst.cols == padded_cols(src.cols) &&
                              reinterpret_cast<std::uintptr_t>(dst.data) % 16 == 0 && (dst.ld * sizeof(T)) % 16 == 0,
                          "stage: the destination must be ", src.rows, "x", padded_cols(src.cols),
                          " with 16-byte aligned rows");
  const std::int64_t chunks = dst.cols * static_cast<std::int64_t>(sizeof(T)) / 16;
  impl::stage_rows<<<impl::row_grid(src.rows, chunks), impl::kThreads, 0, stream>>>(
      src.data, src.ld, src.rows, src.cols, dst.data, dst.ld, chunks);
  check_launch("galore::cuda::stage_rows");
}

template <class T>
void stage(Context& ctx, MatrixView<const T, system::cuda> src, MatrixView<T, system::cuda> dst) {
  stage(ctx.stream(), src, dst);
}

// dst = the first dst.cols columns of src (equal row counts).
template <class T>
void unstage(Context& ctx, MatrixView<const T, system::cuda> src, MatrixView<T, system::cuda> dst) {
  galore::detail::require(dst.rows == src.rows && dst.cols <= src.cols, "unstage: shapes do not agree");
  if (dst.contiguous() && reinterpret_cast<std::uintptr_t>(dst.data) % 16 == 0) {
    const std::int64_t n = dst.rows * dst.cols;
    impl::unstage_rows_contiguous<<<impl::blocks_for(n / 8 + 1), impl::kThreads, 0, ctx.stream()>>>(
        src.data, src.ld, dst.cols, n, dst.data);
  } else {
    impl::unstage_rows<<<impl::row_grid(dst.rows, dst.cols), impl::kThreads, 0, ctx.stream()>>>(
        src.data, src.ld, dst.rows, dst.cols, dst.data, dst.ld);
  }
  check_launch("galore::cuda::unstage_rows");
}

}  // namespace galore::cuda
