// galore (CUDA backend): one Adam kernel over many layers, each with its own
// skip decision, for the batched step (step_plan.cuh).
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

// The hyperparameters the kernel reads from device memory, so that a captured
// CUDA graph follows learning-rate changes.
struct BatchedAdamParams {
  AdamLaunch adam;
};

constexpr std::int64_t kItemElements = std::int64_t{1} << 16;

namespace impl {

// Four consecutive elements as float: one 16-byte (float) or 8-byte (bf16) access.
template <class T>
__device__ inline void load4(const T* p, float (&x)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.y));
    x[0] = a.x, x[1] = a.y, x[2] = b.x, x[3] = b.y;
  }
}
template <class T>
__device__ inline void store4(T* p, const float (&x)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  } else {
    const __nv_bfloat162 a = __floats2bfloat162_rn(x[0], x[1]), b = __floats2bfloat162_rn(x[2], x[3]);
    uint2 v;
    v.x = *reinterpret_cast<const unsigned*>(&a);
    v.y = *reinterpret_cast<const unsigned*>(&b);
    *reinterpret_cast<uint2*>(p) = v;
  }
}

// Elements [begin, end) of a layer: f(i) on one element, f4(i) on four from i;
// 4-element accesses where the layer allows them (begin is a multiple of 4:
// items start at multiples of kItemElements), single ones for the rest.
template <class One, class Four>
__device__ inline void for_elements(bool vec4, std::int64_t begin, std::int64_t end, One f, Four f4) {
  std::int64_t tail = begin;
  if (vec4) {
    tail = begin + (end - begin) / 4 * 4;
    for (std::int64_t i = begin + 4 * static_cast<std::int64_t>(threadIdx.x); i < tail; i += 4 * blockDim.x) f4(i);
  }
  for (std::int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) f(i);
}

template <class M, class T>
__device__ void batched_lowrank_item(const BatchedAdamLayer<M>& L, std::int64_t begin, std::int64_t end, bool skip,
                                     float step, const math::AdamCoefficients& coeffs) {
  const float* r = static_cast<const float*>(L.input);
  T* d = static_cast<T*>(L.output);
  if (skip) {
    for_elements(L.vec4, begin, end, [&](std::int64_t j) { d[j] = from_float<T>(0.0f); },
                 [&](std::int64_t j) { store4(d + j, {0.0f, 0.0f, 0.0f, 0.0f}); });
    return;
  }
  if (L.ld != L.cols) {  // padded rows (a staged layer): R and D have ld columns, the moments cols
    for (std::int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
      const std::int64_t row = j / L.ld, col = j - row * L.ld;
      if (col >= L.cols) {
        d[j] = from_float<T>(0.0f);
        continue;
      }
      const std::int64_t i = row * L.cols + col;
      const math::AdamElement e = math::adam_element(r[j], to_float(L.m[i]), to_float(L.v[i]), step, coeffs);
      L.m[i] = from_float<M>(e.m);
      L.v[i] = from_float<M>(e.v);
      d[j] = from_float<T>(e.d);
    }
    return;
  }
  for_elements(
      L.vec4, begin, end,
      [&](std::int64_t i) {
        const math::AdamElement e = math::adam_element(r[i], to_float(L.m[i]), to_float(L.v[i]), step, coeffs);
        L.m[i] = from_float<M>(e.m);
        L.v[i] = from_float<M>(e.v);
        d[i] = from_float<T>(e.d);
      },
      [&](std::int64_t i) {
        float g[4], m[4], v[4], out[4];
        load4(r + i, g);
        load4(L.m + i, m);
        load4(L.v + i, v);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const math::AdamElement e = math::adam_element(g[k], m[k], v[k], step, coeffs);
          m[k] = e.m, v[k] = e.v, out[k] = e.d;
        }
        store4(L.m + i, m);
        store4(L.v + i, v);
        store4(d + i, out);
      });
}

template <class M, class T>
__device__ void batched_dense_item(const BatchedAdamLayer<M>& L, std::int64_t begin, std::int64_t end, float step,
                                   const AdamLaunch& p) {
  const T* g = static_cast<const T*>(L.input);
  T* w = static_cast<T*>(L.output);
  for_elements(
      L.vec4, begin, end,
      [&](std::int64_t i) {
        const math::AdamElement e = math::adam_element(to_float(g[i]), to_float(L.m[i]), to_float(L.v[i]), step, p.coeffs);
        L.m[i] = from_float<M>(e.m);
        L.v[i] = from_float<M>(e.v);
        w[i] = from_float<T>((to_float(w[i]) - e.d) * p.decay);
      },
      [&](std::int64_t i) {
        float gv[4], m[4], v[4], wv[4];
        load4(g + i, gv);
        load4(L.m + i, m);
        load4(L.v + i, v);
        load4(w + i, wv);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const math::AdamElement e = math::adam_element(gv[k], m[k], v[k], step, p.coeffs);
          m[k] = e.m, v[k] = e.v, wv[k] = (wv[k] - e.d) * p.decay;
        }
        store4(L.m + i, m);
        store4(L.v + i, v);
        store4(w + i, wv);
      });
}

