// SVD policies (exact, randomized, warm-started): the properties every policy
// must have, checked over all of them, and the drift-triggered refresh schedule.
#include <doctest/doctest.h>

#include <galore/galore.hpp>

#include "support/random.hpp"

using namespace galore;
using galore_test::decaying_spectrum;
using galore_test::gaussian;
using galore_test::orthonormal_columns;

namespace {

float orthonormality_error(const Basis& b) {
  float e = 0;
  if (b.side != Side::Right)
    e = std::max(e, (b.left.transpose() * b.left - MatrixF::Identity(b.left.cols(), b.left.cols())).cwiseAbs().maxCoeff());
  if (b.side != Side::Left)
    e = std::max(e, (b.right * b.right.transpose() - MatrixF::Identity(b.right.rows(), b.right.rows())).cwiseAbs().maxCoeff());
  return e;
}

// A gradient a few steps later: the same spectrum, singular vectors slightly rotated.
MatrixF drifted(const MatrixF& G, std::uint64_t seed, float amount) {
  return G + amount * G.norm() / std::sqrt(float(G.size())) * gaussian(G.rows(), G.cols(), seed) +
         amount * decaying_spectrum(G.rows(), G.cols(), seed + 1, 0.8f, 0.0f) * (G.norm() / 2.0f);
}

template <class Policy>
void check_policy(const Policy& policy, double min_energy) {
  for (Shape s : {Shape{120, 80}, Shape{80, 120}}) {
    for (Side side : {Side::Left, Side::Right, Side::Both}) {
      CAPTURE(s.rows);
      CAPTURE(to_string(side));
      const Index r = 10;
      const MatrixF G0 = decaying_spectrum(s.rows, s.cols, 21, 0.75f, 0.01f);
      const MatrixF G1 = drifted(G0, 40, 0.05f);
      Basis first, second;
      eigen::compute_basis(policy, G0, r, side, nullptr, first);
      const BasisView prev(first);
      eigen::compute_basis(policy, G1, r, side, &prev, second);
      for (const Basis* b : {&first, &second}) {
        CHECK(b->side == side);
        if (side != Side::Right) CHECK(b->left.rows() == s.rows);
        if (side != Side::Left) CHECK(b->right.cols() == s.cols);
        CHECK(b->rank() == r);
        CHECK(orthonormality_error(*b) < 2e-5f);
      }
      const double e0 = svd::captured_energy(G0, first), e1 = svd::captured_energy(G1, second);
      CHECK(e0 >= min_energy);
      CHECK(e1 >= min_energy);
      CHECK(e0 <= 1.0 + 1e-4);
      // Signs follow the previous basis: the first singular vectors point the same way.
      CHECK(first_singular_vector(BasisView(second)).dot(first_singular_vector(prev)) > 0.0f);
    }
  }
}

}  // namespace

TEST_CASE("every SVD policy returns an orthonormal, sign-continuous basis capturing the top-r energy") {
  SUBCASE("exact") { check_policy(svd::Exact{}, 1.0 - 1e-5); }
  SUBCASE("randomized") { check_policy(svd::Randomized{}, 0.999); }
  SUBCASE("warm start") { check_policy(svd::WarmStart{}, 0.99); }
}

