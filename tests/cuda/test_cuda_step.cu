// The CUDA backend's per-layer step against the CPU backend on identical inputs,
// its skip rules, its memory and its errors.
#include <doctest/doctest.h>

#include <galore/cuda.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_reference.hpp"
#include "cuda_support.cuh"

using namespace galore;
using galore_test::Device;
using galore_test::RunSpec;

// The GPU facade takes the CPU's policy names and keeps the moments of the
// state policy in the matching device type.
static_assert(std::is_same_v<cuda::GaLoreOptimizer<>::moment_type, float>);
static_assert(std::is_same_v<cuda::GaLoreOptimizer<Projector<>, LowRankAdam<state::BFloat16>>::moment_type, cuda::bf16>);
static_assert(std::is_same_v<cuda::GaLoreAdamW, cuda::GaLoreOptimizer<>>);
static_assert(std::is_same_v<cuda::GaLoreOptimizer<Projector<svd::WarmStart, quant::None, schedule::Lazy>>::svd_policy,
                             svd::WarmStart>);

namespace {

const ProjectionType kTypes[] = {ProjectionType::Std, ProjectionType::ReverseStd, ProjectionType::Left,
                                 ProjectionType::Right, ProjectionType::Full};

// W after every step on the GPU (T: the weights' element type; M: the moments').
template <class T, class M = float, class Policy = svd::Exact>
std::vector<std::vector<float>> gpu_run(const RunSpec& s, const std::vector<float>& W0,
                                        const std::vector<std::vector<float>>& grads, Policy policy = {}) {
  cuda::Context ctx;
  galore_test::GpuOptimizer<Policy, M> opt(ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale},
                                           adam_of(s), schedule::FixedGap{s.gap}, policy);
  const Shape shape{s.rows, s.cols};
  const LayerId id = s.dense ? opt.add_dense(shape, cuda::dtype_of<T>()) : opt.add_layer(shape, cuda::dtype_of<T>());
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  Device<T> W(W0), G(grads[0]);
  std::vector<std::vector<float>> out;
  for (std::size_t t = 0; t < grads.size(); ++t) {
    if (!s.lrs.empty()) opt.set_lr(s.lrs[t]);
    G.upload(grads[t]);
    opt.step(id, W.data(), static_cast<const T*>(G.data()), ctx);
    ctx.synchronize();
    out.push_back(W.download());
  }
  return out;
}

RunSpec spec_for(long m, long n, ProjectionType type) {
  RunSpec s;
  s.rows = m;
  s.cols = n;
  s.rank = 6;
  s.type = static_cast<int>(type);
  s.scale = 0.25f;
  s.lr = 1e-2;
  s.weight_decay = 0.05;
  s.eps = 1e-3;  // keeps d a smooth function of R, so float-level differences stay float-level
  s.gap = 3;
  return s;
}

void check_trajectories(const std::vector<std::vector<float>>& gpu, const std::vector<std::vector<float>>& cpu,
                        const std::vector<float>& W0, double tol, const std::string& what) {
  REQUIRE(gpu.size() == cpu.size());
  for (std::size_t t = 0; t < gpu.size(); ++t) {
    INFO(what, " step ", t);
    const double e = galore_test::relative_change_error(gpu[t], cpu[t], W0);
    CHECK(e < tol);
    for (float x : gpu[t]) REQUIRE(std::isfinite(x));
  }
}

// max |P P^T - I| of r rows of length n (a right basis factor).
double orthonormality(const std::vector<float>& P, long r, long n) {
  double worst = 0.0;
  for (long a = 0; a < r; ++a)
    for (long b = 0; b < r; ++b) {
      double x = 0.0;
      for (long j = 0; j < n; ++j) x += double(P[a * n + j]) * P[b * n + j];
      worst = std::max(worst, std::abs(x - (a == b ? 1.0 : 0.0)));
    }
  return worst;
}

// run(policy, name) for the randomized and warm-started policies.
template <class Run>
void with_iterative_policies(Run run) {
  run(svd::Randomized{}, "randomized");
  run(svd::WarmStart{}, "warm start");
  svd::WarmStart iterate_only;
  iterate_only.rayleigh_ritz = false;
  run(iterate_only, "warm start without Rayleigh-Ritz");
}

// Steps an m x n float layer with a right basis through grads, refreshing with
// `policy` at every step; check(G, P) after each applied step.
template <class Policy, class Check>
void refresh_every_step(Policy policy, long m, long n, long r, ProjectionType type,
                        const std::vector<std::vector<float>>& grads, Check check) {
  cuda::Context ctx;
  galore_test::GpuOptimizer<Policy> opt(ProjectorOptions{r, type, 0.25f}, AdamConfig{}, schedule::FixedGap{1}, policy);
  const LayerId id = opt.add_layer({m, n}, cuda::DType::Float32);
  REQUIRE(opt.side(id) == Side::Right);
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  Device<float> W(std::vector<float>(static_cast<std::size_t>(m * n), 0.0f)), G(grads[0]);
  for (const auto& g : grads) {
    G.upload(g);
    opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
    REQUIRE(opt.status(id, ctx) == StepStatus::Applied);
    check(g, Device<float>::download(opt.template basis<float>(id).right, static_cast<std::size_t>(r * n)));
  }
  CHECK(opt.svd_count(id) == static_cast<std::int64_t>(grads.size()));
}

}  // namespace

