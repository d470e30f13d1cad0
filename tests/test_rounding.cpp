// StochasticRounder and Philox4x32-10: known answers, the counter layout,
// unbiasedness (down to fractions of 1e-8), the variance of stochastic rounding,
// exactness of the rounding decision, the vectorized encoder (AVX2 or AVX-512,
// as the compiler targets) against the scalar functions, and reproducibility as
// a pure function of the counter.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <galore/galore.hpp>
#include <random>
#include <vector>

using namespace galore;

TEST_CASE("Philox4x32-10 matches the Random123 known-answer vectors") {
  const Philox4x32 a = philox4x32_10(0, 0, 0, 0, 0, 0);
  CHECK(a.v[0] == 0x6627e8d5u);
  CHECK(a.v[1] == 0xe169c58du);
  CHECK(a.v[2] == 0xbc57ac4cu);
  CHECK(a.v[3] == 0x9b00dbd8u);
  const Philox4x32 b = philox4x32_10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
  CHECK(b.v[0] == 0x408f276du);
  CHECK(b.v[1] == 0x41c83b0eu);
  CHECK(b.v[2] == 0xa20bc7c6u);
  CHECK(b.v[3] == 0x6d5451fdu);
  const Philox4x32 c = philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u);
  CHECK(c.v[0] == 0xd16cfe09u);
  CHECK(c.v[1] == 0x94fdccebu);
  CHECK(c.v[2] == 0x5001e420u);
  CHECK(c.v[3] == 0x24126ea1u);
}

TEST_CASE("random bits follow the documented Philox layout, and a batch equals the element-wise function") {
  const StochasticRounder<8> r((std::uint64_t{0xABCD} << 32) | 1234);
  // Element i = 64 t + j reads counter 16 t + j % 16 (low and high words), step,
  // layer, key (seed low, seed high), and takes word j / 16 of the output.
  const Philox4x32 p = philox4x32_10(16 * 3 + 5, 0, 9, 7, 1234, 0xABCD);
  CHECK(r.random_bits(7, 9, 64 * 3 + 32 + 5) == p.v[2]);
  const std::uint64_t far = (std::uint64_t{5} << 40) + 64 * 2 + 48 + 15;
  const std::uint64_t counter = (far >> 6) * 16 + 15;
  const Philox4x32 q = philox4x32_10(static_cast<std::uint32_t>(counter), static_cast<std::uint32_t>(counter >> 32),
                                     9, 7, 1234, 0xABCD);
  CHECK(r.random_bits(7, 9, far) == q.v[3]);
  // Lengths across several batches of tiles (fill_random_bits computes four
  // tiles of 64 at a time), from aligned and unaligned starts.
  for (std::uint64_t first : {0ull, 1ull, 3ull, 7ull, 8ull, 63ull, 64ull, 1001ull, (1ull << 34) + 2, (1ull << 32) - 70}) {
    for (Index n : {Index{1}, Index{37}, Index{64}, Index{200}, Index{256}, Index{257}, Index{1000}}) {
      std::vector<std::uint32_t> u(static_cast<std::size_t>(n));
      r.fill_random_bits(7, 9, first, n, u.data());
      for (Index k = 0; k < n; ++k) CHECK(u[static_cast<std::size_t>(k)] == r.random_bits(7, 9, first + k));
    }
  }
}

TEST_CASE("stochastic rounding is unbiased and has the variance frac(x) * (1 - frac(x))") {
  const StochasticRounder<8> r(42);
  const int N = 200000;
  for (float x : {0.3f, 2.75f, -1.25f, 7.5f, -0.01f, 3.0f}) {
    CAPTURE(x);
    double sum = 0, sum2 = 0;
    int off_grid = 0;
    for (int i = 0; i < N; ++i) {
      const double y = r.round(x, 0, 1, static_cast<std::uint64_t>(i));
      off_grid += !(y == std::floor(x) || y == std::floor(x) + 1);
      sum += y;
      sum2 += y * y;
    }
    CHECK(off_grid == 0);
    const double mean = sum / N, var = sum2 / N - mean * mean;
    const double p = x - std::floor(x);
    const double se = std::sqrt(p * (1 - p) / N);
    CHECK(std::abs(mean - x) <= 4 * se + 1e-7);  // within four standard errors
    if (p > 0) CHECK(var == doctest::Approx(p * (1 - p)).epsilon(0.03));
    else CHECK(var == 0.0);
  }
}

TEST_CASE("rounding is a pure function of (seed, layer, step, element)") {
  const StochasticRounder<8> a(7), b(7), other_seed(8);
  int same_step = 0, diff_step = 0, diff_layer = 0, diff_seed = 0;
  const int N = 4000;
  for (int i = 0; i < N; ++i) {
    const auto e = static_cast<std::uint64_t>(i);
    CHECK(a.round(0.5f, 3, 10, e) == b.round(0.5f, 3, 10, e));
    same_step += a.random_bits(3, 10, e) == b.random_bits(3, 10, e);
    diff_step += a.round(0.5f, 3, 10, e) == a.round(0.5f, 3, 11, e);
    diff_layer += a.round(0.5f, 3, 10, e) == a.round(0.5f, 4, 10, e);
    diff_seed += a.round(0.5f, 3, 10, e) == other_seed.round(0.5f, 3, 10, e);
  }
  CHECK(same_step == N);
  // Independent streams agree on a fair coin about half the time.
  for (int agree : {diff_step, diff_layer, diff_seed}) {
    CHECK(agree > N / 2 - 4 * 32);
    CHECK(agree < N / 2 + 4 * 32);
  }
}

