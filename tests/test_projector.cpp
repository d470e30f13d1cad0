// Projector<SVDPolicy, QuantPolicy, SchedulePolicy>: side choice, orthonormal
// bases, idempotent projection, refresh schedule, memory, and its errors.
#include <doctest/doctest.h>

#include <Eigen/SVD>
#include <galore/galore.hpp>
#include <stdexcept>

#include "support/random.hpp"

using namespace galore;
using galore_test::decaying_spectrum;
using galore_test::gaussian;

namespace {

const ProjectionType kAllTypes[] = {ProjectionType::Std, ProjectionType::ReverseStd,
                                    ProjectionType::Left, ProjectionType::Right,
                                    ProjectionType::Full};
const Shape kShapes[] = {{40, 24}, {24, 40}, {32, 32}};

float orthonormality_error(const BasisView& b) {
  float e = 0.0f;
  if (b.side != Side::Right) {
    const Index r = b.left->cols();
    e = std::max(e, (b.left->transpose() * *b.left - MatrixF::Identity(r, r)).cwiseAbs().maxCoeff());
  }
  if (b.side != Side::Left) {
    const Index r = b.right->rows();
    e = std::max(e, (*b.right * b.right->transpose() - MatrixF::Identity(r, r)).cwiseAbs().maxCoeff());
  }
  return e;
}

}  // namespace

TEST_CASE("resolve_side follows galore_torch for every type and shape") {
  CHECK(resolve_side(ProjectionType::Std, 40, 24) == Side::Right);
  CHECK(resolve_side(ProjectionType::Std, 24, 40) == Side::Left);
  CHECK(resolve_side(ProjectionType::Std, 32, 32) == Side::Right);
  CHECK(resolve_side(ProjectionType::ReverseStd, 40, 24) == Side::Left);
  CHECK(resolve_side(ProjectionType::ReverseStd, 24, 40) == Side::Right);
  CHECK(resolve_side(ProjectionType::ReverseStd, 32, 32) == Side::Left);
  CHECK(resolve_side(ProjectionType::Left, 40, 24) == Side::Left);
  CHECK(resolve_side(ProjectionType::Right, 24, 40) == Side::Right);
  CHECK(resolve_side(ProjectionType::Full, 24, 40) == Side::Both);
  for (auto t : kAllTypes) CHECK(parse_projection_type(to_string(t)) == t);
}

TEST_CASE("every projection type gives an orthonormal, canonically signed basis and an idempotent projection") {
  for (auto type : kAllTypes) {
    for (Shape s : kShapes) {
      CAPTURE(to_string(type));
      CAPTURE(s.rows);
      CAPTURE(s.cols);
      const Index rank = 6;
      Projector<> p(s, {rank, type, 0.25f});
      const MatrixF G = decaying_spectrum(s.rows, s.cols, 11);
      MatrixF R;
      p.project(G, 0, R);
      const Shape lr = p.low_rank_shape();
      CHECK(R.rows() == lr.rows);
      CHECK(R.cols() == lr.cols);

      BasisScratch scratch;
      const BasisView b = p.basis(scratch);
      CHECK(orthonormality_error(b) < 1e-5f);
      // Canonical signs: the largest-magnitude entry of every singular vector is positive.
      if (b.side != Side::Right)
        for (Index j = 0; j < rank; ++j) {
          Index i;
          b.left->col(j).cwiseAbs().maxCoeff(&i);
          CHECK((*b.left)(i, j) > 0.0f);
        }
      if (b.side != Side::Left)
        for (Index j = 0; j < rank; ++j) {
          Index i;
          b.right->row(j).cwiseAbs().maxCoeff(&i);
          CHECK((*b.right)(j, i) > 0.0f);
        }

      // Pi(G) = back(project(G)) / scale is an orthogonal projection: Pi(Pi(G)) = Pi(G).
      MatrixF once, twice, R2;
      p.project_back(R, once);
      once /= p.scale();
      p.project(once, R2);
      p.project_back(R2, twice);
      twice /= p.scale();
      CHECK((twice - once).norm() <= 1e-5f * once.norm());
      // ...and it keeps exactly the top-r energy of G (singular values from JacobiSVD).
      Eigen::JacobiSVD<Eigen::MatrixXf> ref(G);
      const auto sv = ref.singularValues();
      // (Two-sided: P P^T G Q^T Q keeps the same top-r block of the spectrum.)
      CHECK(once.squaredNorm() == doctest::Approx(sv.head(rank).squaredNorm()).epsilon(1e-4));
    }
  }
}

