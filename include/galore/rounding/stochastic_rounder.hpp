// galore: StochasticRounder<Bits>, rounding to Bits-bit integer codes.
//
// Stochastic rounding (Q-GaLore, arXiv 2407.08296, for its INT8 weights) rounds x
// to floor(x) + 1 with probability x - floor(x) and to floor(x) otherwise, so
// that E[round(x)] = x: updates far below a quantization step survive on average
// instead of vanishing. q_galore_torch draws float32 uniforms (24 bits), which
// biases the result by up to 2^-24 of a step.
//
// Here each element gets 32 random bits u, and the rounding is exact in integer
// arithmetic: with a = |x| and f = a - floor(a),
//   |round(x)| = floor(a) + (u < ceil(f * 2^32)),   round(x) has the sign of x,
// so P(|round(x)| = floor(a) + 1) = ceil(f * 2^32) / 2^32 and the bias
// E[round(x)] - x is below 2^-32 of a step in magnitude (away from zero), for
// every fraction, including fractions like 1e-9 and 1 - 1e-9 that float32
// cannot hold as x - floor(x) of a negative x. Every step of stochastic_round is
// exact (see there), so the result does not depend on rounding modes of
// intermediate steps, FMA contraction or the instruction set.
//
// The bits of element i at step t of layer l come from Philox4x32-10 (Salmon et
// al., SC'11) with
//   key     = (seed & 0xFFFFFFFF, seed >> 32)
//   counter = (c & 0xFFFFFFFF, c >> 32, t, l)   with c = (i >> 6) * 16 + (i & 15)
//   u       = word (i >> 4) & 3 of the output,
// so one call serves four elements, 16 consecutive calls serve a tile of 64
// consecutive elements (lane i & 15, word (i >> 4) & 3), and the tile unpacks into
// element order with plain stores. The bits, and so the rounding, are a pure
// function of (seed, layer, step, i): reproducible, independent of threads, and
// the same on any backend.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../math/quant_codes.hpp"
#include "../quant/minmax.hpp"
#include "../types.hpp"
#include "philox.hpp"
#include "rounding_mode.hpp"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace galore {

using math::stochastic_round;

namespace detail {

#if defined(__AVX2__)
// codes[k] = to_code(stochastic_round(w[k] / scale, u[k]) + zero, max_code) for
// k < n rounded down to a multiple of 8, the same operations as the scalar
// functions in eight lanes (the tests check bit equality); returns that count.
inline Index encode_stochastic_avx2(const float* w, Index n, float scale, float zero, float max_code,
                                    const std::uint32_t* u, std::uint8_t* codes) {
  const __m256 vscale = _mm256_set1_ps(scale), vzero = _mm256_set1_ps(zero), vmax = _mm256_set1_ps(max_code);
  const __m256 fzero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  const __m256 sign = _mm256_set1_ps(-0.0f), two32 = _mm256_set1_ps(4294967296.0f);
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  Index k = 0;
  for (; k + 8 <= n; k += 8) {
    // _mm256_max_ps(p, q) is (p > q ? p : q) and _mm256_min_ps(p, q) is
    // (p < q ? p : q), NaN included: the scalar functions' comparisons.
    const __m256 x = _mm256_div_ps(_mm256_loadu_ps(w + k), vscale);
    const __m256 a = _mm256_andnot_ps(sign, x);
    const __m256 whole = _mm256_round_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m256 frac = _mm256_max_ps(_mm256_sub_ps(a, whole), fzero);
    const __m256 high = _mm256_cmp_ps(frac, half, _CMP_GE_OQ);
    const __m256 rest = _mm256_sub_ps(frac, _mm256_and_ps(high, half));
    const __m256i t =
        _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(rest, two32), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
    // u < threshold (unsigned) as a signed compare of both minus 2^31:
    // threshold - 2^31 = t when high, t - 2^31 = t ^ 2^31 otherwise.
    const __m256i shifted = _mm256_xor_si256(t, _mm256_andnot_si256(_mm256_castps_si256(high), top));
    const __m256i key = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + k)), top);
    const __m256 up = _mm256_castsi256_ps(_mm256_cmpgt_epi32(shifted, key));
    const __m256 r = _mm256_add_ps(whole, _mm256_and_ps(up, one));
    const __m256 q = _mm256_add_ps(_mm256_or_ps(_mm256_andnot_ps(sign, r), _mm256_and_ps(sign, x)), vzero);
    const __m256i i32 = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(q, fzero), vmax));  // to_code
    const __m128i i16 = _mm_packus_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + k), _mm_packus_epi16(i16, i16));
  }
  return k;
}
#endif

