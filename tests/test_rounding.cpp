// StochasticRounder and Philox4x32-10: known answers, unbiasedness, the variance
// of stochastic rounding, and reproducibility as a pure function of the counter.
#include <doctest/doctest.h>

#include <cmath>
#include <galore/galore.hpp>
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

TEST_CASE("uniforms lie in [0, 1) and a batch equals the element-wise function at any offset") {
  const StochasticRounder<8> r(1234);
  CHECK(StochasticRounder<8>::uniform16(0, 0) == 0.0f);
  CHECK(StochasticRounder<8>::uniform16(~0u, 1) == 65535.0f / 65536.0f);
  // Element i = 128 t + r reads counter 16 t + r % 16, word r / 32, half (r / 16) % 2.
  const Philox4x32 p = philox4x32_10(16 * 3 + 5, 0, 9, 7, 1234, 0);
  CHECK(r.uniform(7, 9, 128 * 3 + 64 + 16 + 5) == float(p.v[2] >> 16) / 65536.0f);
  for (std::uint64_t first : {0ull, 1ull, 3ull, 7ull, 8ull, 1001ull, (1ull << 34) + 2}) {
    std::vector<float> u(37);
    r.fill_uniform(7, 9, first, 37, u.data());
    for (Index k = 0; k < 37; ++k) {
      CHECK(u[k] == r.uniform(7, 9, first + k));
      CHECK(u[k] >= 0.0f);
      CHECK(u[k] < 1.0f);
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
    same_step += a.uniform(3, 10, e) == b.uniform(3, 10, e);
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
