// GaLoreOptimizer, the per-layer facade: reduction to AdamW at full rank, bf16
// weights, non-finite gradients, memory, and every error path.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <galore/galore.hpp>
#include <limits>
#include <numeric>
#include <random>

#include "support/random.hpp"

using namespace galore;
using galore_test::decaying_spectrum;
using galore_test::gaussian;

namespace {

AdamConfig adam_lr(double lr, double wd = 0.0) {
  AdamConfig c;
  c.lr = lr;
  c.weight_decay = wd;
  return c;
}

// Gradients whose singular vectors are signed coordinate axes in a fixed
// (permuted) order: the SVD basis is then a permutation, canonically positive,
// and GaLore at full rank must equal AdamW element for element.
std::vector<MatrixF> permuted_diagonal_gradients(Index m, Index n, int steps, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<Index> rows(m), cols(n);
  std::iota(rows.begin(), rows.end(), 0);
  std::iota(cols.begin(), cols.end(), 0);
  std::shuffle(rows.begin(), rows.end(), gen);
  std::shuffle(cols.begin(), cols.end(), gen);
  std::uniform_real_distribution<float> jitter(0.9f, 1.1f);
  std::bernoulli_distribution sign;
  std::vector<MatrixF> out;
  const Index k = std::min(m, n);
  for (int t = 0; t < steps; ++t) {
    MatrixF G = MatrixF::Zero(m, n);
    // Distinct, well separated magnitudes keep the order of singular values fixed.
    for (Index i = 0; i < k; ++i)
      G(rows[i], cols[i]) = (sign(gen) ? 1.0f : -1.0f) * float(k - i) * jitter(gen);
    out.push_back(G);
  }
  return out;
}

}  // namespace

TEST_CASE("GaLore at full rank with scale 1 reduces to plain AdamW") {
  for (ProjectionType type : {ProjectionType::Std, ProjectionType::Left, ProjectionType::Right,
                              ProjectionType::Full}) {
    CAPTURE(to_string(type));
    const Index m = 12, n = 8;
    const auto grads = permuted_diagonal_gradients(m, n, 9, 3);
    GaLoreAdamW opt({std::min(m, n), type, 1.0f}, LowRankAdam<>(adam_lr(0.05, 0.1)),
                    schedule::FixedGap{4});
    if (type == ProjectionType::Left || type == ProjectionType::Full) {
      // Left and two-sided projections need rank = m to span every row: use a square problem.
      continue;
    }
    const LayerId g = opt.add_layer({m, n});
    const LayerId d = opt.add_dense({m, n});
    MatrixF Wg = gaussian(m, n, 7), Wd = Wg;
    for (const MatrixF& G : grads) {
      opt.step(g, Wg, G);
      opt.step(d, Wd, G);
      CHECK((Wg - Wd).cwiseAbs().maxCoeff() <= 1e-6f);
    }
  }
  // Square: every type reaches full rank on both sides.
  for (ProjectionType type : {ProjectionType::Left, ProjectionType::Full, ProjectionType::ReverseStd}) {
    CAPTURE(to_string(type));
    const Index m = 10;
    const auto grads = permuted_diagonal_gradients(m, m, 9, 4);
    GaLoreAdamW opt({m, type, 1.0f}, LowRankAdam<>(adam_lr(0.05)), schedule::FixedGap{4});
    const LayerId g = opt.add_layer({m, m});
    const LayerId d = opt.add_dense({m, m});
    MatrixF Wg = gaussian(m, m, 8), Wd = Wg;
    for (const MatrixF& G : grads) {
      opt.step(g, Wg, G);
      opt.step(d, Wd, G);
      CHECK((Wg - Wd).cwiseAbs().maxCoeff() <= 1e-6f);
    }
  }
}