#if defined(__AVX512F__)
// The same in sixteen lanes: masks take the place of the blends, and the
// decision u < ceil(f * 2^32) is an unsigned compare. Bit for bit the scalar
// functions' results (the tests check it).
inline Index encode_stochastic_avx512(const float* w, Index n, float scale, float zero, float max_code,
                                      const std::uint32_t* u, std::uint8_t* codes) {
  const __m512 vscale = _mm512_set1_ps(scale), vzero = _mm512_set1_ps(zero), vmax = _mm512_set1_ps(max_code);
  const __m512 fzero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  const __m512 two32 = _mm512_set1_ps(4294967296.0f);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  Index k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 x = _mm512_div_ps(_mm512_loadu_ps(w + k), vscale);
    const __m512 a = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(x)));
    const __m512 whole = _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 frac = _mm512_max_ps(_mm512_sub_ps(a, whole), fzero);
    const __mmask16 high = _mm512_cmp_ps_mask(frac, half, _CMP_GE_OQ);
    const __m512 rest = _mm512_mask_sub_ps(frac, high, frac, half);
    const __m512i t =
        _mm512_cvttps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(rest, two32), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
    const __m512i threshold = _mm512_mask_or_epi32(t, high, t, sign);  // t < 2^31: + 2^31 when high
    const __mmask16 up = _mm512_cmplt_epu32_mask(_mm512_loadu_si512(u + k), threshold);
    const __m512 r = _mm512_mask_add_ps(whole, up, whole, one);
    const __m512i signed_r = _mm512_or_si512(_mm512_andnot_si512(sign, _mm512_castps_si512(r)),
                                             _mm512_and_si512(sign, _mm512_castps_si512(x)));
    const __m512 q = _mm512_add_ps(_mm512_castsi512_ps(signed_r), vzero);
    const __m512i i32 = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(q, fzero), vmax));  // to_code
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm512_cvtusepi32_epi8(i32));
  }
  return k;
}
#endif

}  // namespace detail

template <int Bits>
class StochasticRounder {
  static_assert(Bits >= 1 && Bits <= 8, "StochasticRounder rounds to codes of 1 to 8 bits");

 public:
  static constexpr int bits = Bits;
  static constexpr float max_code = static_cast<float>((1 << Bits) - 1);

  explicit StochasticRounder(std::uint64_t seed = 0, RoundingMode mode = RoundingMode::Stochastic)
      : seed_(seed), mode_(mode) {
    detail::require(mode == RoundingMode::Nearest || mode == RoundingMode::Stochastic,
                    "StochasticRounder: unknown rounding mode ", static_cast<int>(mode),
                    " (expected RoundingMode::Nearest or RoundingMode::Stochastic)");
  }

  std::uint64_t seed() const { return seed_; }
  RoundingMode mode() const { return mode_; }

  // The 32 random bits that element i of (layer, step) is rounded with.
  GALORE_HOST_DEVICE std::uint32_t random_bits(std::uint32_t layer, std::uint32_t step, std::uint64_t i) const {
    return math::stochastic_bits(seed_, layer, step, i);
  }

  // x rounded to an integer value (not yet offset or clamped).
  float round(float x, std::uint32_t layer, std::uint32_t step, std::uint64_t i) const {
    if (mode_ == RoundingMode::Nearest) return std::nearbyint(x);
    return stochastic_round(x, random_bits(layer, step, i));
  }

  // Encodes group values for the min-max quantizer:
  //   codes[k] = to_code(round(w[k] / scale) + zero, 2^Bits - 1),
  // element k being element `first + k` of the tensor (the random counter), with
  // a true float division as the reference. Total: NaN gives code 0, values
  // beyond the code range saturate (math::to_code).
  struct Encoder {
    const StochasticRounder* rounder;
    std::uint32_t layer, step;

