// galore (CUDA backend): the fraction of a gradient's energy a basis captured,
// |R|^2 / |G|^2 (R the projected gradient), for drift-watching schedules
// (schedule/drift.hpp). Sums in float64, as the CPU backend's measurement.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../core/matrix_view.hpp"
#include "../../math/adam.hpp"
#include "basis_kernels.cuh"
#include "context.cuh"
#include "error.cuh"

namespace galore::cuda {

namespace impl {

// sums[0] += |G|^2 (rows x cols, leading dimension ld), sums[1] += |r|^2 (n
// floats); *out_of_range = 1 if some element of r is beyond Adam's input range
// (NaN, Inf or |r| > 2^60).
template <class T>
__global__ void sum_squares(const T* __restrict__ g, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                            const float* __restrict__ r, std::int64_t n, double* sums, unsigned* out_of_range) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t first = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  double gs = 0.0, rs = 0.0;
  bool bad = false;
  for (std::int64_t i = first; i < rows * cols; i += stride) {
    const double x = to_float(g[strided_index(i, ld, cols)]);
    gs += x * x;
  }
  for (std::int64_t i = first; i < n; i += stride) {
    rs += double(r[i]) * r[i];
    bad |= !math::in_adam_range(r[i]);
  }
  gs = block_sum(gs);
  rs = block_sum(rs);
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    atomicAdd(&sums[0], gs);
    atomicAdd(&sums[1], rs);
    if (bad) atomicOr(out_of_range, 1u);
  }
}

}  // namespace impl

struct CapturedEnergy {
  bool in_range = true;   // every element of R within Adam's input range
  double captured = 1.0;  // |R|^2 / |G|^2 (1 when |G|^2 is 0 or NaN, as on the CPU)
};

// The measurement a drift-watching schedule takes, as the CPU backend's: R
// (n floats; padding, if any, holds zeros) and G summed in float64. A step
// whose R is out of range is skipped before it is measured, so in_range says
// whether `captured` counts. Synchronizes ctx's stream to read the sums.
template <class T>
CapturedEnergy captured_energy(Context& ctx, WorkspaceArena& ws, DeviceView<const T> G, const float* R,
                               std::int64_t n) {
  struct Sums {
    double g2, r2;
    unsigned out_of_range;
  };
  Sums* sums = ws.take<Sums>(1);
  check(cudaMemsetAsync(sums, 0, sizeof(Sums), ctx.stream()), "cudaMemsetAsync");
  impl::sum_squares<<<impl::blocks_for(G.rows * G.cols, 1024), impl::kVectorThreads, 0, ctx.stream()>>>(
      G.data, G.rows, G.cols, G.ld, R, n, &sums->g2, &sums->out_of_range);
  check_launch("galore::cuda::sum_squares");
  Sums host{};
  check(cudaMemcpyAsync(&host, sums, sizeof host, cudaMemcpyDeviceToHost, ctx.stream()), "cudaMemcpyAsync");
  ctx.synchronize();
  CapturedEnergy e;
  e.in_range = host.out_of_range == 0;
  e.captured = host.g2 > 0.0 ? host.r2 / host.g2 : 1.0;
  return e;
}
inline std::size_t captured_energy_bytes() { return WorkspaceArena::align(2 * sizeof(double) + sizeof(unsigned)); }

}  // namespace galore::cuda
