// Q-GaLore: INT8 weights, the lazy schedule, and the composed facade, including
// the effect the Q-GaLore paper reports (stochastic rounding trains where
// round-to-nearest INT8 weights stall).
#include <doctest/doctest.h>

#include <galore/galore.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "support/random.hpp"

using namespace galore;
using galore_test::gaussian;

TEST_CASE("an INT8 weight holds one byte per weight plus a scale and a zero per group") {
  for (Shape s : {Shape{512, 512}, Shape{100, 37}, Shape{3, 300}}) {
    CAPTURE(s.rows);
    const MatrixF W = gaussian(s.rows, s.cols, 1);
    const QuantizedWeight<8> q(W, 256);
    const Index groups = (s.size() + 255) / 256;
    CHECK(q.codes().codes.size() == std::size_t(s.size()));
    CHECK(q.codes().scales.size() == std::size_t(groups));
    CHECK(q.bytes() == std::size_t(s.size() + 5 * groups));
    CHECK(QuantizedWeight<8>::bytes_for(s, 256) == q.bytes());
    // Round-to-nearest: every weight within half a step of its group.
    const MatrixF back = q.dequantize();
    Index outside = 0;
    for (Index i = 0; i < s.size(); ++i)
      outside += std::abs(back.data()[i] - W.data()[i]) > 0.5f * q.codes().scales[i / 256] * 1.0001f;
    CHECK(outside == 0);
  }
  const QuantizedWeight<4> q4(gaussian(8, 64, 2), 64);
  CHECK(q4.bytes() == std::size_t(8 * 64 / 2 + 8 * 5));
}

TEST_CASE("row panels of a quantized weight start on group boundaries") {
  const MatrixF W = gaussian(200, 100, 3);
  QuantizedWeight<8> q(W, 256);
  CHECK(q.row_alignment() == 64);  // 64 rows x 100 = 25 groups of 256
  MatrixF rows(64, 100);
  q.dequantize_rows(64, rows);
  CHECK(rows == q.dequantize().middleRows(64, 64));
  const quant::NearestEncoder<8> nearest;
  q.quantize_rows(64, rows, nearest);  // aligned: fine; values move by at most half a step
  CHECK((q.dequantize().middleRows(64, 64) - rows).cwiseAbs().maxCoeff() <= 0.5f * q.codes().scales[25] * 1.01f);
  CHECK_THROWS_WITH_AS(q.quantize_rows(10, rows, nearest), doctest::Contains("group boundaries"),
                       galore::invalid_argument);
  CHECK_THROWS_AS(q.dequantize_rows(190, rows), galore::invalid_argument);
  CHECK_THROWS_AS(QuantizedWeight<8>(MatrixF(0, 5)), galore::invalid_argument);
}

TEST_CASE("the lazy schedule grows the gap when the queue of cosines is full and its mean passes the threshold") {
  const schedule::Lazy lazy{4, 0.5, 1.5, 3};
  auto s = lazy.init();
  VectorF e0 = VectorF::Unit(6, 0), e1 = VectorF::Unit(6, 1);
  lazy.on_refresh(s, 0, e0);  // first refresh: nothing to compare with
  CHECK(std::isnan(s.last_cosine));
  CHECK(s.queue.empty());
  lazy.on_refresh(s, 0, e0);
  lazy.on_refresh(s, 0, e0);
  CHECK(s.gap == 4);  // two cosines of 1: queue not full yet
  lazy.on_refresh(s, 0, e0);
  CHECK(s.gap == 6);  // full queue, mean 1 >= 0.5: int(4 * 1.5)
  lazy.on_refresh(s, 0, e1);  // cosine 0 joins: mean 2/3, still >= 0.5
  CHECK(s.gap == 9);
  lazy.on_refresh(s, 0, e0);  // cosines 1, 0, 0: mean 1/3
  CHECK(s.gap == 9);
  CHECK(s.queue.size() == 3);
  CHECK(lazy.due(s, 18));
  CHECK_FALSE(lazy.due(s, 12));
  const VectorF minus_e0 = -e0;
  CHECK(schedule::Lazy::cosine(e0, minus_e0) == -1.0f);

  CHECK_THROWS_AS((schedule::Lazy{0, 0.4, 2, 5}.init()), galore::invalid_argument);
  CHECK_THROWS_AS((schedule::Lazy{10, 0.4, 0.5, 5}.init()), galore::invalid_argument);
  CHECK_THROWS_AS((schedule::Lazy{10, 0.4, 2, 0}.init()), galore::invalid_argument);
}

