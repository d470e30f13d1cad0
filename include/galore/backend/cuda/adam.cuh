// galore (CUDA backend): Adam on the device, with the skip decision on the device.
//
// A step runs two kernels, with the CPU backend's rule (math/adam.hpp): a step
// whose (projected) gradient holds NaN, Inf or an element beyond +-2^60 is
// skipped as a whole; every accepted element's update is clamped to +-2^64.
// check_step reads the gradient once and decides; its last block writes the
// decision, the step size and the back-projection's alpha and beta into the
// layer's StepCounters (device memory). apply_adam then stores the moments and
// the update, or nothing on a skipped step. The host never waits: the decision
// is read when the caller asks for it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../../math/adam.hpp"
#include "error.cuh"
#include "gemm.cuh"

namespace galore::cuda {

// Per-layer counters and per-step scalars, in device memory.
struct StepCounters {
  long long applied = 0;  // applied steps: Adam's t of the latest applied step
  long long skipped = 0;  // steps skipped for a non-finite gradient or update
  int last_skipped = 0;   // 1 when the latest step was skipped
  unsigned bad = 0;          // check_step's scratch: some element was not finite
  unsigned blocks_done = 0;  // check_step's scratch: blocks finished
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

constexpr int kCheckUnroll = 4;

template <class G>
__global__ void check_step(const G* __restrict__ g, std::int64_t n, AdamLaunch p, StepCounters* c) {
  // kCheckUnroll independent loads per thread and round: a check of a few MB
  // is otherwise bound by the latency of one load at a time.
  bool bad = false;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride * kCheckUnroll) {
    float x[kCheckUnroll];
#pragma unroll
    for (int k = 0; k < kCheckUnroll; ++k) x[k] = i + k * stride < n ? to_float(g[i + k * stride]) : 0.0f;
#pragma unroll
    for (int k = 0; k < kCheckUnroll; ++k) bad |= !math::in_adam_range(x[k]);
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    if (bad) atomicOr(&c->bad, 1u);
    __threadfence();
    const unsigned done = atomicAdd(&c->blocks_done, 1u);
    if (done == gridDim.x - 1) {  // the last block: every other block's `bad` is visible
      __threadfence();
      const bool skip = atomicOr(&c->bad, 0u) != 0u;
      c->last_skipped = skip ? 1 : 0;
      if (skip) {
        ++c->skipped;
        c->step_size = 0.0f;
        c->alpha = 0.0f;
        c->beta = 1.0f;
      } else {
        ++c->applied;
        c->step_size = math::adam_step_size_float(p.lr, p.beta1, p.beta2, c->applied, p.correct_bias);
        c->alpha = -p.decay * p.scale;
        c->beta = p.decay;
      }
      c->bad = 0u;
      c->blocks_done = 0u;
    }
  }
}

// Low-rank step: moments (rows x cols, contiguous) and D (in the basis' element
// type, for the GEMM). R and D have leading dimension ld >= cols; D's columns
// from cols to ld (the padding of a staged layer, staging.cuh) are set to 0.
template <class M, class D>
__global__ void apply_adam(const float* __restrict__ r, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                           M* __restrict__ m, M* __restrict__ v, D* __restrict__ d, math::AdamCoefficients k,
                           const StepCounters* c) {
  const bool skip = c->last_skipped != 0;
  const float step = c->step_size;
  auto element = [&](std::int64_t i, std::int64_t j) {
    if (skip) {
      d[j] = from_float<D>(0.0f);
      return;
    }
    const math::AdamElement e = math::adam_element(r[j], to_float(m[i]), to_float(v[i]), step, k);
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
  // Padded rows: blocks along y take rows, along x a row's columns.
  for (std::int64_t row = blockIdx.y; row < rows; row += gridDim.y)
    for (std::int64_t col = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; col < ld;
         col += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      if (col < cols) element(row * cols + col, row * ld + col);
      else d[row * ld + col] = from_float<D>(0.0f);
    }
}

// Dense AdamW: W = (W - d) * decay, element by element, as the CPU backend.
template <class T, class M>
__global__ void apply_adamw_dense(T* __restrict__ w, const T* __restrict__ g, std::int64_t n, M* __restrict__ m,
                                  M* __restrict__ v, math::AdamCoefficients k, float decay, const StepCounters* c) {
  if (c->last_skipped != 0) return;
  const float step = c->step_size;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const math::AdamElement e = math::adam_element(to_float(g[i]), to_float(m[i]), to_float(v[i]), step, k);
    m[i] = from_float<M>(e.m);
    v[i] = from_float<M>(e.v);
    w[i] = from_float<T>((to_float(w[i]) - e.d) * decay);
  }
}

}  // namespace impl

// Decides the step (see the file comment). g: the projected gradient R (float)
// or, for dense layers, G itself.
template <class G>
void check_step(Context& ctx, const G* g, std::int64_t n, const AdamLaunch& p, StepCounters* counters) {
  const int blocks = impl::blocks_for((n + impl::kCheckUnroll - 1) / impl::kCheckUnroll, 1024);
  impl::check_step<<<blocks, impl::kThreads, 0, ctx.stream()>>>(g, n, p, counters);
  check_launch("galore::cuda::check_step");
}

// R and D: rows x cols with leading dimension ld (see impl::apply_adam).
template <class M, class D>
void apply_adam(Context& ctx, const float* r, std::int64_t rows, std::int64_t cols, std::int64_t ld, M* m, M* v, D* d,
                const AdamLaunch& p, const StepCounters* counters) {
  dim3 grid(impl::blocks_for(rows * cols));
  if (ld != cols) {
    const std::int64_t x = std::min<std::int64_t>((ld + impl::kThreads - 1) / impl::kThreads, 2048);
    grid = dim3(static_cast<unsigned>(x), static_cast<unsigned>(std::clamp<std::int64_t>(2048 / x, 1, rows)));
  }
  impl::apply_adam<<<grid, impl::kThreads, 0, ctx.stream()>>>(r, rows, cols, ld, m, v, d, p.coeffs, counters);
  check_launch("galore::cuda::apply_adam");
}

template <class T, class M>
void apply_adamw_dense(Context& ctx, T* w, const T* g, std::int64_t n, M* m, M* v, const AdamLaunch& p,
                       const StepCounters* counters) {
  impl::apply_adamw_dense<<<impl::blocks_for(n), impl::kThreads, 0, ctx.stream()>>>(w, g, n, m, v, p.coeffs, p.decay,
                                                                                    counters);
  check_launch("galore::cuda::apply_adamw_dense");
}

}  // namespace galore::cuda