TEST_CASE("nearest mode rounds half to even") {
  const StochasticRounder<8> r(0, RoundingMode::Nearest);
  CHECK(r.round(0.5f, 0, 0, 0) == 0.0f);
  CHECK(r.round(1.5f, 0, 0, 0) == 2.0f);
  CHECK(r.round(2.5f, 0, 0, 0) == 2.0f);
  CHECK(r.round(-2.5f, 0, 0, 0) == -2.0f);
  CHECK(r.round(2.6f, 0, 0, 0) == 3.0f);
}

TEST_CASE("the stochastic encoder is unbiased at the code level and clamps to the code range") {
  const StochasticRounder<8> r(99);
  const float scale = 0.01f, zero = 100.0f;
  std::vector<float> w(50000, 0.123456f);
  w[0] = 10.0f;    // far above the range: clamps to 255
  w[1] = -10.0f;   // far below: clamps to 0
  std::vector<std::uint8_t> codes(w.size());
  r.bind(2, 5)(w.data(), static_cast<Index>(w.size()), scale, zero, 0, codes.data());
  CHECK(codes[0] == 255);
  CHECK(codes[1] == 0);
  double mean = 0;
  for (std::size_t i = 2; i < w.size(); ++i) mean += scale * (codes[i] - zero);
  mean /= double(w.size() - 2);
  CHECK(std::abs(mean - 0.123456) < 4 * scale * 0.5 / std::sqrt(double(w.size())));
}

namespace {

// Mean of stochastic_round(x) over n elements drawn through the encoder (scale 1,
// zero point 128, so code - 128 is the rounded value), minus x, in exact arithmetic.
double sr_bias(const StochasticRounder<8>& r, float x, Index n) {
  std::vector<float> w(static_cast<std::size_t>(n), x);
  std::vector<std::uint8_t> codes(w.size());
  r.bind(11, 3)(w.data(), n, 1.0f, 128.0f, 0, codes.data());
  std::int64_t sum = 0;  // exact, and vectorizes (a double sum would be a serial chain)
  for (std::uint8_t c : codes) sum += int(c) - 128;
  return double(sum) / double(n) - double(x);
}

}  // namespace

TEST_CASE("stochastic rounding is unbiased at fractions of 1e-5 and below") {
  // Uniforms of 16 bits round x up with probability ceil(frac * 2^16) / 2^16:
  // 1.5e-5 for every frac below that, and 1 for frac = 1 - 1e-5. Ten million
  // draws resolve the fraction to a few standard deviations of the binomial.
  const StochasticRounder<8> r(2024);
  const Index n = 10'000'000;
  for (float x : {1e-5f, 1e-6f, 1e-7f, 3e-8f, -1e-5f, -1e-6f, -1e-7f, -3e-8f, 1.0f - 0x1p-24f, 5.0f + 0x1p-20f,
                  -7.0f - 0x1p-21f}) {
    CAPTURE(x);
    const double p = double(x) - std::floor(double(x));  // the fraction, exactly
    const double sd = std::sqrt(p * (1 - p) / double(n));
    const double bias = sr_bias(r, x, n);
    CAPTURE(bias);
    CHECK(std::abs(bias) <= 5 * sd + 1.0 / double(n));
  }
}

TEST_CASE("a StochasticRounder rejects an unknown rounding mode") {
  CHECK_THROWS_WITH_AS(StochasticRounder<8>(1, static_cast<RoundingMode>(7)), doctest::Contains("rounding mode"),
                       galore::invalid_argument);
  CHECK_NOTHROW(StochasticRounder<8>(1, RoundingMode::Nearest));
  CHECK_NOTHROW(StochasticRounder<4>(1, RoundingMode::Stochastic));
}

TEST_CASE("the stochastic encoder is total: NaN, Inf and huge values give defined codes") {
  // Without care these reach a float-to-integer conversion out of range, which
  // is undefined behaviour (-fsanitize=float-cast-overflow reports it).
  const StochasticRounder<8> r(5);
  const float inf = INFINITY, big = 3e38f;
  const std::vector<float> w = {NAN,   -NAN,   inf,         -inf,      big,   -big,
                                1e10f, -1e10f, 0x1p23f + 2, -0x1p24f, 0.25f, 1e-40f};
  for (float scale : {1.0f, 1e-30f, 1e30f, inf, NAN}) {
    for (float zero : {0.0f, 7.0f, 255.0f}) {
      CAPTURE(scale);
      CAPTURE(zero);
      std::vector<std::uint8_t> codes(w.size(), 77);
      r.bind(1, 1)(w.data(), static_cast<Index>(w.size()), scale, zero, 0, codes.data());
      for (std::size_t k = 0; k < w.size(); ++k) {
        CAPTURE(w[k]);
        const float v = w[k] / scale;
        const auto clamp = [](double c) { return c <= 0 ? 0 : c >= 255 ? 255 : int(c); };
        if (std::isnan(v)) {
          CHECK(codes[k] == 0);  // NaN, from the value or the scale, gives code 0
        } else {
          const double lo = std::floor(double(v)) + zero;  // +-Inf saturate
          CHECK(codes[k] >= clamp(lo));
          CHECK(codes[k] <= clamp(lo + 1));
        }
      }
    }
  }
}