TEST_CASE("float32 GaLore steps match the CPU for every projection type over several refreshes") {
  // 37 x 29: rows of 116 bytes, not 16-byte aligned (cuBLAS takes other kernels for them).
  for (const auto& mn : {std::pair<long, long>{48, 32}, std::pair<long, long>{32, 56}, std::pair<long, long>{37, 29}})
    for (ProjectionType type : kTypes) {
      const long m = mn.first, n = mn.second;
      const RunSpec s = spec_for(m, n, type);
      const auto grads = galore_test::separated_gradients(m, n, 10, 8, 11u + static_cast<unsigned>(type));
      const auto W0 = galore_test::gaussian(static_cast<std::size_t>(m * n), 5u);
      check_trajectories(gpu_run<float>(s, W0, grads), galore_test::cpu_run(s, W0, grads), W0, 1e-3,
                         std::string(to_string(type)) + " " + std::to_string(m) + "x" + std::to_string(n));
    }
}

TEST_CASE("the lazy schedule on the GPU refreshes and grows its gap as on the CPU (left and right bases)") {
  // A still subspace: every cosine is about 1, so with gap 2, a queue of 2 and
  // gamma 2 the refreshes come at steps 0, 2, 4 (the gap grows to 4), 8 (to 8)
  // and 16 (to 16).
  for (ProjectionType type : {ProjectionType::Right, ProjectionType::Left}) {
    RunSpec s = spec_for(40, 24, type);
    s.gap = 2;
    s.lazy_queue = 2;
    s.lazy_threshold = 0.5;
    s.lazy_gamma = 2.0;
    const auto grads = galore_test::separated_gradients(40, 24, 10, 20, 21u);
    const auto W0 = galore_test::gaussian(40 * 24, 22u);
    galore_test::RunInfo cpu_info;
    const auto cpu = galore_test::cpu_run(s, W0, grads, false, &cpu_info);
    cuda::Context ctx;
    cuda::GaLoreOptimizer<Projector<svd::Exact, quant::None, schedule::Lazy>> opt(
        ProjectorOptions{s.rank, type, s.scale}, adam_of(s), schedule::Lazy{s.gap, s.lazy_threshold, s.lazy_gamma, 2});
    const LayerId id = opt.add_layer({40, 24}, cuda::DType::Float32);
    ctx.reserve_workspace(opt.workspace_bytes(ctx));
    Device<float> W(W0), G(grads[0]);
    std::vector<std::vector<float>> gpu;
    for (const auto& g : grads) {
      G.upload(g);
      opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
      gpu.push_back(W.download());
    }
    check_trajectories(gpu, cpu, W0, 1e-3, std::string("lazy ") + to_string(type));
    const LayerStats st = opt.stats(id, ctx);
    CHECK(cpu_info.svd_count == 5);
    CHECK(cpu_info.gap == 16);
    CHECK(st.svd_count == cpu_info.svd_count);
    CHECK(st.update_gap == cpu_info.gap);
    const schedule::Lazy::State& lazy = opt.schedule_state(id);
    CHECK(lazy.past.size() == static_cast<std::size_t>(type == ProjectionType::Right ? 24 : 40));
    CHECK(lazy.last_cosine > 0.99f);
    CHECK(opt.host_state_bytes() == sizeof(float) * (lazy.past.size() + 2));
  }
}