template <class T>
__device__ bool any_out_of_range(bool vec4, const T* x, std::int64_t begin, std::int64_t end) {
  bool bad = false;
  for_elements(
      vec4, begin, end, [&](std::int64_t i) { bad |= !math::in_adam_range(to_float(x[i])); },
      [&](std::int64_t i) {
        float y[4];
        load4(x + i, y);
#pragma unroll
        for (int k = 0; k < 4; ++k) bad |= !math::in_adam_range(y[k]);
      });
  return bad;
}

template <class M>
__global__ void __launch_bounds__(kThreads) batched_adam_step(const BatchedAdamLayer<M>* __restrict__ layers,
                                                              int num_layers, const BatchedAdamItem* __restrict__ items,
                                                              int num_items, const BatchedAdamParams* params,
                                                              BatchBarrier* barrier) {
  const AdamLaunch p = params->adam;
  const unsigned long long launch = barrier->launches;
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) barrier->arrived[(launch + 1) & 1] = barrier->finished[(launch + 1) & 1] = 0u;
    // Clear each layer's slot of its next step (adam.cuh's decide_step does the same).
    for (int l = threadIdx.x; l < num_layers; l += blockDim.x) {
      StepCounters* c = layers[l].counters;
      c->bad[(c->applied + c->skipped + 1) & 1] = 0u;
    }
  }
  // Phase one: check. A bad element marks its layer in the slot of its step.
  for (int k = blockIdx.x; k < num_items; k += gridDim.x) {
    const BatchedAdamItem it = items[k];
    const BatchedAdamLayer<M>& L = layers[it.layer];
    bool bad;
    const bool vec4 = L.vec4 || !L.dense;  // R (float, in the workspace) is always aligned
    if (!L.dense) bad = any_out_of_range(vec4, static_cast<const float*>(L.input), it.begin, it.end);
    else if (L.bf16) bad = any_out_of_range(vec4, static_cast<const bf16*>(L.input), it.begin, it.end);
    else bad = any_out_of_range(vec4, static_cast<const float*>(L.input), it.begin, it.end);
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
      if (skip) continue;
      if (L.bf16) batched_dense_item<M, bf16>(L, it.begin, it.end, step, p);
      else batched_dense_item<M, float>(L, it.begin, it.end, step, p);
    } else if (L.bf16) {
      batched_lowrank_item<M, bf16>(L, it.begin, it.end, skip, step, p.coeffs);
    } else {
      batched_lowrank_item<M, float>(L, it.begin, it.end, skip, step, p.coeffs);
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
    c->last_skipped = skip ? 1 : 0;
    if (skip) {
      c->skipped += 1;
      c->step_size = 0.0f;
      c->alpha = 0.0f;
      c->beta = 1.0f;
    } else {
      c->applied = applied + 1;
      c->step_size = math::adam_step_size_float(p.lr, p.beta1, p.beta2, applied + 1, p.correct_bias);
      c->alpha = -p.decay * L.scale;
      c->beta = p.decay;
    }
    if (L.back_output_slot) *L.back_output_slot = skip && L.skipped_output ? L.skipped_output : L.back_output;
  }
  if (threadIdx.x == 0) barrier->launches = launch + 1;
}

}  // namespace impl

// One batched Adam launch over `num_layers` layers cut into `num_items` items
// (all arrays in device memory). `total_elements` sizes the grid.
template <class M>
void batched_adam_step(Context& ctx, const BatchedAdamLayer<M>* layers, int num_layers, const BatchedAdamItem* items,
                       int num_items, const BatchedAdamParams* params, BatchBarrier* barrier,
                       std::int64_t total_elements) {
  if (num_items == 0) return;
  impl::launch_cooperative(ctx, impl::batched_adam_step<M>, total_elements, "galore::cuda::batched_adam_step", layers,
                           num_layers, items, num_items, params, barrier);
}

}  // namespace galore::cuda
