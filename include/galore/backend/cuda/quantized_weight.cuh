// galore (CUDA backend): cuda::QuantizedWeight<8>, Q-GaLore's INT8 weight in
// device memory (arXiv 2407.08296; q_galore_torch's group-wise quantizer), and
// QuantizedWeight<4>, its INT4 projection bases packed two codes per byte
// (rounded to nearest; group_scales, encode_packed4, dequantize_packed4 below).
//
// The layout of the CPU's galore::QuantizedWeight<8> (galore/quantized_weight.hpp):
// one code per weight, and per group of `group_size` consecutive elements of the
// row-major flattening one float32 scale and one zero point, nothing else. The
// element math is the shared code of math/quant_codes.hpp, so for identical
// inputs the GPU writes the CPU's codes, scales and zeros bit for bit:
//   - quantize(): round to nearest (the reference's initial quantization);
//   - requantize_rows(): fresh scales and zeros, codes by stochastic rounding
//     with the random bits StochasticRounder<8>::bind(layer, step) draws on the
//     CPU (Philox4x32-10 keyed by the seed, counter by element, step and layer).
//
// Kernels: the lanes of a group find its extremes (a shuffle reduction), write
// its scale and zero, and encode it. Groups of 64, 128, 256 or 512 elements
// that lie in rows (the common case) take quantize_contiguous_groups: each lane
// loads its 8 or 16 elements of the group once, all at a time, in the layout of
// the CPU's Philox tiles (the four elements i, i + 16, i + 32, i + 48 of a
// 64-element tile share a counter, so a lane holds whole blocks), and divides
// by one multiplication. Other layouts and sizes take quantize_groups: a warp a
// group, read twice; with groups of a multiple of 64 elements each lane there
// computes one Philox block per four elements too.
//
// Weights must be finite, as on the CPU: quantize() and requantize_rows() check
// the values first (one reduction and one synchronization) and throw
// galore::invalid_argument, changing nothing, for NaN or Inf.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../../core/matrix_view.hpp"
#include "../../core/shape.hpp"
#include "../../math/quant_codes.hpp"
#include "../../quant/group_quantized.hpp"
#include "../../rounding/rounding_mode.hpp"
#include "adam.cuh"
#include "context.cuh"
#include "device_buffer.cuh"
#include "error.cuh"
#include "reduce.cuh"