TEST_CASE("the drift schedule on the GPU measures and refreshes as on the CPU") {
  // Twelve gradients of one subspace, then twelve of another: measurements every
  // 2 steps from step 2 set the baseline, then see the captured energy fall when
  // the subspace changes and refresh at once. A NaN gradient on a measurement
  // step (6) is skipped without touching the schedule. Right, left (40 x 21:
  // the padded copies of an unaligned left layer) and both-sided bases.
  for (const auto& c : {std::tuple{ProjectionType::Right, 40L, 24L}, std::tuple{ProjectionType::Left, 40L, 21L},
                        std::tuple{ProjectionType::Full, 40L, 24L}}) {
    const ProjectionType type = std::get<0>(c);
    const long rows = std::get<1>(c), cols = std::get<2>(c);
    INFO(to_string(type), " ", rows, "x", cols);
    RunSpec s = spec_for(rows, cols, type);
    s.rank = 4;
    s.gap = 1000;
    s.drift_check_every = 2;
    s.drift_tolerance = 0.1;
    s.drift_min_gap = 2;
    auto grads = galore_test::separated_gradients(rows, cols, 6, 12, 31u);
    const auto other = galore_test::separated_gradients(rows, cols, 6, 12, 77u);
    grads.insert(grads.end(), other.begin(), other.end());
    grads[6][5] = std::numeric_limits<float>::quiet_NaN();
    const auto W0 = galore_test::gaussian(static_cast<std::size_t>(rows * cols), 23u);
    galore_test::RunInfo cpu_info;
    const auto cpu = galore_test::cpu_run(s, W0, grads, false, &cpu_info);

    cuda::Context ctx;
    cuda::GaLoreOptimizer<Projector<svd::Exact, quant::None, schedule::Drift>> opt(
        ProjectorOptions{s.rank, type, s.scale}, adam_of(s),
        schedule::Drift{s.drift_check_every, s.drift_tolerance, s.drift_min_gap, s.gap});
    const LayerId id = opt.add_layer({rows, cols}, cuda::DType::Float32);
    ctx.reserve_workspace(opt.workspace_bytes(ctx));
    Device<float> W(W0), G(grads[0]);
    std::vector<std::vector<float>> gpu;
    for (std::size_t t = 0; t < grads.size(); ++t) {
      G.upload(grads[t]);
      const cuda::DeviceStepResult r = opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
      if (t == 6) CHECK((r.status_known && r.status == StepStatus::SkippedNonFinite));
      gpu.push_back(W.download());
    }
    // The NaN step leaves W as it was: compare the other steps' trajectories.
    std::vector<std::vector<float>> g2, c2;
    for (std::size_t t = 0; t < gpu.size(); ++t)
      if (t != 6) {
        g2.push_back(gpu[t]);
        c2.push_back(cpu[t]);
      }
    check_trajectories(g2, c2, W0, 1e-3, std::string("drift ") + to_string(type));
    const LayerStats st = opt.stats(id, ctx);
    CHECK(cpu_info.svd_count >= 2);  // the change of subspace refreshed
    CHECK(st.svd_count == cpu_info.svd_count);
    CHECK(st.skipped_steps == 1);
    CHECK(cpu_info.skipped == 1);
    const schedule::Drift::State& d = opt.schedule_state(id);
    CHECK(d.last_refresh == cpu_info.drift_last_refresh);
    CHECK(d.baseline == doctest::Approx(cpu_info.drift_baseline).epsilon(1e-4));
    CHECK(d.last_captured == doctest::Approx(cpu_info.drift_last_captured).epsilon(1e-4));
  }
}

TEST_CASE("learning-rate changes, no bias correction and no weight decay match the CPU") {
  RunSpec s = spec_for(40, 24, ProjectionType::Std);
  s.lrs = {1e-2, 2e-2, 5e-3, 1e-2, 3e-2, 1e-3};
  s.correct_bias = false;
  s.weight_decay = 0.0;
  const auto grads = galore_test::separated_gradients(40, 24, 10, 6, 3u);
  const auto W0 = galore_test::gaussian(40 * 24, 9u);
  check_trajectories(gpu_run<float>(s, W0, grads), galore_test::cpu_run(s, W0, grads), W0, 1e-3, "lr schedule");
}

TEST_CASE("bf16 weights and gradients, and bf16 moments, follow the CPU within bf16 rounding") {
  // Full (both-sided) projection is compared with a host computation below instead: its
  // r x r R has near-zero off-diagonal entries that the bf16 basis' rounding dominates.
  for (ProjectionType type : {ProjectionType::Std, ProjectionType::ReverseStd, ProjectionType::Left,
                              ProjectionType::Right}) {
    const RunSpec s = spec_for(48, 32, type);
    auto grads = galore_test::separated_gradients(48, 32, 10, 6, 21u);
    for (auto& g : grads) g = galore_test::round_to_bf16(g);
    const auto W0 = galore_test::round_to_bf16(galore_test::gaussian(48 * 32, 6u));
    // The GPU keeps a bf16 layer's basis in bf16 (as galore_torch does), the CPU in float32: the
    // basis' rounding (2^-9) flips the sign of a few near-zero entries of R, whose Adam updates
    // are +-lr each, so the trajectories differ by several percent of the update (a wrong
    // product or transpose differs by 100%).
    check_trajectories(gpu_run<cuda::bf16>(s, W0, grads), galore_test::cpu_run(s, W0, grads, true), W0, 0.12,
                       std::string("bf16 ") + to_string(type));
  }
  RunSpec s = spec_for(48, 32, ProjectionType::Std);
  s.bf16_moments = true;
  const auto grads = galore_test::separated_gradients(48, 32, 10, 6, 22u);
  const auto W0 = galore_test::gaussian(48 * 32, 7u);
  check_trajectories(gpu_run<float, cuda::bf16>(s, W0, grads), galore_test::cpu_run(s, W0, grads), W0, 1e-2,
                     "bf16 moments");
}

