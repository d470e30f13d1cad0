// Conformance with q_galore_torch 1.0: every `qgalore_projector` and
// `group_quant_minmax` case of the golden folder.
//
// The quantizer must reproduce codes, scales and zeros bit for bit. The lazy
// schedule is checked exactly by replaying the reference's unquantized bases
// (with LAPACK's signs, as the golden README prescribes): cosines, gaps and SVD
// counts must then match. The library's own SVD is checked by subspace.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <galore/galore.hpp>
#include <memory>

#include "support/golden.hpp"

using namespace galore;
using galore_test::GoldenCase;
using galore_test::slice;

namespace {

// Calls f with a std::integral_constant<int, bits> for the case's n_bit.
template <class F>
void with_bits(long bits, F&& f) {
  switch (bits) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: FAIL("unsupported n_bit ", bits);
  }
}

struct ReplaySVD {
  std::shared_ptr<std::function<Basis()>> next;
  void compute(ConstMatrixRef<float>, Index, Side, const BasisView*, Basis& out) const { out = (*next)(); }
};

double rel_err(const MatrixF& a, const MatrixF& ref) { return (a - ref).norm() / std::max(ref.norm(), 1e-30f); }

}  // namespace

TEST_CASE("golden group_quant_minmax: codes, scales and zeros bit for bit") {
  const auto cases = galore_test::golden_cases("group_quant_minmax");
  REQUIRE_MESSAGE(!cases.empty(), "no group_quant_minmax case in ", galore_test::golden_dir());
  for (const GoldenCase& c : cases) {
    CAPTURE(c.name);
    const MatrixF w = c.matrix("w.npy");
    const auto q = c.array("q.npy");
    const auto scales = c.array("scales.npy");
    const auto zeros = c.array("zeros.npy");
    const MatrixF dequant = c.matrix("dequant.npy");
    REQUIRE(q.dtype == "|u1");
    with_bits(c.integer("n_bit"), [&](auto bits) {
      constexpr int B = decltype(bits)::value;
      const auto ours = quant::quantize_minmax<B>(w, c.integer("group_size"));
      REQUIRE(ours.size() == static_cast<Index>(q.u8.size()));
      REQUIRE(ours.num_groups() == static_cast<Index>(scales.f32.size()));
      Index code_mismatch = 0, scale_mismatch = 0, zero_mismatch = 0;
      for (Index i = 0; i < ours.size(); ++i) code_mismatch += ours.code(i) != q.u8[i];
      for (Index g = 0; g < ours.num_groups(); ++g) {
        scale_mismatch += ours.scales[g] != scales.f32[g];
        zero_mismatch += static_cast<float>(ours.zeros[g]) != zeros.f32[g];
      }
      CHECK(code_mismatch == 0);
      CHECK(scale_mismatch == 0);
      CHECK(zero_mismatch == 0);
      CHECK(quant::dequantize_minmax(ours) == dequant);
      // Packed storage: Bits per code, plus a float scale and a byte zero per group.
      CHECK(ours.bytes() == std::size_t((ours.size() * B + 7) / 8 + ours.num_groups() * 5));
    });
  }
}

TEST_CASE("golden qgalore_projector: quantized bases, projections and the lazy schedule") {
  const auto cases = galore_test::golden_cases("qgalore_projector");
  REQUIRE_MESSAGE(!cases.empty(), "no qgalore_projector case in ", galore_test::golden_dir());
  for (const GoldenCase& c : cases) {
    CAPTURE(c.name);
    const Index m = c.integer("m"), n = c.integer("n"), rank = c.integer("rank"), steps = c.integer("steps");
    const auto G = c.array("G.npy");
    const auto ortho_float = c.array("ortho_float.npy");
    const auto ortho_dequant = c.array("ortho_dequant.npy");
    const auto low_rank = c.array("low_rank_grad.npy");
    const auto back = c.array("project_back.npy");
    const auto gaps = c.array("update_proj_gap.npy");
    const auto svd_counts = c.array("svd_count.npy");
    const auto cosines = c.array("cosine.npy");
    const ProjectorOptions options{rank, ProjectionType::Std, static_cast<float>(c.num("scale"))};
    const schedule::Lazy lazy{c.integer("update_proj_gap"), c.num("cos_threshold"), c.num("gamma_proj"),
                              static_cast<int>(c.integer("queue_size"))};
    const Side side = resolve_side(ProjectionType::Std, m, n);

    with_bits(c.integer("n_bit"), [&](auto bits) {
      constexpr int B = decltype(bits)::value;
      const quant::MinMax<B> quantizer{c.integer("group_size")};

      INFO("replayed bases");
      long current = 0;
      auto next = std::make_shared<std::function<Basis()>>([&] {
        Basis b;
        b.side = side;
        (side == Side::Right ? b.right : b.left) = slice(ortho_float, current);
        return b;
      });
      Projector<ReplaySVD, quant::MinMax<B>, schedule::Lazy> p({m, n}, options, lazy, ReplaySVD{next}, quantizer);
      for (current = 0; current < steps; ++current) {
        CAPTURE(current);
        const std::int64_t count_before = p.svd_count();
        MatrixF R, PB;
        p.project(slice(G, current), current, R);
        BasisScratch scratch;
        const BasisView b = p.basis(scratch);
        const MatrixF& P = side == Side::Right ? *b.right : *b.left;
        CHECK(P == slice(ortho_dequant, current));  // dequantized basis, bit for bit
        CHECK(rel_err(R, slice(low_rank, current)) <= 1e-5);
        p.project_back(R, PB);
        CHECK(rel_err(PB, slice(back, current)) <= 1e-5);
        CHECK(p.update_gap() == static_cast<std::int64_t>(gaps.f32[current]));
        CHECK(p.svd_count() == static_cast<std::int64_t>(svd_counts.f32[current]));
        const float ref_cos = cosines.f32[current];
        const float our_cos = p.svd_count() > count_before ? p.schedule_state().last_cosine : NAN;
        CHECK(std::isnan(ref_cos) == std::isnan(our_cos));
        if (!std::isnan(ref_cos)) CHECK(std::abs(our_cos - ref_cos) <= 1e-5f);
      }

      INFO("own SVD");
      for (current = 0; current < steps; ++current) {
        const bool refreshed = current == 0 || svd_counts.f32[current] != svd_counts.f32[current - 1];
        if (!refreshed) continue;
        CAPTURE(current);
        Basis ours;
        eigen::compute_basis(svd::Exact{}, slice(G, current), rank, side, nullptr, ours);
        const MatrixF ref = slice(ortho_float, current);
        const MatrixF proj_ours = side == Side::Right ? MatrixF(ours.right.transpose() * ours.right)
                                                      : MatrixF(ours.left * ours.left.transpose());
        const MatrixF proj_ref = side == Side::Right ? MatrixF(ref.transpose() * ref) : MatrixF(ref * ref.transpose());
        CHECK((proj_ours - proj_ref).norm() <= 1e-3);
      }
      // With canonical signs, a subspace that barely moves reads as cosine ~ +1,
      // never as a LAPACK sign flip: the gap grows no later than in the reference.
      Projector<svd::Exact, quant::MinMax<B>, schedule::Lazy> own({m, n}, options, lazy, svd::Exact{}, quantizer);
      MatrixF R;
      for (Index t = 0; t < steps; ++t) own.project(slice(G, t), t, R);
      CHECK(own.svd_count() <= static_cast<std::int64_t>(svd_counts.f32[steps - 1]));
    });
  }
}
