// galore: StochasticRounder<Bits>, rounding to Bits-bit integer codes.
//
// Stochastic rounding replaces round(x) by floor(x) + (u < x - floor(x)) with u
// uniform in [0, 1), so that E[round(x)] = x: tiny updates to INT8 weights survive
// on average instead of vanishing (Q-GaLore, DESIGN.md 2.3). u comes from
// Philox4x32-10 at counter (i / 4, step, layer) and key seed, so the rounding of
// element i at step t of a layer is a pure function of (seed, layer, step, i):
// reproducible, independent of threading, and the same on any backend.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../types.hpp"
#include "../quant/minmax.hpp"
#include "philox.hpp"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace galore {

enum class RoundingMode : std::uint8_t {
  Nearest,     // round half to even (torch.round)
  Stochastic,  // floor(x) + (u < frac(x))
};

inline const char* to_string(RoundingMode m) {
  return m == RoundingMode::Nearest ? "nearest" : "stochastic";
}

template <int Bits>
class StochasticRounder {
  static_assert(Bits >= 1 && Bits <= 8, "StochasticRounder rounds to codes of 1 to 8 bits");

 public:
  static constexpr int bits = Bits;
  static constexpr float max_code = static_cast<float>((1 << Bits) - 1);

  explicit StochasticRounder(std::uint64_t seed = 0, RoundingMode mode = RoundingMode::Stochastic)
      : seed_(seed), mode_(mode) {}

  std::uint64_t seed() const { return seed_; }
  RoundingMode mode() const { return mode_; }

  // The uniform number in [0, 1) that element i of (layer, step) is rounded with.
  GALORE_HOST_DEVICE float uniform(std::uint32_t layer, std::uint32_t step, std::uint64_t i) const {
    const std::uint64_t r = i & 127, counter = (i >> 7) * 16 + (r & 15);
    const Philox4x32 p = philox4x32_10(static_cast<std::uint32_t>(counter),
                                       static_cast<std::uint32_t>(counter >> 32), step, layer,
                                       static_cast<std::uint32_t>(seed_),
                                       static_cast<std::uint32_t>(seed_ >> 32));
    return uniform16(p.v[r >> 5], static_cast<int>((r >> 4) & 1));
  }

  // The 16-bit half h of word x as a multiple of 2^-16 in [0, 1).
  GALORE_HOST_DEVICE static float uniform16(std::uint32_t x, int h) {
    return static_cast<float>((x >> (16 * h)) & 0xFFFFu) * (1.0f / 65536.0f);
  }

  // x rounded to an integer value (not yet offset or clamped).
  float round(float x, std::uint32_t layer, std::uint32_t step, std::uint64_t i) const {
    if (mode_ == RoundingMode::Nearest) return std::nearbyint(x);
    const float f = std::floor(x);
    return f + (uniform(layer, step, i) < x - f ? 1.0f : 0.0f);
  }

  // Encodes group values for the min-max quantizer:
  //   codes[k] = clamp(round(w[k] / scale) + zero, 0, 2^Bits - 1),
  // element k being element `first + k` of the tensor (the random counter).
  struct Encoder {
    const StochasticRounder* rounder;
    std::uint32_t layer, step;

    void operator()(const float* w, Index n, float scale, float zero, std::uint64_t first,
                    std::uint8_t* codes) const {
      if (rounder->mode_ == RoundingMode::Nearest) {
        for (Index k = 0; k < n; ++k)
          codes[k] = static_cast<std::uint8_t>(
              std::min(std::max(std::nearbyint(w[k] / scale) + zero, 0.0f), max_code));
        return;
      }
      constexpr Index kChunk = 256;
      alignas(64) float u[kChunk];
      for (Index k0 = 0; k0 < n; k0 += kChunk) {
        const Index len = std::min(kChunk, n - k0);
        rounder->fill_uniform(layer, step, first + static_cast<std::uint64_t>(k0), len, u);
        // restrict: the byte-sized codes could otherwise alias the floats, which
        // keeps the compiler from vectorizing.
        const float* __restrict x = w + k0;
        std::uint8_t* __restrict q = codes + k0;
        const float* __restrict uu = u;
        for (Index k = 0; k < len; ++k) {
          const float v = x[k] / scale;
          // floor(v) by the vectorizable round-half-even trick (std::floor does not
          // vectorize under the default -ftrapping-math); beyond 2^22 the clamp
          // below saturates either way.
          float f = galore::detail::round_half_even(v);
          f -= f > v ? 1.0f : 0.0f;
          const float up = uu[k] < v - f ? 1.0f : 0.0f;
          q[k] = static_cast<std::uint8_t>(static_cast<std::int32_t>(std::min(std::max(f + up + zero, 0.0f), max_code)));
        }
      }
    }
  };

  Encoder bind(std::uint32_t layer, std::uint32_t step) const { return {this, layer, step}; }

  // u[k] = uniform(layer, step, first + k) for k < n: a tile of 128 values is 16
  // Philox calls in SIMD lanes, unpacked without shuffles.
  void fill_uniform(std::uint32_t layer, std::uint32_t step, std::uint64_t first, Index n, float* u) const {
    const std::uint32_t k0 = static_cast<std::uint32_t>(seed_), k1 = static_cast<std::uint32_t>(seed_ >> 32);
    alignas(64) std::uint32_t out[4][16];
    alignas(64) float tile[128];
    const std::uint64_t last = first + static_cast<std::uint64_t>(n);
    for (std::uint64_t t = first >> 7; (t << 7) < last; ++t) {
      philox_lanes<16>(t * 16, step, layer, k0, k1, out);
      const std::uint64_t lo = std::max(first, t << 7), hi = std::min(last, (t + 1) << 7);
      const bool whole = lo == (t << 7) && hi == ((t + 1) << 7);
      float* dst = whole ? u + (lo - first) : tile;
      for (int w = 0; w < 4; ++w)
        for (int h = 0; h < 2; ++h)
          for (int l = 0; l < 16; ++l) dst[32 * w + 16 * h + l] = uniform16(out[w][l], h);
      if (!whole)
        for (std::uint64_t i = lo; i < hi; ++i) u[i - first] = tile[i - (t << 7)];
    }
  }

 private:
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
    const __m256i odd_mask = _mm256_set1_epi64x(static_cast<long long>(0xFFFFFFFF00000000ull));
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
        // lanes shifted down; then the high and low words gathered back.
        const __m256i p0e = _mm256_mul_epu32(c0, m0), p0o = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
        const __m256i p1e = _mm256_mul_epu32(c2, m1), p1o = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
        const __m256i hi0 = _mm256_or_si256(_mm256_srli_epi64(p0e, 32), _mm256_and_si256(p0o, odd_mask));
        const __m256i lo0 = _mm256_or_si256(_mm256_andnot_si256(odd_mask, p0e), _mm256_slli_epi64(p0o, 32));
        const __m256i hi1 = _mm256_or_si256(_mm256_srli_epi64(p1e, 32), _mm256_and_si256(p1o, odd_mask));
        const __m256i lo1 = _mm256_or_si256(_mm256_andnot_si256(odd_mask, p1e), _mm256_slli_epi64(p1o, 32));
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