TEST_CASE("a bf16 step equals a float64 host computation on the GPU's own bf16 basis, for every projection type") {
  const long m = 40, n = 24, r = 5;
  // 37 x 21 bf16: rows of 42 bytes, not 16-byte aligned.
  for (const auto& mn : {std::pair<long, long>{m, n}, std::pair<long, long>{n, m}, std::pair<long, long>{37, 21}})
    for (ProjectionType type : kTypes) {
      const long rows = mn.first, cols = mn.second;
      INFO(to_string(type), " ", rows, "x", cols);
      RunSpec s = spec_for(rows, cols, type);
      s.rank = r;
      const auto W0 = galore_test::round_to_bf16(galore_test::gaussian(static_cast<std::size_t>(rows * cols), 3u));
      const auto G = galore_test::round_to_bf16(galore_test::separated_gradients(rows, cols, 8, 1, 71u)[0]);
      cuda::Context ctx;
      cuda::GaLoreOptimizer<> opt(ProjectorOptions{r, type, s.scale}, adam_of(s), schedule::FixedGap{s.gap});
      const LayerId id = opt.add_layer({rows, cols}, cuda::DType::BFloat16);
      ctx.reserve_workspace(opt.workspace_bytes(ctx));
      Device<cuda::bf16> W(W0), g(G);
      opt.step(id, W.data(), static_cast<const cuda::bf16*>(g.data()), ctx);
      const std::vector<float> W1 = W.download();
      const auto b = opt.basis<cuda::bf16>(id);
      const std::vector<float> P = b.left ? Device<cuda::bf16>::download(b.left, static_cast<std::size_t>(rows * r))
                                          : std::vector<float>{};
      const std::vector<float> Q = b.right ? Device<cuda::bf16>::download(b.right, static_cast<std::size_t>(r * cols))
                                           : std::vector<float>{};
      // R in float64 from the bf16 values: right G Q^T, left P^T G, both P^T G Q^T.
      const Side side = resolve_side(type, rows, cols);
      const Shape lr = low_rank_shape(side, {rows, cols}, r);
      auto gq = [&](long i, long q) {
        double x = 0.0;
        for (long j = 0; j < cols; ++j) x += double(G[i * cols + j]) * Q[q * cols + j];
        return x;
      };
      std::vector<double> R(static_cast<std::size_t>(lr.size()), 0.0);
      for (long a = 0; a < lr.rows; ++a)
        for (long c = 0; c < lr.cols; ++c) {
          double x = 0.0;
          if (side == Side::Right) x = gq(a, c);
          else if (side == Side::Left)
            for (long i = 0; i < rows; ++i) x += double(P[i * r + a]) * G[i * cols + c];
          else
            for (long i = 0; i < rows; ++i) x += double(P[i * r + a]) * gq(i, c);
          R[a * lr.cols + c] = x;
        }
      // Adam at t = 1, d rounded to bf16 as the GPU stores it for the GEMM.
      const double step = s.lr * std::sqrt(1.0 - 0.999) / (1.0 - 0.9);
      std::vector<float> D(R.size());
      for (std::size_t i = 0; i < R.size(); ++i) {
        const double mom = 0.1 * R[i], v = 0.001 * R[i] * R[i];
        D[i] = static_cast<float>(cuda::bf16(static_cast<float>(step * mom / (std::sqrt(v) + s.eps))));
      }
      // back(D): right D Q, left P D, both (P D rounded to bf16) Q.
      std::vector<double> back(static_cast<std::size_t>(rows * cols), 0.0);
      std::vector<float> PN;
      if (side == Side::Both) {
        PN.resize(static_cast<std::size_t>(rows * r));
        for (long i = 0; i < rows; ++i)
          for (long q = 0; q < r; ++q) {
            double x = 0.0;
            for (long k = 0; k < r; ++k) x += double(P[i * r + k]) * D[k * r + q];
            PN[i * r + q] = static_cast<float>(cuda::bf16(static_cast<float>(x)));
          }
      }
      for (long i = 0; i < rows; ++i)
        for (long j = 0; j < cols; ++j) {
          double x = 0.0;
          if (side == Side::Right)
            for (long q = 0; q < r; ++q) x += double(D[i * r + q]) * Q[q * cols + j];
          else if (side == Side::Left)
            for (long q = 0; q < r; ++q) x += double(P[i * r + q]) * D[q * cols + j];
          else
            for (long q = 0; q < r; ++q) x += double(PN[i * r + q]) * Q[q * cols + j];
          back[i * cols + j] = x;
        }
      const double decay = 1.0 - s.lr * s.weight_decay;
      double worst = 0.0;
      for (std::size_t i = 0; i < W1.size(); ++i) {
        const double ref = decay * W0[i] - decay * s.scale * back[i];
        // One bf16 rounding of the result (2^-8 relative), plus float accumulation.
        worst = std::max(worst, std::abs(W1[i] - ref) / (std::abs(ref) * 0x1p-8 + 1e-5));
      }
      CHECK(worst <= 1.0);
    }
}

