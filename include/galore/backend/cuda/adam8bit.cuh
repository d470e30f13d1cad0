// galore (CUDA backend): bitsandbytes' 8-bit blockwise Adam moments in device
// memory, the 8-bit path of the CPU's state::Blockwise8bit
// (optim/blockwise8bit_state.hpp), bit for bit.
//
// m is stored as codes of bitsandbytes' signed dynamic map, v of the unsigned
// one, each block of `block_size` elements scaled by its own float32 absmax: 2
// bytes per element and 8 per block. A step dequantizes a block, applies
// bitsandbytes' update to each element (math::adam8bit_element, the CPU's
// code; an element whose gradient is out of Adam's range keeps its state and
// gets d = 0), takes the block's new absmax, and re-quantizes each state to its
// nearest code, defined on both backends as the number of midpoints between
// neighbouring codes that lie below the value (the CPU's quant::CodeIndex; here
// a binary search over the midpoints in shared memory), so ties agree; an m whose
// code would flip its sign moves one code towards it, as bitsandbytes does.
//
// One thread block of 256 threads per quantization block; blocks of up to
// 4096 elements (bitsandbytes uses 256, its versions before 0.44 2048).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../../math/adam.hpp"
#include "../../math/adam8bit.hpp"
#include "../../quant/dynamic_map.hpp"
#include "adam.cuh"
#include "context.cuh"
#include "device_buffer.cuh"
#include "error.cuh"
#include "reduce.cuh"

namespace galore::cuda {

// The signed and unsigned dynamic maps and their midpoints, in device memory:
// [signed map | unsigned map | signed midpoints | unsigned midpoints], 256
// floats each (255 midpoints, then +inf).
class DynamicMaps {
 public:
  DynamicMaps() : buf_(4 * 256) {
    std::vector<float> host(4 * 256);
    const quant::CodeMap& qm = quant::dynamic_map_signed();
    const quant::CodeMap& qv = quant::dynamic_map_unsigned();
    // The CPU's own midpoints (255, then +inf), so that both backends count the same ones.
    const std::vector<float>& mm = quant::signed_code_index().midpoints();
    const std::vector<float>& mv = quant::unsigned_code_index().midpoints();
    std::copy(qm.begin(), qm.end(), host.begin());
    std::copy(qv.begin(), qv.end(), host.begin() + 256);
    std::copy(mm.begin(), mm.begin() + 256, host.begin() + 512);
    std::copy(mv.begin(), mv.begin() + 256, host.begin() + 768);
    check(cudaMemcpy(buf_.data(), host.data(), buf_.bytes(), cudaMemcpyHostToDevice), "cudaMemcpy");
    // A pageable copy may return before its DMA lands, and a non-blocking
    // stream is not ordered after the legacy one.
    check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
  }
  const float* data() const { return buf_.data(); }

 private:
  DeviceBuffer<float> buf_;
};

// One tensor's 8-bit moments.
class Blockwise8bitMoments {
 public:
  static constexpr int kMaxBlock = 4096;

  Blockwise8bitMoments() = default;
  // n elements in blocks of block_size, from zero codes and zero absmax (as
  // bitsandbytes starts). Throws galore::invalid_argument for n < 1 or a block
  // size outside [1, 4096].
  explicit Blockwise8bitMoments(std::int64_t n, int block_size = 256) : n_(n), block_(block_size) {
    detail::require(n >= 1, "Blockwise8bitMoments needs at least one element (got ", n, ")");
    detail::require(block_size >= 1 && block_size <= kMaxBlock, "8-bit block size on the GPU must be in [1, ",
                    kMaxBlock, "] (got ", block_size, ")");
    // With a zero absmax every code decodes to 0, as bitsandbytes'
    // zero-initialized state.
    codes_ = DeviceBuffer<std::uint8_t>::zeroed(2 * static_cast<std::size_t>(n));
    absmax_ = DeviceBuffer<float>::zeroed(2 * static_cast<std::size_t>(blocks()));
  }