namespace galore::cuda {

namespace impl {

constexpr int kWarp = 32;
constexpr int kQuantWarps = 8;      // warps per block of the quantization kernels
constexpr float kMaxCode = 255.0f;  // the largest 8-bit code

// Element k of rows laid out `cols` wide with leading dimension ld.
template <class T>
__device__ inline float element(const T* p, std::int64_t ld, std::int64_t cols, std::int64_t k) {
  return to_float(p[strided_index(k, ld, cols)]);
}

// Sets *bad when some element of the rows x cols values (leading dimension ld)
// is NaN or Inf.
template <class T>
__global__ void find_non_finite(const T* __restrict__ x, std::int64_t ld, std::int64_t cols, std::int64_t n,
                                unsigned* bad) {
  bool any = false;
  for (std::int64_t k = grid_first(); k < n; k += grid_stride()) any |= !isfinite(element(x, ld, cols, k));
  if (__syncthreads_or(any) && threadIdx.x == 0) atomicOr(bad, 1u);
}

// x[0] = NaN when *flag is set. A quantized basis made from a candidate that
// held NaN or Inf (whose codes are defined but meaningless) then makes the
// projection non-finite, and the step is skipped, as with an unquantized basis.
template <class T>
__global__ void poison_if_flagged(const unsigned* __restrict__ flag, T* __restrict__ x) {
  if (*flag != 0u) x[0] = from_float<T>(__int_as_float(0x7FC00000));
}

// With `after` (the counters of the step that produced the values): false if
// that step was skipped (nothing is to be written); else, for stochastic
// rounding, step becomes its count of applied steps.
template <bool Stochastic>
__device__ inline bool proceed_after(const StepCounters* after, std::uint32_t& step) {
  if (after == nullptr) return true;
  if (after->last_skipped) return false;
  if constexpr (Stochastic) step = static_cast<std::uint32_t>(after->applied);
  return true;
}

// Philox block `counter` of (seed, layer, step): its four words are the random
// bits of elements i, i + 16, i + 32, i + 48 of a 64-element tile, counter
// (i >> 6) * 16 + (i & 15) for i < 16 in the tile (math::stochastic_bits).
__device__ inline Philox4x32 block_bits(std::uint64_t counter, std::uint64_t seed, std::uint32_t layer,
                                        std::uint32_t step) {
  return philox4x32_10(static_cast<std::uint32_t>(counter), static_cast<std::uint32_t>(counter >> 32), step, layer,
                       static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
}

// lo = the min of lo, hi = the max of hi over aligned groups of `Lanes` lanes
// (a power of two up to a warp: small groups share a warp, which reduce.cuh's
// warp_min and warp_max do not allow; mask: the lanes of the caller's group,
// all of which take part).
template <int Lanes>
__device__ inline void lanes_min_max(float& lo, float& hi, unsigned mask) {
#pragma unroll
  for (int o = Lanes / 2; o > 0; o /= 2) {
    lo = fminf(lo, __shfl_xor_sync(mask, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(mask, hi, o));
  }
}

// The scale and zero point (codes up to max_code) of elements [k0, k1) of x
// (rows `cols` wide, leading dimension ld) from their extremes: every lane of
// the warp takes part and gets them.
template <class T>
__device__ inline void warp_scale_zero(const T* __restrict__ x, std::int64_t ld, std::int64_t cols, std::int64_t k0,
                                       std::int64_t k1, float max_code, float& scale, float& zero) {
  float lo = INFINITY, hi = -INFINITY;
#pragma unroll 8
  for (std::int64_t k = k0 + static_cast<std::int64_t>(threadIdx.x % kWarp); k < k1; k += kWarp) {
    const float v = element(x, ld, cols, k);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  math::minmax_scale_zero(warp_min(lo), warp_max(hi), max_code, scale, zero);
}

// Groups [g0, g0 + groups) of elements [first, first + n) of the weight, read
// from x (element k of x is element first + k; first starts a group), each by
// one warp: extremes, scale and zero, codes (nearest, or stochastic with the
// bits of (seed, layer, step)). With `after` (the counters of the step that
// produced x) nothing is written if that step was skipped, and the step is its
// count of applied steps. Any layout and group size; quantize_contiguous_groups
// is the fast path of the common ones.
template <class T, bool Stochastic>
__global__ void __launch_bounds__(kWarp* kQuantWarps)
    quantize_groups(const T* __restrict__ x, std::int64_t ld, std::int64_t cols, std::int64_t first, std::int64_t n,
                    std::int64_t group, std::uint8_t* __restrict__ codes, float* __restrict__ scales,
                    std::uint8_t* __restrict__ zeros, std::uint64_t seed, std::uint32_t layer, std::uint32_t step,
                    const StepCounters* after = nullptr) {
  if (!proceed_after<Stochastic>(after, step)) return;
  if constexpr (!Stochastic) (void)seed, (void)layer, (void)step;
  const int lane = threadIdx.x % kWarp;
  const std::int64_t groups = (n + group - 1) / group;
  for (std::int64_t gl = blockIdx.x * static_cast<std::int64_t>(kQuantWarps) + threadIdx.x / kWarp; gl < groups;
       gl += static_cast<std::int64_t>(gridDim.x) * kQuantWarps) {
    const std::int64_t k0 = gl * group, k1 = k0 + group < n ? k0 + group : n;
    float scale, zero;
    warp_scale_zero(x, ld, cols, k0, k1, kMaxCode, scale, zero);
    const std::int64_t g = quotient(first + k0, group);
    if (lane == 0) {
      scales[g] = scale;
      zeros[g] = static_cast<std::uint8_t>(zero);
    }
    std::uint8_t* out = codes + first;
    if constexpr (!Stochastic) {
#pragma unroll 8
      for (std::int64_t k = k0 + lane; k < k1; k += kWarp)
        out[k] = math::minmax_code(element(x, ld, cols, k), scale, zero, kMaxCode);
    } else if (group % 64 == 0) {
      // Whole 64-element tiles (the group starts on one): lane l of a
      // half-warp takes elements l, l + 16, l + 32, l + 48 of its tile, whose
      // bits are the four words of one Philox block.
      for (std::int64_t t0 = k0; t0 < k1; t0 += 128) {
        const std::int64_t tile = t0 + (lane / 16) * 64;
        const std::uint64_t i0 = static_cast<std::uint64_t>(first + tile) + static_cast<std::uint64_t>(lane % 16);
        const Philox4x32 bits = block_bits((i0 >> 6) * 16 + (i0 & 15), seed, layer, step);
        for (int w = 0; w < 4; ++w) {
          const std::int64_t k = tile + lane % 16 + 16 * w;
          if (k < k1) out[k] = math::stochastic_code(element(x, ld, cols, k), scale, zero, kMaxCode, bits.v[w]);
        }
      }
    } else {
      for (std::int64_t k = k0 + lane; k < k1; k += kWarp)
        out[k] = math::stochastic_code(element(x, ld, cols, k), scale, zero, kMaxCode,
                                       math::stochastic_bits(seed, layer, step, static_cast<std::uint64_t>(first + k)));
    }
  }
}

// How quantize_contiguous_groups spreads a group of Group elements (64, 128,
// 256 or 512) over lanes, PerLane (8 or 16) elements a lane: `lanes` lanes a
// group (a warp, or for small groups a part of one, which then takes several
// groups at once), each holding `blocks` Philox blocks of four elements. Block
// q of the group covers the elements whose random bits are its four words
// (math::stochastic_bits), (q / 16) * 64 + q % 16 + 16 w for w < 4, and lane t
// holds blocks t + lanes b: a warp's load of one (b, w) reads runs of 4 to 16
// consecutive elements.
template <int Group, int PerLane>
struct GroupLanes {
  static_assert(Group == 64 || Group == 128 || Group == 256 || Group == 512,
                "galore: contiguous quantization groups of 64, 128, 256 or 512 elements");
  static_assert(PerLane == 8 || PerLane == 16, "galore: 8 or 16 elements a lane");
  static constexpr int lanes = Group / PerLane < kWarp ? Group / PerLane : kWarp;
  static constexpr int blocks = Group / (4 * lanes);
  static constexpr int per_warp = kWarp / lanes;  // groups a warp takes at once

  // Lane t's block b: the group's Philox block q (its counter is the group's
  // first element / 4 + q: groups start tiles).
  __host__ __device__ static constexpr int block(int t, int b) { return t + lanes * b; }
  // Element w of block q, from the group's first element.
  __host__ __device__ static constexpr int element(int q, int w) { return q / 16 * 64 + q % 16 + 16 * w; }
  // The same as lane t's first element plus a constant of (b, w), so that a
  // lane addresses its elements from one pointer with immediate offsets.
  __host__ __device__ static constexpr int lane_offset(int t) { return element(block(t, 0), 0); }
  __host__ __device__ static constexpr int offset(int b, int w) { return element(block(0, b), w); }

  // The lanes take every element once, element w of block q has word w of
  // counter q (math::stochastic_bits, from a tile's start), and the split into
  // lane_offset and offset holds.
  static constexpr bool consistent() {
    int seen[Group] = {};
    for (int t = 0; t < lanes; ++t)
      for (int b = 0; b < blocks; ++b)
        for (int w = 0; w < 4; ++w) {
          const int q = block(t, b), i = element(q, w);
          if (i < 0 || i >= Group || seen[i]++ != 0) return false;
          if ((i >> 6) * 16 + (i & 15) != q || ((i >> 4) & 3) != w) return false;
          if (lane_offset(t) + offset(b, w) != i) return false;
        }
    return true;
  }
  static_assert(consistent(), "galore: GroupLanes must follow the Philox layout of math::stochastic_bits");
};

// Elements a lane of quantize_contiguous_groups: round to nearest is bound by
// memory (fewer registers, more warps in flight); stochastic rounding by its
// arithmetic (the group's own work, extremes, scale, zero and reciprocal,
// shared by more elements).
template <bool Stochastic>
constexpr int kPerLane = Stochastic ? 16 : 8;

// The mask of the `Lanes` lanes (an aligned part of the warp) of this thread.
template <int Lanes>
__device__ inline unsigned lanes_mask() {
  if constexpr (Lanes == kWarp) return 0xFFFFFFFFu;
  else return ((1u << Lanes) - 1) << (threadIdx.x % kWarp / Lanes * Lanes);
}

// q = w / scale for every element of a lane, rounded as the float division
// rounds it, by one double multiplication: with inv = 1 / scale (double,
// correctly rounded), w * inv is within 2^-52 (relative) of the quotient,
// while a quotient of two floats lies at least 2^-49 (relative) from every
// rounding boundary between normal floats (a midpoint m 2^k, m odd and of 25
// bits: a - b m 2^k is 0 for no float a, b and otherwise at least 2^-49 of
// b m 2^k), so both round alike. False (q partly unset) when some quotient
// rounds below 2^-126 (zero or subnormal; rare: exact zeros, tiny values):
// the caller divides. NaN and Inf come out as the division's.
template <int Blocks>
__device__ inline bool exact_quotients(const float (&w)[Blocks][4], float scale, float (&q)[Blocks][4]) {
  const double inv = 1.0 / static_cast<double>(scale);
  bool tiny = false;
#pragma unroll
  for (int b = 0; b < Blocks; ++b)
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      q[b][k] = static_cast<float>(static_cast<double>(w[b][k]) * inv);
      tiny |= fabsf(q[b][k]) < 0x1p-126f;
    }
  return !tiny;
}

// out[L::offset(b, w)] = the code of x[b][w] / divisor (by rounding to
// nearest, or stochastically with word w of bits[b]), zero point `zero`.
template <class L, bool Stochastic>
__device__ inline void encode_lane(const float (&x)[L::blocks][4], float divisor, float zero,
                                   const Philox4x32 (&bits)[L::blocks], std::uint8_t* out) {
#pragma unroll
  for (int b = 0; b < L::blocks; ++b)
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if constexpr (Stochastic)
        out[L::offset(b, w)] = math::stochastic_code(x[b][w], divisor, zero, kMaxCode, bits[b].v[w]);
      else
        out[L::offset(b, w)] = math::minmax_code(x[b][w], divisor, zero, kMaxCode);
    }
}

// quantize_groups' codes, scales and zeros for the common case, faster: groups
// of 64, 128, 256 or 512 elements each lying in one row of x (ld == cols, or
// rows of a whole number of groups), `groups` of them, none short. Each lane
// loads all its elements of the group at once (GroupLanes), draws their
// random bits while the loads are in flight, and divides by one
// multiplication (exact_quotients); the group is read once.
template <class T, bool Stochastic, int Group>
__global__ void __launch_bounds__(kWarp* kQuantWarps)
    quantize_contiguous_groups(const T* __restrict__ x, std::int64_t ld, std::int64_t cols, std::int64_t first,
                               std::int64_t groups, std::uint8_t* __restrict__ codes, float* __restrict__ scales,
                               std::uint8_t* __restrict__ zeros, std::uint64_t seed, std::uint32_t layer,
                               std::uint32_t step, const StepCounters* after) {
  using L = GroupLanes<Group, kPerLane<Stochastic>>;
  constexpr std::int64_t per_block = kQuantWarps * L::per_warp;
  if (!proceed_after<Stochastic>(after, step)) return;
  if constexpr (!Stochastic) (void)seed, (void)layer, (void)step;
  const int t = static_cast<int>(threadIdx.x % L::lanes);
  const unsigned mask = lanes_mask<L::lanes>();
  for (std::int64_t gl = blockIdx.x * per_block + threadIdx.x / L::lanes; gl < groups; gl += gridDim.x * per_block) {
    const std::int64_t k0 = gl * Group;                      // the group's first element in x
    const auto i0 = static_cast<std::uint64_t>(first + k0);  // and in the weight
    const T* p = x + strided_index(k0, ld, cols) + L::lane_offset(t);
    float v[L::blocks][4];
#pragma unroll
    for (int b = 0; b < L::blocks; ++b)
#pragma unroll
      for (int w = 0; w < 4; ++w) v[b][w] = to_float(p[L::offset(b, w)]);
    Philox4x32 bits[L::blocks] = {};
    if constexpr (Stochastic) {
#pragma unroll
      for (int b = 0; b < L::blocks; ++b) bits[b] = block_bits(i0 / 4 + L::block(t, b), seed, layer, step);
    }
    float lo = INFINITY, hi = -INFINITY;
#pragma unroll
    for (int b = 0; b < L::blocks; ++b)
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        lo = fminf(lo, v[b][w]);
        hi = fmaxf(hi, v[b][w]);
      }
    lanes_min_max<L::lanes>(lo, hi, mask);
    float scale, zero;
    math::minmax_scale_zero(lo, hi, kMaxCode, scale, zero);
    if (t == 0) {
      scales[i0 / Group] = scale;
      zeros[i0 / Group] = static_cast<std::uint8_t>(zero);
    }
    std::uint8_t* out = codes + i0 + L::lane_offset(t);
    float q[L::blocks][4];
    if (exact_quotients(v, scale, q)) encode_lane<L, Stochastic>(q, 1.0f, zero, bits, out);  // q / 1 is q
    else encode_lane<L, Stochastic>(v, scale, zero, bits, out);
  }
}

// Blocks for `groups` groups at `per_block` a block (grid-stride beyond the limit).
inline unsigned quantize_blocks(std::int64_t groups, std::int64_t per_block) {
  return static_cast<unsigned>(std::min<std::int64_t>((groups + per_block - 1) / per_block, 65535));
}

// Launches quantize_groups on elements [first, first + n) from x.
template <class T, bool Stochastic>
void launch_strided_groups(const T* x, std::int64_t ld, std::int64_t cols, std::int64_t first, std::int64_t n,
                           std::int64_t group, std::uint8_t* codes, float* scales, std::uint8_t* zeros,
                           std::uint64_t seed, std::uint32_t layer, std::uint32_t step, const StepCounters* after,
                           cudaStream_t stream) {
  quantize_groups<T, Stochastic>
      <<<quantize_blocks((n + group - 1) / group, kQuantWarps), kWarp * kQuantWarps, 0, stream>>>(
          x, ld, cols, first, n, group, codes, scales, zeros, seed, layer, step, after);
  check_launch("galore::cuda::quantize_groups");
}

// Launches quantize_contiguous_groups<T, Stochastic, Group> on the whole groups
// and quantize_groups on a short last one (which lies in the one row that
// holds rows of a whole number of groups, or in x's only row).
template <class T, bool Stochastic, int Group>
void launch_contiguous_groups(const T* x, std::int64_t ld, std::int64_t cols, std::int64_t first, std::int64_t n,
                              std::uint8_t* codes, float* scales, std::uint8_t* zeros, std::uint64_t seed,
                              std::uint32_t layer, std::uint32_t step, const StepCounters* after,
                              cudaStream_t stream) {
  const std::int64_t whole = n / Group, k = whole * Group;
  if (whole > 0) {
    constexpr int per_block = kQuantWarps * GroupLanes<Group, kPerLane<Stochastic>>::per_warp;
    quantize_contiguous_groups<T, Stochastic, Group><<<quantize_blocks(whole, per_block), kWarp * kQuantWarps, 0,
                                                       stream>>>(x, ld, cols, first, whole, codes, scales, zeros,
                                                                 seed, layer, step, after);
    check_launch("galore::cuda::quantize_contiguous_groups");
  }
  if (k < n)
    launch_strided_groups<T, Stochastic>(x + k, n - k, n - k, first + k, n - k, Group, codes, scales, zeros, seed,
                                         layer, step, after, stream);
}

// Quantizes elements [first, first + n) of a weight in groups of `group`
// (first starts one) from x, rows `cols` wide with leading dimension ld
// (element k of x is element first + k; n a whole number of rows), as
// quantize_groups describes: by quantize_contiguous_groups where every group
// lies in a row and has 64, 128, 256 or 512 elements, else by quantize_groups.
// What QuantizedWeight's quantize(), requantize_rows() and
// requantize_rows_after() launch (after the finiteness check of the first two).
template <class T, bool Stochastic>
void launch_quantize_groups(const T* x, std::int64_t ld, std::int64_t cols, std::int64_t first, std::int64_t n,
                            std::int64_t group, std::uint8_t* codes, float* scales, std::uint8_t* zeros,
                            std::uint64_t seed, std::uint32_t layer, std::uint32_t step, const StepCounters* after,
                            cudaStream_t stream) {
  if (n == 0) return;
  const bool in_rows = ld == cols || n <= cols || cols % group == 0;
  switch (in_rows ? group : 0) {
    case 64:
      return launch_contiguous_groups<T, Stochastic, 64>(x, ld, cols, first, n, codes, scales, zeros, seed, layer,
                                                         step, after, stream);
    case 128:
      return launch_contiguous_groups<T, Stochastic, 128>(x, ld, cols, first, n, codes, scales, zeros, seed, layer,
                                                          step, after, stream);
    case 256:
      return launch_contiguous_groups<T, Stochastic, 256>(x, ld, cols, first, n, codes, scales, zeros, seed, layer,
                                                          step, after, stream);
    case 512:
      return launch_contiguous_groups<T, Stochastic, 512>(x, ld, cols, first, n, codes, scales, zeros, seed, layer,
                                                          step, after, stream);
    default:
      return launch_strided_groups<T, Stochastic>(x, ld, cols, first, n, group, codes, scales, zeros, seed, layer,
                                                  step, after, stream);
  }
}

// out (rows x cols, leading dimension ld) = elements [first, first + n) dequantized.
template <class T>
__global__ void dequantize_elements(const std::uint8_t* __restrict__ codes, const float* __restrict__ scales,
                                    const std::uint8_t* __restrict__ zeros, std::int64_t group, std::int64_t first,
                                    std::int64_t n, T* __restrict__ out, std::int64_t ld, std::int64_t cols) {
  for (std::int64_t k = grid_first(); k < n; k += grid_stride()) {
    const std::int64_t i = first + k, g = quotient(i, group);
    out[strided_index(k, ld, cols)] =
        from_float<T>(math::minmax_value(codes[i], scales[g], static_cast<float>(zeros[g])));
  }
}

// The same four elements per thread, for contiguous output whose groups,
// first element and base are multiples of four elements (one 4-byte code load,
// one group, one vector store per thread).
template <class T>
__global__ void dequantize_elements4(const std::uint8_t* __restrict__ codes, const float* __restrict__ scales,
                                     const std::uint8_t* __restrict__ zeros, std::int64_t group, std::int64_t first,
                                     std::int64_t n, T* __restrict__ out) {
  for (std::int64_t q = grid_first(); q < n / 4; q += grid_stride()) {
    const std::int64_t i = first + 4 * q, g = quotient(i, group);
    const uchar4 c = reinterpret_cast<const uchar4*>(codes + first)[q];
    const float scale = scales[g], zero = static_cast<float>(zeros[g]);
    store4(out + 4 * q, {math::minmax_value(c.x, scale, zero), math::minmax_value(c.y, scale, zero),
                         math::minmax_value(c.z, scale, zero), math::minmax_value(c.w, scale, zero)});
  }
}

// ---- 4-bit codes, two per byte (Q-GaLore's INT4 bases) ----

// Each group's scale and zero point for codes up to max_code, from its
// extremes (one warp a group) over elements [0, n) of x (rows `cols` wide,
// leading dimension ld; groups from element 0).
template <class T>
__global__ void __launch_bounds__(kWarp* kQuantWarps)
    group_scales(const T* __restrict__ x, std::int64_t ld, std::int64_t cols, std::int64_t n, std::int64_t group,
                 float max_code, float* __restrict__ scales, std::uint8_t* __restrict__ zeros) {
  const int lane = threadIdx.x % kWarp;
  const std::int64_t groups = (n + group - 1) / group;
  for (std::int64_t g = blockIdx.x * static_cast<std::int64_t>(kQuantWarps) + threadIdx.x / kWarp; g < groups;
       g += static_cast<std::int64_t>(gridDim.x) * kQuantWarps) {
    const std::int64_t k0 = g * group, k1 = k0 + group < n ? k0 + group : n;
    float scale, zero;
    warp_scale_zero(x, ld, cols, k0, k1, max_code, scale, zero);
    if (lane == 0) {
      scales[g] = scale;
      zeros[g] = static_cast<std::uint8_t>(zero);
    }
  }
}

// Nearest 4-bit codes of elements [0, n) of x with their groups' scales and
// zeros, packed as the CPU packs them (element 2j in the low half of byte j):
// one byte a thread, whose two elements may lie in two groups, so no byte is
// written twice whatever the group size.
template <class T>
__global__ void encode_packed4(const T* __restrict__ x, std::int64_t ld, std::int64_t cols, std::int64_t n,
                               std::int64_t group, const float* __restrict__ scales,
                               const std::uint8_t* __restrict__ zeros, std::uint8_t* __restrict__ codes) {
  for (std::int64_t j = grid_first(); j < (n + 1) / 2; j += grid_stride()) {
    unsigned byte = 0;
    for (int e = 0; e < 2 && 2 * j + e < n; ++e) {
      const std::int64_t k = 2 * j + e, g = quotient(k, group);
      byte |= static_cast<unsigned>(math::minmax_code(element(x, ld, cols, k), scales[g],
                                                      static_cast<float>(zeros[g]), 15.0f))
              << (4 * e);
    }
    codes[j] = static_cast<std::uint8_t>(byte);
  }
}

// out (rows x cols, leading dimension ld) = elements [first, first + n) of
// packed 4-bit codes, dequantized.
template <class T>
__global__ void dequantize_packed4(const std::uint8_t* __restrict__ codes, const float* __restrict__ scales,
                                   const std::uint8_t* __restrict__ zeros, std::int64_t group, std::int64_t first,
                                   std::int64_t n, T* __restrict__ out, std::int64_t ld, std::int64_t cols) {
  for (std::int64_t k = grid_first(); k < n; k += grid_stride()) {
    const std::int64_t i = first + k, g = quotient(i, group);
    const std::uint8_t c = static_cast<std::uint8_t>((codes[i / 2] >> (4 * (i % 2))) & 15u);
    out[strided_index(k, ld, cols)] = from_float<T>(math::minmax_value(c, scales[g], static_cast<float>(zeros[g])));
  }
}

// Nearest 4-bit codes of elements [0, n) of x (rows `cols` wide, leading
// dimension ld) in groups of `group`, packed, with their scales and zeros.
template <class T>
void launch_quantize_packed4(const T* x, std::int64_t ld, std::int64_t cols, std::int64_t n, std::int64_t group,
                             std::uint8_t* codes, float* scales, std::uint8_t* zeros, cudaStream_t stream) {
  if (n == 0) return;
  group_scales<T><<<quantize_blocks((n + group - 1) / group, kQuantWarps), kWarp * kQuantWarps, 0, stream>>>(
      x, ld, cols, n, group, 15.0f, scales, zeros);
  check_launch("galore::cuda::group_scales");
  encode_packed4<T><<<blocks_for((n + 1) / 2), kThreads, 0, stream>>>(x, ld, cols, n, group, scales, zeros, codes);
  check_launch("galore::cuda::encode_packed4");
}

// Nearest Bits-bit codes (8, or 4 packed two a byte) of a contiguous matrix
// of n elements in rows `cols` wide, in groups of `group`, with their scales
// and zeros: QuantizedWeight<Bits>::quantize() without its finiteness check,
// and the GPU optimizer's quantized bases.
template <int Bits, class T>
void launch_quantize_nearest(const T* x, std::int64_t cols, std::int64_t n, std::int64_t group, std::uint8_t* codes,
                             float* scales, std::uint8_t* zeros, cudaStream_t stream) {
  static_assert(Bits == 8 || Bits == 4, "galore: 8-bit or packed 4-bit codes");
  if constexpr (Bits == 4)
    launch_quantize_packed4(x, cols, cols, n, group, codes, scales, zeros, stream);
  else
    launch_quantize_groups<T, false>(x, cols, cols, 0, n, group, codes, scales, zeros, 0, 0, 0, nullptr, stream);
}

// out (rows `cols` wide, leading dimension ld) = elements [first, first + n)
// of Bits-bit codes in groups of `group`, dequantized.
template <int Bits, class T>
void launch_dequantize(const std::uint8_t* codes, const float* scales, const std::uint8_t* zeros, std::int64_t group,
                       std::int64_t first, std::int64_t n, T* out, std::int64_t ld, std::int64_t cols,
                       cudaStream_t stream) {
  static_assert(Bits == 8 || Bits == 4, "galore: 8-bit or packed 4-bit codes");
  if (n == 0) return;
  if constexpr (Bits == 4) {
    dequantize_packed4<T><<<blocks_for(n), kThreads, 0, stream>>>(codes, scales, zeros, group, first, n, out, ld, cols);
    check_launch("galore::cuda::dequantize_packed4");
    return;
  }
  const bool vector = (ld == cols || n <= cols) && n % 4 == 0 && first % 4 == 0 && group % 4 == 0 &&
                      reinterpret_cast<std::uintptr_t>(out) % (4 * sizeof(T)) == 0;
  if (vector)
    dequantize_elements4<T><<<blocks_for(n / 4), kThreads, 0, stream>>>(codes, scales, zeros, group, first, n, out);
  else
    dequantize_elements<T><<<blocks_for(n), kThreads, 0, stream>>>(codes, scales, zeros, group, first, n, out, ld,
                                                                   cols);
  check_launch("galore::cuda::dequantize_elements");
}

}  // namespace impl

// Bits 8: Q-GaLore's INT8 weights (nearest and stochastic rounding, the
// optimizer's step on them). Bits 4: Q-GaLore's INT4 projection bases as the
// CPU's GroupQuantized<4> stores them, two codes per byte (element 2j in the
// low half of byte j), rounded to nearest (quantize(), dequantize()).
template <int Bits = 8>
class QuantizedWeight {
  static_assert(Bits == 8 || Bits == 4, "galore: quantized matrices on the GPU hold 8-bit or packed 4-bit codes");

