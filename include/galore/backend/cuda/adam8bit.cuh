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
// The count comes from the CPU's compact bucket table (quant::CodeIndex), in
// shared memory: one byte per bucket of floats (sign, clamped exponent, 8
// mantissa bits) gives the midpoints below the bucket, one comparison finishes.
//
// Blocks of up to 512 elements (bitsandbytes uses 256) are stepped one per
// warp, so the block's absmax is a shuffle reduction with no barrier; larger
// blocks (up to 4096; bitsandbytes before 0.44 used 2048) one per thread block.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
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

// The signed and unsigned dynamic maps, their midpoints and bucket tables, in
// device memory: [signed map | unsigned map | signed midpoints | unsigned
// midpoints] as 256 floats each (255 midpoints, then +inf), then the signed and
// the unsigned compact bucket table: the CPU's quant::CodeIndex, copied.
class DynamicMaps {
 public:
  static constexpr int kTableBytes = quant::CodeIndex::kCompactBytes;
  static constexpr int kBytes = 4 * 256 * static_cast<int>(sizeof(float)) + 2 * kTableBytes;

  DynamicMaps() : buf_(kBytes) {
    std::vector<unsigned char> host(kBytes);
    const quant::CodeMap* map[2] = {&quant::dynamic_map_signed(), &quant::dynamic_map_unsigned()};
    const quant::CodeIndex* index[2] = {&quant::signed_code_index(), &quant::unsigned_code_index()};
    for (int k = 0; k < 2; ++k) {
      std::memcpy(host.data() + k * 256 * sizeof(float), map[k]->data(), 256 * sizeof(float));
      std::memcpy(host.data() + (512 + k * 256) * sizeof(float), index[k]->midpoints().data(), 256 * sizeof(float));
      std::memcpy(host.data() + 1024 * sizeof(float) + k * kTableBytes, index[k]->compact_table().data(), kTableBytes);
    }
    check(cudaMemcpy(buf_.data(), host.data(), buf_.bytes(), cudaMemcpyHostToDevice), "cudaMemcpy");
    // A pageable copy may return before its DMA lands, and a non-blocking
    // stream is not ordered after the legacy one.
    check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
  }
  const unsigned char* data() const { return buf_.data(); }