TEST_CASE("dense AdamW layers match the CPU element for element") {
  RunSpec s;
  s.rows = 7;
  s.cols = 33;
  s.dense = true;
  s.lr = 1e-2;
  s.weight_decay = 0.1;
  const auto grads = galore_test::separated_gradients(7, 33, 3, 5, 4u, 0.5f);
  const auto W0 = galore_test::gaussian(7 * 33, 8u);
  const auto gpu = gpu_run<float>(s, W0, grads);
  const auto cpu = galore_test::cpu_run(s, W0, grads);
  for (std::size_t t = 0; t < gpu.size(); ++t) CHECK(galore_test::max_abs_diff(gpu[t], cpu[t]) < 1e-6);
  const auto gpu16 = gpu_run<cuda::bf16>(s, galore_test::round_to_bf16(W0), grads);
  std::vector<std::vector<float>> g16;
  for (const auto& g : grads) g16.push_back(galore_test::round_to_bf16(g));
  const auto cpu16 = galore_test::cpu_run(s, galore_test::round_to_bf16(W0), g16, true);
  // One bf16 ulp at most (the GPU may fuse a multiply-add the CPU rounds twice).
  for (std::size_t t = 0; t < gpu16.size(); ++t) CHECK(galore_test::max_abs_diff(gpu16[t], cpu16[t]) < 2e-2);
}

TEST_CASE("the basis equals the CPU's, canonical signs included") {
  for (ProjectionType type : kTypes)
    for (const auto& mn : {std::pair<long, long>{64, 40}, std::pair<long, long>{40, 64}}) {
      const long m = mn.first, n = mn.second;
      INFO(to_string(type), " ", m, "x", n);
      const long r = 5;
      const auto G = galore_test::separated_gradients(m, n, 8, 1, 31u)[0];
      std::vector<float> left, right;
      galore_test::cpu_exact_basis(m, n, r, static_cast<int>(type), G, left, right);
      cuda::Context ctx;
      cuda::GaLoreOptimizer<> opt(ProjectorOptions{r, type, 0.25f});
      const LayerId id = opt.add_layer({m, n}, cuda::DType::Float32);
      ctx.reserve_workspace(opt.workspace_bytes(ctx));
      Device<float> W(std::vector<float>(static_cast<std::size_t>(m * n), 0.5f)), g(G);
      const auto res = opt.step(id, W.data(), static_cast<const float*>(g.data()), ctx);
      CHECK(res.refreshed);
      CHECK(res.status_known);
      const auto b = opt.basis<float>(id);
      if (!left.empty()) CHECK(galore_test::max_abs_diff(Device<float>::download(b.left, left.size()), left) < 1e-4);
      if (!right.empty())
        CHECK(galore_test::max_abs_diff(Device<float>::download(b.right, right.size()), right) < 1e-4);
      CHECK(left.empty() == (b.left == nullptr));
      CHECK(right.empty() == (b.right == nullptr));
    }
}

TEST_CASE("a non-finite gradient skips the step on the device and leaves everything untouched") {
  RunSpec s = spec_for(40, 24, ProjectionType::Std);
  auto grads = galore_test::separated_gradients(40, 24, 10, 7, 41u);
  // gap 2: steps 0 and 1 apply; at applied count 2 a refresh is due, and stays due while steps are skipped.
  grads[2][3] = std::numeric_limits<float>::infinity();
  grads[3][17] = std::numeric_limits<float>::quiet_NaN();
  grads[4][5] = 1e20f;  // finite, but v = (1-b2) g^2 overflows float
  const auto W0 = galore_test::gaussian(40 * 24, 12u);

  cuda::Context ctx;
  cuda::GaLoreOptimizer<> opt(ProjectorOptions{s.rank, ProjectionType::Std, s.scale}, adam_of(s), schedule::FixedGap{2});
  const LayerId id = opt.add_layer({40, 24}, cuda::DType::Float32);
  const LayerId dense = opt.add_dense({3, 24}, cuda::DType::Float32);
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  Device<float> W(W0), G(grads[0]);
  const std::size_t lr = 40 * 6;
  auto moments = [&](LayerId l, std::size_t n) {
    auto m = Device<float>::download(opt.first_moment(l), n);
    auto v = Device<float>::download(opt.second_moment(l), n);
    m.insert(m.end(), v.begin(), v.end());
    return m;
  };
  auto basis = [&] { return Device<float>::download(opt.basis<float>(id).right, 6 * 24); };

  for (int t = 0; t < 2; ++t) {
    G.upload(grads[static_cast<std::size_t>(t)]);
    opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
    CHECK(opt.status(id, ctx) == StepStatus::Applied);
  }
  for (int t = 2; t <= 4; ++t) {
    INFO("step ", t);
    const auto w_before = W.download();
    const auto m_before = moments(id, lr);
    const auto p_before = basis();
    const auto svd_before = opt.svd_count(id);
    G.upload(grads[static_cast<std::size_t>(t)]);
    const auto r = opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
    CHECK_FALSE(r.refreshed);
    CHECK(r.status_known);  // a refresh step learns its outcome
    CHECK(r.status == StepStatus::SkippedNonFinite);
    CHECK(opt.status(id, ctx) == StepStatus::SkippedNonFinite);
    CHECK(W.download() == w_before);
    CHECK(moments(id, lr) == m_before);
    CHECK(basis() == p_before);
    CHECK(opt.svd_count(id) == svd_before);
  }
  const LayerStats st = opt.stats(id, ctx);
  CHECK(st.steps == 2);
  CHECK(st.skipped_steps == 3);
  G.upload(grads[5]);
  const auto r = opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
  CHECK(r.refreshed);
  CHECK(opt.svd_count(id) == 2);

  // Dense layers: the same rule, decided on the device without a synchronization.
  Device<float> Wd(galore_test::gaussian(72, 2u)), Gd(galore_test::gaussian(72, 3u));
  opt.step(dense, Wd.data(), static_cast<const float*>(Gd.data()), ctx);
  std::vector<float> bad = galore_test::gaussian(72, 4u);
  bad[10] = std::numeric_limits<float>::quiet_NaN();
  Gd.upload(bad);
  const auto wd_before = Wd.download();
  const auto md_before = moments(dense, 72);
  const auto rd = opt.step(dense, Wd.data(), static_cast<const float*>(Gd.data()), ctx);
  CHECK_FALSE(rd.status_known);
  CHECK(opt.status(dense, ctx) == StepStatus::SkippedNonFinite);
  CHECK(Wd.download() == wd_before);
  CHECK(moments(dense, 72) == md_before);
}