namespace {

// Least squares whose solution is W0 plus a small rank-6 change (entries ~0.15).
struct Regression {
  Index k = 256, m = 256, n = 128;
  MatrixF X, Y, W0;
  Regression() {
    X = gaussian(k, m, 1) / std::sqrt(float(m));
    W0 = gaussian(m, n, 4);
    Y = X * (W0 + 0.15f / std::sqrt(6.0f) * gaussian(m, 6, 2) * gaussian(6, n, 3));
  }
  MatrixF grad(const MatrixF& W) const { return 2.0f / float(k * n) * X.transpose() * (X * W - Y); }
  float loss(const MatrixF& W) const { return (X * W - Y).squaredNorm() / float(k * n); }
};

QGaLoreAdamW8bit make_qgalore(RoundingMode mode, std::uint64_t seed = 1) {
  AdamConfig c;
  c.lr = 0.005;
  c.eps = 1e-8;
  return QGaLoreAdamW8bit({16, ProjectionType::Std, 0.25f}, LowRankAdam<state::Blockwise8bit>(c),
                          schedule::Lazy{20, 0.4, 2, 5}, svd::Exact{}, quant::Int4{256},
                          StochasticRounder<8>(seed, mode));
}

}  // namespace

TEST_CASE("Q-GaLore with stochastic rounding trains INT8 weights that round-to-nearest leaves stalled") {
  const Regression p;
  // Each step moves a weight by about lr * scale = 0.001, far below half an INT8
  // step of these weights (~0.01): rounding to nearest throws every update away.
  auto sr = make_qgalore(RoundingMode::Stochastic), rtn = make_qgalore(RoundingMode::Nearest);
  const LayerId a = sr.add_layer({p.m, p.n}), b = rtn.add_layer({p.m, p.n});
  QuantizedWeight<8> Wsr(p.W0), Wrtn(p.W0);
  const float start = p.loss(Wsr.dequantize());
  for (int t = 0; t < 300; ++t) {
    REQUIRE(sr.step(a, Wsr, p.grad(Wsr.dequantize())).applied());
    REQUIRE(rtn.step(b, Wrtn, p.grad(Wrtn.dequantize())).applied());
  }
  const float l_sr = p.loss(Wsr.dequantize()), l_rtn = p.loss(Wrtn.dequantize());
  MESSAGE("loss from ", start, ": stochastic rounding ", l_sr, ", round-to-nearest ", l_rtn);
  CHECK(l_rtn >= 0.97f * start);  // stalled
  CHECK(l_sr <= 0.5f * start);    // trains
}

TEST_CASE("Q-GaLore steps are reproducible from the rounder's seed") {
  const Regression p;
  auto a = make_qgalore(RoundingMode::Stochastic, 5), b = make_qgalore(RoundingMode::Stochastic, 5),
       c = make_qgalore(RoundingMode::Stochastic, 6);
  const LayerId la = a.add_layer({p.m, p.n}), lb = b.add_layer({p.m, p.n}), lc = c.add_layer({p.m, p.n});
  const MatrixF W0 = gaussian(p.m, p.n, 4);
  QuantizedWeight<8> Wa(W0), Wb(W0), Wc(W0);
  for (int t = 0; t < 5; ++t) {
    const MatrixF G = p.grad(Wa.dequantize());
    a.step(la, Wa, G);
    b.step(lb, Wb, G);
    c.step(lc, Wc, G);
  }
  CHECK(Wa.codes().codes == Wb.codes().codes);
  CHECK(Wa.codes().codes != Wc.codes().codes);
}

#if defined(_OPENMP)
TEST_CASE("an INT8 weight's panels give the same codes on one thread and on several") {
  // 700 x 512: six row panels of 128 rows (the last one short), spread over the
  // threads as whole panels, each in a buffer of its own.
  const Index m = 700, n = 512;
  const MatrixF W0 = gaussian(m, n, 11, 0.05f);
  const StochasticRounder<8> rounder(9);
  const int threads = omp_get_max_threads();
  auto run = [&](int nthreads) {
    omp_set_num_threads(nthreads);
    QuantizedWeight<8> W(W0);
    for (std::uint32_t t = 0; t < 3; ++t) {
      const auto update = requantize_with(W, rounder.bind(0, t));
      std::vector<float> panel(static_cast<std::size_t>(detail::panel_floats(update)));
      detail::update_in_float(update, panel.data(), [&](MatrixRef<float> rows, Index row0) {
        for (Index r = 0; r < rows.rows(); ++r)
          for (Index c = 0; c < n; ++c) rows(r, c) += 0.003f * std::sin(0.01f * static_cast<float>((row0 + r) * n + c + t));
      });
    }
    omp_set_num_threads(threads);
    return W;
  };
  const QuantizedWeight<8> one = run(1), several = run(std::max(threads, 3));
  CHECK(one.codes().codes == several.codes().codes);
  CHECK(one.codes().scales == several.codes().scales);
  CHECK(one.codes().zeros == several.codes().zeros);
  CHECK(one.codes().codes != QuantizedWeight<8>(W0).codes().codes);  // the updates moved the weight
}
#endif