TEST_CASE("the fixed schedule refreshes at step 0 and every gap steps, and counts SVDs") {
  Projector<> p({30, 20}, {4, ProjectionType::Std, 0.25f}, schedule::FixedGap{3});
  MatrixF R;
  int refreshes = 0;
  for (std::int64_t step = 0; step < 10; ++step) {
    const bool due = p.refresh_due(step);
    CHECK(due == (step % 3 == 0));
    CHECK(p.update_basis(gaussian(30, 20, 100 + step), step) == due);
    refreshes += due;
  }
  CHECK(p.svd_count() == refreshes);
  CHECK(p.svd_count() == 4);
  CHECK(p.update_gap() == 3);
}

TEST_CASE("a projector with no basis refreshes whatever the schedule says") {
  Projector<> p({30, 20}, {4, ProjectionType::Std, 0.25f}, schedule::FixedGap{5});
  CHECK(p.refresh_due(3));
  CHECK(p.update_basis(gaussian(30, 20, 1), 3));
  CHECK_FALSE(p.refresh_due(4));
}

TEST_CASE("bytes held equal the formula for every side and for bf16 storage") {
  const Index m = 48, n = 20, r = 5;
  struct Expect { ProjectionType type; std::size_t floats; };
  const Expect cases[] = {{ProjectionType::Std, std::size_t(r * n)},
                          {ProjectionType::ReverseStd, std::size_t(m * r)},
                          {ProjectionType::Left, std::size_t(m * r)},
                          {ProjectionType::Right, std::size_t(r * n)},
                          {ProjectionType::Full, std::size_t(m * r + r * n)}};
  const MatrixF G = gaussian(m, n, 3);
  for (const auto& c : cases) {
    CAPTURE(to_string(c.type));
    Projector<> p({m, n}, {r, c.type, 0.25f});
    CHECK(p.bytes() == 0);
    CHECK(p.bytes_when_filled() == 4 * c.floats);
    p.refresh(G);
    CHECK(p.bytes() == 4 * c.floats);

    Projector<svd::Exact, quant::BFloat16> pb({m, n}, {r, c.type, 0.25f});
    pb.refresh(G);
    CHECK(pb.bytes() == 2 * c.floats);
    CHECK(pb.bytes_when_filled() == 2 * c.floats);
  }
}

TEST_CASE("bf16 storage lends a basis within bf16 rounding of the float one") {
  const MatrixF G = decaying_spectrum(40, 24, 5);
  Projector<> pf({40, 24}, {6, ProjectionType::Std, 0.25f});
  Projector<svd::Exact, quant::BFloat16> pb({40, 24}, {6, ProjectionType::Std, 0.25f});
  pf.refresh(G);
  pb.refresh(G);
  BasisScratch sf, sb;
  const MatrixF& a = *pf.basis(sf).right;
  const MatrixF& b = *pb.basis(sb).right;
  CHECK(((a - b).array().abs() <= a.array().abs() * (1.0f / 256) + 1e-30f).all());
}

