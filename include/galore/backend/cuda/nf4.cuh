// galore (CUDA backend): NF4 codes (QLoRA's 4-bit NormalFloat,
// quant/nf4_codes.hpp) on the device, for the GPU optimizer's NF4 bases
// (quant::NF4). The element math is the CPU's (nf4_codes.hpp's host-device
// functions: the absmax of a block, x * (1 / absmax), the nearest level), so for
// the same input both backends write the same codes and absmax.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../quant/nf4_codes.hpp"
#include "error.cuh"
#include "quantized_weight.cuh"
#include "reduce.cuh"

namespace galore::cuda::impl {

// Each block's absmax over elements [0, n) of contiguous x, a warp a block. A
// maximum is exact in any order; fmaxf skips NaN as the CPU's std::max does.
template <class T>
__global__ void __launch_bounds__(kWarp* kQuantWarps)
    nf4_absmax(const T* __restrict__ x, std::int64_t n, std::int64_t block, float* __restrict__ absmax) {
  const int lane = threadIdx.x % kWarp;
  const std::int64_t blocks = (n + block - 1) / block;
  for (std::int64_t b = blockIdx.x * static_cast<std::int64_t>(kQuantWarps) + threadIdx.x / kWarp; b < blocks;
       b += static_cast<std::int64_t>(gridDim.x) * kQuantWarps) {
    const std::int64_t k1 = (b + 1) * block < n ? (b + 1) * block : n;
    float a = 0.0f;
    for (std::int64_t k = b * block + lane; k < k1; k += kWarp) a = fmaxf(a, fabsf(to_float(x[k])));
    a = warp_max(a);
    if (lane == 0) absmax[b] = a;
  }
}

// The codes of elements [0, n) of contiguous x with their blocks' absmax, two a
// byte (element 2j in the low half of byte j): a byte a thread, so no byte is
// written twice whatever the block size.
template <class T>
__global__ void nf4_encode(const T* __restrict__ x, std::int64_t n, std::int64_t block,
                           const float* __restrict__ absmax, std::uint8_t* __restrict__ codes) {
  for (std::int64_t j = grid_first(); j < (n + 1) / 2; j += grid_stride()) {
    unsigned byte = 0;
    for (int e = 0; e < 2 && 2 * j + e < n; ++e) {
      const std::int64_t k = 2 * j + e;
      byte |= static_cast<unsigned>(quant::nf4_code(to_float(x[k]) * quant::nf4_inverse(absmax[k / block])))
              << (4 * e);
    }
    codes[j] = static_cast<std::uint8_t>(byte);
  }
}

// out[0, n) (contiguous) = the NF4 values of the codes times their blocks' absmax.
template <class T>
__global__ void nf4_decode(const std::uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                           std::int64_t n, std::int64_t block, T* __restrict__ out) {
  for (std::int64_t k = grid_first(); k < n; k += grid_stride()) {
    const int c = (codes[k / 2] >> (4 * (k % 2))) & 15;
    out[k] = from_float<T>(quant::nf4_value(c) * absmax[k / block]);
  }
}

// NF4 codes and absmax of n contiguous elements in blocks of `block`.
template <class T>
void launch_quantize_nf4(const T* x, std::int64_t n, std::int64_t block, std::uint8_t* codes, float* absmax,
                         cudaStream_t stream) {
  if (n == 0) return;
  nf4_absmax<T><<<quantize_blocks((n + block - 1) / block, kQuantWarps), kWarp * kQuantWarps, 0, stream>>>(
      x, n, block, absmax);
  check_launch("galore::cuda::nf4_absmax");
  nf4_encode<T><<<blocks_for((n + 1) / 2), kThreads, 0, stream>>>(x, n, block, absmax, codes);
  check_launch("galore::cuda::nf4_encode");
}

template <class T>
void launch_dequantize_nf4(const std::uint8_t* codes, const float* absmax, std::int64_t n, std::int64_t block,
                           T* out, cudaStream_t stream) {
  if (n == 0) return;
  nf4_decode<T><<<blocks_for(n), kThreads, 0, stream>>>(codes, absmax, n, block, out);
  check_launch("galore::cuda::nf4_decode");
}

}  // namespace galore::cuda::impl
