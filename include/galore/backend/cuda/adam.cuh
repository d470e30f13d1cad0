// galore (CUDA backend): Adam on the device, with the skip decision on the device.
//
// The CPU backend's rule (math/adam.hpp): a step whose (projected) gradient
// holds NaN, Inf or an element beyond +-2^60 is skipped as a whole; every
// accepted element's update is clamped to +-2^64. One cooperative kernel per
// step decides and applies: its blocks first check their share of the gradient,
// meet at a grid-wide barrier (all blocks are co-resident), and then either
// store the moments and the update or, on a skipped step, leave the moments
// untouched. Block 0 writes the decision, the step size and the
// back-projection's alpha and beta into the layer's StepCounters (device
// memory). The host never waits: the decision is read when the caller asks for
// it. (Two kernels, a check and then Adam, cost a launch and a pass over the
// gradient more: 8 us per 2048 x 2048 layer at rank 512 on an H200.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "../../math/adam.hpp"
#include "context.cuh"
#include "error.cuh"
#include "gemm.cuh"

namespace galore::cuda {

// Per-layer counters and per-step scalars, in device memory.
struct StepCounters {
  long long applied = 0;  // applied steps: Adam's t of the latest applied step
  long long skipped = 0;  // steps skipped for a non-finite gradient or update
  int last_skipped = 0;   // 1 when the latest step was skipped
  // The step kernel's scratch: step t (applied + skipped before it) collects
  // "some element is out of range" in bad[t % 2] and counts the blocks at its
  // barrier in arrived[t % 2], and clears the other slots for the next step,
  // so no slot is cleared while another block uses it.
  unsigned bad[2] = {0, 0};
  unsigned arrived[2] = {0, 0};
  float step_size = 0.0f;    // this step's Adam step size (0 when skipped)
  float alpha = 0.0f;        // back-projection: W = beta * W + alpha * back(D)
  float beta = 1.0f;
};

// Everything a launch needs from AdamConfig and the projector, by value.
struct AdamLaunch {
  double lr, beta1, beta2;
  bool correct_bias;
  math::AdamCoefficients coeffs;
  float decay;  // 1 - lr * weight_decay
  float scale;  // the projection's scale (1 for dense layers)
};

template <class T>
__device__ inline float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else return __bfloat162float(x);
}
template <class T>
__device__ inline T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else return __float2bfloat16_rn(x);
}

namespace impl {

constexpr int kThreads = 256;

inline int blocks_for(std::int64_t n, int max_blocks = 2048) {
  const std::int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

// Phase one of a step kernel: every block checks its share of g[0, n), the
// grid meets, and every thread learns the verdict and this step's Adam step
// size. Block 0 then updates the counters: every block read them before the
// barrier, and no block reads them after it.
struct Verdict {
  bool skip;
  float step;
};
template <class G>
__device__ Verdict decide_step(const G* __restrict__ g, std::int64_t n, const AdamLaunch& p, StepCounters* c) {
  const long long applied = c->applied;
  const long long t = applied + c->skipped;
  unsigned* slot = &c->bad[t & 1];
  if (blockIdx.x == 0 && threadIdx.x == 0) c->bad[(t + 1) & 1] = c->arrived[(t + 1) & 1] = 0u;
  // Four independent loads per thread and round: a check of a few MB is
  // otherwise bound by the latency of one load at a time.
  bool bad = false;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n; i += 4 * stride) {
    float x[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) x[k] = i + k * stride < n ? to_float(g[i + k * stride]) : 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k) bad |= !math::in_adam_range(x[k]);
  }
  bad = __syncthreads_or(bad);
  __shared__ Verdict verdict;
  if (threadIdx.x == 0) {
    // The grid barrier: the launch is cooperative, so every block is resident
    // and the spin ends. The fences order each block's atomicOr before its
    // arrival and the verdict's read after everyone's. (cooperative_groups'
    // grid sync would do the same but brings CCCL's ::cuda namespace, which
    // collides with galore::cuda under `using namespace galore`.)
    if (bad) atomicOr(slot, 1u);
    __threadfence();
    atomicAdd(&c->arrived[t & 1], 1u);
    while (*static_cast<volatile unsigned*>(&c->arrived[t & 1]) < gridDim.x) __nanosleep(64);
    __threadfence();
    const bool skip = *static_cast<volatile unsigned*>(slot) != 0u;
    const float step = skip ? 0.0f : math::adam_step_size_float(p.lr, p.beta1, p.beta2, applied + 1, p.correct_bias);
    verdict = {skip, step};
    if (blockIdx.x == 0) {
      c->last_skipped = skip ? 1 : 0;
      if (skip) {
        c->skipped += 1;
        c->alpha = 0.0f;
        c->beta = 1.0f;
      } else {
        c->applied = applied + 1;
        c->alpha = -p.decay * p.scale;
        c->beta = p.decay;
      }
      c->step_size = step;
    }
  }
  __syncthreads();
  return verdict;
}

