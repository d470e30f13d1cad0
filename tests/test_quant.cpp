// Quantizers: the properties every projector quantization policy must have
// (error bound, memory formula), then packing, partial groups and NF4 details.
#include <doctest/doctest.h>

#include <galore/galore.hpp>

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
  quant::NF4 bad{0};
  quant::NF4::Storage st;
  CHECK_THROWS_WITH_AS(bad.store(gaussian(2, 8, 1), st), doctest::Contains("block size"), galore::invalid_argument);
}