TEST_CASE("bf16 weights stay within bf16 rounding of the float32 run") {
  for (ProjectionType type : {ProjectionType::Std, ProjectionType::ReverseStd, ProjectionType::Full}) {
    CAPTURE(to_string(type));
    const Index m = 300, n = 200;  // several row panels in bf16
    GaLoreAdamW f({8, type, 0.25f}, LowRankAdam<>(adam_lr(0.01, 0.01)), schedule::FixedGap{3});
    GaLoreAdamW b({8, type, 0.25f}, LowRankAdam<>(adam_lr(0.01, 0.01)), schedule::FixedGap{3});
    const LayerId lf = f.add_layer({m, n}), lb = b.add_layer({m, n});
    const LayerId df = f.add_dense({1, n}), db = b.add_dense({1, n});
    // Both runs start from and see the same bf16-representable values.
    Matrix<bfloat16> Wb = gaussian(m, n, 1).cast<bfloat16>();
    MatrixF Wf = Wb.cast<float>();
    Matrix<bfloat16> vb = gaussian(1, n, 2).cast<bfloat16>();
    MatrixF vf = vb.cast<float>();
    MatrixF Wmax = Wf.cwiseAbs(), vmax = vf.cwiseAbs();
    for (int t = 1; t <= 7; ++t) {
      const Matrix<bfloat16> Gb = decaying_spectrum(m, n, 10 + t).cast<bfloat16>();
      const Matrix<bfloat16> gb = gaussian(1, n, 50 + t).cast<bfloat16>();
      REQUIRE(f.step(lf, Wf, Gb.cast<float>()).applied());
      REQUIRE(b.step(lb, Wb, Gb).applied());
      f.step(df, vf, gb.cast<float>());
      b.step(db, vb, gb);
      // Each bf16 store rounds by at most half an ulp (2^-8 relative to the value
      // stored then): after t stores the gap is at most t * 2^-8 * max_k |W_k|.
      Wmax = Wmax.cwiseMax(Wf.cwiseAbs());
      vmax = vmax.cwiseMax(vf.cwiseAbs());
      const auto bound = [t](const MatrixF& ref) {
        return (ref.array() * (t * std::ldexp(1.0f, -8)) + 1e-7f).eval();
      };
      CHECK(((Wb.cast<float>() - Wf).array().abs() <= bound(Wmax)).all());
      CHECK(((vb.cast<float>() - vf).array().abs() <= bound(vmax)).all());
    }
  }
}

