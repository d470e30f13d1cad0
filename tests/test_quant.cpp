// Quantizers: the properties every projector quantization policy must have
// (error bound, memory formula), then packing, partial groups and NF4 details.
#include <doctest/doctest.h>

#include <cmath>
#include <galore/galore.hpp>
#include <limits>

#include "support/random.hpp"

using namespace galore;
using galore_test::gaussian;

namespace {

// Largest error a policy may make on element i of P (from its stored metadata).
template <class Q>
MatrixF error_bound(const Q&, const typename Q::Storage&, const MatrixF& P);

template <int B>
MatrixF error_bound(const quant::MinMax<B>&, const quant::GroupQuantized<B>& s, const MatrixF& P) {
  MatrixF b(P.rows(), P.cols());
  for (Index i = 0; i < P.size(); ++i) b.data()[i] = 0.5f * s.scales[i / s.group_size] * (1 + 1e-5f) + 1e-7f;
  return b;
}
MatrixF error_bound(const quant::NF4&, const quant::NF4::Storage& s, const MatrixF& P) {
  float gap = 0;
  for (std::size_t k = 1; k < quant::kNF4Values.size(); ++k)
    gap = std::max(gap, quant::kNF4Values[k] - quant::kNF4Values[k - 1]);
  MatrixF b(P.rows(), P.cols());
  for (Index i = 0; i < P.size(); ++i) b.data()[i] = 0.5f * gap * s.absmax[i / s.block_size] * (1 + 1e-5f);
  return b;
}
MatrixF error_bound(const quant::BFloat16&, const quant::BFloat16::Storage&, const MatrixF& P) {
  return (P.cwiseAbs() * std::ldexp(1.0f, -8)).array() + 1e-30f;
}
MatrixF error_bound(const quant::None&, const quant::None::Storage&, const MatrixF& P) {
  return MatrixF::Zero(P.rows(), P.cols());
}

}  // namespace

TEST_CASE_TEMPLATE("every projector quantizer: bounded error and memory equal to its formula", Q, quant::None,
                   quant::BFloat16, quant::MinMax<2>, quant::Int4, quant::Int8, quant::NF4) {
  for (Shape s : {Shape{6, 40}, Shape{33, 7}, Shape{1, 5}}) {
    CAPTURE(s.rows);
    CAPTURE(s.cols);
    const MatrixF P = gaussian(s.rows, s.cols, 3) * 0.2f;
    Q q{};
    typename Q::Storage st;
    q.store(P, st);
    MatrixF scratch;
    const MatrixF& back = q.load(st, scratch);
    REQUIRE(back.rows() == s.rows);
    REQUIRE(back.cols() == s.cols);
    CHECK(((back - P).cwiseAbs().array() <= error_bound(q, st, P).array()).all());
    CHECK(st.bytes() == q.storage_bytes(s));
  }
}

TEST_CASE("min-max codes: what the reference's formula gives, group by group, with a short last group") {
  const MatrixF w = gaussian(3, 10, 5);
  const auto q = quant::quantize_minmax<4>(w, 4);  // 30 elements: groups of 4, the last of 2
  REQUIRE(q.num_groups() == 8);
  for (Index g = 0; g < 8; ++g) {
    const Index lo = g * 4, hi = std::min<Index>(lo + 4, 30);
    float mn = w.data()[lo], mx = mn;
    for (Index i = lo; i < hi; ++i) mn = std::min(mn, w.data()[i]), mx = std::max(mx, w.data()[i]);
    const float scale = std::max(mx - mn, 1e-5f) / 15.0f;
    const float zero = std::clamp(std::nearbyint(-mn / scale), 0.0f, 15.0f);
    CHECK(q.scales[g] == scale);
    CHECK(q.zeros[g] == zero);
    for (Index i = lo; i < hi; ++i)
      CHECK(q.code(i) == std::clamp(std::nearbyint(w.data()[i] / scale) + zero, 0.0f, 15.0f));
  }
}

TEST_CASE("round half to even, as torch.round") {
  // w / scale lands exactly on .5: 2.5 -> 2, 3.5 -> 4 (std::round would give 3 and 4).
  MatrixF w(1, 4);
  w << 0.0f, 2.5f, 3.5f, 15.0f;  // min 0, max 15: scale 1, zero 0
  const auto q = quant::quantize_minmax<4>(w, -1);
  CHECK(q.scales[0] == 1.0f);
  CHECK(q.code(1) == 2);
  CHECK(q.code(2) == 4);
}

TEST_CASE("constant groups hit the 1e-5 scale floor and stay exact where representable") {
  const MatrixF w = MatrixF::Constant(2, 8, 0.0f);
  const auto q = quant::quantize_minmax<8>(w, 8);
  CHECK(q.scales[0] == 1e-5f / 255.0f);
  CHECK(quant::dequantize_minmax(q).isZero());
}