// The step kernel decides on the device with a grid-wide barrier: a large layer
// spreads its check over every resident block, and the verdict must reach every
// block whichever block saw the bad element, step after step (the kernel's
// scratch alternates between two slots).
TEST_CASE("a step spread over many blocks skips whichever block sees the bad element, step after step") {
  RunSpec d;
  d.rows = 1200;
  d.cols = 1001;
  d.dense = true;
  d.lr = 1e-2;
  d.weight_decay = 0.1;
  auto dense_grads = galore_test::separated_gradients(d.rows, d.cols, 4, 8, 5u, 0.5f);
  const std::size_t n = static_cast<std::size_t>(d.rows * d.cols);
  dense_grads[1][n - 1] = std::numeric_limits<float>::quiet_NaN();  // the last block's share
  dense_grads[3][0] = std::numeric_limits<float>::infinity();       // the first block's
  dense_grads[4][n / 2] = 1e20f;                                    // one in the middle
  const auto W0 = galore_test::gaussian(n, 9u);
  const auto gpu = gpu_run<float>(d, W0, dense_grads);
  const auto cpu = galore_test::cpu_run(d, W0, dense_grads);
  for (std::size_t t = 0; t < gpu.size(); ++t) {
    INFO("dense step ", t);
    CHECK(galore_test::max_abs_diff(gpu[t], cpu[t]) < 1e-6);
  }
  CHECK(gpu[1] == gpu[0]);  // skipped
  CHECK(gpu[4] == gpu[2]);  // two skips in a row
  CHECK(gpu[5] != gpu[4]);  // applied again

  // A left-projected layer with a staged (padded) R of 8 x 2048: 64 blocks.
  RunSpec s = spec_for(600, 2045, ProjectionType::Std);
  s.rank = 8;
  auto grads = galore_test::separated_gradients(600, 2045, 12, 8, 6u, 1e-4f);
  grads[1][600 * 2045 - 1] = std::numeric_limits<float>::quiet_NaN();
  grads[4][0] = -std::numeric_limits<float>::infinity();
  grads[5][1234] = 1e30f;
  const auto W1 = galore_test::gaussian(600 * 2045, 10u);
  const auto gpu_p = gpu_run<float>(s, W1, grads);
  check_trajectories(gpu_p, galore_test::cpu_run(s, W1, grads), W1, 1e-3, "staged left layer");
  CHECK(gpu_p[1] == gpu_p[0]);
  CHECK(gpu_p[5] == gpu_p[3]);
}

TEST_CASE("skipped steps shift the refresh clock exactly as on the CPU") {
  RunSpec s = spec_for(40, 24, ProjectionType::Std);
  s.gap = 2;
  auto grads = galore_test::separated_gradients(40, 24, 10, 9, 43u);
  grads[2][0] = std::numeric_limits<float>::quiet_NaN();
  grads[5][7] = -std::numeric_limits<float>::infinity();
  const auto W0 = galore_test::gaussian(40 * 24, 13u);
  check_trajectories(gpu_run<float>(s, W0, grads), galore_test::cpu_run(s, W0, grads), W0, 1e-3, "skips");
}