TEST_CASE("a non-finite gradient skips the step and leaves everything untouched") {
  const float bad_values[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
  for (float bad : bad_values) {
    for (int bad_step : {0, 1, 3}) {  // 0 and 3 are refresh steps (gap 3), 1 is not
      CAPTURE(bad);
      CAPTURE(bad_step);
      GaLoreAdamW clean({4, ProjectionType::Std, 0.25f}, LowRankAdam<>(adam_lr(0.01)), schedule::FixedGap{3});
      GaLoreAdamW dirty({4, ProjectionType::Std, 0.25f}, LowRankAdam<>(adam_lr(0.01)), schedule::FixedGap{3});
      const LayerId a = clean.add_layer({20, 12}), b = dirty.add_layer({20, 12});
      const LayerId da = clean.add_dense({1, 12}), db = dirty.add_dense({1, 12});
      MatrixF Wa = gaussian(20, 12, 1), Wb = Wa, va = gaussian(1, 12, 2), vb = va;
      for (int t = 0; t < 6; ++t) {
        const MatrixF G = decaying_spectrum(20, 12, 30 + t);
        const MatrixF g = gaussian(1, 12, 60 + t);
        if (t == bad_step) {
          MatrixF Gbad = G, gbad = g;
          Gbad(5, 7) = bad;
          gbad(0, 3) = bad;
          const MatrixF Wbefore = Wb, vbefore = vb;
          const auto stats_before = dirty.stats(b);
          const StepResult r = dirty.step(b, Wb, Gbad);
          CHECK(r.status == StepStatus::SkippedNonFinite);
          CHECK_FALSE(dirty.step(db, vb, gbad).applied());
          CHECK(Wb == Wbefore);
          CHECK(vb == vbefore);
          CHECK(dirty.stats(b).steps == stats_before.steps);
          CHECK(dirty.stats(b).svd_count == stats_before.svd_count);
          CHECK(dirty.stats(b).skipped_steps == 1);
          CHECK(dirty.stats(db).skipped_steps == 1);
        }
        // Afterwards the dirty run is the clean run: nothing of the bad step remains.
        clean.step(a, Wa, G);
        dirty.step(b, Wb, G);
        clean.step(da, va, g);
        dirty.step(db, vb, g);
        CHECK(Wa == Wb);
        CHECK(va == vb);
      }
    }
  }
}

TEST_CASE("a zero gradient does not produce NaN") {
  for (ProjectionType type : {ProjectionType::Std, ProjectionType::Full}) {
    GaLoreAdamW opt({3, type, 0.25f});
    const LayerId id = opt.add_layer({10, 6});
    const LayerId d = opt.add_dense({1, 6});
    MatrixF W = gaussian(10, 6, 1);
    const MatrixF W0 = W;
    MatrixF v = MatrixF::Ones(1, 6);
    for (int t = 0; t < 3; ++t) {
      CHECK(opt.step(id, W, MatrixF::Zero(10, 6)).applied());
      CHECK(opt.step(d, v, MatrixF::Zero(1, 6)).applied());
    }
    CHECK(W.allFinite());
    CHECK(W == W0);
    CHECK(v == MatrixF::Ones(1, 6));
  }
}

TEST_CASE("reported state bytes equal the formula") {
  struct L { Shape s; bool projected; Index rank; };
  const L layers[] = {{{64, 32}, true, 8}, {{32, 64}, true, 8}, {{48, 48}, true, 16}, {{1, 64}, false, 0},
                      {{100, 20}, true, 4}};
  GaLoreAdamW opt({8, ProjectionType::Std, 0.25f});
  std::vector<LayerId> ids;
  std::size_t expect = 0;
  for (const L& l : layers) {
    if (!l.projected) {
      ids.push_back(opt.add_dense(l.s));
      expect += 2 * 4 * l.s.size();  // m and v in float32
      continue;
    }
    ids.push_back(opt.add_layer(l.s, ProjectorOptions{l.rank, ProjectionType::Std, 0.25f}));
    const bool right = l.s.rows >= l.s.cols;
    const Index lowrank = right ? l.s.rows * l.rank : l.rank * l.s.cols;
    const Index basis = right ? l.rank * l.s.cols : l.s.rows * l.rank;
    expect += 2 * 4 * lowrank + 4 * basis;  // moments at rank r + P
  }
  // The moments exist from registration; the bases from each layer's first step.
  std::size_t before = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) before += opt.stats(ids[i]).state_bytes;
  CHECK(opt.state_bytes() == before);
  for (std::size_t i = 0; i < ids.size(); ++i) {
    MatrixF W = gaussian(layers[i].s.rows, layers[i].s.cols, i);
    opt.step(ids[i], W, gaussian(layers[i].s.rows, layers[i].s.cols, 10 + i));
  }
  CHECK(opt.state_bytes() == expect);
}

TEST_CASE("raw buffers and Eigen views give the same step") {
  GaLoreAdamW a({4, ProjectionType::Std, 0.25f}), b({4, ProjectionType::Std, 0.25f});
  const LayerId la = a.add_layer({16, 12}), lb = b.add_layer({16, 12});
  MatrixF Wa = gaussian(16, 12, 1);
  std::vector<float> Wb(Wa.data(), Wa.data() + Wa.size());
  for (int t = 0; t < 3; ++t) {
    const MatrixF G = gaussian(16, 12, 5 + t);
    a.step(la, Wa, G);
    b.step(lb, Wb.data(), G.data());
  }
  CHECK(Eigen::Map<MatrixF>(Wb.data(), 16, 12) == Wa);
}

TEST_CASE("per-layer rank override and learning-rate changes") {
  GaLoreAdamW opt({8, ProjectionType::Std, 0.25f}, LowRankAdam<>(adam_lr(0.01)));
  const LayerId id = opt.add_layer({40, 20}, ProjectorOptions{3, ProjectionType::Left, 0.5f});
  CHECK(opt.projector(id).rank() == 3);
  CHECK(opt.projector(id).side() == Side::Left);
  opt.set_lr(0.02);
  CHECK(opt.adam_config().lr == 0.02);
  CHECK_THROWS_AS(opt.set_lr(-1.0), galore::invalid_argument);
  CHECK(opt.adam_config().lr == 0.02);
}

