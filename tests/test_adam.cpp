// LowRankAdam<StateT> with dense float32 and bfloat16 moments: the AdamW formula
// of galore_torch against an independent double-precision implementation, the
// configuration checks, memory, and the zero-gradient edge case.
#include <doctest/doctest.h>

#include <cmath>
#include <galore/galore.hpp>
#include <vector>

#include "support/random.hpp"

using namespace galore;
using galore_test::gaussian;

namespace {

// galore_torch's AdamW step in double, written from its source, for one tensor.
struct ReferenceAdam {
  AdamConfig c;
  std::vector<double> m, v;
  int t = 0;
  std::vector<double> step(const MatrixF& g) {
    if (m.empty()) m.assign(g.size(), 0.0), v.assign(g.size(), 0.0);
    ++t;
    double step_size = c.lr;
    if (c.correct_bias)
      step_size *= std::sqrt(1 - std::pow(c.beta2, t)) / (1 - std::pow(c.beta1, t));
    std::vector<double> d(g.size());
    for (Index i = 0; i < g.size(); ++i) {
      const double x = g.data()[i];
      m[i] = c.beta1 * m[i] + (1 - c.beta1) * x;
      v[i] = c.beta2 * v[i] + (1 - c.beta2) * x * x;
      d[i] = step_size * m[i] / (std::sqrt(v[i]) + c.eps);
    }
    return d;
  }
};

template <class StateT>
void check_against_reference(AdamConfig c, double tol) {
  LowRankAdam<StateT> adam(c);
  ReferenceAdam ref{c, {}, {}, 0};
  auto mo = adam.init({7, 9});
  MatrixF D;
  for (int t = 1; t <= 6; ++t) {
    const MatrixF g = gaussian(7, 9, 40 + t, t == 3 ? 1e-4f : 1.0f);
    adam.update(mo, g, t, D);
    const auto expect = ref.step(g);
    for (Index i = 0; i < D.size(); ++i) CHECK(D.data()[i] == doctest::Approx(expect[i]).epsilon(tol));
  }
}

}  // namespace

TEST_CASE("float32 moments follow galore_torch's AdamW") {
  AdamConfig c;
  c.lr = 0.01;
  check_against_reference<state::Float32>(c, 1e-5);
  c.correct_bias = false;
  check_against_reference<state::Float32>(c, 1e-5);
  c.beta1 = 0.5;
  c.beta2 = 0.9;
  c.eps = 1e-3;
  check_against_reference<state::Float32>(c, 1e-5);
}

TEST_CASE("bf16 moments stay close to float32 moments") {
  AdamConfig c;
  c.lr = 0.01;
  // bf16 rounds m and v to 8 significant bits; each step's D is within a few bf16 ulps.
  check_against_reference<state::BFloat16>(c, 3e-2);
}

TEST_CASE("without bias correction the step size is lr") {
  AdamConfig c;
  c.lr = 0.5;
  c.correct_bias = false;
  CHECK(c.step_size(1) == 0.5);
  CHECK(c.step_size(100) == 0.5);
  c.correct_bias = true;
  CHECK(c.step_size(1) == doctest::Approx(0.5 * std::sqrt(1 - 0.999) / (1 - 0.9)));
}

TEST_CASE("a zero gradient gives a zero step, never NaN") {
  for (double eps : {1e-6, 1e-30}) {  // eps = 0 is rejected (see below)
    AdamConfig c;
    c.eps = eps;
    LowRankAdam<> adam(c);
    auto mo = adam.init({4, 5});
    MatrixF D;
    adam.update(mo, MatrixF::Zero(4, 5), 1, D);
    CHECK(D.isZero());
  }
}

TEST_CASE("moment memory equals 2 * elements * sizeof(state)") {
  for (Shape s : {Shape{3, 5}, Shape{64, 128}, Shape{1, 1}}) {
    LowRankAdam<state::Float32> f;
    LowRankAdam<state::BFloat16> b;
    CHECK(f.init(s).bytes() == std::size_t(8 * s.size()));
    CHECK(f.moments_bytes(s) == std::size_t(8 * s.size()));
    CHECK(b.init(s).bytes() == std::size_t(4 * s.size()));
    CHECK(b.moments_bytes(s) == std::size_t(4 * s.size()));
  }
}

TEST_CASE("a strided view of R gives the same step as a contiguous copy") {
  LowRankAdam<> adam;
  const MatrixF big = gaussian(10, 12, 9);
  auto m1 = adam.init({4, 5}), m2 = adam.init({4, 5});
  MatrixF D1, D2;
  adam.update(m1, big.block(2, 3, 4, 5), 1, D1);
  const MatrixF copy = big.block(2, 3, 4, 5);
  adam.update(m2, copy, 1, D2);
  CHECK(D1 == D2);
}

