// galore (CUDA backend): the device side of a refresh inside the whole-model
// step (batched_step.cuh): adopting the candidate bases without waiting.
//
// A refresh step computes each due layer's candidate basis, projects with it
// and lets the batched Adam kernel decide whether the layer's step applies.
// The candidate becomes the layer's basis only if it did (a skipped step keeps
// the old one, as step() does). adopt_applied makes that choice on the device,
// from each layer's StepCounters, so the host learns of it once, after every
// chunk has run, instead of waiting once per chunk.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "adam.cuh"
#include "context.cuh"
#include "error.cuh"

namespace galore::cuda {

// One due layer: its counters (written by the step's Adam kernel), the
// candidate and the layer's basis storage.
struct AdoptItem {
  const StepCounters* counters = nullptr;
  const void* candidate = nullptr;
  void* basis = nullptr;
  std::int64_t bytes = 0;
};

namespace impl {

// blockIdx.y: the item. Both pointers are 256-byte aligned (workspace and
// layer storage), so the copy moves 16-byte vectors and then any tail bytes.
__global__ void adopt_applied(const AdoptItem* items) {
  const AdoptItem it = items[blockIdx.y];
  if (it.counters->last_skipped) return;
  const std::int64_t vectors = it.bytes / 16;
  const auto* from = static_cast<const uint4*>(it.candidate);
  auto* to = static_cast<uint4*>(it.basis);
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < vectors; i += stride)
    to[i] = from[i];
  if (blockIdx.x == 0)
    for (std::int64_t b = vectors * 16 + threadIdx.x; b < it.bytes; b += blockDim.x)
      static_cast<unsigned char*>(it.basis)[b] = static_cast<const unsigned char*>(it.candidate)[b];
}

}  // namespace impl

// items: `count` AdoptItems in device memory.
inline void adopt_applied(Context& ctx, const AdoptItem* items, int count, std::int64_t largest_bytes) {
  if (count == 0) return;
  const std::int64_t blocks = std::min<std::int64_t>((largest_bytes / 16 + impl::kThreads - 1) / impl::kThreads, 256);
  impl::adopt_applied<<<dim3(static_cast<unsigned>(std::max<std::int64_t>(blocks, 1)), static_cast<unsigned>(count)),
                        impl::kThreads, 0, ctx.stream()>>>(items);
  check_launch("galore::cuda::adopt_applied");
}

}  // namespace galore::cuda