TEST_CASE("sub-byte codes pack into bytes without disturbing their neighbours") {
  quant::GroupQuantized<4> q4;
  q4.resize({3, 5}, 5);  // 15 codes: 8 bytes, the last half used
  CHECK(q4.codes.size() == 8);
  for (Index i = 0; i < 15; ++i) q4.set_code(i, static_cast<std::uint8_t>((i * 7) % 16));
  for (Index i = 0; i < 15; ++i) CHECK(q4.code(i) == (i * 7) % 16);
  quant::GroupQuantized<2> q2;
  q2.resize({1, 9}, 9);
  CHECK(q2.codes.size() == 3);
  for (Index i = 0; i < 9; ++i) q2.set_code(i, static_cast<std::uint8_t>(i % 4));
  for (Index i = 0; i < 9; ++i) CHECK(q2.code(i) == i % 4);
  CHECK(quant::GroupQuantized<4>::bytes_for({3, 5}, 5) == 8 + 3 * 5);
}

TEST_CASE("a projector with an INT4 policy holds only the packed basis") {
  const Index m = 64, n = 32, r = 8;
  Projector<svd::Exact, quant::Int4> p({m, n}, {r, ProjectionType::Std, 0.25f}, schedule::FixedGap{10},
                                       svd::Exact{}, quant::Int4{32});
  p.refresh(gaussian(m, n, 1));
  // r x n = 256 codes in 128 bytes, 8 groups of 32 with a float scale and a byte zero.
  CHECK(p.bytes() == 128 + 8 * 5);
  CHECK(p.bytes() == p.bytes_when_filled());
  CHECK(p.right_storage().codes.size() == 128);
}

TEST_CASE("NF4 keeps each block's absmax exactly and uses QLoRA's 16 values") {
  CHECK(quant::kNF4Values.front() == -1.0f);
  CHECK(quant::kNF4Values[7] == 0.0f);
  CHECK(quant::kNF4Values.back() == 1.0f);
  for (int k = 0; k < 16; ++k) CHECK(quant::nf4_code(quant::kNF4Values[k]) == k);
  // The host-device table both backends encode and decode with is the same.
  for (int k = 0; k < 16; ++k) CHECK(quant::nf4_value(k) == quant::kNF4Values[static_cast<std::size_t>(k)]);
  // Midpoints go to the lower value; beyond [-1, 1] and NaN to the ends and 0.
  for (int k = 1; k < 16; ++k) {
    const float mid = 0.5f * (quant::kNF4Values[k - 1] + quant::kNF4Values[k]);
    CHECK(quant::nf4_code(mid) == k - 1);
    CHECK(quant::nf4_code(std::nextafter(mid, 2.0f)) == k);
  }
  CHECK(quant::nf4_code(-3.0f) == 0);
  CHECK(quant::nf4_code(3.0f) == 15);
  CHECK(quant::nf4_code(std::numeric_limits<float>::quiet_NaN()) == 0);
  CHECK(quant::nf4_inverse(0.0f) == 0.0f);  // an all-zero block encodes to the level 0, code 7
  CHECK(quant::nf4_code(0.0f * quant::nf4_inverse(0.0f)) == 7);
  const MatrixF P = gaussian(4, 50, 9);
  quant::NF4 q{16};
  quant::NF4::Storage st;
  q.store(P, st);
  MatrixF scratch;
  const MatrixF& back = q.load(st, scratch);
  for (Index b = 0; b * 16 < P.size(); ++b) {
    Index arg = b * 16;
    for (Index i = b * 16; i < std::min<Index>(P.size(), b * 16 + 16); ++i)
      if (std::abs(P.data()[i]) > std::abs(P.data()[arg])) arg = i;
    CHECK(back.data()[arg] == P.data()[arg]);  // +-1 * absmax reproduces the extreme element exactly
  }
  CHECK(st.bytes() == 100 + 13 * 4);
}