TEST_CASE("Adam configuration and call errors") {
  auto make = [](auto edit) {
    AdamConfig c;
    edit(c);
    return LowRankAdam<>(c);
  };
  CHECK_THROWS_WITH_AS(make([](AdamConfig& c) { c.lr = -1; }), doctest::Contains("learning rate"),
                       galore::invalid_argument);
  CHECK_THROWS_AS(make([](AdamConfig& c) { c.lr = NAN; }), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(make([](AdamConfig& c) { c.beta1 = 1.0; }), doctest::Contains("beta1"),
                       galore::invalid_argument);
  CHECK_THROWS_WITH_AS(make([](AdamConfig& c) { c.beta2 = -0.1; }), doctest::Contains("beta2"),
                       galore::invalid_argument);
  CHECK_THROWS_WITH_AS(make([](AdamConfig& c) { c.eps = -1e-8; }), doctest::Contains("eps"),
                       galore::invalid_argument);
  CHECK_THROWS_WITH_AS(make([](AdamConfig& c) { c.weight_decay = -0.1; }),
                       doctest::Contains("weight decay"), galore::invalid_argument);

  LowRankAdam<> adam;
  auto mo = adam.init({3, 3});
  MatrixF D;
  CHECK_THROWS_WITH_AS(adam.update(mo, MatrixF::Zero(3, 4), 1, D), doctest::Contains("moments are 3x3"),
                       galore::invalid_argument);
  CHECK_THROWS_WITH_AS(adam.update(mo, MatrixF::Zero(3, 3), 0, D), doctest::Contains("starts at 1"),
                       galore::invalid_argument);
  CHECK_THROWS_AS(adam.set_lr(-2.0), galore::invalid_argument);
  adam.set_lr(0.25);
  CHECK(adam.config().lr == 0.25);
}

TEST_CASE("settings that break the float32 math are rejected with a message") {
  auto make = [](auto edit) {
    AdamConfig c;
    edit(c);
    return LowRankAdam<>(c);
  };
  // eps = 0 turns a zero or tiny gradient into 0/0 or x/0.
  CHECK_THROWS_WITH_AS(make([](AdamConfig& c) { c.eps = 0.0; }), doctest::Contains("eps"),
                       galore::invalid_argument);
  CHECK_THROWS_AS(make([](AdamConfig& c) { c.eps = 1e-40; }), galore::invalid_argument);  // 0 or subnormal in float
  // A beta that rounds to 1 in float32 never forgets.
  CHECK_THROWS_WITH_AS(make([](AdamConfig& c) { c.beta2 = 0.99999999; }), doctest::Contains("beta2"),
                       galore::invalid_argument);
  CHECK_THROWS_AS(make([](AdamConfig& c) { c.beta1 = 0.999999999; }), galore::invalid_argument);
  // A learning rate beyond float32, and a decay factor 1 - lr * wd below 0.
  CHECK_THROWS_AS(make([](AdamConfig& c) { c.lr = 1e39; }), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(make([](AdamConfig& c) {
                         c.lr = 2.0;
                         c.weight_decay = 1.0;
                       }),
                       doctest::Contains("weight decay"), galore::invalid_argument);
  LowRankAdam<> adam(AdamConfig{});
  AdamConfig c;
  c.weight_decay = 0.5;
  LowRankAdam<> decaying(c);
  CHECK_THROWS_AS(decaying.set_lr(3.0), galore::invalid_argument);
  CHECK(decaying.config().lr == c.lr);
  // Still accepted: the smallest sensible eps, lr * wd = 1.
  CHECK_NOTHROW(make([](AdamConfig& c) { c.eps = 1e-30; }));
  CHECK_NOTHROW(make([](AdamConfig& c) {
    c.lr = 1.0;
    c.weight_decay = 1.0;
  }));
}

TEST_CASE("a gradient element whose square overflows float32 leaves the moments untouched") {
  for (float huge : {1e20f, 1e30f, 3e38f}) {
    CAPTURE(huge);
    LowRankAdam<> adam;
    auto mo = adam.init({4, 5});
    MatrixF D;
    adam.update(mo, gaussian(4, 5, 1), 1, D);
    const auto m0 = mo.m, v0 = mo.v;
    MatrixF g = gaussian(4, 5, 2);
    g(1, 1) = huge;
    adam.update(mo, g, 2, D);
    CHECK(mo.m.allFinite());
    CHECK(mo.v.allFinite());
    CHECK((mo.m == m0).all());
    CHECK((mo.v == v0).all());
  }
}

TEST_CASE("the Adam input range ends exactly at AdamConfig::max_input") {
  const float top = AdamConfig::max_input;
  CHECK(top == std::ldexp(1.0f, 60));
  CHECK(AdamConfig::max_update == std::ldexp(1.0f, 64));
  CHECK(galore::detail::in_adam_range(top));
  CHECK(galore::detail::in_adam_range(-top));
  CHECK_FALSE(galore::detail::in_adam_range(std::nextafter(top, INFINITY)));
  CHECK_FALSE(galore::detail::in_adam_range(NAN));
  CHECK_FALSE(galore::detail::in_adam_range(-INFINITY));
  CHECK(galore::detail::in_adam_range(bfloat16(top)));
  CHECK_FALSE(galore::detail::in_adam_range(bfloat16(std::ldexp(1.0f, 61))));
  CHECK_FALSE(galore::detail::in_adam_range(bfloat16(INFINITY)));
}