  std::int64_t size() const { return n_; }
  int block_size() const { return block_; }
  std::int64_t blocks() const { return (n_ + block_ - 1) / block_; }
  std::uint8_t* m_codes() { return codes_.data(); }
  std::uint8_t* v_codes() { return codes_.data() + n_; }
  float* m_absmax() { return absmax_.data(); }
  float* v_absmax() { return absmax_.data() + blocks(); }

  // Device bytes: 2 per element and 8 per block (the CPU's bytes_for on its 8-bit path).
  std::size_t bytes() const { return codes_.bytes() + absmax_.bytes(); }
  static std::size_t bytes_for(std::int64_t n, int block_size = 256) {
    detail::require(block_size >= 1, "8-bit block size must be positive (got ", block_size, ")");
    return 2 * static_cast<std::size_t>(n) + 2 * sizeof(float) * static_cast<std::size_t>((n + block_size - 1) / block_size);
  }

  // The state in host memory (tests, checkpoints). Synchronizes ctx's stream.
  void download(std::vector<std::uint8_t>& m_code, std::vector<std::uint8_t>& v_code, std::vector<float>& m_absmax,
                std::vector<float>& v_absmax, Context& ctx) {
    m_code.resize(static_cast<std::size_t>(n_));
    v_code.resize(static_cast<std::size_t>(n_));
    m_absmax.resize(static_cast<std::size_t>(blocks()));
    v_absmax.resize(static_cast<std::size_t>(blocks()));
    const std::size_t b = sizeof(float) * static_cast<std::size_t>(blocks());
    check(cudaMemcpyAsync(m_code.data(), m_codes(), static_cast<std::size_t>(n_), cudaMemcpyDeviceToHost, ctx.stream()),
          "cudaMemcpyAsync");
    check(cudaMemcpyAsync(v_code.data(), v_codes(), static_cast<std::size_t>(n_), cudaMemcpyDeviceToHost, ctx.stream()),
          "cudaMemcpyAsync");
    check(cudaMemcpyAsync(m_absmax.data(), this->m_absmax(), b, cudaMemcpyDeviceToHost, ctx.stream()), "cudaMemcpyAsync");
    check(cudaMemcpyAsync(v_absmax.data(), this->v_absmax(), b, cudaMemcpyDeviceToHost, ctx.stream()), "cudaMemcpyAsync");
    ctx.synchronize();
  }