TEST_CASE("quantizer errors") {
  CHECK_THROWS_WITH_AS(quant::quantize_minmax<4>(gaussian(2, 8, 1), 0), doctest::Contains("group size"),
                       galore::invalid_argument);
  CHECK_THROWS_AS(quant::quantize_minmax<8>(gaussian(2, 8, 1), -7), galore::invalid_argument);
  quant::NF4 bad;
  bad.block_size = 0;  // a public member, changed after construction
  quant::NF4::Storage st;
  CHECK_THROWS_WITH_AS(bad.store(gaussian(2, 8, 1), st), doctest::Contains("block size"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(bad.storage_bytes({2, 8}), doctest::Contains("block size"), galore::invalid_argument);
  quant::GroupQuantized<4> q;
  CHECK_THROWS_WITH_AS(q.resize({2, 8}, 0), doctest::Contains("group size"), galore::invalid_argument);
}

TEST_CASE("quantization policies reject invalid hyperparameters when constructed") {
  // NF4 with block size 0 used to divide by zero in storage_bytes, and Int4{0}
  // threw only at the first store, after a projector had counted its SVD.
  CHECK_THROWS_WITH_AS(quant::NF4{0}, doctest::Contains("block size"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(quant::NF4{-64}, doctest::Contains("block size"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(quant::Int4{0}, doctest::Contains("group size"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(quant::Int8{-2}, doctest::Contains("group size"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(quant::MinMax<2>{-256}, doctest::Contains("group size"), galore::invalid_argument);
  CHECK_NOTHROW(quant::NF4{1});
  CHECK_NOTHROW(quant::Int4{-1});
  CHECK_NOTHROW(quant::Int4{1});
  CHECK_NOTHROW(quant::Int8{});
  CHECK(quant::Int4{}.group_size == -1);
  CHECK(quant::NF4{}.block_size == 64);
  // The settings the CUDA facade takes are the policies' own.
  CHECK_THROWS_WITH_AS(quant::MinMaxSettings{0}.validate(), doctest::Contains("group size"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(quant::NF4Settings{0}.validate(), doctest::Contains("block size"), galore::invalid_argument);
  CHECK_NOTHROW(quant::MinMaxSettings{}.validate());
  CHECK_NOTHROW(quant::NF4Settings{}.validate());
  const quant::MinMaxSettings& base = quant::Int4{128};
  CHECK(base.group_size == 128);
  quant::Int8 changed;
  changed.group_size = 0;  // a public member, changed after construction: refused when the optimizer is built
  using Int8Opt = GaLoreOptimizer<Projector<svd::Exact, quant::Int8>>;
  const auto build = [&] {
    return Int8Opt(ProjectorOptions{4}, LowRankAdam<>(), schedule::FixedGap{}, svd::Exact{}, changed);
  };
  CHECK_THROWS_AS(build(), galore::invalid_argument);
  using NF4Projector = Projector<svd::Exact, quant::NF4>;
  CHECK_THROWS_AS(NF4Projector({8, 8}, {2, ProjectionType::Std, 0.25f}, schedule::FixedGap{10}, svd::Exact{},
                               quant::NF4{0}),
                  galore::invalid_argument);
}

TEST_CASE("the min-max quantizer is total: NaN and Inf give defined codes, never undefined behaviour") {
  // A float-to-integer conversion of NaN, Inf or an out-of-range value is
  // undefined behaviour (-fsanitize=float-cast-overflow reports it): codes and
  // zero points are clamped in float first, NaN going to 0.
  const float inf = INFINITY;
  std::vector<std::uint8_t> codes(6, 77);
  const float w[6] = {NAN, inf, -inf, 3e38f, -3e38f, 0.5f};
  quant::NearestEncoder<8>{}(w, 6, 1.0f, 10.0f, 0, codes.data());
  CHECK(codes == std::vector<std::uint8_t>{0, 255, 0, 255, 0, 10});
  quant::NearestEncoder<4>{}(w, 6, NAN, 3.0f, 0, codes.data());
  CHECK(codes == std::vector<std::uint8_t>{0, 0, 0, 0, 0, 0});
  // Whole groups of NaN or Inf: every code, zero point and conversion defined.
  for (float bad : {float(NAN), inf, -inf}) {
    CAPTURE(bad);
    MatrixF m = gaussian(4, 8, 1);
    m(1, 2) = bad;
    m.row(3).setConstant(bad);
    const auto q8 = quant::quantize_minmax<8>(m, 8);
    const auto q4 = quant::quantize_minmax<4>(m, -1);
    for (Index g = 0; g < 4; ++g) {
      CHECK(q8.zeros[g] <= 255);
      CHECK(q4.zeros[g] <= 15);
    }
    // Rows without a bad value are unaffected.
    CHECK(quant::dequantize_minmax(q8).row(0) == quant::dequantize_minmax(quant::quantize_minmax<8>(m.topRows(1), 8)));
  }
}

TEST_CASE("a group or block larger than the matrix is one group, even at the largest Index") {
  // ceil(n / g) as (n + g - 1) / g overflows for g near the largest Index.
  const MatrixF P = gaussian(3, 8, 4);
  for (Index g : {Index{25}, Index{1} << 40, std::numeric_limits<Index>::max()}) {
    CAPTURE(g);
    const auto q = quant::quantize_minmax<4>(P, g);
    CHECK(q.num_groups() == 1);
    CHECK(quant::GroupQuantized<4>::bytes_for({3, 8}, g) == 12 + 5);
    CHECK(quant::dequantize_minmax(q) == quant::dequantize_minmax(quant::quantize_minmax<4>(P, 24)));
    const quant::NF4 nf4{g};
    quant::NF4::Storage st;
    nf4.store(P, st);
    CHECK(st.absmax.size() == 1);
    CHECK(nf4.storage_bytes({3, 8}) == 12 + 4);
  }
}