    void operator()(const float* w, Index n, float scale, float zero, std::uint64_t first,
                    std::uint8_t* codes) const {
      if (rounder->mode_ == RoundingMode::Nearest) {
        quant::NearestEncoder<Bits>{}(w, n, scale, zero, first, codes);
        return;
      }
      constexpr Index kChunk = 256;
      alignas(64) std::uint32_t u[kChunk];
      for (Index k0 = 0; k0 < n; k0 += kChunk) {
        const Index len = std::min(kChunk, n - k0);
        rounder->fill_random_bits(layer, step, first + static_cast<std::uint64_t>(k0), len, u);
        Index k = 0;
#if defined(__AVX512F__)
        k = detail::encode_stochastic_avx512(w + k0, len, scale, zero, max_code, u, codes + k0);
#endif
#if defined(__AVX2__)
        k += detail::encode_stochastic_avx2(w + k0 + k, len - k, scale, zero, max_code, u + k, codes + k0 + k);
#endif
        for (; k < len; ++k)
          codes[k0 + k] = math::stochastic_code(w[k0 + k], scale, zero, max_code, u[k]);
      }
    }
  };

  Encoder bind(std::uint32_t layer, std::uint32_t step) const { return {this, layer, step}; }

  // u[k] = random_bits(layer, step, first + k) for k < n: a tile of 64 elements is
  // 16 Philox calls in SIMD lanes, whose outputs are already in element order.
  // Tiles are computed kTiles at a time (independent chains that keep the
  // vector units busy through each round's latency).
  void fill_random_bits(std::uint32_t layer, std::uint32_t step, std::uint64_t first, Index n,
                        std::uint32_t* u) const {
    if (n <= 0) return;
    const std::uint32_t k0 = static_cast<std::uint32_t>(seed_), k1 = static_cast<std::uint32_t>(seed_ >> 32);
    alignas(64) std::uint32_t out[kTiles][4][16];
    const std::uint64_t last = first + static_cast<std::uint64_t>(n);
    for (std::uint64_t t0 = first >> 6; (t0 << 6) < last; t0 += kTiles) {
      const int tiles = static_cast<int>(std::min<std::uint64_t>(kTiles, ((last + 63) >> 6) - t0));
      philox_tiles(t0, tiles, step, layer, k0, k1, out);
      for (std::uint64_t t = t0; t < t0 + static_cast<std::uint64_t>(tiles); ++t) {
        const std::uint64_t lo = std::max(first, t << 6), hi = std::min(last, (t + 1) << 6);
        std::memcpy(u + (lo - first), &out[t - t0][0][0] + (lo - (t << 6)), sizeof(std::uint32_t) * (hi - lo));
      }
    }
  }

 private:
  static constexpr int kTiles = 4;

  // out[k] = tile t0 + k for k < tiles: Philox4x32-10 of counters
  // ((t0 + k) * 16 + l, step, layer) for l < 16, word j of lane l in out[k][j][l].
  static void philox_tiles(std::uint64_t t0, int tiles, std::uint32_t step, std::uint32_t layer,
                           std::uint32_t key0, std::uint32_t key1, std::uint32_t (&out)[kTiles][4][16]) {
#if defined(__AVX512F__)
    // One 16-lane vector per tile; the kTiles chains run round by round (all
    // of them: a chain costs little next to the latency it hides).
    (void)tiles;
    const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
    const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
    __m512i c0[kTiles], c1[kTiles], c2[kTiles], c3[kTiles];
    for (int k = 0; k < kTiles; ++k) {
      alignas(64) std::uint32_t lo[16], hi[16];
      for (int l = 0; l < 16; ++l) {
        const std::uint64_t b = (t0 + static_cast<std::uint64_t>(k)) * 16 + static_cast<std::uint64_t>(l);
        lo[l] = static_cast<std::uint32_t>(b);
        hi[l] = static_cast<std::uint32_t>(b >> 32);
      }
      c0[k] = _mm512_load_si512(lo);
      c1[k] = _mm512_load_si512(hi);
      c2[k] = _mm512_set1_epi32(static_cast<int>(step));
      c3[k] = _mm512_set1_epi32(static_cast<int>(layer));
    }
    std::uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      const __m512i vk0 = _mm512_set1_epi32(static_cast<int>(k0)), vk1 = _mm512_set1_epi32(static_cast<int>(k1));
      for (int k = 0; k < kTiles; ++k) {
        // As the AVX2 lanes below: 64-bit products of the even and the odd
        // lanes, their high and low words blended back; 0x96 is a three-way XOR.
        const __m512i p0e = _mm512_mul_epu32(c0[k], m0), p0o = _mm512_mul_epu32(_mm512_srli_epi64(c0[k], 32), m0);
        const __m512i p1e = _mm512_mul_epu32(c2[k], m1), p1o = _mm512_mul_epu32(_mm512_srli_epi64(c2[k], 32), m1);
        const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(p0e, 32), p0o);
        const __m512i lo0 = _mm512_mask_blend_epi32(0xAAAA, p0e, _mm512_slli_epi64(p0o, 32));
        const __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(p1e, 32), p1o);
        const __m512i lo1 = _mm512_mask_blend_epi32(0xAAAA, p1e, _mm512_slli_epi64(p1o, 32));
        c0[k] = _mm512_ternarylogic_epi32(hi1, c1[k], vk0, 0x96);
        c1[k] = lo1;
        c2[k] = _mm512_ternarylogic_epi32(hi0, c3[k], vk1, 0x96);
        c3[k] = lo0;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int k = 0; k < kTiles; ++k) {
      _mm512_store_si512(&out[k][0][0], c0[k]);
      _mm512_store_si512(&out[k][1][0], c1[k]);
      _mm512_store_si512(&out[k][2][0], c2[k]);
      _mm512_store_si512(&out[k][3][0], c3[k]);
    }