 private:
  std::int64_t n_ = 0;
  int block_ = 256;
  DeviceBuffer<std::uint8_t> codes_;  // m codes, then v codes
  DeviceBuffer<float> absmax_;        // m absmax per block, then v
};

namespace impl {

constexpr int kAdam8bitThreads = 256;
constexpr int kAdam8bitPerThread = Blockwise8bitMoments::kMaxBlock / kAdam8bitThreads;

// The number of midpoints below x among the 255 sorted ones in mid.
__device__ inline int midpoints_below(const float* mid, float x) {
  int lo = 0, hi = 255;
  while (lo < hi) {
    const int m = (lo + hi) / 2;
    if (mid[m] < x) lo = m + 1;
    else hi = m;
  }
  return lo;
}

// The largest x of the block's threads, for x >= 0 (0 fills the empty lanes).
__device__ inline float block_max(float x, float* scratch) {
  x = warp_max(x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from the previous reduction
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  return warp_max(lane < kAdam8bitThreads / 32 ? scratch[lane] : 0.0f);
}

// Blocks b = blockIdx.x, blockIdx.x + gridDim.x, ... of the tensor, one at a
// time per thread block (the maps are loaded into shared memory once per
// thread block, not per quantization block): elements lo + threadIdx.x + 256 u.
__global__ void __launch_bounds__(kAdam8bitThreads)
    adam8bit_blockwise(const float* __restrict__ g, std::int64_t n, int block, std::uint8_t* __restrict__ m_code,
                       std::uint8_t* __restrict__ v_code, float* __restrict__ m_absmax, float* __restrict__ v_absmax,
                       const float* __restrict__ maps, math::Adam8bitCoefficients coef, float* __restrict__ d) {
  __shared__ float qm[256], qv[256], mid_m[256], mid_v[256], scratch[kAdam8bitThreads / 32];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) {
    qm[k] = maps[k];
    qv[k] = maps[256 + k];
    mid_m[k] = maps[512 + k];
    mid_v[k] = maps[768 + k];
  }
  __syncthreads();
  const std::int64_t nblocks = (n + block - 1) / block;
  for (std::int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const std::int64_t lo = b * block;
    const int len = static_cast<int>(n - lo < block ? n - lo : block);
    const float am = m_absmax[b], av = v_absmax[b];
    float mn[kAdam8bitPerThread], vn[kAdam8bitPerThread];
    float new_am = 0.0f, new_av = 0.0f;
#pragma unroll
    for (int u = 0; u < kAdam8bitPerThread; ++u) {
      const int j = static_cast<int>(threadIdx.x) + u * kAdam8bitThreads;
      if (j >= len) break;
      const std::int64_t i = lo + j;
      const float m = qm[m_code[i]] * am, v = qv[v_code[i]] * av, gi = g[i];
      const bool ok = math::in_adam_range(gi);
      const math::AdamElement e = math::adam8bit_element(ok ? gi : 0.0f, m, v, coef);
      mn[u] = ok ? e.m : m;
      vn[u] = ok ? e.v : v;
      d[i] = ok ? math::clamp_update(e.d) : 0.0f;
      new_am = fmaxf(new_am, fabsf(mn[u]));
      new_av = fmaxf(new_av, vn[u]);
    }
    new_am = block_max(new_am, scratch);
    new_av = block_max(new_av, scratch);
    if (threadIdx.x == 0) {
      m_absmax[b] = new_am;
      v_absmax[b] = new_av;
    }
#pragma unroll
    for (int u = 0; u < kAdam8bitPerThread; ++u) {
      const int j = static_cast<int>(threadIdx.x) + u * kAdam8bitThreads;
      if (j >= len) break;
      const std::int64_t i = lo + j;
      // An all-zero block (absmax 0) stores the zero codes instead of 0/0.
      int cm = 127;
      if (new_am > 0.0f) {
        const float m = mn[u];
        cm = midpoints_below(mid_m, m / new_am);
        if (signbit(qm[cm]) != signbit(m)) cm += m > 0.0f ? 1 : -1;
      }
      m_code[i] = static_cast<std::uint8_t>(cm);
      v_code[i] = static_cast<std::uint8_t>(new_av > 0.0f ? midpoints_below(mid_v, vn[u] / new_av) : 0);
    }
  }
}

}  // namespace impl

// One step of the moments with the float gradient g (size() elements, device
// memory), writing the update d (clamped; 0 where g is out of Adam's range):
// the CPU's state::Blockwise8bit::update on its 8-bit path. The coefficients
// come from the host (math::adam8bit_coefficients: powf differs between the
// backends by an ulp or two). No synchronization.
inline void adam8bit_step(Context& ctx, Blockwise8bitMoments& mo, const DynamicMaps& maps, const float* g, float* d,
                          const math::Adam8bitCoefficients& coef) {
  detail::require(mo.size() > 0, "adam8bit_step: the moments are empty (default-constructed)");
  // Enough thread blocks to fill the device (8 per multiprocessor), each
  // looping over quantization blocks.
  const auto grid = static_cast<unsigned>(std::min<std::int64_t>(mo.blocks(), 8 * ctx.multiprocessors()));
  impl::adam8bit_blockwise<<<grid, impl::kAdam8bitThreads, 0, ctx.stream()>>>(
      g, mo.size(), mo.block_size(), mo.m_codes(), mo.v_codes(), mo.m_absmax(), mo.v_absmax(), maps.data(), coef, d);
  check_launch("galore::cuda::adam8bit_blockwise");
}

}  // namespace galore::cuda
