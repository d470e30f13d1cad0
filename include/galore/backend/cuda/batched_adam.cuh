// galore (CUDA backend): one Adam kernel over many layers, each with its own
// skip decision, for the batched step (batched_step.cuh).
//
// The per-layer kernel (adam.cuh) checks one layer's gradient, meets at a grid
// barrier and applies Adam or leaves the layer untouched. This one does the
// same for a list of layers in one cooperative launch: phase one checks every
// layer's share of the work and marks a layer bad in its own StepCounters slot;
// after one grid barrier every block applies Adam to the layers that are clean
// and writes D = 0 for those that are not; the last block to finish writes each
// layer's counters (applied or skipped, step size, alpha and beta) and points
// the back-projection of a skipped layer at a scratch output when weight decay
// would otherwise shrink its W (W = beta W + alpha back(D) with D = 0 is still
// beta W). No host synchronization: the host reads the counters when asked.
//
// Low-rank layers read R (float) and write D (the layer's element type, for the
// back-projection GEMM); dense layers read G and update W in place (AdamW, as
// adam.cuh's adamw_dense_step). Work is cut into items of at most kItemElements
// elements of one layer, so that blocks share the big layers evenly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../../math/adam.hpp"
#include "adam.cuh"

namespace galore::cuda {

// One layer of a batched Adam launch (device memory, built by the plan).
template <class M>
struct BatchedAdamLayer {
  // Low-rank: R is rows x cols with leading dimension ld (padded columns hold
  // 0), D likewise. Dense: g and w hold rows x cols contiguous elements (ld = cols).
  const void* input = nullptr;  // R (float) or G (the layer's element type)
  void* output = nullptr;       // D or W (the layer's element type)
  std::int64_t rows = 0, cols = 0, ld = 0;
  M* m = nullptr;
  M* v = nullptr;
  StepCounters* counters = nullptr;
  float scale = 1.0f;  // the projection's scale (1 for dense layers)
  int bf16 = 0;        // the element type of D, G and W: 1 bf16, 0 float
  int dense = 0;
  int vec4 = 0;  // input, output and moments aligned for 4-element vector access (unpadded layers)
  // Where the back-projection GEMM reads this layer's output pointer, the
  // pointer it holds on an applied step, and the scratch it gets on a skipped
  // one (null: never redirected, as when beta is 1).
  void** back_output_slot = nullptr;
  void* back_output = nullptr;
  void* skipped_output = nullptr;
};

struct BatchedAdamItem {
  int layer = 0;
  std::int64_t begin = 0, end = 0;  // elements [begin, end) of rows x ld
};

// The launch-to-launch scratch of a batched kernel: the grid barrier's arrival
// counts and the completion count, by launch parity (as StepCounters' slots).
struct BatchBarrier {
  unsigned long long launches = 0;
  unsigned arrived[2] = {0, 0};
  unsigned finished[2] = {0, 0};
};

constexpr std::int64_t kItemElements = std::int64_t{1} << 16;

namespace impl {

// One item of a layer, its elements shared by the block's threads.
template <class M, class T>
__device__ void run_lowrank(const BatchedAdamLayer<M>& L, std::int64_t begin, std::int64_t end, bool skip, float step,
                            const math::AdamCoefficients& coeffs) {
  const float* r = static_cast<const float*>(L.input);
  T* d = static_cast<T*>(L.output);
  if (L.ld == L.cols)
    lowrank_elements(r, L.m, L.v, d, L.vec4 != 0, begin, end, threadIdx.x, blockDim.x, skip, step, coeffs);
  else
    padded_lowrank_elements(r, L.m, L.v, d, L.cols, L.ld, begin, end, threadIdx.x, blockDim.x, skip, step, coeffs);
}
template <class M>
__device__ void run_dense(const BatchedAdamLayer<M>& L, std::int64_t begin, std::int64_t end, float step,
                          const AdamLaunch& p) {
  if (L.bf16)
    dense_elements(static_cast<const bf16*>(L.input), static_cast<bf16*>(L.output), L.m, L.v, L.vec4 != 0, begin, end,
                   threadIdx.x, blockDim.x, step, p.coeffs, p.decay);
  else
    dense_elements(static_cast<const float*>(L.input), static_cast<float*>(L.output), L.m, L.v, L.vec4 != 0, begin,
                   end, threadIdx.x, blockDim.x, step, p.coeffs, p.decay);
}

template <class M>
__global__ void __launch_bounds__(kThreads) batched_adam_step(const BatchedAdamLayer<M>* __restrict__ layers,
                                                              int num_layers, const BatchedAdamItem* __restrict__ items,
                                                              int num_items, const AdamLaunch* params,
                                                              BatchBarrier* barrier) {
  const AdamLaunch p = *params;  // in device memory, so that a captured graph follows lr changes
  const unsigned long long launch = barrier->launches;
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) barrier->arrived[(launch + 1) & 1] = barrier->finished[(launch + 1) & 1] = 0u;
    // Each layer's next step may be a per-layer one: its slots are cleared here too.
    for (int l = threadIdx.x; l < num_layers; l += blockDim.x) clear_next_slots(layers[l].counters);
  }
  // Phase one: check. A bad element marks its layer in the slot of its step.
  for (int k = blockIdx.x; k < num_items; k += gridDim.x) {
    const BatchedAdamItem it = items[k];
    const BatchedAdamLayer<M>& L = layers[it.layer];
    bool bad;
    const bool vec4 = L.vec4 || !L.dense;  // R (float, in the workspace) is always aligned
    const std::int64_t first = threadIdx.x, stride = blockDim.x;
    if (!L.dense) bad = any_out_of_range(vec4, static_cast<const float*>(L.input), it.begin, it.end, first, stride);
    else if (L.bf16) bad = any_out_of_range(vec4, static_cast<const bf16*>(L.input), it.begin, it.end, first, stride);
    else bad = any_out_of_range(vec4, static_cast<const float*>(L.input), it.begin, it.end, first, stride);
    if (__syncthreads_or(bad) && threadIdx.x == 0) {
      StepCounters* c = L.counters;
      atomicOr(&c->bad[(c->applied + c->skipped) & 1], 1u);
    }
  }
  // The grid barrier (all blocks are resident: the launch is cooperative).
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(&barrier->arrived[launch & 1], 1u);
    while (*static_cast<volatile unsigned*>(&barrier->arrived[launch & 1]) < gridDim.x) __nanosleep(64);
    __threadfence();
  }
  __syncthreads();
  // Phase two: apply. Counters are only read here; the last block writes them.
  for (int k = blockIdx.x; k < num_items; k += gridDim.x) {
    const BatchedAdamItem it = items[k];
    const BatchedAdamLayer<M>& L = layers[it.layer];
    const StepCounters* c = L.counters;
    const long long applied = c->applied;
    const bool skip = *static_cast<const volatile unsigned*>(&c->bad[(applied + c->skipped) & 1]) != 0u;
    const float step = skip ? 0.0f : math::adam_step_size_float(p.lr, p.beta1, p.beta2, applied + 1, p.correct_bias);
    if (L.dense) {
      if (!skip) run_dense(L, it.begin, it.end, step, p);
    } else if (L.bf16) {
      run_lowrank<M, bf16>(L, it.begin, it.end, skip, step, p.coeffs);
    } else {
      run_lowrank<M, float>(L, it.begin, it.end, skip, step, p.coeffs);
    }
  }
  // The last block to finish updates every layer's counters.
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&barrier->finished[launch & 1], 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int l = threadIdx.x; l < num_layers; l += blockDim.x) {
    const BatchedAdamLayer<M>& L = layers[l];
    StepCounters* c = L.counters;
    const long long applied = c->applied;
    const bool skip = *static_cast<volatile unsigned*>(&c->bad[(applied + c->skipped) & 1]) != 0u;
    record_step(c, skip, skip ? 0.0f : math::adam_step_size_float(p.lr, p.beta1, p.beta2, applied + 1, p.correct_bias),
                p.decay, L.scale);
    if (L.back_output_slot) *L.back_output_slot = skip && L.skipped_output ? L.skipped_output : L.back_output;
  }
  if (threadIdx.x == 0) barrier->launches = launch + 1;
}

}  // namespace impl

// One batched Adam launch over `num_layers` layers cut into `num_items` items
// (all arrays in device memory). `total_elements` sizes the grid.
template <class M>
void batched_adam_step(Context& ctx, const BatchedAdamLayer<M>* layers, int num_layers, const BatchedAdamItem* items,
                       int num_items, const AdamLaunch* params, BatchBarrier* barrier,
                       std::int64_t total_elements) {
  if (num_items == 0) return;
  impl::launch_cooperative(ctx, impl::batched_adam_step<M>, total_elements, "galore::cuda::batched_adam_step", layers,
                           num_layers, items, num_items, params, barrier);
}

}  // namespace galore::cuda