 public:
  static constexpr int bits = Bits;

  QuantizedWeight() = default;
  // A rows x cols weight in groups of group_size elements (-1: one group per
  // row), every code, scale and zero 0 until quantize() writes them. Throws
  // galore::invalid_argument for a shape that is not positive or a group size
  // that is neither positive nor -1.
  explicit QuantizedWeight(Shape shape, Index group_size = 256) : shape_(shape) {
    detail::require(shape.rows > 0 && shape.cols > 0, "cuda::QuantizedWeight needs a positive shape (got ",
                    shape.rows, "x", shape.cols, ")");
    group_ = quant::resolve_group_size(group_size, shape);
    codes_ = DeviceBuffer<std::uint8_t>::zeroed(code_bytes(shape.size()));
    scales_ = DeviceBuffer<float>::zeroed(static_cast<std::size_t>(num_groups()));
    zeros_ = DeviceBuffer<std::uint8_t>::zeroed(static_cast<std::size_t>(num_groups()));
  }

  Shape shape() const { return shape_; }
  Index rows() const { return shape_.rows; }
  Index cols() const { return shape_.cols; }
  Index group_size() const { return group_; }
  Index num_groups() const { return group_ > 0 ? (shape_.size() + group_ - 1) / group_ : 0; }
  // Row panels that start on group boundaries are multiples of this many rows.
  Index row_alignment() const { return group_ > 0 ? group_ / std::gcd(group_, cols()) : 1; }