TEST_CASE("warm start without Rayleigh-Ritz keeps the iterate: the same subspace, orthonormal, near the previous vectors") {
  const MatrixF G0 = decaying_spectrum(200, 150, 17, 0.85f, 0.02f);
  const MatrixF G1 = drifted(G0, 71, 0.1f);
  for (Side side : {Side::Right, Side::Left}) {
    Basis b0, with_rr, without_rr;
    eigen::compute_basis(svd::Exact{}, G0, 12, side, nullptr, b0);
    const BasisView prev(b0);
    svd::WarmStart iterate_only;
    iterate_only.rayleigh_ritz = false;
    eigen::compute_basis(svd::WarmStart{}, G1, 12, side, &prev, with_rr);
    eigen::compute_basis(iterate_only, G1, 12, side, &prev, without_rr);
    const MatrixF& A = side == Side::Right ? with_rr.right : with_rr.left;
    const MatrixF& B = side == Side::Right ? without_rr.right : without_rr.left;
    REQUIRE(B.rows() == A.rows());
    REQUIRE(B.cols() == A.cols());
    // Orthonormal, and the projector onto its span is Rayleigh-Ritz's.
    const MatrixF gram = side == Side::Right ? MatrixF(B * B.transpose()) : MatrixF(B.transpose() * B);
    CHECK((gram - MatrixF::Identity(12, 12)).norm() < 1e-4f);
    const MatrixF PA = side == Side::Right ? MatrixF(A.transpose() * A) : MatrixF(A * A.transpose());
    const MatrixF PB = side == Side::Right ? MatrixF(B.transpose() * B) : MatrixF(B * B.transpose());
    CHECK((PA - PB).norm() < 1e-4f);
    // The vectors stay near their predecessors, each oriented like it.
    const MatrixF& P0 = side == Side::Right ? b0.right : b0.left;
    float mean = 0.0f;
    for (Index i = 0; i < 12; ++i) {
      const float dot = side == Side::Right ? B.row(i).dot(P0.row(i)) : B.col(i).dot(P0.col(i));
      CHECK(dot > -1e-3f);
      mean += dot / 12.0f;
    }
    CHECK(mean > 0.5f);
  }
  // A two-sided projection always uses Rayleigh-Ritz.
  Basis b0, both_rr, both_iterate;
  eigen::compute_basis(svd::Exact{}, G0, 6, Side::Both, nullptr, b0);
  const BasisView prev(b0);
  svd::WarmStart iterate_only;
  iterate_only.rayleigh_ritz = false;
  eigen::compute_basis(svd::WarmStart{}, G1, 6, Side::Both, &prev, both_rr);
  eigen::compute_basis(iterate_only, G1, 6, Side::Both, &prev, both_iterate);
  CHECK(both_rr.left == both_iterate.left);
  CHECK(both_rr.right == both_iterate.right);
}

TEST_CASE("captured energy is 1 for the exact basis and falls for a stale one") {
  const MatrixF G = decaying_spectrum(100, 60, 3, 0.8f, 0.01f);
  Basis exact, stale;
  eigen::compute_basis(svd::Exact{}, G, 8, Side::Right, nullptr, exact);
  CHECK(svd::captured_energy(G, exact) == doctest::Approx(1.0).epsilon(1e-5));
  eigen::compute_basis(svd::Exact{}, decaying_spectrum(100, 60, 99, 0.8f, 0.01f), 8, Side::Right, nullptr, stale);
  CHECK(svd::captured_energy(G, stale) < 0.5);
}

TEST_CASE("warm start improves on the stale basis and randomized is reproducible") {
  const MatrixF G0 = decaying_spectrum(200, 150, 7, 0.85f, 0.02f);
  const MatrixF G1 = drifted(G0, 70, 0.1f);
  Basis b0, warm, r1, r2;
  eigen::compute_basis(svd::Exact{}, G0, 16, Side::Right, nullptr, b0);
  const BasisView prev(b0);
  eigen::compute_basis(svd::WarmStart{}, G1, 16, Side::Right, &prev, warm);
  const Eigen::VectorXf sv = svd::singular_values(G1);
  CHECK(svd::captured_energy(G1, BasisView(warm), sv) > svd::captured_energy(G1, prev, sv));
  eigen::compute_basis(svd::Randomized{}, G1, 16, Side::Right, nullptr, r1);
  eigen::compute_basis(svd::Randomized{}, G1, 16, Side::Right, nullptr, r2);
  CHECK(r1.right == r2.right);
}

namespace {

// Gradients whose subspace holds still for `stable` steps, then rotates.
struct RotatingGradients {
  Index m = 96, n = 64, r = 6;
  int stable = 300;
  float speed = 0.004f;
  MatrixF U0, V0, dU, dV;
  Eigen::VectorXf s;
  RotatingGradients() {
    U0 = orthonormal_columns(m, r, 1);
    V0 = orthonormal_columns(n, r, 2);
    dU = gaussian(m, r, 3);
    dV = gaussian(n, r, 4);
    s.resize(r);
    for (Index i = 0; i < r; ++i) s(i) = std::pow(0.8f, float(i));
  }
  MatrixF at(int t) const {
    const float a = t < stable ? 0.0f : speed * float(t - stable);
    MatrixF U = U0 + a * dU, V = V0 + a * dV;
    Eigen::HouseholderQR<Eigen::MatrixXf> qu(U), qv(V);
    U = Eigen::MatrixXf(qu.householderQ()).leftCols(r);
    V = Eigen::MatrixXf(qv.householderQ()).leftCols(r);
    return U * s.asDiagonal() * V.transpose() + gaussian(m, n, 1000 + t, 0.02f);
  }
};

template <class Schedule>
std::pair<std::int64_t, double> run_schedule(const RotatingGradients& g, Schedule schedule, int steps) {
  GaLoreOptimizer<Projector<svd::Exact, quant::None, Schedule>, LowRankAdam<>> opt(
      ProjectorOptions{g.r, ProjectionType::Std, 0.25f}, LowRankAdam<>(), schedule);
  const LayerId id = opt.add_layer({g.m, g.n});
  MatrixF W = MatrixF::Zero(g.m, g.n);
  double energy = 0;
  for (int t = 0; t < steps; ++t) {
    const MatrixF G = g.at(t);
    opt.step(id, W, G);
    BasisScratch scratch;
    energy += svd::captured_energy(G, opt.projector(id).basis(scratch));
  }
  return {opt.projector(id).svd_count(), energy / steps};
}

}  // namespace