TEST_CASE("randomized and warm-started refreshes capture the exact top-r energy") {
  const long m = 192, n = 128, r = 16;
  const auto grads = galore_test::separated_gradients(m, n, 40, 3, 51u, 0.02f);
  auto energy = [&](const std::vector<float>& G, const std::vector<float>& P) {  // P: r x n
    double captured = 0.0;
    for (long i = 0; i < m; ++i)
      for (long q = 0; q < r; ++q) {
        double x = 0.0;
        for (long j = 0; j < n; ++j) x += double(G[i * n + j]) * P[q * n + j];
        captured += x * x;
      }
    const auto sv = galore_test::cpu_singular_values(m, n, G);
    double top = 0.0;
    for (long q = 0; q < r; ++q) top += double(sv[q]) * sv[q];
    return captured / top;
  };
  auto run = [&](auto policy, const char* name) {
    INFO(name);
    refresh_every_step(policy, m, n, r, ProjectionType::Std, grads, [&](const auto& g, const auto& P) {
      CHECK(energy(g, P) > 0.995);
      CHECK(orthonormality(P, r, n) < 1e-4);
    });
  };
  with_iterative_policies(run);
}

TEST_CASE("the refreshed basis is orthonormal when the top singular values span a factor 10^4") {
  // A warm start orthonormalizes X = G^T G P^T, whose condition number is the
  // square of the spread (1e8 here): directions the first, shifted CholeskyQR
  // pass flattens (to norm 0.03) must come back orthonormal.
  const long m = 96, n = 64, r = 8, k = 12;
  const auto A = galore_test::gaussian(static_cast<std::size_t>(m * k), 41u);
  const auto B = galore_test::gaussian(static_cast<std::size_t>(k * n), 42u);
  std::vector<std::vector<float>> grads;
  for (int t = 0; t < 3; ++t) {
    std::vector<float> g = galore_test::gaussian(static_cast<std::size_t>(m * n), 43u + t, 1e-7f);
    for (long i = 0; i < m; ++i)
      for (long j = 0; j < n; ++j) {
        double x = 0.0;
        for (long q = 0; q < k; ++q)
          x += (q < r ? std::pow(10.0, -4.0 * q / (r - 1)) : 1e-5) * A[i * k + q] * B[q * n + j];
        g[i * n + j] += static_cast<float>(x);
      }
    grads.push_back(std::move(g));
  }
  auto run = [&](auto policy, const char* name) {
    INFO(name);
    refresh_every_step(policy, m, n, r, ProjectionType::Right, grads,
                       [&](const auto&, const auto& P) { CHECK(orthonormality(P, r, n) < 1e-4); });
  };
  with_iterative_policies(run);
}

TEST_CASE("a zero or rank-deficient gradient gives a finite step and a finite basis") {
  for (int policy = 0; policy < 3; ++policy) {
    INFO("policy ", policy);
    const long m = 48, n = 32, r = 8;
    auto grads = galore_test::separated_gradients(m, n, 3, 3, 61u, 0.0f);  // rank 3 < r
    grads.insert(grads.begin() + 1, std::vector<float>(static_cast<std::size_t>(m * n), 0.0f));
    cuda::Context ctx;
    auto go = [&](auto p) {
      galore_test::GpuOptimizer<decltype(p)> opt(ProjectorOptions{r, ProjectionType::Std, 0.25f}, AdamConfig{},
                                                 schedule::FixedGap{1}, p);
      const LayerId id = opt.add_layer({m, n}, cuda::DType::Float32);
      ctx.reserve_workspace(opt.workspace_bytes(ctx));
      Device<float> W(galore_test::gaussian(static_cast<std::size_t>(m * n), 3u)), G(grads[0]);
      for (const auto& g : grads) {
        G.upload(g);
        opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
        CHECK(opt.status(id, ctx) == StepStatus::Applied);
      }
      for (float x : W.download()) REQUIRE(std::isfinite(x));
      for (float x : Device<float>::download(opt.template basis<float>(id).right, static_cast<std::size_t>(r * n)))
        REQUIRE(std::isfinite(x));
    };
    if (policy == 0) go(svd::Exact{});
    if (policy == 1) go(svd::Randomized{});
    if (policy == 2) go(svd::WarmStart{});
  }
}

TEST_CASE("first_moment and second_moment are the layer's m and v") {
  // 40 x 6 float moments take 960 bytes: v starts at the next 256-byte boundary.
  RunSpec s = spec_for(40, 24, ProjectionType::Std);
  AdamConfig adam = adam_of(s);
  cuda::Context ctx;
  cuda::GaLoreOptimizer<> opt(ProjectorOptions{s.rank, ProjectionType::Std, s.scale}, adam, schedule::FixedGap{5});
  const LayerId id = opt.add_layer({40, 24}, cuda::DType::Float32);
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  Device<float> W(galore_test::gaussian(40 * 24, 1u)), G(galore_test::separated_gradients(40, 24, 8, 1, 2u)[0]);
  opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
  // After one step from zero: m = (1 - b1) R and v = (1 - b2) R^2, so v = (1 - b2) / (1 - b1)^2 m^2.
  const auto m = Device<float>::download(opt.first_moment(id), 40 * 6);
  const auto v = Device<float>::download(opt.second_moment(id), 40 * 6);
  const double k = (1.0 - adam.beta2) / ((1.0 - adam.beta1) * (1.0 - adam.beta1));
  double mass = 0.0;
  for (std::size_t i = 0; i < m.size(); ++i) {
    CHECK(v[i] == doctest::Approx(k * double(m[i]) * m[i]).epsilon(1e-5));
    mass += std::abs(m[i]);
  }
  CHECK(mass > 0.0);
}

