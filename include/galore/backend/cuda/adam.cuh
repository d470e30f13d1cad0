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

// Elements [begin, end), this thread taking `first` and every `stride`-th
// after it (of the threads sharing the range): f(i) on one element, f4(i) on
// four from i. With vec4 (begin a multiple of 4 and the arrays aligned for it)
// the thread takes groups of four and single elements only in the tail.
template <class One, class Four>
__device__ inline void for_elements(bool vec4, std::int64_t begin, std::int64_t end, std::int64_t first,
                                    std::int64_t stride, One f, Four f4) {
  std::int64_t tail = begin;
  if (vec4) {
    tail = begin + (end - begin) / 4 * 4;
    for (std::int64_t i = begin + 4 * first; i < tail; i += 4 * stride) f4(i);
  }
  for (std::int64_t i = tail + first; i < end; i += stride) f(i);
}

// Is any element of x[begin, end) outside Adam's range (this thread's share)?
template <class T>
__device__ bool any_out_of_range(bool vec4, const T* x, std::int64_t begin, std::int64_t end, std::int64_t first,
                                 std::int64_t stride) {
  bool bad = false;
  for_elements(
      vec4, begin, end, first, stride, [&](std::int64_t i) { bad |= !math::in_adam_range(to_float(x[i])); },
      [&](std::int64_t i) {
        float y[4];
        load4(x + i, y);
#pragma unroll
        for (int k = 0; k < 4; ++k) bad |= !math::in_adam_range(y[k]);
      });
  return bad;
}

// Adam on elements [begin, end) of contiguous g (float or the layer's type),
// m and v (this thread's share): the moments in place, each update d handed to
// out(i, d), or four from i to out4(i, d4).
template <class G, class M, class Out, class Out4>
__device__ void adam_elements(const G* __restrict__ g, M* __restrict__ m, M* __restrict__ v, bool vec4,
                              std::int64_t begin, std::int64_t end, std::int64_t first, std::int64_t stride,
                              float step, const math::AdamCoefficients& coeffs, Out out, Out4 out4) {
  for_elements(
      vec4, begin, end, first, stride,
      [&](std::int64_t i) {
        const math::AdamElement e = math::adam_element(to_float(g[i]), to_float(m[i]), to_float(v[i]), step, coeffs);
        m[i] = from_float<M>(e.m);
        v[i] = from_float<M>(e.v);
        out(i, e.d);
      },
      [&](std::int64_t i) {
        float g4[4], m4[4], v4[4], d4[4];
        load4(g + i, g4);
        load4(m + i, m4);
        load4(v + i, v4);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const math::AdamElement e = math::adam_element(g4[k], m4[k], v4[k], step, coeffs);
          m4[k] = e.m, v4[k] = e.v, d4[k] = e.d;
        }
        store4(m + i, m4);
        store4(v + i, v4);
        out4(i, d4);
      });
}

// Low-rank Adam on elements [begin, end) of contiguous R, m, v and D (this
// thread's share); on a skipped step D = 0 and the moments stay.
template <class M, class D>
__device__ void lowrank_elements(const float* __restrict__ r, M* __restrict__ m, M* __restrict__ v,
                                 D* __restrict__ d, bool vec4, std::int64_t begin, std::int64_t end,
                                 std::int64_t first, std::int64_t stride, bool skip, float step,
                                 const math::AdamCoefficients& coeffs) {
  if (skip) {
    for_elements(vec4, begin, end, first, stride, [&](std::int64_t j) { d[j] = from_float<D>(0.0f); },
                 [&](std::int64_t j) { store4(d + j, {0.0f, 0.0f, 0.0f, 0.0f}); });
    return;
  }
  adam_elements(
      r, m, v, vec4, begin, end, first, stride, step, coeffs, [&](std::int64_t i, float di) { d[i] = from_float<D>(di); },
      [&](std::int64_t i, const float (&d4)[4]) { store4(d + i, d4); });
}