TEST_CASE("the drift schedule refreshes less than a fixed gap and captures at least as much energy") {
  const RotatingGradients g;
  const int steps = 600;
  const auto fixed = run_schedule(g, schedule::FixedGap{50}, steps);
  const auto drift = run_schedule(g, schedule::Drift{5, 0.05, 5, 1000}, steps);
  MESSAGE("fixed gap 50: ", fixed.first, " SVDs, mean captured energy ", fixed.second, "; drift: ", drift.first,
          " SVDs, ", drift.second);
  CHECK(drift.first < fixed.first);
  CHECK(drift.second >= fixed.second);
}

TEST_CASE("drift schedule configuration errors") {
  CHECK_THROWS_AS((schedule::Drift{0, 0.1, 10, 100}.init()), galore::invalid_argument);
  CHECK_THROWS_AS((schedule::Drift{10, 1.5, 10, 100}.init()), galore::invalid_argument);
  CHECK_THROWS_AS((schedule::Drift{10, 0.1, 100, 10}.init()), galore::invalid_argument);
}

TEST_CASE("a drift-triggered refresh on a step that is then skipped changes nothing") {
  using Opt = GaLoreOptimizer<Projector<svd::Exact, quant::None, schedule::Drift>, LowRankAdam<>>;
  auto make = [] { return Opt({4, ProjectionType::Std, 0.25f}, LowRankAdam<>(), schedule::Drift{1, 0.1, 1, 1000}); };
  Opt clean = make(), dirty = make();
  const LayerId a = clean.add_layer({30, 20}), b = dirty.add_layer({30, 20});
  MatrixF Wa = gaussian(30, 20, 1), Wb = Wa;
  const MatrixF G0 = decaying_spectrum(30, 20, 5, 0.7f, 0.001f);
  for (int t = 0; t < 5; ++t) {
    const MatrixF G = drifted(G0, 100 + t, 0.01f);
    if (t == 2) {
      // 1e22 along a direction the basis does not see: the old basis projects it
      // to rounding noise (R stays in range) but the captured energy collapses, so
      // the schedule asks for a refresh, whose basis sees it: R out of range, skip.
      BasisScratch s;
      const MatrixF P = *dirty.projector(b).basis(s).right;  // 4 x 20
      Eigen::VectorXd v = gaussian(20, 1, 9).cast<double>();
      const Eigen::MatrixXd Pd = P.cast<double>();
      for (int k = 0; k < 2; ++k) v -= Pd.transpose() * (Pd * v);
      v.normalize();
      MatrixF Gbad = G;
      Gbad.row(0) += 1e22f * v.cast<float>().transpose();
      const auto state = dirty.projector(b).schedule_state();
      const MatrixF Wbefore = Wb;
      const StepResult r = dirty.step(b, Wb, Gbad);
      CHECK(r.status == StepStatus::SkippedNonFinite);
      CHECK_FALSE(r.refreshed);
      CHECK(Wb == Wbefore);
      const auto& now = dirty.projector(b).schedule_state();
      CHECK(dirty.projector(b).svd_count() == 1);
      CHECK(now.last_refresh == state.last_refresh);
      CHECK(now.baseline == state.baseline);
      CHECK(now.last_captured == state.last_captured);
      CHECK(*dirty.projector(b).basis(s).right == P);
    }
    REQUIRE(clean.step(a, Wa, G).applied());
    REQUIRE(dirty.step(b, Wb, G).applied());
    CHECK(Wa == Wb);
  }
}
