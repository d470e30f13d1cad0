// Refreshing the bases of several same-shape matrices at once
// (cuda::compute_bases): the batched warm start against one refresh per matrix,
// its workspace formula, and its errors.
#include <doctest/doctest.h>

#include <galore/cuda.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "cuda_support.cuh"

using namespace galore;
using galore_test::Device;

namespace {

// A basis buffer of `side` for an m x n matrix at rank r, element type T.
template <class T>
struct BasisBuffer {
  Device<T> left, right;
  cuda::DeviceBasis<T> basis;
  BasisBuffer(Side side, Index m, Index n, Index r) {
    basis.side = side;
    basis.rows = m;
    basis.cols = n;
    basis.rank = r;
    if (side != Side::Right) {
      left = Device<T>(std::vector<float>(static_cast<std::size_t>(m * r), 0.0f));
      basis.left = left.data();
    }
    if (side != Side::Left) {
      right = Device<T>(std::vector<float>(static_cast<std::size_t>(r * n), 0.0f));
      basis.right = right.data();
    }
  }
  std::vector<float> download() const {
    std::vector<float> out;
    if (basis.left) out = Device<T>::download(basis.left, static_cast<std::size_t>(basis.rows * basis.rank));
    if (basis.right) {
      const auto r = Device<T>::download(basis.right, static_cast<std::size_t>(basis.rank * basis.cols));
      out.insert(out.end(), r.begin(), r.end());
    }
    return out;
  }
};

// |Q^T Q - I| (max entry) of the vectors of side `side` in a downloaded basis.
double orthonormality(const std::vector<float>& v, Index len, Index r, bool columns) {
  double worst = 0.0;
  for (Index a = 0; a < r; ++a)
    for (Index b = 0; b < r; ++b) {
      double s = 0.0;
      for (Index i = 0; i < len; ++i)
        s += columns ? double(v[i * r + a]) * v[i * r + b] : double(v[a * len + i]) * v[b * len + i];
      worst = std::max(worst, std::abs(s - (a == b ? 1.0 : 0.0)));
    }
  return worst;
}

// `count` separated gradients of one shape (different subspaces), the previous
// bases from an exact refresh of a drifted copy of each, then one batched
// warm refresh against one refresh per matrix.
template <class T>
void batched_equals_single(Index m, Index n, Index r, Side side, bool rayleigh_ritz, int count, bool zero_member) {
  INFO(m, " x ", n, " rank ", r, " side ", static_cast<int>(side), " rayleigh_ritz ", rayleigh_ritz, " count ", count,
       std::is_same_v<T, float> ? " float" : " bf16");
  cuda::Context ctx;
  svd::WarmStart p;
  p.rayleigh_ritz = rayleigh_ritz;
  std::vector<Device<T>> G;
  std::vector<BasisBuffer<T>> prev, one, many;
  for (int b = 0; b < count; ++b) {
    auto g = galore_test::separated_gradients(m, n, r + 4, 2, 300u + 17u * b, 0.02f);
    if (zero_member && b == 1) g[1].assign(g[1].size(), 0.0f);
    G.emplace_back(g[0]);
    prev.emplace_back(side, m, n, r);
    one.emplace_back(side, m, n, r);
    many.emplace_back(side, m, n, r);
    ctx.reserve_workspace(cuda::compute_basis_bytes<T>(ctx, svd::Exact{}, m, n, r, side));
    auto ws = ctx.arena();
    cuda::compute_basis(ctx, ws, svd::Exact{}, DeviceView<const T>(G.back().data(), m, n), r, prev.back().basis,
                        nullptr);
    G.back().upload(g[1]);  // the drifted gradient the warm start refreshes on
  }
  std::vector<DeviceView<const T>> views;
  std::vector<cuda::DeviceBasis<T>> outs, previous;
  for (int b = 0; b < count; ++b) {
    views.emplace_back(G[static_cast<std::size_t>(b)].data(), m, n);
    outs.push_back(many[static_cast<std::size_t>(b)].basis);
    previous.push_back(prev[static_cast<std::size_t>(b)].basis);
  }
  // The workspace formula is enough: the arena throws when a call takes more.
  ctx.reserve_workspace(cuda::compute_bases_bytes<T>(ctx, p, m, n, r, side, count));
  {
    auto ws = ctx.arena();
    cuda::compute_bases(ctx, ws, p, Span<const DeviceView<const T>>(views), r, Span<const cuda::DeviceBasis<T>>(outs),
                        Span<const cuda::DeviceBasis<T>>(previous));
  }
  ctx.reserve_workspace(cuda::compute_basis_bytes<T>(ctx, p, m, n, r, side));
  for (int b = 0; b < count; ++b) {
    auto ws = ctx.arena();
    cuda::compute_basis(ctx, ws, p, views[static_cast<std::size_t>(b)], r, one[static_cast<std::size_t>(b)].basis,
                        &previous[static_cast<std::size_t>(b)]);
  }
  ctx.synchronize();
  // Batched and single Cholesky factorizations round differently: the vectors
  // agree to float precision (bf16 storage: to one or two bf16 steps).
  const double tol = std::is_same_v<T, float> ? 2e-4 : 1.6e-2;
  for (int b = 0; b < count; ++b) {
    INFO("matrix ", b);
    const auto x = many[static_cast<std::size_t>(b)].download(), y = one[static_cast<std::size_t>(b)].download();
    for (float v : x) REQUIRE(std::isfinite(v));
    if (zero_member && b == 1) continue;  // an arbitrary orthonormal completion: finite is all that is asked
    CHECK(galore_test::max_abs_diff(x, y) < tol);
    const bool columns = side == Side::Left;
    const Index len = columns ? m : n;
    if (side != Side::Both) CHECK(orthonormality(x, len, r, columns) < (std::is_same_v<T, float> ? 1e-4 : 3e-2));
  }
}

}  // namespace

