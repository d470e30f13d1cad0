// Conformance of the CUDA backend with galore_torch 1.0: every galore_adamw
// case of the golden folder (GALORE_GOLDEN_DIR, else ../shared/golden), at the
// CPU tests' tolerances (tests/test_golden_galore.cpp says why these three
// checks): the GPU's own exact SVD reproduces W within the first subspace
// period; replaying the reference's bases reproduces the whole trajectory; the
// GPU's SVD spans the reference's subspace at every refresh.
#include <doctest/doctest.h>

#include <galore/cuda.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "cuda_support.cuh"
#include "golden_reader.hpp"

using namespace galore;
using galore_test::Device;
using galore_test::GoldenAdamW;

namespace galore_test {

// An SVD policy that hands out the reference's recorded bases: a custom policy
// for the CUDA facade is a type with compute_basis / compute_basis_bytes
// overloads found by argument-dependent lookup.
struct ReplaySVD {
  const GoldenAdamW* c = nullptr;
  const long* step = nullptr;
};

template <class T>
std::size_t compute_basis_bytes(cuda::Context&, const ReplaySVD&, Index, Index, Index, Side) {
  return 0;
}

template <class T>
void compute_basis(cuda::Context& ctx, cuda::WorkspaceArena&, const ReplaySVD& p, DeviceView<const T>, Index r,
                   const cuda::DeviceBasis<T>& out, const cuda::DeviceBasis<T>*) {
  static_assert(std::is_same_v<T, float>, "the golden cases are float32");
  const long t = *p.step;
  const bool both = out.left && out.right;
  if (out.left)
    cuda::check(cudaMemcpyAsync(out.left, p.c->ortho[t].data(), sizeof(float) * out.rows * r, cudaMemcpyHostToDevice,
                                ctx.stream()),
                "cudaMemcpyAsync");
  if (out.right)
    cuda::check(cudaMemcpyAsync(out.right, (both ? p.c->ortho_right : p.c->ortho)[t].data(),
                                sizeof(float) * r * out.cols, cudaMemcpyHostToDevice, ctx.stream()),
                "cudaMemcpyAsync");
  ctx.synchronize();  // the host vectors are pageable
}

}  // namespace galore_test

namespace {

double rel_err(const std::vector<float>& a, const std::vector<float>& ref) {
  double e = 0.0, d = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    e += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
    d += double(ref[i]) * ref[i];
  }
  return std::sqrt(e / d);
}

std::vector<float> minus(const std::vector<float>& a, const std::vector<float>& b) {
  std::vector<float> out(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) out[i] = a[i] - b[i];
  return out;
}

AdamConfig golden_adam(const GoldenAdamW& c) {
  AdamConfig a;
  a.lr = c.lr;
  a.beta1 = c.beta1;
  a.beta2 = c.beta2;
  a.eps = c.eps;
  a.weight_decay = c.weight_decay;
  a.correct_bias = c.correct_bias;
  return a;
}

// P P^T (left, m x m) or P^T P (right, n x n) of a row-major basis factor.
std::vector<double> projector(const std::vector<float>& f, long rows, long cols, bool left) {
  const long k = left ? rows : cols;
  std::vector<double> out(static_cast<std::size_t>(k * k), 0.0);
  for (long i = 0; i < k; ++i)
    for (long j = 0; j < k; ++j) {
      double s = 0.0;
      if (left)
        for (long q = 0; q < cols; ++q) s += double(f[i * cols + q]) * f[j * cols + q];
      else
        for (long q = 0; q < rows; ++q) s += double(f[q * cols + i]) * f[q * cols + j];
      out[static_cast<std::size_t>(i * k + j)] = s;
    }
  return out;
}
double distance(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return std::sqrt(s);
}

}  // namespace