  std::uint8_t* codes() { return codes_.data(); }
  const std::uint8_t* codes() const { return codes_.data(); }
  float* scales() { return scales_.data(); }
  const float* scales() const { return scales_.data(); }
  std::uint8_t* zeros() { return zeros_.data(); }
  const std::uint8_t* zeros() const { return zeros_.data(); }

  // Device bytes held: a byte per weight (half a byte with 4-bit codes,
  // rounded up), a float32 scale and a one-byte zero point per group (the CPU's
  // GroupQuantized<Bits>::bytes_for).
  std::size_t bytes() const { return codes_.bytes() + scales_.bytes() + zeros_.bytes(); }
  static std::size_t bytes_for(Shape s, Index group_size = 256) {
    const Index g = quant::resolve_group_size(group_size, s);
    return code_bytes(s.size()) + static_cast<std::size_t>((s.size() + g - 1) / g) * (sizeof(float) + 1);
  }

  // Quantizes W (float or bf16, the weight's shape, any leading dimension) by
  // rounding to nearest. Synchronizes ctx's stream (the finiteness check).
  template <class T>
  void quantize(DeviceView<const T> W, Context& ctx) {
    detail::require(W.shape() == shape_, "cuda::QuantizedWeight::quantize: W is ", W.rows, "x", W.cols,
                    ", the weight ", rows(), "x", cols());
    encode<T, false>(W, 0, ctx, 0, 0, 0);
  }
  template <class T>
  void quantize(DeviceView<T> W, Context& ctx) {
    quantize(DeviceView<const T>(W), ctx);
  }

