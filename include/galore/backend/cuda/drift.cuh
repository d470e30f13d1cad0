// galore (CUDA backend): the fraction of a gradient's energy a basis captured,
// |R|^2 / |G|^2 (R the projected gradient), for drift-watching schedules
// (schedule/drift.hpp). Sums in float64, as the CPU backend's measurement.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../core/matrix_view.hpp"
#include "basis_kernels.cuh"
#include "context.cuh"
#include "error.cuh"

namespace galore::cuda {

namespace impl {

// sums[0] += |G|^2 (rows x cols, leading dimension ld), sums[1] += |r|^2 (n floats).
template <class T>
__global__ void sum_squares(const T* __restrict__ g, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                            const float* __restrict__ r, std::int64_t n, double* sums) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t first = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  double gs = 0.0, rs = 0.0;
  for (std::int64_t i = first; i < rows * cols; i += stride) {
    const double x = to_float(g[i / cols * ld + i % cols]);
    gs += x * x;
  }
  for (std::int64_t i = first; i < n; i += stride) rs += double(r[i]) * r[i];
  gs = block_sum(gs);
  rs = block_sum(rs);
  if (threadIdx.x == 0) {
    atomicAdd(&sums[0], gs);
    atomicAdd(&sums[1], rs);
  }
}

}  // namespace impl

// |R|^2 / |G|^2 (1 for G = 0; NaN or Inf in either propagates). R: n floats
// (padding, if any, holds zeros). Synchronizes ctx's stream to read the sums.
template <class T>
double captured_energy(Context& ctx, WorkspaceArena& ws, DeviceView<const T> G, const float* R, std::int64_t n) {
  double* sums = ws.take<double>(2);
  check(cudaMemsetAsync(sums, 0, 2 * sizeof(double), ctx.stream()), "cudaMemsetAsync");
  impl::sum_squares<<<impl::blocks_for(G.rows * G.cols, 1024), impl::kVectorThreads, 0, ctx.stream()>>>(
      G.data, G.rows, G.cols, G.ld, R, n, sums);
  check_launch("galore::cuda::sum_squares");
  double host[2];
  check(cudaMemcpyAsync(host, sums, sizeof host, cudaMemcpyDeviceToHost, ctx.stream()), "cudaMemcpyAsync");
  ctx.synchronize();
  return host[0] > 0.0 ? host[1] / host[0] : 1.0;
}
inline std::size_t captured_energy_bytes() { return WorkspaceArena::align(2 * sizeof(double)); }

}  // namespace galore::cuda