TEST_CASE("golden galore_adamw on the GPU: every case matches galore_torch") {
  const auto cases = galore_test::golden_adamw_cases();
  REQUIRE_MESSAGE(!cases.empty(), "no galore_adamw case in ", galore_test::golden_folder());
  MESSAGE("golden folder: ", galore_test::golden_folder(), " (", cases.size(), " galore_adamw cases)");
  for (const GoldenAdamW& c : cases) {
    CAPTURE(c.name);
    const ProjectionType type = parse_projection_type(c.proj_type);
    const ProjectorOptions projection{c.rank, type, static_cast<float>(c.scale)};
    const Side side = resolve_side(type, c.m, c.n);
    const Shape shape{c.m, c.n};
    cuda::Context ctx;

    {  // the GPU's own SVD reproduces W within the first subspace period
      INFO("own SVD, first period");
      cuda::GaLoreOptimizer<> opt(projection, golden_adam(c), schedule::FixedGap{c.gap});
      const LayerId id = opt.add_layer(shape, cuda::DType::Float32);
      ctx.reserve_workspace(opt.workspace_bytes(ctx));
      Device<float> W(c.W0), G(c.G[0]);
      for (long t = 0; t < std::min(c.gap, c.steps); ++t) {
        CAPTURE(t);
        G.upload(c.G[t]);
        opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
        REQUIRE(opt.status(id, ctx) == StepStatus::Applied);
        const std::vector<float> w = W.download();
        CHECK(rel_err(w, c.W[t]) <= 1e-4);
        if (side != Side::Both) CHECK(rel_err(minus(w, c.W0), minus(c.W[t], c.W0)) <= 1e-3);
      }
    }

    {  // replaying the reference's bases reproduces the whole trajectory
      INFO("replayed bases");
      long current = 0;
      cuda::GaLoreOptimizer<Projector<galore_test::ReplaySVD>> opt(
          projection, golden_adam(c), schedule::FixedGap{c.gap}, galore_test::ReplaySVD{&c, &current});
      const LayerId id = opt.add_layer(shape, cuda::DType::Float32);
      ctx.reserve_workspace(opt.workspace_bytes(ctx));
      Device<float> W(c.W0), G(c.G[0]);
      for (current = 0; current < c.steps; ++current) {
        CAPTURE(current);
        G.upload(c.G[current]);
        const cuda::DeviceStepResult r = opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
        CHECK(r.refreshed == (current % c.gap == 0));
        REQUIRE(opt.status(id, ctx) == StepStatus::Applied);
        const std::vector<float> w = W.download();
        CHECK(rel_err(w, c.W[current]) <= 1e-4);
        if (side != Side::Both) CHECK(rel_err(minus(w, c.W0), minus(c.W[current], c.W0)) <= 1e-3);
      }
      CHECK(opt.svd_count(id) == (c.steps + c.gap - 1) / c.gap);
    }

    {  // the GPU's exact SVD spans the reference's subspace at every refresh
      INFO("own SVD subspace");
      ctx.reserve_workspace(cuda::compute_basis_bytes<float>(ctx, svd::Exact{}, c.m, c.n, c.rank, side));
      Device<float> left(std::vector<float>(static_cast<std::size_t>(c.m * c.rank))),
          right(std::vector<float>(static_cast<std::size_t>(c.rank * c.n))), G(c.G[0]);
      for (long t = 0; t < c.steps; t += c.gap) {
        CAPTURE(t);
        G.upload(c.G[t]);
        cuda::DeviceBasis<float> b;
        b.side = side;
        b.rows = c.m;
        b.cols = c.n;
        b.rank = c.rank;
        if (side != Side::Right) b.left = left.data();
        if (side != Side::Left) b.right = right.data();
        auto ws = ctx.arena();
        cuda::compute_basis(ctx, ws, svd::Exact{}, DeviceView<const float>(G.data(), c.m, c.n), c.rank, b, nullptr);
        ctx.synchronize();
        if (side != Side::Right) {
          const auto ours = projector(left.download(), c.m, c.rank, true);
          CHECK(distance(ours, projector(c.ortho[t], c.m, c.rank, true)) <= 1e-3);
        }
        if (side != Side::Left) {
          const auto& ref = side == Side::Both ? c.ortho_right[t] : c.ortho[t];
          CHECK(distance(projector(right.download(), c.rank, c.n, false), projector(ref, c.rank, c.n, false)) <= 1e-3);
        }
      }
    }
  }
}