  // Re-quantizes rows [row0, row0 + values.rows) from float values, with fresh
  // scales and zeros, by stochastic rounding with the bits of (seed, layer,
  // step): the codes the CPU's quantize_rows(row0, values,
  // StochasticRounder<8>(seed).bind(layer, step)) writes. The rows must start
  // and end on group boundaries (a multiple of row_alignment(), or the end).
  // Synchronizes ctx's stream (the finiteness check).
  void requantize_rows(Index row0, DeviceView<const float> values, std::uint64_t seed, std::uint32_t layer,
                       std::uint32_t step, Context& ctx) {
    static_assert(Bits == 8, "galore: 4-bit codes are rounded to nearest (quantize()), as Q-GaLore's INT4 bases");
    check_rows(row0, values.rows, values.cols);
    const Index first = row0 * cols(), n = values.rows * cols();
    detail::require(first % group_ == 0 && (n % group_ == 0 || first + n == shape_.size()),
                    "requantize_rows: rows ", row0, "..", row0 + values.rows,
                    " do not start and end on quantization group boundaries");
    encode<float, true>(values, first, ctx, seed, layer, step);
  }

  // out = the weight dequantized (float or bf16, the weight's shape, any
  // leading dimension), or rows [row0, row0 + out.rows) of it.
  template <class T>
  void dequantize(DeviceView<T> out, Context& ctx) const {
    detail::require(out.shape() == shape_, "cuda::QuantizedWeight::dequantize: out is ", out.rows, "x", out.cols,
                    ", the weight ", rows(), "x", cols());
    dequantize_rows(0, out, ctx);
  }
  template <class T>
  void dequantize_rows(Index row0, DeviceView<T> out, Context& ctx) const {
    static_assert(!std::is_const_v<T>, "galore: dequantize writes its output");
    check_rows(row0, out.rows, out.cols);
    impl::launch_dequantize<Bits, T>(codes_.data(), scales_.data(), zeros_.data(), group_, row0 * cols(),
                                     out.rows * cols(), out.data, out.ld, cols(), ctx.stream());
  }

