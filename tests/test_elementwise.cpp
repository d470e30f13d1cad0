// The element-wise math both backends share (include/galore/math): every product
// and sum rounded once, never fused, so that the CPU's results are the GPU's bit
// for bit (tests/cuda/test_cuda_elementwise.cu compares them on the device);
// the CPU's vectorized Adam states against the shared scalar formulas; and the
// small helpers the backend-free headers use (Span, clamp_update).
//
// The references below round each operation to float through a volatile, which
// no compiler can fuse with the next operation. (Computing in double and
// converting does not serve: GCC narrows (float)((double)a * b) back to a float
// product, and then contracts it like any other.)
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <galore/galore.hpp>
#include <galore/math/adam8bit.hpp>
#include <galore/math/quant_codes.hpp>
#include <random>
#include <vector>

using namespace galore;

namespace {

float rmul(float a, float b) {
  volatile float r = a * b;
  return r;
}
float radd(float a, float b) {
  volatile float r = a + b;
  return r;
}
float rdiv(float a, float b) {
  volatile float r = a / b;
  return r;
}
float rsqrt(float a) {
  volatile float r = std::sqrt(a);
  return r;
}

std::uint32_t bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

// Inputs over many magnitudes, as Adam sees them: gradients from 1e-8 to 1e4,
// moments consistent with them, a few exact zeros.
struct AdamInputs {
  std::vector<float> g, m, v;
};
AdamInputs adam_inputs(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> expo(-8.0f, 4.0f), unit(-1.0f, 1.0f);
  AdamInputs in;
  for (std::size_t i = 0; i < n; ++i) {
    const float scale = std::pow(10.0f, expo(gen));
    const float g = i % 97 == 0 ? 0.0f : unit(gen) * scale;
    in.g.push_back(g);
    in.m.push_back(unit(gen) * scale);
    in.v.push_back(std::abs(unit(gen)) * scale * scale);
  }
  return in;
}

math::AdamCoefficients coefficients(const AdamConfig& c) {
  return {static_cast<float>(c.beta1), static_cast<float>(1.0 - c.beta1), static_cast<float>(c.beta2),
          static_cast<float>(1.0 - c.beta2), static_cast<float>(c.eps)};
}

}  // namespace

TEST_CASE("math::adam_element rounds every product and sum once (no contraction)") {
  const AdamConfig cfg{1e-2, 0.9, 0.999, 1e-8, 0.0, true};
  const math::AdamCoefficients c = coefficients(cfg);
  const float step = cfg.step_size_float(7);
  const AdamInputs in = adam_inputs(200000, 1);
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < in.g.size(); ++i) {
    const math::AdamElement e = math::adam_element(in.g[i], in.m[i], in.v[i], step, c);
    const float m = radd(rmul(c.b1, in.m[i]), rmul(c.a1, in.g[i]));
    const float v = radd(rmul(c.b2, in.v[i]), rmul(c.a2, rmul(in.g[i], in.g[i])));
    const float d = math::clamp_update(rdiv(rmul(step, m), radd(rsqrt(v), c.eps)));
    mismatches += bits(e.m) != bits(m) || bits(e.v) != bits(v) || bits(e.d) != bits(d);
  }
  // A build that lets the compiler fuse a*b + c (-mfma or -march=native without
  // -ffp-contract=off) changes a third of these.
  CHECK(mismatches == 0);
}

TEST_CASE("math::adam8bit_element rounds every product and sum once (no contraction)") {
  const math::Adam8bitCoefficients c = math::adam8bit_coefficients(1e-3, 0.9, 0.999, 1e-8, 3, true);
  const AdamInputs in = adam_inputs(200000, 2);
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < in.g.size(); ++i) {
    const math::AdamElement e = math::adam8bit_element(in.g[i], in.m[i], in.v[i], c);
    const float m = radd(rmul(in.m[i], c.b1), rmul(c.a1, in.g[i]));
    const float v = radd(rmul(in.v[i], c.b2), rmul(rmul(c.a2, in.g[i]), in.g[i]));
    const float d = rmul(c.step, rdiv(m, radd(rsqrt(v), c.eps)));
    mismatches += bits(e.m) != bits(m) || bits(e.v) != bits(v) || bits(e.d) != bits(d);
  }
  CHECK(mismatches == 0);
  // bitsandbytes' coefficients, in float32.
  const float c2 = std::sqrt(1.0f - std::pow(0.999f, 3.0f));
  CHECK(c.step == doctest::Approx(1e-3f * c2 / (1.0f - std::pow(0.9f, 3.0f))).epsilon(1e-6));
  CHECK(c.eps == doctest::Approx(1e-8f * c2).epsilon(1e-6));
  const math::Adam8bitCoefficients plain = math::adam8bit_coefficients(1e-3, 0.9, 0.999, 1e-8, 3, false);
  CHECK(plain.step == 1e-3f);
  CHECK(plain.eps == 1e-8f);
}

TEST_CASE("state::Dense<float> (vectorized) gives math::adam_element's bits") {
  const AdamConfig cfg{3e-3, 0.85, 0.995, 1e-6, 0.0, true};
  const AdamInputs in = adam_inputs(5000, 3);
  const Shape shape{50, 100};
  const state::Float32 policy;
  state::Float32::Moments mo = policy.init(shape);
  for (Index i = 0; i < shape.size(); ++i) {
    mo.m(i) = in.m[static_cast<std::size_t>(i)];
    mo.v(i) = in.v[static_cast<std::size_t>(i)];
  }
  const std::int64_t t = 4;
  std::vector<float> d(in.g.size());
  policy.update(mo, in.g.data(), t, cfg, [&](Index off, const float* chunk, Index len) {
    std::memcpy(d.data() + off, chunk, sizeof(float) * static_cast<std::size_t>(len));
  });
  const math::AdamCoefficients c = coefficients(cfg);
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < in.g.size(); ++i) {
    const math::AdamElement e = math::adam_element(in.g[i], in.m[i], in.v[i], cfg.step_size_float(t), c);
    const auto k = static_cast<Index>(i);
    mismatches += bits(e.m) != bits(mo.m(k)) || bits(e.v) != bits(mo.v(k)) || bits(e.d) != bits(d[i]);
  }
  CHECK(mismatches == 0);
}