// Low-rank Adam on padded rows: R and D have ld columns, the moments cols; the
// padded columns of D are set to 0. Elements [begin, end) of R's rows x ld.
template <class M, class D>
__device__ void padded_lowrank_elements(const float* __restrict__ r, M* __restrict__ m, M* __restrict__ v,
                                        D* __restrict__ d, std::int64_t cols, std::int64_t ld, std::int64_t begin,
                                        std::int64_t end, std::int64_t first, std::int64_t stride, bool skip,
                                        float step, const math::AdamCoefficients& coeffs) {
  // 32-bit division where it suffices (most layers): far cheaper than 64-bit.
  const bool narrow = end <= std::int64_t{UINT32_MAX};
  for (std::int64_t j = begin + first; j < end; j += stride) {
    const std::int64_t row = narrow ? static_cast<std::uint32_t>(j) / static_cast<std::uint32_t>(ld) : j / ld;
    const std::int64_t col = j - row * ld;
    if (skip || col >= cols) {
      d[j] = from_float<D>(0.0f);
      continue;
    }
    const std::int64_t i = row * cols + col;
    const math::AdamElement e = math::adam_element(r[j], to_float(m[i]), to_float(v[i]), step, coeffs);
    m[i] = from_float<M>(e.m);
    v[i] = from_float<M>(e.v);
    d[j] = from_float<D>(e.d);
  }
}

// Dense AdamW on elements [begin, end): W = (W - d) * decay, as the CPU backend.
template <class M, class T>
__device__ void dense_elements(const T* __restrict__ g, T* __restrict__ w, M* __restrict__ m, M* __restrict__ v,
                               bool vec4, std::int64_t begin, std::int64_t end, std::int64_t first,
                               std::int64_t stride, float step, const math::AdamCoefficients& coeffs, float decay) {
  adam_elements(
      g, m, v, vec4, begin, end, first, stride, step, coeffs,
      [&](std::int64_t i, float di) { w[i] = from_float<T>((to_float(w[i]) - di) * decay); },
      [&](std::int64_t i, const float (&d4)[4]) {
        float w4[4];
        load4(w + i, w4);
#pragma unroll
        for (int k = 0; k < 4; ++k) w4[k] = (w4[k] - d4[k]) * decay;
        store4(w + i, w4);
      });
}

// May a dense step use 4-element accesses on W and G (16-byte aligned)?
inline bool vector_aligned(const void* w, const void* g) { return std::min(alignment_of(w), alignment_of(g)) >= 16; }

// This thread's place in a grid-stride loop.
__device__ inline std::int64_t grid_first() { return blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; }
__device__ inline std::int64_t grid_stride() { return static_cast<std::int64_t>(gridDim.x) * blockDim.x; }

// a / b for a, b >= 0, by a 32-bit division where both fit one (a 64-bit
// division costs several times more instructions).
__device__ inline std::int64_t quotient(std::int64_t a, std::int64_t b) {
  if (a <= 0xffffffffLL && b <= 0xffffffffLL) return static_cast<std::uint32_t>(a) / static_cast<std::uint32_t>(b);
  return a / b;
}
// Where element k of rows `cols` wide with leading dimension ld lies.
__device__ inline std::int64_t strided_index(std::int64_t k, std::int64_t ld, std::int64_t cols) {
  if (ld == cols) return k;
  const std::int64_t row = quotient(k, cols);
  return row * ld + (k - row * cols);
}

// A layer's step number t (applied + skipped before it) picks its slots in
// bad[] and arrived[]; before any block of step t touches them, the slots of
// step t + 1 are cleared, whichever kernel (per layer or batched) runs it.
__device__ inline void clear_next_slots(StepCounters* c) {
  const long long next = c->applied + c->skipped + 1;
  c->bad[next & 1] = c->arrived[next & 1] = 0u;
}

// The outcome of a step in the layer's counters: applied or skipped, the step
// size, and the back-projection's alpha and beta (W = beta W + alpha back(D)).
__device__ inline void record_step(StepCounters* c, bool skip, float step, float decay, float scale) {
  c->last_skipped = skip ? 1 : 0;
  if (skip) {
    c->skipped += 1;
    c->alpha = 0.0f;
    c->beta = 1.0f;
  } else {
    c->applied += 1;
    c->alpha = -decay * scale;
    c->beta = decay;
  }
  c->step_size = step;
}