  // What the GPU optimizer's step on this weight calls: rows [row0, row0 +
  // values.rows) re-quantized from the updated values (float, any leading
  // dimension) unless the step that computed them was skipped (its counters say
  // so, on the device: no synchronization, no finiteness check, which the
  // step's own skip decision covers), by stochastic rounding with the bits of
  // (rounding.seed, layer, the counters' applied steps), or to nearest.
  void requantize_rows_after(Index row0, DeviceView<const float> values, const WeightRounding& rounding,
                             std::uint32_t layer, const StepCounters* counters, Context& ctx) {
    static_assert(Bits == 8, "galore: 4-bit codes are rounded to nearest (quantize()), as Q-GaLore's INT4 bases");
    check_rows(row0, values.rows, values.cols);
    const Index first = row0 * cols(), n = values.rows * cols();
    detail::require(first % group_ == 0 && (n % group_ == 0 || first + n == shape_.size()),
                    "requantize_rows_after: rows ", row0, "..", row0 + values.rows,
                    " do not start and end on quantization group boundaries");
    if (rounding.mode == RoundingMode::Nearest) launch<float, false>(values, first, ctx, rounding.seed, layer, 0, counters);
    else launch<float, true>(values, first, ctx, rounding.seed, layer, 0, counters);
  }