TEST_CASE("state_bytes equals the layout formula and the device memory allocated") {
  using A = cuda::WorkspaceArena;
  cuda::GaLoreOptimizer<> probe(ProjectorOptions{512, ProjectionType::Std, 0.25f});
  // right side: m x r moments (float), r x n basis (layer's type), the counters
  const std::size_t counters = A::align(sizeof(cuda::StepCounters));
  CHECK(probe.predict_layer_bytes({2048, 1024}, cuda::DType::BFloat16, probe.projection_options()) ==
        2 * A::align(4 * 2048 * 512) + A::align(2 * 512 * 1024) + counters);
  CHECK(probe.predict_layer_bytes({1000, 3000}, cuda::DType::Float32, ProjectorOptions{100, ProjectionType::Full}) ==
        2 * A::align(4 * 100 * 100) + A::align(4 * 1000 * 100) + A::align(4 * 100 * 3000) + counters);
  CHECK(probe.predict_dense_bytes({3, 5}, cuda::DType::Float32) == 2 * A::align(4 * 15) + counters);

  std::size_t free_before = 0, free_after = 0, total = 0;
  cuda::check(cudaDeviceSynchronize(), "sync");
  cuda::check(cudaMemGetInfo(&free_before, &total), "cudaMemGetInfo");
  {
    cuda::GaLoreOptimizer<> opt(ProjectorOptions{1024, ProjectionType::Std, 0.25f});
    std::size_t predicted = 0;
    for (int i = 0; i < 4; ++i) {
      opt.add_layer({4096, 4096}, cuda::DType::Float32);
      predicted += opt.predict_layer_bytes({4096, 4096}, cuda::DType::Float32, opt.projection_options());
    }
    CHECK(opt.state_bytes() == predicted);
    cuda::check(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");
    const std::size_t measured = free_before - free_after;
    INFO("measured ", measured, " state_bytes ", opt.state_bytes());
    // cudaMalloc hands out whole 2 MiB pages: at most one partial page per layer.
    CHECK(measured >= opt.state_bytes());
    CHECK(measured <= opt.state_bytes() + 4 * (std::size_t{2} << 20));
  }
}

TEST_CASE("bad calls throw and change nothing") {
  cuda::Context ctx;
  CHECK_THROWS_AS(cuda::GaLoreOptimizer<>(ProjectorOptions{0}), galore::invalid_argument);
  CHECK_THROWS_AS(cuda::GaLoreOptimizer<>(ProjectorOptions{4, static_cast<ProjectionType>(42)}),
                  galore::invalid_argument);
  CHECK_THROWS_AS(cuda::GaLoreOptimizer<>(ProjectorOptions{4, ProjectionType::Std, NAN}), galore::invalid_argument);
  cuda::GaLoreOptimizer<> opt(ProjectorOptions{4, ProjectionType::Std, 0.25f});
  CHECK_THROWS_AS(opt.add_layer({3, 2}, cuda::DType::Float32), galore::invalid_argument);  // rank 4 > 2
  CHECK_THROWS_AS(opt.add_layer({0, 2}, cuda::DType::Float32), galore::invalid_argument);
  const LayerId id = opt.add_layer({16, 8}, cuda::DType::Float32);
  Device<float> W(galore_test::gaussian(128, 1u)), G(galore_test::gaussian(128, 2u));
  Device<cuda::bf16> W16(galore_test::gaussian(128, 1u)), G16(galore_test::gaussian(128, 2u));
  // No workspace yet.
  CHECK_THROWS_AS(opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx), galore::invalid_argument);
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  CHECK_THROWS_AS(opt.step(id, W16.data(), static_cast<const cuda::bf16*>(G16.data()), ctx), galore::invalid_argument);
  CHECK_THROWS_AS(opt.step(id, device_view(W.data(), 8, 16), DeviceView<const float>(G.data(), 8, 16), ctx),
                  galore::invalid_argument);
  CHECK_THROWS_AS(opt.step(id, static_cast<float*>(nullptr), static_cast<const float*>(G.data()), ctx),
                  galore::invalid_argument);
  CHECK_THROWS_AS(opt.step(LayerId{7}, W.data(), static_cast<const float*>(G.data()), ctx), galore::invalid_argument);
  const auto w0 = W.download();
  CHECK(opt.stats(id, ctx).steps == 0);
  CHECK(opt.svd_count(id) == 0);
  CHECK(W.download() == w0);
  // Still usable.
  opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
  CHECK(opt.status(id, ctx) == StepStatus::Applied);
  CHECK(opt.stats(id, ctx).steps == 1);
  // Learning rates are validated.
  CHECK_THROWS_AS(opt.set_lr(-1.0), galore::invalid_argument);
  CHECK(opt.adam_config().lr == doctest::Approx(1e-3));
}