TEST_CASE("Q-GaLore state bytes equal the formula: 8-bit moments, INT4 basis, lazy schedule") {
  auto opt = make_qgalore(RoundingMode::Stochastic);
  struct L { Shape s; };
  const Shape shapes[] = {{256, 128}, {128, 256}, {64, 64}};
  std::size_t expect = 0;
  for (Shape s : shapes) {
    const LayerId id = opt.add_layer(s);
    QuantizedWeight<8> W(gaussian(s.rows, s.cols, 1));
    opt.step(id, W, gaussian(s.rows, s.cols, 2));
    const bool right = s.rows >= s.cols;
    const Index lowrank = right ? s.rows * 16 : 16 * s.cols;  // moments' elements
    const Index basis = right ? 16 * s.cols : s.rows * 16;    // INT4 codes
    const std::size_t moments = lowrank >= 4096 ? std::size_t(2 * lowrank + 8 * ((lowrank + 255) / 256))
                                                : std::size_t(8 * lowrank);
    const std::size_t proj = std::size_t(basis / 2 + 5 * ((basis + 255) / 256));
    const std::size_t lazy = 4 * std::size_t((right ? s.cols : s.rows) + 5);  // first vector + queue
    expect += moments + proj + lazy;
  }
  CHECK(opt.state_bytes() == expect);
}

TEST_CASE("Q-GaLore facade errors") {
  auto opt = make_qgalore(RoundingMode::Stochastic);
  const LayerId id = opt.add_layer({64, 32});
  const LayerId d = opt.add_dense({1, 32});
  QuantizedWeight<8> W(gaussian(64, 32, 1)), V(gaussian(1, 32, 2)), other(gaussian(32, 64, 3));
  CHECK_THROWS_WITH_AS(opt.step(d, V, gaussian(1, 32, 4)), doctest::Contains("projected layers only"),
                       galore::invalid_argument);
  CHECK_THROWS_WITH_AS(opt.step(id, other, gaussian(32, 64, 4)), doctest::Contains("registered as 64x32"),
                       galore::invalid_argument);
  MatrixF G = gaussian(64, 32, 5);
  G(3, 3) = NAN;
  const auto before = W.codes().codes;
  CHECK(opt.step(id, W, G).status == StepStatus::SkippedNonFinite);
  CHECK(W.codes().codes == before);
}

TEST_CASE("a quantized weight rejects NaN and Inf, when built and when re-quantized, changing nothing") {
  for (float bad : {float(NAN), INFINITY, -INFINITY}) {
    CAPTURE(bad);
    MatrixF W = gaussian(8, 64, 1);
    W(5, 17) = bad;
    CHECK_THROWS_WITH_AS(QuantizedWeight<8>(W, 256), doctest::Contains("NaN or Inf"), galore::invalid_argument);
    CHECK_THROWS_WITH_AS(QuantizedWeight<4>(W, 64), doctest::Contains("(5, 17)"), galore::invalid_argument);

    QuantizedWeight<8> q(gaussian(8, 64, 2), 128);
    const auto before = q.codes();
    const StochasticRounder<8> rounder(3);
    MatrixF rows = gaussian(4, 64, 3);
    rows(2, 63) = bad;
    CHECK_THROWS_WITH_AS(q.quantize_rows(4, rows, rounder.bind(0, 1)), doctest::Contains("NaN or Inf"),
                         galore::invalid_argument);
    CHECK_THROWS_AS(q.quantize_rows(4, rows, quant::NearestEncoder<8>{}), galore::invalid_argument);
    CHECK(q.codes().codes == before.codes);
    CHECK(q.codes().scales == before.scales);
    CHECK(q.codes().zeros == before.zeros);
  }
}