namespace {

// Floats of every magnitude from 2^-149 to 2^25, both signs, and the values
// around integers and halves where the rounding decision is most delicate.
std::vector<float> hard_values() {
  std::vector<float> v;
  std::mt19937 gen(17);
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  for (int e = -149; e <= 25; ++e)
    for (int k = 0; k < 6; ++k) v.push_back(std::ldexp(mant(gen), e));
  for (float base : {0.0f, 0.5f, 1.0f, 2.5f, 100.0f, 4194304.5f, 8388607.5f}) {
    float x = base;
    for (int k = 0; k < 4; ++k) x = std::nextafter(x, 1e30f), v.push_back(x);
    x = base;
    for (int k = 0; k < 4; ++k) x = std::nextafter(x, -1e30f), v.push_back(x);
  }
  const std::size_t n = v.size();
  for (std::size_t k = 0; k < n; ++k) v.push_back(-v[k]);
  return v;
}

}  // namespace

TEST_CASE("the stochastic rounding decision is exact: away from zero iff the bits are below ceil(frac * 2^32)") {
  // |round(x)| = floor(|x|) + 1 exactly for the ceil(f * 2^32) smallest bit
  // patterns, f = frac(|x|): the probability is ceil(f * 2^32) / 2^32 and the
  // bias below 2^-32 of a step, whatever x.
  for (float x : hard_values()) {
    CAPTURE(x);
    const double a = std::abs(double(x)), whole = std::floor(a);
    const double threshold = std::ceil((a - whole) * 4294967296.0);  // both exact in double
    const float down = float(x < 0 ? -whole : whole), up = float(x < 0 ? -(whole + 1) : whole + 1);
    REQUIRE(threshold <= 4294967295.0);
    const auto t = static_cast<std::uint64_t>(threshold);
    if (t > 0) {
      CHECK(stochastic_round(x, 0u) == up);
      CHECK(stochastic_round(x, static_cast<std::uint32_t>(t - 1)) == up);
    }
    CHECK(stochastic_round(x, static_cast<std::uint32_t>(t)) == down);
    CHECK(stochastic_round(x, ~0u) == (t > 0xFFFFFFFFu ? up : down));
  }
  CHECK(std::isnan(stochastic_round(NAN, 0u)));
  CHECK(stochastic_round(INFINITY, 0u) == INFINITY);
  CHECK(stochastic_round(-INFINITY, 0u) == -INFINITY);
}

TEST_CASE("the vectorized stochastic encoder equals the scalar element functions bit for bit") {
  const StochasticRounder<8> r8(31);
  const StochasticRounder<4> r4(32);
  std::vector<float> w = hard_values();
  for (float s : {NAN, INFINITY, -INFINITY, 3e38f, -3e38f, 0.0f, -0.0f}) w.push_back(s);
  std::mt19937 gen(3);
  std::normal_distribution<float> d(0.0f, 3.0f);
  for (int k = 0; k < 5000; ++k) w.push_back(d(gen));
  const Index n = static_cast<Index>(w.size());
  std::vector<std::uint8_t> codes(w.size());
  for (float scale : {1.0f, 0.013f, 1e-20f, 7.5e3f}) {
    for (float zero : {0.0f, 3.0f, 128.0f, 255.0f}) {
      for (std::uint64_t first : {0ull, 5ull, 1000003ull}) {
        CAPTURE(scale);
        CAPTURE(zero);
        CAPTURE(first);
        for (Index len : {n, n - 3, Index{7}, Index{13}}) {
          r8.bind(4, 6)(w.data(), len, scale, zero, first, codes.data());
          Index mismatch = 0;
          for (Index k = 0; k < len; ++k)
            mismatch += codes[k] != math::to_code(stochastic_round(w[k] / scale, r8.random_bits(4, 6, first + k)) + zero,
                                                    255.0f);
          CHECK(mismatch == 0);
          r4.bind(9, 1)(w.data(), len, scale, std::min(zero, 15.0f), first, codes.data());
          mismatch = 0;
          for (Index k = 0; k < len; ++k)
            mismatch += codes[k] != math::to_code(stochastic_round(w[k] / scale, r4.random_bits(9, 1, first + k)) +
                                                        std::min(zero, 15.0f),
                                                    15.0f);
          CHECK(mismatch == 0);
        }
      }
    }
  }
}