TEST_CASE("state::Blockwise8bit's float32 fallback gives math::adam8bit_element's bits") {
  const AdamConfig cfg{3e-3, 0.85, 0.995, 1e-6, 0.0, true};
  const AdamInputs in = adam_inputs(300, 4);
  const state::Blockwise8bit policy;  // below min_8bit_size the moments stay float32
  state::Blockwise8bit::Moments mo = policy.init({10, 30});
  REQUIRE_FALSE(mo.quantized);
  mo.m32 = in.m;
  mo.v32 = in.v;
  std::vector<float> d(in.g.size());
  policy.update(mo, in.g.data(), 5, cfg, [&](Index off, const float* chunk, Index len) {
    std::memcpy(d.data() + off, chunk, sizeof(float) * static_cast<std::size_t>(len));
  });
  const math::Adam8bitCoefficients c =
      math::adam8bit_coefficients(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, 5, cfg.correct_bias);
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < in.g.size(); ++i) {
    const math::AdamElement e = math::adam8bit_element(in.g[i], in.m[i], in.v[i], c);
    mismatches += bits(e.m) != bits(mo.m32[i]) || bits(e.v) != bits(mo.v32[i]) ||
                  bits(math::clamp_update(e.d)) != bits(d[i]);
  }
  CHECK(mismatches == 0);
}

TEST_CASE("math::clamp_update bounds the step and keeps NaN") {
  CHECK(math::clamp_update(1.5f) == 1.5f);
  CHECK(math::clamp_update(-1e30f) == -math::kMaxUpdate);
  CHECK(math::clamp_update(INFINITY) == math::kMaxUpdate);
  CHECK(math::clamp_update(-INFINITY) == -math::kMaxUpdate);
  CHECK(std::isnan(math::clamp_update(NAN)));
  CHECK(math::kMaxUpdate == std::ldexp(1.0f, 64));
  CHECK(math::kMaxInput == std::ldexp(1.0f, 60));
  CHECK(bits(math::kMaxInput) == math::kMaxInputBits);
}

TEST_CASE("AdamConfig's step size is math::adam_step_size") {
  AdamConfig c;
  c.lr = 0.25;
  for (std::int64_t t : {1, 2, 10, 1000, 1000000}) {
    CHECK(c.step_size(t) == math::adam_step_size(c.lr, c.beta1, c.beta2, t, true));
    CHECK(c.step_size_float(t) == static_cast<float>(c.step_size(t)));
  }
  c.lr = 1e38;
  c.beta1 = 0.999999;  // 1 - b1^1 = 1e-6: the step size overflows float32
  CHECK(c.step_size_float(1) == FLT_MAX);
}

TEST_CASE("min-max codes: the shared scalar functions are the quantizer's") {
  // minmax_scale_zero rounds -lo / scale half to even, as torch.round.
  float scale = 0.0f, zero = 0.0f;
  math::minmax_scale_zero(-0.5f, 1.0f, 3.0f, scale, zero);  // -lo / scale = 1.0
  CHECK(scale == 0.5f);
  CHECK(zero == 1.0f);
  math::minmax_scale_zero(-2.5f, 3.5f, 15.0f, scale, zero);  // -lo / scale = 6.25
  CHECK(zero == 6.0f);
  math::minmax_scale_zero(NAN, NAN, 15.0f, scale, zero);
  CHECK(zero == 0.0f);
  math::minmax_scale_zero(-INFINITY, 0.0f, 15.0f, scale, zero);
  CHECK(zero == 0.0f);  // -lo / scale = Inf / Inf = NaN
  // The whole-matrix quantizer gives the scalar codes.
  std::mt19937_64 gen(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  MatrixF w(7, 33);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = nd(gen);
  const quant::GroupQuantized<4> q = quant::quantize_minmax<4>(w, 11);
  std::size_t mismatches = 0;
  for (Index i = 0; i < w.size(); ++i) {
    const std::size_t group = static_cast<std::size_t>(i / 11);
    mismatches += q.code(i) != math::minmax_code(w.data()[i], q.scales[group], q.zeros[group], 15.0f);
  }
  CHECK(mismatches == 0);
}

TEST_CASE("Span views contiguous containers without copying") {
  std::vector<float> v{1.0f, 2.0f, 3.0f};
  const Span<float> s(v);
  CHECK(s.data() == v.data());
  CHECK(s.size() == 3);
  s[1] = 5.0f;
  CHECK(v[1] == 5.0f);
  const VectorF e = VectorF::Constant(4, 2.0f);
  const Span<const float> c(e);
  CHECK(c.size() == 4);
  float sum = 0.0f;
  for (float x : c) sum += x;
  CHECK(sum == 8.0f);
  // A schedule takes an Eigen vector and a std::vector alike.
  schedule::Lazy lazy{1, 0.5, 2.0, 1};
  schedule::Lazy::State st = lazy.init();
  lazy.on_refresh(st, 0, VectorF(VectorF::Unit(3, 0)));
  lazy.on_refresh(st, 1, std::vector<float>{1.0f, 0.0f, 0.0f});
  CHECK(st.last_cosine == 1.0f);
  CHECK(lazy.current_gap(st) == 2);
}