TEST_CASE("a batched warm refresh equals one warm refresh per matrix") {
  for (bool rr : {false, true}) {
    batched_equals_single<float>(96, 64, 8, Side::Right, rr, 5, false);
    batched_equals_single<float>(64, 96, 8, Side::Left, rr, 4, false);
    batched_equals_single<cuda::bf16>(96, 64, 8, Side::Right, rr, 3, false);
  }
  batched_equals_single<float>(80, 72, 6, Side::Both, true, 3, false);
}

TEST_CASE("a zero gradient in a batch gives a finite basis and leaves its neighbours alone") {
  batched_equals_single<float>(96, 64, 8, Side::Right, false, 4, true);
  batched_equals_single<float>(96, 64, 8, Side::Right, true, 3, true);
}

TEST_CASE("a batch without previous bases refreshes each matrix with the cold policy") {
  const Index m = 64, n = 48, r = 6;
  cuda::Context ctx;
  svd::WarmStart p;
  std::vector<Device<float>> G;
  std::vector<BasisBuffer<float>> batched, cold;
  std::vector<DeviceView<const float>> views;
  std::vector<cuda::DeviceBasis<float>> outs;
  for (int b = 0; b < 3; ++b) {
    G.emplace_back(galore_test::separated_gradients(m, n, r + 2, 1, 500u + b)[0]);
    batched.emplace_back(Side::Right, m, n, r);
    cold.emplace_back(Side::Right, m, n, r);
    views.emplace_back(G.back().data(), m, n);
    outs.push_back(batched.back().basis);
  }
  ctx.reserve_workspace(cuda::compute_bases_bytes<float>(ctx, p, m, n, r, Side::Right, 3));
  {
    auto ws = ctx.arena();
    cuda::compute_bases(ctx, ws, p, Span<const DeviceView<const float>>(views), r,
                        Span<const cuda::DeviceBasis<float>>(outs), Span<const cuda::DeviceBasis<float>>());
  }
  for (int b = 0; b < 3; ++b) {
    auto ws = ctx.arena();
    cuda::compute_basis(ctx, ws, p.cold, views[static_cast<std::size_t>(b)], r, cold[static_cast<std::size_t>(b)].basis,
                        nullptr);
  }
  for (int b = 0; b < 3; ++b)
    CHECK(batched[static_cast<std::size_t>(b)].download() == cold[static_cast<std::size_t>(b)].download());
}

TEST_CASE("compute_bases refuses mixed shapes, mixed sides, mismatched counts and a short workspace") {
  const Index r = 4;
  cuda::Context ctx;
  svd::WarmStart p;
  Device<float> A(galore_test::gaussian(40 * 24, 1u)), B(galore_test::gaussian(24 * 40, 2u));
  BasisBuffer<float> a1(Side::Right, 40, 24, r), a2(Side::Right, 40, 24, r), a3(Side::Left, 40, 24, r);
  ctx.reserve_workspace(cuda::compute_bases_bytes<float>(ctx, p, 40, 40, r, Side::Right, 2) +
                        cuda::compute_bases_bytes<float>(ctx, p, 40, 40, r, Side::Left, 2));
  using Views = std::vector<DeviceView<const float>>;
  using Bases = std::vector<cuda::DeviceBasis<float>>;
  auto call = [&](const Views& g, const Bases& out, const Bases& prev) {
    auto ws = ctx.arena();
    cuda::compute_bases(ctx, ws, p, Span<const DeviceView<const float>>(g), r, Span<const cuda::DeviceBasis<float>>(out),
                        Span<const cuda::DeviceBasis<float>>(prev));
  };
  const DeviceView<const float> a(A.data(), 40, 24), b(B.data(), 24, 40);
  CHECK_THROWS_WITH_AS(call({a, b}, {a1.basis, a2.basis}, {}), doctest::Contains("one shape"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(call({a, a}, {a1.basis, a3.basis}, {}), doctest::Contains("one side"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(call({a, a}, {a1.basis}, {}), doctest::Contains("as many outputs"), galore::invalid_argument);
  CHECK_THROWS_WITH_AS(call({a, a}, {a1.basis, a2.basis}, {a1.basis}), doctest::Contains("as many outputs"),
                       galore::invalid_argument);
  // The same call with a workspace one byte short of the formula throws before launching anything.
  const std::size_t need = cuda::compute_bases_bytes<float>(ctx, p, 40, 24, r, Side::Right, 2);
  cuda::DeviceBuffer<unsigned char> small(need - 256);
  ctx.attach_workspace(small.data(), small.size());
  CHECK_THROWS_WITH_AS(call({a, a}, {a1.basis, a2.basis}, {a2.basis, a1.basis}), doctest::Contains("too small"),
                       galore::invalid_argument);
}