TEST_CASE("projector errors say what to fix") {
  const ProjectorOptions ok{4, ProjectionType::Std, 0.25f};
  CHECK_THROWS_WITH_AS(Projector<>({30, 20}, {0, ProjectionType::Std, 0.25f}),
                       doctest::Contains("rank 0 is out of range"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(Projector<>({30, 20}, {21, ProjectionType::Std, 0.25f}),
                       doctest::Contains("choose 1 <= rank <= 20"), galore::invalid_argument);
  CHECK_THROWS_AS(Projector<>({0, 20}, ok), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(Projector<>({30, 20}, {4, static_cast<ProjectionType>(42), 0.25f}),
                       doctest::Contains("unknown projection type"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(parse_projection_type("diagonal"),
                       doctest::Contains("unknown projection type 'diagonal'"), galore::invalid_argument);
  CHECK_THROWS_AS(Projector<>({30, 20}, {4, ProjectionType::Std, NAN}), galore::invalid_argument);
  CHECK_THROWS_AS(Projector<>({30, 20}, ok, schedule::FixedGap{0}), galore::invalid_argument);

  Projector<> p({30, 20}, ok);
  BasisScratch s;
  CHECK_THROWS_WITH_AS(p.basis(s), doctest::Contains("no basis yet"), galore::invalid_argument);
  MatrixF R;
  CHECK_THROWS_WITH_AS(p.project(gaussian(20, 30, 1), 0, R), doctest::Contains("gradient is 20x30"),
                       galore::invalid_argument);
  p.project(gaussian(30, 20, 1), 0, R);
  MatrixF out;
  CHECK_THROWS_WITH_AS(p.project_back(MatrixF::Zero(3, 3), out), doctest::Contains("must be 30x4"),
                       galore::invalid_argument);
  Basis wrong;
  wrong.side = Side::Right;
  wrong.right = MatrixF::Zero(4, 19);
  CHECK_THROWS_WITH_AS(p.adopt(wrong), doctest::Contains("right factor must be 4x20"), galore::invalid_argument);
  wrong.side = Side::Left;
  CHECK_THROWS_WITH_AS(p.adopt(wrong), doctest::Contains("does not match"), galore::invalid_argument);
}

namespace {

// Stores like quant::None, but throws while *fail is set.
struct ThrowingQuant {
  bool* fail;
  struct Storage {
    MatrixF matrix;
    std::size_t bytes() const { return sizeof(float) * static_cast<std::size_t>(matrix.size()); }
    Shape shape() const { return shape_of(matrix); }
  };
  void store(const MatrixF& P, Storage& out) const {
    if (*fail) throw std::runtime_error("store failed");
    out.matrix = P;
  }
  const MatrixF& load(const Storage& s, MatrixF&) const { return s.matrix; }
  std::size_t storage_bytes(Shape s) const { return sizeof(float) * static_cast<std::size_t>(s.size()); }
};

// The exact SVD, but returns a NaN entry while *fail is set (as a policy whose
// float products overflowed would).
struct FlakySVD {
  bool* fail;
  void compute(ConstMatrixRef<float> G, Index rank, Side side, const BasisView* previous, Basis& out) const {
    eigen::compute_basis(svd::Exact{}, G, rank, side, previous, out);
    if (*fail) (side == Side::Right ? out.right : out.left)(0, 0) = NAN;
  }
};

}  // namespace

TEST_CASE("a refresh whose basis cannot be stored changes nothing: count, schedule, basis") {
  bool fail = false;
  Projector<svd::Exact, ThrowingQuant, schedule::Lazy> p({30, 20}, {4, ProjectionType::Std, 0.25f},
                                                         schedule::Lazy{1, 0.0, 2.0, 2}, svd::Exact{},
                                                         ThrowingQuant{&fail});
  p.refresh(decaying_spectrum(30, 20, 1), 0);
  p.refresh(decaying_spectrum(30, 20, 2), 1);
  const auto state = p.schedule_state();
  const MatrixF basis = p.right_storage().matrix;
  REQUIRE(state.queue.size() == 1);
  fail = true;
  CHECK_THROWS_AS(p.refresh(decaying_spectrum(30, 20, 3), 2), std::runtime_error);
  Basis b;
  eigen::compute_basis(svd::Exact{}, decaying_spectrum(30, 20, 4), 4, Side::Right, nullptr, b);
  CHECK_THROWS_AS(p.adopt(b, 2), std::runtime_error);
  CHECK(p.svd_count() == 2);
  CHECK(p.schedule_state().queue == state.queue);
  CHECK(p.schedule_state().past == state.past);
  CHECK(p.schedule_state().gap == state.gap);
  CHECK(p.right_storage().matrix == basis);
}

TEST_CASE("a refresh whose SVD gives non-finite vectors keeps the basis in use") {
  bool fail = false;
  Projector<FlakySVD> p({30, 20}, {4, ProjectionType::Std, 0.25f}, schedule::FixedGap{1}, FlakySVD{&fail});
  p.refresh(decaying_spectrum(30, 20, 1), 0);
  const MatrixF basis = p.right_storage().matrix;
  fail = true;
  p.refresh(decaying_spectrum(30, 20, 2), 1);
  MatrixF R;
  p.project(decaying_spectrum(30, 20, 3), 2, R);
  CHECK(p.svd_count() == 1);
  CHECK(p.right_storage().matrix == basis);
  CHECK(R.allFinite());
}

TEST_CASE("every SVD policy finds the subspace of gradients near float32's limits") {
  const MatrixF G = decaying_spectrum(40, 24, 7, 0.7f, 0.001f);
  const Eigen::VectorXf sv = svd::singular_values(G);
  auto check = [&](auto policy) {
    const MatrixF unit = G / G.cwiseAbs().maxCoeff();
    for (float factor : {1e36f, 1e-30f, 3e38f}) {  // 3e38: the largest entry, so G's products overflow
      CAPTURE(factor);
      Projector<decltype(policy)> p({40, 24}, {4, ProjectionType::Std, 0.25f}, schedule::FixedGap{1}, policy);
      p.refresh(G, 0);  // a sane start (for the warm-started policy)
      const MatrixF scaled = factor == 3e38f ? MatrixF(unit * factor) : MatrixF(G * factor);
      REQUIRE(scaled.allFinite());
      p.refresh(scaled, 1);
      BasisScratch s;
      const BasisView b = p.basis(s);
      CHECK(b.right->allFinite());
      CHECK(p.svd_count() == 2);
      CHECK(svd::captured_energy(G, b, sv) >= 0.999);  // the subspace of G, whatever its scale
    }
  };
  SUBCASE("exact") { check(svd::Exact{}); }
  SUBCASE("randomized") { check(svd::Randomized{}); }
  SUBCASE("warm start") { check(svd::WarmStart{}); }
}
