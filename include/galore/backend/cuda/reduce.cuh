// galore (CUDA backend): reductions across a warp's 32 lanes (every lane must
// take part; every lane gets the result).
#pragma once

#include <cuda_runtime.h>

namespace galore::cuda::impl {

__device__ inline float warp_min(float x) {
  for (int o = 16; o > 0; o /= 2) x = fminf(x, __shfl_xor_sync(0xFFFFFFFFu, x, o));
  return x;
}
__device__ inline float warp_max(float x) {
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, o));
  return x;
}

}  // namespace galore::cuda::impl