TEST_CASE("facade errors say what to fix and change nothing") {
  GaLoreAdamW opt({4, ProjectionType::Std, 0.25f});
  const LayerId id = opt.add_layer({20, 10}, "blocks.0.wq");
  const LayerId d = opt.add_dense({1, 10}, "blocks.0.norm");
  MatrixF W = gaussian(20, 10, 1), G = gaussian(20, 10, 2);
  opt.step(id, W, G);
  const MatrixF W1 = W;

  // A layer that changes shape between steps.
  MatrixF W2 = gaussian(20, 11, 3), G2 = gaussian(20, 11, 4);
  CHECK_THROWS_WITH_AS(opt.step(id, W2, G2), doctest::Contains("'blocks.0.wq' was registered as 20x10"),
                       galore::invalid_argument);
  // W and G of different shapes.
  CHECK_THROWS_WITH_AS(opt.step(id, W, gaussian(10, 20, 5)), doctest::Contains("G 10x20"),
                       galore::invalid_argument);
  CHECK_THROWS_AS(opt.step(d, W, G), galore::invalid_argument);
  CHECK(W == W1);
  CHECK(opt.stats(id).steps == 1);

  CHECK_THROWS_WITH_AS(opt.add_layer({20, 10}, ProjectorOptions{11, ProjectionType::Std, 0.25f}),
                       doctest::Contains("rank 11 is out of range"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(opt.add_layer({0, 10}), doctest::Contains("positive shape"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(opt.step(LayerId{99}, W, G), doctest::Contains("unknown layer id 99"),
                       galore::invalid_argument);
  CHECK_THROWS_WITH_AS(opt.step(id, static_cast<float*>(nullptr), G.data()), doctest::Contains("null"),
                       galore::invalid_argument);
  CHECK_THROWS_WITH_AS(opt.projector(d), doctest::Contains("dense"), galore::invalid_argument);
  CHECK_THROWS_AS(GaLoreAdamW({0, ProjectionType::Std, 0.25f}), galore::invalid_argument);
  CHECK_THROWS_AS(GaLoreAdamW({4, ProjectionType::Std, 0.25f}, LowRankAdam<>(), schedule::FixedGap{-3}),
                  galore::invalid_argument);
}

// ---- Hostile input: finite gradients the float32 math cannot hold, bad settings ----

namespace {

// Every stored value of a layer's moments, to compare before and after a skipped step.
std::vector<double> snapshot(const state::Float32::Moments& mo) {
  std::vector<double> out(mo.m.data(), mo.m.data() + mo.m.size());
  out.insert(out.end(), mo.v.data(), mo.v.data() + mo.v.size());
  return out;
}
std::vector<double> snapshot(const state::BFloat16::Moments& mo) {
  std::vector<double> out;
  for (Index i = 0; i < mo.m.size(); ++i) out.push_back(static_cast<float>(mo.m(i)));
  for (Index i = 0; i < mo.v.size(); ++i) out.push_back(static_cast<float>(mo.v(i)));
  return out;
}
std::vector<double> snapshot(const state::Blockwise8bit::Moments& mo) {
  std::vector<double> out(mo.m_code.begin(), mo.m_code.end());
  out.insert(out.end(), mo.v_code.begin(), mo.v_code.end());
  for (const auto* v : {&mo.m_absmax, &mo.v_absmax, &mo.m32, &mo.v32}) out.insert(out.end(), v->begin(), v->end());
  return out;
}
bool all_finite(const std::vector<double>& v) {
  for (double x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

// One huge but finite gradient element, on a refresh step and on a plain step, on a
// projected and on a dense layer: the step is skipped with nothing changed, and the
// run then continues exactly as one that never saw it, with finite weights and moments.
template <class Opt>
void check_huge_gradient_is_skipped(const std::function<Opt()>& make, float huge) {
  const Index m = 128, n = 64;  // at rank 32 the moments hold 4096 elements: 8-bit states quantize
  for (bool dense : {false, true}) {
    for (int bad_step : {1, 3}) {  // gap 3: step 3 refreshes the basis, step 1 does not
      CAPTURE(huge);
      CAPTURE(dense);
      CAPTURE(bad_step);
      Opt clean = make(), dirty = make();
      const LayerId a = dense ? clean.add_dense({m, n}) : clean.add_layer({m, n});
      const LayerId b = dense ? dirty.add_dense({m, n}) : dirty.add_layer({m, n});
      MatrixF Wa = gaussian(m, n, 1), Wb = Wa;
      for (int t = 0; t < 6; ++t) {
        const MatrixF G = decaying_spectrum(m, n, 30 + t);
        if (t == bad_step) {
          MatrixF Gbad = G;
          Gbad(2, 3) = huge;
          const MatrixF Wbefore = Wb;
          const auto moments_before = snapshot(dirty.moments(b));
          const LayerStats before = dirty.stats(b);
          const StepResult r = dirty.step(b, Wb, Gbad);
          CHECK(r.status == StepStatus::SkippedNonFinite);
          CHECK_FALSE(r.refreshed);
          CHECK(Wb == Wbefore);
          CHECK(snapshot(dirty.moments(b)) == moments_before);
          CHECK(dirty.stats(b).steps == before.steps);
          CHECK(dirty.stats(b).svd_count == before.svd_count);
          CHECK(dirty.stats(b).skipped_steps == 1);
        }
        REQUIRE(clean.step(a, Wa, G).applied());
        REQUIRE(dirty.step(b, Wb, G).applied());
        CHECK(Wb.allFinite());
        CHECK(all_finite(snapshot(dirty.moments(b))));
        CHECK(Wa == Wb);
      }
    }
  }
}

}  // namespace

TEST_CASE("a finite gradient whose moments would overflow float32 skips the step and changes nothing") {
  const ProjectorOptions proj{32, ProjectionType::Std, 0.25f};
  SUBCASE("float32 moments") {
    for (float huge : {1e20f, 1e30f})
      check_huge_gradient_is_skipped<GaLoreAdamW>(
          [&] { return GaLoreAdamW(proj, LowRankAdam<>(adam_lr(0.01)), schedule::FixedGap{3}); }, huge);
  }
  SUBCASE("bf16 moments") {
    using Opt = GaLoreOptimizer<Projector<>, LowRankAdam<state::BFloat16>>;
    for (float huge : {1e20f, 1e30f})
      check_huge_gradient_is_skipped<Opt>(
          [&] { return Opt(proj, LowRankAdam<state::BFloat16>(adam_lr(0.01)), schedule::FixedGap{3}); }, huge);
  }
  SUBCASE("8-bit moments") {
    for (float huge : {1e20f, 1e30f})
      check_huge_gradient_is_skipped<GaLoreAdamW8bit>(
          [&] {
            return GaLoreAdamW8bit(proj, LowRankAdam<state::Blockwise8bit>(adam_lr(0.01)), schedule::FixedGap{3});
          },
          huge);
  }
}

TEST_CASE("an update too large for float32 is clamped, never Inf or NaN") {
  // v underflows to 0 for a 1e-25 gradient, so d = step * m / eps: with lr 1e36
  // and eps 1e-30 that is about 3e39, beyond float32.
  AdamConfig c = adam_lr(1e36);
  c.eps = 1e-30;
  GaLoreAdamW opt({4, ProjectionType::Std, 0.25f}, LowRankAdam<>(c), schedule::FixedGap{3});
  const LayerId d = opt.add_dense({4, 8});
  const LayerId p = opt.add_layer({16, 8});
  MatrixF Wd = gaussian(4, 8, 1), Wp = gaussian(16, 8, 2);
  MatrixF gd = MatrixF::Zero(4, 8);
  gd(1, 2) = 1e-25f;
  const MatrixF gp = decaying_spectrum(16, 8, 3) * 1e-25f;
  for (int t = 0; t < 3; ++t) {
    CHECK(opt.step(d, Wd, gd).applied());
    CHECK(opt.step(p, Wp, gp).applied());
    CHECK(Wd.allFinite());
    CHECK(Wp.allFinite());
    CHECK(all_finite(snapshot(opt.moments(d))));
  }
}

TEST_CASE("a skipped refresh step leaves the projector untouched (fixed gap)") {
  // 3e38 is finite, but G P^T overflows: the step must not adopt the new basis.
  GaLoreAdamW clean({4, ProjectionType::Std, 0.25f}, LowRankAdam<>(adam_lr(0.01)), schedule::FixedGap{3});
  GaLoreAdamW dirty({4, ProjectionType::Std, 0.25f}, LowRankAdam<>(adam_lr(0.01)), schedule::FixedGap{3});
  const LayerId a = clean.add_layer({20, 12}), b = dirty.add_layer({20, 12});
  MatrixF Wa = gaussian(20, 12, 1), Wb = Wa;
  for (int t = 0; t < 7; ++t) {
    const MatrixF G = decaying_spectrum(20, 12, 40 + t);
    if (t == 3) {
      MatrixF Gbad = G;
      Gbad(4, 5) = 3e38f;
      const MatrixF basis_before = dirty.projector(b).right_storage().matrix;
      const std::int64_t svds = dirty.projector(b).svd_count();
      const StepResult r = dirty.step(b, Wb, Gbad);
      CHECK(r.status == StepStatus::SkippedNonFinite);
      CHECK_FALSE(r.refreshed);
      CHECK(dirty.projector(b).svd_count() == svds);
      CHECK(dirty.projector(b).right_storage().matrix == basis_before);
    }
    clean.step(a, Wa, G);
    dirty.step(b, Wb, G);
    CHECK(Wa == Wb);
  }
}

TEST_CASE("a skipped refresh step leaves the projector untouched (lazy schedule, INT4 basis)") {
  auto make = [] {
    return QGaLoreAdamW8bit({4, ProjectionType::Std, 0.25f}, LowRankAdam<state::Blockwise8bit>(adam_lr(0.01)),
                            schedule::Lazy{2, 0.0, 2.0, 2}, svd::Exact{}, quant::Int4{16}, StochasticRounder<8>(5));
  };
  QGaLoreAdamW8bit clean = make(), dirty = make();
  const LayerId a = clean.add_layer({20, 12}), b = dirty.add_layer({20, 12});
  MatrixF Wa = gaussian(20, 12, 1), Wb = Wa;
  for (int t = 0; t < 9; ++t) {
    const MatrixF G = decaying_spectrum(20, 12, 50 + t, 0.8f, 0.001f);
    if (t == 4) {  // a refresh with a previous vector and a cosine in the queue
      MatrixF Gbad = G;
      Gbad(4, 5) = 3e38f;
      const auto& p = dirty.projector(b);
      REQUIRE(p.refresh_due(dirty.steps(b)));
      REQUIRE(p.schedule_state().queue.size() == 1);
      const auto state = p.schedule_state();
      const auto codes = p.right_storage().codes;
      const auto scales = p.right_storage().scales;
      const std::int64_t svds = p.svd_count();
      const StepResult r = dirty.step(b, Wb, Gbad);
      CHECK(r.status == StepStatus::SkippedNonFinite);
      CHECK(p.svd_count() == svds);
      CHECK(p.update_gap() == state.gap);
      CHECK(p.schedule_state().queue == state.queue);
      CHECK(p.schedule_state().past == state.past);
      CHECK(p.schedule_state().last_cosine == state.last_cosine);
      CHECK(p.right_storage().codes == codes);
      CHECK(p.right_storage().scales == scales);
    }
    clean.step(a, Wa, G);
    dirty.step(b, Wb, G);
    CHECK(Wa == Wb);
    CHECK(clean.stats(a).update_gap == dirty.stats(b).update_gap);
  }
}

TEST_CASE("the lazy schedule's gap saturates instead of overflowing") {
  // cos_threshold -1 and a full queue of one: every refresh after the first grows the gap by 1e300.
  QGaLoreAdamW8bit opt({4, ProjectionType::Std, 0.25f}, LowRankAdam<state::Blockwise8bit>(adam_lr(0.01)),
                       schedule::Lazy{1, -1, 1e300, 1}, svd::Exact{}, quant::Int4{16}, StochasticRounder<8>(5));
  const LayerId id = opt.add_layer({20, 12});
  MatrixF W = gaussian(20, 12, 1);
  for (int t = 0; t < 4; ++t) {
    CHECK(opt.step(id, W, decaying_spectrum(20, 12, 60 + t)).applied());
    CHECK(opt.stats(id).update_gap >= 1);
  }
  CHECK(opt.stats(id).update_gap == std::numeric_limits<std::int64_t>::max());
  CHECK(opt.stats(id).svd_count == 2);
  CHECK(W.allFinite());
}

TEST_CASE("bad settings are rejected where they are given, before any state exists") {
  const ProjectorOptions ok{4, ProjectionType::Std, 0.25f};
  // Projection options: at the optimizer's constructor, not at the first add_layer.
  CHECK_THROWS_WITH_AS(GaLoreAdamW({4, static_cast<ProjectionType>(99), 0.25f}),
                       doctest::Contains("unknown projection type"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(GaLoreAdamW({4, ProjectionType::Std, NAN}), doctest::Contains("scale"),
                       galore::invalid_argument);
  CHECK_THROWS_AS(GaLoreAdamW({4, ProjectionType::Std, INFINITY}), galore::invalid_argument);
  CHECK_THROWS_AS(GaLoreAdamW({4, ProjectionType::Std, -0.25f}), galore::invalid_argument);
  CHECK_THROWS_AS(GaLoreAdamW({4, ProjectionType::Std, 0.0f}), galore::invalid_argument);
  GaLoreAdamW opt(ok);
  CHECK_THROWS_AS(opt.add_layer({20, 10}, ProjectorOptions{4, static_cast<ProjectionType>(99), 0.25f}),
                  galore::invalid_argument);
  CHECK(opt.num_layers() == 0);
  // SVD policy options.
  using RandomizedOpt = GaLoreOptimizer<Projector<svd::Randomized>, LowRankAdam<>>;
  using WarmOpt = GaLoreOptimizer<Projector<svd::WarmStart>, LowRankAdam<>>;
  CHECK_THROWS_WITH_AS(RandomizedOpt(ok, LowRankAdam<>(), schedule::FixedGap{}, svd::Randomized{-1, 2}),
                       doctest::Contains("oversampl"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(RandomizedOpt(ok, LowRankAdam<>(), schedule::FixedGap{}, svd::Randomized{16, -1}),
                       doctest::Contains("power iterations"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(WarmOpt(ok, LowRankAdam<>(), schedule::FixedGap{}, svd::WarmStart{0}),
                       doctest::Contains("iterations"), galore::invalid_argument);
  CHECK_THROWS_AS(WarmOpt(ok, LowRankAdam<>(), schedule::FixedGap{}, svd::WarmStart{1, svd::Randomized{-4, 2}}),
                  galore::invalid_argument);
  // The lazy schedule's cosine threshold is a mean cosine: in [-1, 1].
  CHECK_THROWS_AS((schedule::Lazy{10, 1.5, 2, 5}.init()), galore::invalid_argument);
  CHECK_THROWS_AS((schedule::Lazy{10, NAN, 2, 5}.init()), galore::invalid_argument);
  CHECK_THROWS_AS((schedule::Lazy{10, 0.4, INFINITY, 5}.init()), galore::invalid_argument);
  // The 8-bit state's block size: when the Adam policy is built, not at add_layer.
  CHECK_THROWS_WITH_AS(LowRankAdam<state::Blockwise8bit>(AdamConfig{}, state::Blockwise8bit{0}),
                       doctest::Contains("block size"), galore::invalid_argument);
}

TEST_CASE("a step that throws changes nothing, even on a refresh step") {
  Projector<> p({20, 12}, {4, ProjectionType::Std, 0.25f}, schedule::FixedGap{3});
  LowRankAdam<> adam;
  auto wrong = adam.init({5, 5});  // not the projector's low-rank shape (20 x 4)
  std::int64_t step = 0;
  MatrixF W = gaussian(20, 12, 1);
  const MatrixF W0 = W, G = gaussian(20, 12, 2);
  CHECK_THROWS_AS(galore_step(p, adam, wrong, step, MatrixRef<float>(W), ConstMatrixRef<float>(G)),
                  galore::invalid_argument);
  CHECK_FALSE(p.has_basis());
  CHECK(p.svd_count() == 0);
  CHECK(step == 0);
  CHECK(W == W0);
  // A weight of another shape: refused before the SVD.
  MatrixF Wwrong = gaussian(12, 20, 3);
  auto right = adam.init(p.low_rank_shape());
  CHECK_THROWS_AS(galore_step(p, adam, right, step, MatrixRef<float>(Wwrong), ConstMatrixRef<float>(G)),
                  galore::invalid_argument);
  CHECK(p.svd_count() == 0);
  CHECK(step == 0);
}