// Low-rank step on R (rows x cols, leading dimension ld >= cols; the padded
// columns of a staged layer, staging.cuh, hold 0): the moments (rows x cols,
// contiguous) and D (in the basis' element type, for the GEMM, leading
// dimension ld; its padded columns are set to 0, and all of D on a skipped step).
template <class M, class D>
__global__ void __launch_bounds__(kThreads) adam_step(const float* __restrict__ r, std::int64_t rows,
                                                      std::int64_t cols, std::int64_t ld, M* __restrict__ m,
                                                      M* __restrict__ v, D* __restrict__ d, AdamLaunch p,
                                                      StepCounters* c) {
  const Verdict verdict = decide_step(r, rows * ld, p, c);
  const bool skip = verdict.skip;
  const float step = verdict.step;
  auto element = [&](std::int64_t i, std::int64_t j) {
    if (skip) {
      d[j] = from_float<D>(0.0f);
      return;
    }
    const math::AdamElement e = math::adam_element(r[j], to_float(m[i]), to_float(v[i]), step, p.coeffs);
    m[i] = from_float<M>(e.m);
    v[i] = from_float<M>(e.v);
    d[j] = from_float<D>(e.d);
  };
  if (ld == cols) {
    const std::int64_t n = rows * cols;
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
      element(i, i);
    return;
  }
  // Padded rows: a block takes kThreads consecutive columns of one row at a time.
  const std::int64_t per_row = (ld + kThreads - 1) / kThreads;
  for (std::int64_t item = blockIdx.x; item < rows * per_row; item += gridDim.x) {
    const std::int64_t row = item / per_row, col = (item % per_row) * kThreads + threadIdx.x;
    if (col < cols) element(row * cols + col, row * ld + col);
    else if (col < ld) d[row * ld + col] = from_float<D>(0.0f);
  }
}

// Dense AdamW: W = (W - d) * decay, element by element, as the CPU backend.
template <class T, class M>
__global__ void __launch_bounds__(kThreads) adamw_dense_step(T* __restrict__ w, const T* __restrict__ g,
                                                             std::int64_t n, M* __restrict__ m, M* __restrict__ v,
                                                             AdamLaunch p, StepCounters* c) {
  const Verdict verdict = decide_step(g, n, p, c);
  if (verdict.skip) return;
  const float step = verdict.step;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const math::AdamElement e = math::adam_element(to_float(g[i]), to_float(m[i]), to_float(v[i]), step, p.coeffs);
    m[i] = from_float<M>(e.m);
    v[i] = from_float<M>(e.v);
    w[i] = from_float<T>((to_float(w[i]) - e.d) * p.decay);
  }
}

// Launches a step kernel cooperatively with at most as many blocks as the
// device holds at once (the grid barrier needs them all resident).
template <class... Params, class... Args>
void launch_cooperative(Context& ctx, void (*kernel)(Params...), std::int64_t work, const char* what,
                        Args&&... args) {
  const int resident = ctx.resident_blocks(reinterpret_cast<const void*>(kernel), kThreads);
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(std::min(blocks_for(work), resident)));
  config.blockDim = dim3(kThreads);
  config.stream = ctx.stream();
  cudaLaunchAttribute cooperative{};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  config.attrs = &cooperative;
  config.numAttrs = 1;
  check(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), what);
}

}  // namespace impl

// One low-rank step (impl::adam_step): R and D are rows x cols with leading
// dimension ld.
template <class M, class D>
void adam_step(Context& ctx, const float* r, std::int64_t rows, std::int64_t cols, std::int64_t ld, M* m, M* v, D* d,
               const AdamLaunch& p, StepCounters* counters) {
  impl::launch_cooperative(ctx, impl::adam_step<M, D>, rows * ld, "galore::cuda::adam_step", r, rows, cols, ld, m, v,
                           d, p, counters);
}

// One dense AdamW step over n contiguous elements.
template <class T, class M>
void adamw_dense_step(Context& ctx, T* w, const T* g, std::int64_t n, M* m, M* v, const AdamLaunch& p,
                      StepCounters* counters) {
  impl::launch_cooperative(ctx, impl::adamw_dense_step<T, M>, n, "galore::cuda::adamw_dense_step", w, g, n, m, v, p,
                           counters);
}

}  // namespace galore::cuda