  // The codes, scales and zeros in host memory, and back (checkpoints, tests).
  // Both synchronize ctx's stream.
  void download(std::vector<std::uint8_t>& codes, std::vector<float>& scales, std::vector<std::uint8_t>& zeros,
                Context& ctx) const {
    codes.resize(codes_.size());
    scales.resize(scales_.size());
    zeros.resize(zeros_.size());
    copy(codes.data(), codes_.data(), codes_.bytes(), cudaMemcpyDeviceToHost, ctx);
    copy(scales.data(), scales_.data(), scales_.bytes(), cudaMemcpyDeviceToHost, ctx);
    copy(zeros.data(), zeros_.data(), zeros_.bytes(), cudaMemcpyDeviceToHost, ctx);
    ctx.synchronize();
  }
  void upload(const std::vector<std::uint8_t>& codes, const std::vector<float>& scales,
              const std::vector<std::uint8_t>& zeros, Context& ctx) {
    detail::require(codes.size() == codes_.size() && scales.size() == scales_.size() && zeros.size() == zeros_.size(),
                    "cuda::QuantizedWeight::upload: ", codes.size(), " codes, ", scales.size(), " scales and ",
                    zeros.size(), " zeros for a weight of ", codes_.size(), ", ", scales_.size(), " and ",
                    zeros_.size());
    copy(codes_.data(), codes.data(), codes_.bytes(), cudaMemcpyHostToDevice, ctx);
    copy(scales_.data(), scales.data(), scales_.bytes(), cudaMemcpyHostToDevice, ctx);
    copy(zeros_.data(), zeros.data(), zeros_.bytes(), cudaMemcpyHostToDevice, ctx);
    ctx.synchronize();
  }