 private:
  DeviceBuffer<unsigned char> buf_;
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
constexpr int kAdam8bitWarps = kAdam8bitThreads / 32;
constexpr int kAdam8bitPerThread = Blockwise8bitMoments::kMaxBlock / kAdam8bitThreads;
// Blocks up to this size are stepped one per warp.
constexpr int kAdam8bitWarpBlock = 512;

// The maps, midpoints and bucket tables of DynamicMaps, in shared memory.
struct Adam8bitTables {
  float qm[256], qv[256], mid_m[256], mid_v[256];
  unsigned char table_m[DynamicMaps::kTableBytes], table_v[DynamicMaps::kTableBytes];
};
static_assert(sizeof(Adam8bitTables) == DynamicMaps::kBytes, "the shared tables mirror DynamicMaps' layout");

// Copies DynamicMaps' buffer into shared memory (16 bytes per thread and load).
__device__ inline void load_tables(Adam8bitTables& t, const unsigned char* __restrict__ maps) {
  auto* to = reinterpret_cast<uint4*>(&t);
  const auto* from = reinterpret_cast<const uint4*>(maps);
  for (int k = threadIdx.x; k < DynamicMaps::kBytes / 16; k += blockDim.x) to[k] = from[k];
  __syncthreads();
}

// The nearest code of x, as quant::CodeIndex::nearest_compact: the midpoints
// below x's bucket, plus one if the bucket's midpoint (if any) lies below x.
__device__ inline int code_of(const unsigned char* table, const float* mid, float x) {
  const int b = table[quant::CodeIndex::compact_index(__float_as_uint(x))];
  return b + (mid[b] < x);
}

// Dequantizes an element's moments, steps them with gradient gi, and returns
// its update d (clamped; 0 with the state kept when gi is out of Adam's range).
__device__ inline float step_element(const Adam8bitTables& t, std::uint8_t cm, std::uint8_t cv, float am, float av,
                                     float gi, const math::Adam8bitCoefficients& coef, float& m, float& v) {
  m = t.qm[cm] * am;
  v = t.qv[cv] * av;
  const bool ok = math::in_adam_range(gi);
  const math::AdamElement e = math::adam8bit_element(ok ? gi : 0.0f, m, v, coef);
  if (!ok) return 0.0f;
  m = e.m;
  v = e.v;
  return math::clamp_update(e.d);
}

// The codes of new moments m, v in a block of absmax new_am, new_av. An
// all-zero block (absmax 0) stores the zero codes instead of 0/0; an m whose
// code would flip its sign moves one code towards it.
__device__ inline void encode_element(const Adam8bitTables& t, float m, float v, float new_am, float new_av,
                                      std::uint8_t& cm, std::uint8_t& cv) {
  int c = 127;
  if (new_am > 0.0f) {
    c = code_of(t.table_m, t.mid_m, m / new_am);
    if (signbit(t.qm[c]) != signbit(m)) c += m > 0.0f ? 1 : -1;
  }
  cm = static_cast<std::uint8_t>(c);
  cv = static_cast<std::uint8_t>(new_av > 0.0f ? code_of(t.table_v, t.mid_v, v / new_av) : 0);
}

// A tensor's 8-bit moments as a kernel takes them.
struct Adam8bitState {
  std::int64_t n;
  int block;
  std::uint8_t* m_code;
  std::uint8_t* v_code;
  float* m_absmax;
  float* v_absmax;
};

// The largest x of the block's threads, for x >= 0 (0 fills the empty lanes).
__device__ inline float block_max(float x, float* scratch) {
  x = warp_max(x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from the previous reduction
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  return warp_max(lane < kAdam8bitWarps ? scratch[lane] : 0.0f);
}

// Steps every quantization block of s, each thread block taking its share:
// the element i's gradient is load(i), its update goes to store(i, d). Blocks
// of at most 32 * PerLane elements are stepped one per warp (lane l takes
// elements l, l + 32, ... of its block, every load issued before any use, the
// absmax a shuffle reduction); PerLane 0 steps larger blocks one per thread
// block (elements threadIdx.x + 256 u, the absmax through shared memory).
template <int PerLane, class Load, class Store>
__device__ void step_quantization_blocks(const Adam8bitTables& t, const Adam8bitState& s,
                                         const math::Adam8bitCoefficients& coef, Load load, Store store) {
  constexpr bool per_warp = PerLane > 0;
  constexpr int per_thread = per_warp ? PerLane : kAdam8bitPerThread;
  constexpr int stride = per_warp ? 32 : kAdam8bitThreads;
  __shared__ float scratch[per_warp ? 1 : kAdam8bitWarps];
  const int lane = per_warp ? threadIdx.x % 32 : threadIdx.x;
  const std::int64_t units = per_warp ? static_cast<std::int64_t>(gridDim.x) * kAdam8bitWarps : gridDim.x;
  const std::int64_t nblocks = (s.n + s.block - 1) / s.block;
  for (std::int64_t b = per_warp ? blockIdx.x * static_cast<std::int64_t>(kAdam8bitWarps) + threadIdx.x / 32
                                 : blockIdx.x;
       b < nblocks; b += units) {
    const std::int64_t lo = b * s.block;
    const int len = static_cast<int>(s.n - lo < s.block ? s.n - lo : s.block);
    const float am = s.m_absmax[b], av = s.v_absmax[b];
    float g[per_thread];
    std::uint8_t cm[per_thread], cv[per_thread];
#pragma unroll
    for (int u = 0; u < per_thread; ++u) {
      const int j = lane + stride * u;
      g[u] = j < len ? load(lo + j) : 0.0f;
      cm[u] = j < len ? s.m_code[lo + j] : std::uint8_t{127};
      cv[u] = j < len ? s.v_code[lo + j] : std::uint8_t{0};
    }
    float m[per_thread], v[per_thread], new_am = 0.0f, new_av = 0.0f;
#pragma unroll
    for (int u = 0; u < per_thread; ++u) {
      m[u] = v[u] = 0.0f;
      if (lane + stride * u >= len) continue;
      store(lo + lane + stride * u, step_element(t, cm[u], cv[u], am, av, g[u], coef, m[u], v[u]));
      new_am = fmaxf(new_am, fabsf(m[u]));
      new_av = fmaxf(new_av, v[u]);
    }
    if constexpr (per_warp) {
      new_am = warp_max(new_am);
      new_av = warp_max(new_av);
    } else {
      new_am = block_max(new_am, scratch);
      new_av = block_max(new_av, scratch);
    }
    if (lane == 0) {  // every thread of the unit read am and av above
      s.m_absmax[b] = new_am;
      s.v_absmax[b] = new_av;
    }
#pragma unroll
    for (int u = 0; u < per_thread; ++u) {
      const int j = lane + stride * u;
      if (j >= len) continue;
      encode_element(t, m[u], v[u], new_am, new_av, s.m_code[lo + j], s.v_code[lo + j]);
    }
  }
}

// Which step_quantization_blocks a block size takes.
template <class Launch>
void dispatch_block_size(int block, Launch&& launch) {
  if (block <= 256) launch(std::integral_constant<int, 8>{});
  else if (block <= kAdam8bitWarpBlock) launch(std::integral_constant<int, 16>{});
  else launch(std::integral_constant<int, 0>{});
}
// Thread blocks a step of s takes: one per quantization block, or per 8 of
// them stepped per warp.
inline std::int64_t thread_blocks_for(const Adam8bitState& s) {
  const std::int64_t nblocks = (s.n + s.block - 1) / s.block;
  return s.block <= kAdam8bitWarpBlock ? (nblocks + kAdam8bitWarps - 1) / kAdam8bitWarps : nblocks;
}

// One step of the moments on the float gradient g, the update into d.
template <int PerLane>
__global__ void __launch_bounds__(kAdam8bitThreads)
    adam8bit_blocks(Adam8bitState s, const unsigned char* __restrict__ maps, math::Adam8bitCoefficients coef,
                    const float* __restrict__ g, float* __restrict__ d) {
  __shared__ __align__(16) Adam8bitTables t;
  load_tables(t, maps);
  step_quantization_blocks<PerLane>(
      t, s, coef, [g](std::int64_t i) { return g[i]; }, [d](std::int64_t i, float x) { d[i] = x; });
}

// A layer's step as the optimizer makes it (the CPU's LowRankAdam over
// state::Blockwise8bit inside galore_step and adamw_step): the skip decision
// over the whole gradient first (decide_step), then on an applied step the
// 8-bit update with the coefficients of the step's t.
struct Adam8bitHyper {
  double lr, beta1, beta2, eps;
  bool correct_bias;
  __device__ math::Adam8bitCoefficients at(long long t) const {
    return math::adam8bit_coefficients(lr, beta1, beta2, eps, t, correct_bias);
  }
  __device__ float operator()(long long t) const { return at(t).step; }
};

// The low-rank step's input R (float) and output D (the basis' type), rows x
// cols with leading dimension ld: D's padded columns are set to 0, and all of
// D on a skipped step.
template <class DT>
struct LowRankIO {
  const float* r;
  DT* d;
  std::int64_t rows, cols, ld;
  __device__ const float* checked() const { return r; }
  __device__ std::int64_t checked_size() const { return rows * ld; }
  __device__ bool vec4() const { return true; }
  __device__ float load(std::int64_t i) const { return r[strided_index(i, ld, cols)]; }
  __device__ void store(std::int64_t i, float x) const { d[strided_index(i, ld, cols)] = from_float<DT>(x); }
  __device__ void zero_all() const {
    for (std::int64_t i = grid_first(); i < rows * ld; i += grid_stride()) d[i] = from_float<DT>(0.0f);
  }
  __device__ void finish() const {
    const std::int64_t pad = ld - cols;
    if (pad == 0) return;
    for (std::int64_t i = grid_first(); i < rows * pad; i += grid_stride()) {
      const std::int64_t row = quotient(i, pad);
      d[row * ld + cols + (i - row * pad)] = from_float<DT>(0.0f);
    }
  }
};

// A dense layer's gradient G and weight W (n contiguous elements):
// W = (W - d) * decay, as the CPU's adamw_step; nothing written when skipped.
template <class T>
struct DenseIO {
  T* w;
  const T* g;
  std::int64_t n;
  bool aligned;
  float decay;
  __device__ const T* checked() const { return g; }
  __device__ std::int64_t checked_size() const { return n; }
  __device__ bool vec4() const { return aligned; }
  __device__ float load(std::int64_t i) const { return to_float(g[i]); }
  __device__ void store(std::int64_t i, float x) const { w[i] = from_float<T>((to_float(w[i]) - x) * decay); }
  __device__ void zero_all() const {}
  __device__ void finish() const {}
};

template <int PerLane, class IO>
__global__ void __launch_bounds__(kAdam8bitThreads)
    adam8bit_layer_step(Adam8bitState s, const unsigned char* __restrict__ maps, Adam8bitHyper h, IO io, AdamLaunch p,
                        StepCounters* c) {
  __shared__ __align__(16) Adam8bitTables t;
  load_tables(t, maps);
  const Verdict verdict = decide_step(io.checked(), io.checked_size(), io.vec4(), p, c, h);
  if (verdict.skip) {
    io.zero_all();
    return;
  }
  step_quantization_blocks<PerLane>(
      t, s, h.at(verdict.t), [&io](std::int64_t i) { return io.load(i); },
      [&io](std::int64_t i, float x) { io.store(i, x); });
  io.finish();
}

// The same for a tensor under the 8-bit threshold, whose moments stay float32
// (bitsandbytes' formula, element by element).
template <class IO>
__global__ void __launch_bounds__(kThreads)
    adam8bit_float_layer_step(float* __restrict__ m, float* __restrict__ v, std::int64_t n, Adam8bitHyper h, IO io,
                              AdamLaunch p, StepCounters* c) {
  const Verdict verdict = decide_step(io.checked(), io.checked_size(), io.vec4(), p, c, h);
  if (verdict.skip) {
    io.zero_all();
    return;
  }
  const math::Adam8bitCoefficients coef = h.at(verdict.t);
  for (std::int64_t i = grid_first(); i < n; i += grid_stride()) {
    const math::AdamElement e = math::adam8bit_element(io.load(i), m[i], v[i], coef);
    m[i] = e.m;
    v[i] = e.v;
    io.store(i, math::clamp_update(e.d));
  }
  io.finish();
}

}  // namespace impl

// One step of the moments with the float gradient g (size() elements, device
// memory), writing the update d (clamped; 0 where g is out of Adam's range):
// the CPU's state::Blockwise8bit::update on its 8-bit path, with the
// coefficients of math::adam8bit_coefficients (the same bits on both
// backends). No synchronization.
inline void adam8bit_step(Context& ctx, Blockwise8bitMoments& mo, const DynamicMaps& maps, const float* g, float* d,
                          const math::Adam8bitCoefficients& coef) {
  detail::require(mo.size() > 0, "adam8bit_step: the moments are empty (default-constructed)");
  const impl::Adam8bitState s{mo.size(), mo.block_size(), mo.m_codes(), mo.v_codes(), mo.m_absmax(), mo.v_absmax()};
  impl::dispatch_block_size(s.block, [&](auto per_lane) {
    auto* kernel = impl::adam8bit_blocks<decltype(per_lane)::value>;
    // One wave of resident thread blocks, each looping over its share.
    const int resident = ctx.resident_blocks(reinterpret_cast<const void*>(kernel), impl::kAdam8bitThreads);
    const auto grid = static_cast<unsigned>(std::min<std::int64_t>(impl::thread_blocks_for(s), resident));
    kernel<<<grid, impl::kAdam8bitThreads, 0, ctx.stream()>>>(s, maps.data(), coef, g, d);
    check_launch("galore::cuda::adam8bit_step");
  });
}

// A layer's step with 8-bit moments s, as the optimizer makes it: the skip
// decision over io's gradient, then (if applied) the update of the moments and
// io's output (impl::LowRankIO: D; impl::DenseIO: W). One cooperative launch,
// no synchronization.
template <class IO>
void adam8bit_layer_step(Context& ctx, const impl::Adam8bitState& s, const DynamicMaps& maps,
                         const impl::Adam8bitHyper& h, const IO& io, const AdamLaunch& p, StepCounters* counters) {
  impl::dispatch_block_size(s.block, [&](auto per_lane) {
    impl::launch_cooperative(ctx, impl::adam8bit_layer_step<decltype(per_lane)::value, IO>,
                             impl::thread_blocks_for(s) * impl::kThreads, "galore::cuda::adam8bit_layer_step", s,
                             maps.data(), h, io, p, counters);
  });
}
// The same for a tensor under the 8-bit threshold (float32 moments m, v of n elements).
template <class IO>
void adam8bit_float_layer_step(Context& ctx, float* m, float* v, std::int64_t n, const impl::Adam8bitHyper& h,
                               const IO& io, const AdamLaunch& p, StepCounters* counters) {
  impl::launch_cooperative(ctx, impl::adam8bit_float_layer_step<IO>, n, "galore::cuda::adam8bit_float_layer_step", m,
                           v, n, h, io, p, counters);
}

}  // namespace galore::cuda