// Phase one of a step kernel: every block checks its share of g[0, n), the
// grid meets, and every thread learns the verdict, the step's Adam t and its
// step size (step_size(t), by default galore_torch's). Block 0 then updates the
// counters: every block read them before the barrier, and no block reads them
// after it.
struct Verdict {
  bool skip;
  float step;
  long long t;  // Adam's t of this step if it applies: applied steps before it + 1
};
struct AdamStepSize {
  const AdamLaunch& p;
  __device__ float operator()(long long t) const {
    return math::adam_step_size_float(p.lr, p.beta1, p.beta2, t, p.correct_bias);
  }
};
template <class G, class StepSize = AdamStepSize>
__device__ Verdict decide_step(const G* __restrict__ g, std::int64_t n, bool vec4, const AdamLaunch& p,
                               StepCounters* c, StepSize step_size) {
  const long long applied = c->applied;
  const long long t = applied + c->skipped;
  unsigned* slot = &c->bad[t & 1];
  if (blockIdx.x == 0 && threadIdx.x == 0) clear_next_slots(c);
  bool bad = any_out_of_range(vec4, g, 0, n, grid_first(), grid_stride());
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
    const float step = skip ? 0.0f : step_size(applied + 1);
    verdict = {skip, step, applied + 1};
    if (blockIdx.x == 0) record_step(c, skip, step, p.decay, p.scale);
  }
  __syncthreads();
  return verdict;
}
template <class G>
__device__ Verdict decide_step(const G* __restrict__ g, std::int64_t n, bool vec4, const AdamLaunch& p,
                               StepCounters* c) {
  return decide_step(g, n, vec4, p, c, AdamStepSize{p});
}

// Low-rank step on R (rows x cols, leading dimension ld >= cols; the padded
// columns of a staged layer, staging.cuh, hold 0): the moments (rows x cols,
// contiguous) and D (in the basis' element type, for the GEMM, leading
// dimension ld; its padded columns are set to 0, and all of D on a skipped step).
// R, D and the moments start 256-byte aligned (workspace and layer storage).
template <class M, class D>
__global__ void __launch_bounds__(kThreads) adam_step(const float* __restrict__ r, std::int64_t rows,
                                                      std::int64_t cols, std::int64_t ld, M* __restrict__ m,
                                                      M* __restrict__ v, D* __restrict__ d, AdamLaunch p,
                                                      StepCounters* c) {
  const Verdict verdict = decide_step(r, rows * ld, true, p, c);
  if (ld == cols)
    lowrank_elements(r, m, v, d, true, 0, rows * cols, grid_first(), grid_stride(), verdict.skip, verdict.step,
                     p.coeffs);
  else
    padded_lowrank_elements(r, m, v, d, cols, ld, 0, rows * ld, grid_first(), grid_stride(), verdict.skip,
                            verdict.step, p.coeffs);
}

// Dense AdamW: W = (W - d) * decay, element by element, as the CPU backend.
// vec4: w and g are 16-byte aligned.
template <class T, class M>
__global__ void __launch_bounds__(kThreads) adamw_dense_step(T* __restrict__ w, const T* __restrict__ g,
                                                             std::int64_t n, bool vec4, M* __restrict__ m,
                                                             M* __restrict__ v, AdamLaunch p, StepCounters* c) {
  const Verdict verdict = decide_step(g, n, vec4, p, c);
  if (verdict.skip) return;
  dense_elements(g, w, m, v, vec4, 0, n, grid_first(), grid_stride(), verdict.step, p.coeffs, p.decay);
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
  const bool vec4 = impl::vector_aligned(w, g);
  impl::launch_cooperative(ctx, impl::adamw_dense_step<T, M>, n, "galore::cuda::adamw_dense_step", w, g, n, vec4, m,
                           v, p, counters);
}

}  // namespace galore::cuda