 private:
  static void copy(void* to, const void* from, std::size_t bytes, cudaMemcpyKind kind, Context& ctx) {
    if (bytes > 0) check(cudaMemcpyAsync(to, from, bytes, kind, ctx.stream()), "cudaMemcpyAsync");
  }
  void check_rows(Index row0, Index nrows, Index ncols) const {
    detail::require(ncols == cols() && row0 >= 0 && nrows >= 0 && row0 + nrows <= rows(), "rows ", row0, "..",
                    row0 + nrows, " x ", ncols, " do not fit a ", rows(), "x", cols(), " quantized weight");
  }

  // Checks that the values are finite (throws before writing anything), then
  // encodes them as elements [first, first + values.size()).
  template <class T, bool Stochastic>
  void encode(DeviceView<const T> values, Index first, Context& ctx, std::uint64_t seed, std::uint32_t layer,
              std::uint32_t step) {
    const std::int64_t n = values.size();
    if (n == 0) return;
    DeviceBuffer<unsigned> bad(1);
    check(cudaMemsetAsync(bad.data(), 0, sizeof(unsigned), ctx.stream()), "cudaMemsetAsync");
    impl::find_non_finite<T><<<impl::blocks_for(n), impl::kThreads, 0, ctx.stream()>>>(values.data, values.ld,
                                                                                       values.cols, n, bad.data());
    check_launch("galore::cuda::find_non_finite");
    unsigned found = 0;
    check(cudaMemcpyAsync(&found, bad.data(), sizeof found, cudaMemcpyDeviceToHost, ctx.stream()), "cudaMemcpyAsync");
    ctx.synchronize();
    detail::require(found == 0, "cuda::QuantizedWeight: the values hold NaN or Inf; min-max codes exist only for "
                                "finite values");
    launch<T, Stochastic>(values, first, ctx, seed, layer, step, nullptr);
  }
  template <class T, bool Stochastic>
  void launch(DeviceView<const T> values, Index first, Context& ctx, std::uint64_t seed, std::uint32_t layer,
              std::uint32_t step, const StepCounters* after) {
    if constexpr (Bits == 4) {  // the whole matrix, to nearest (quantize())
      static_assert(!Stochastic, "galore: 4-bit codes are rounded to nearest");
      (void)first, (void)seed, (void)layer, (void)step, (void)after;
      impl::launch_quantize_packed4(values.data, values.ld, values.cols, values.size(), group_, codes_.data(),
                                    scales_.data(), zeros_.data(), ctx.stream());
      return;
    }
    impl::launch_quantize_groups<T, Stochastic>(values.data, values.ld, values.cols, first, values.size(), group_,
                                                codes_.data(), scales_.data(), zeros_.data(), seed, layer, step,
                                                after, ctx.stream());
  }

  static std::size_t code_bytes(Index n) { return (static_cast<std::size_t>(n) * Bits + 7) / 8; }

  Shape shape_;
  Index group_ = 0;
  DeviceBuffer<std::uint8_t> codes_;
  DeviceBuffer<float> scales_;
  DeviceBuffer<std::uint8_t> zeros_;
};

using Int8Weight = QuantizedWeight<8>;

}  // namespace galore::cuda