#else
    for (int k = 0; k < tiles; ++k)
      philox_lanes<16>((t0 + static_cast<std::uint64_t>(k)) * 16, step, layer, key0, key1, out[k]);
#endif
  }

  // Philox4x32-10 of counters (b0 + l, step, layer) for l < L, word j of lane l
  // in out[j][l]: the same numbers as philox4x32_10, laid out for SIMD (AVX2
  // when the compiler targets it, eight lanes a vector; plain loops otherwise).
  template <int L>
  static void philox_lanes(std::uint64_t b0, std::uint32_t step, std::uint32_t layer, std::uint32_t key0,
                           std::uint32_t key1, std::uint32_t (&out)[4][L]) {
#if defined(__AVX2__)
    static_assert(L % 8 == 0, "AVX2 lanes come in eights");
    const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
    const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
    for (int v = 0; v < L; v += 8) {
      alignas(32) std::uint32_t lo[8], hi[8];
      for (int l = 0; l < 8; ++l) {
        const std::uint64_t b = b0 + static_cast<std::uint64_t>(v + l);
        lo[l] = static_cast<std::uint32_t>(b);
        hi[l] = static_cast<std::uint32_t>(b >> 32);
      }
      __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
      __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
      __m256i c2 = _mm256_set1_epi32(static_cast<int>(step));
      __m256i c3 = _mm256_set1_epi32(static_cast<int>(layer));
      std::uint32_t k0 = key0, k1 = key1;
      for (int round = 0; round < 10; ++round) {
        // 32 x 32 -> 64-bit products of every lane: even lanes directly, odd
        // lanes shifted down; then the high and low words blended back.
        const __m256i p0e = _mm256_mul_epu32(c0, m0), p0o = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
        const __m256i p1e = _mm256_mul_epu32(c2, m1), p1o = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
        const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0e, 32), p0o, 0xAA);
        const __m256i lo0 = _mm256_blend_epi32(p0e, _mm256_slli_epi64(p0o, 32), 0xAA);
        const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1e, 32), p1o, 0xAA);
        const __m256i lo1 = _mm256_blend_epi32(p1e, _mm256_slli_epi64(p1o, 32), 0xAA);
        const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
        const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out[0][v]), c0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out[1][v]), c1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out[2][v]), c2);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out[3][v]), c3);
    }
#else
    for (int l = 0; l < L; ++l) {
      const std::uint64_t b = b0 + static_cast<std::uint64_t>(l);
      const Philox4x32 r = philox4x32_10(static_cast<std::uint32_t>(b), static_cast<std::uint32_t>(b >> 32), step,
                                         layer, key0, key1);
      for (int j = 0; j < 4; ++j) out[j][l] = r.v[j];
    }
#endif
  }

  std::uint64_t seed_;
  RoundingMode mode_;
};

using Int8Rounder = StochasticRounder<8>;

}  // namespace galore
