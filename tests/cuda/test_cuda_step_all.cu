// The whole-model step (cuda::StepPlan, step_all): batched against per-layer
// and against the CPU on identical inputs (refresh steps included, exact and
// warm-started SVD, fixed and lazy schedules), a skipped layer inside a batch
// (on a refresh step too), graph replay against eager execution, the plan's
// errors and its memory.
#include <doctest/doctest.h>

#include <galore/cuda.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "cpu_reference.hpp"
#include "cuda_support.cuh"

using namespace galore;
using galore_test::Device;
using galore_test::RunSpec;

namespace {

struct LayerSpec {
  long m, n;
  ProjectionType type;
  bool dense = false;
  bool bf16 = false;
};

// Every group the plan forms: right (Std on a tall matrix, Right), left (Std on
// a wide one, ReverseStd on a tall one, Left), left with a column count that is
// not a multiple of 8 (staged), dense; float and bf16.
const std::vector<LayerSpec> kMix = {
    {48, 32, ProjectionType::Std},        {48, 32, ProjectionType::Std},
    {48, 32, ProjectionType::Std},        {32, 56, ProjectionType::Std},
    {32, 56, ProjectionType::Std},        {48, 32, ProjectionType::ReverseStd},
    {40, 37, ProjectionType::Left},       {40, 37, ProjectionType::Left},
    {24, 40, ProjectionType::Right},      {16, 24, ProjectionType::Std, true},
    {8, 40, ProjectionType::Std, true},   {48, 32, ProjectionType::Std, false, true},
    {48, 32, ProjectionType::Std, false, true}, {32, 56, ProjectionType::Left, false, true},
    {16, 24, ProjectionType::Std, true, true},
    // Layers of more than one work item (65536 elements) of the Adam kernel:
    // a staged left one (R 6 x 11008, an item boundary inside a row), a right one
    // (R 12000 x 6: 4-element accesses and a tail), a dense one.
    {40, 11001, ProjectionType::Std},     {12000, 16, ProjectionType::Std},
    {320, 320, ProjectionType::Std, true},
};

RunSpec spec_of(const LayerSpec& l) {
  RunSpec s;
  s.rows = l.m;
  s.cols = l.n;
  s.rank = 6;
  s.type = static_cast<int>(l.type);
  s.scale = 0.25f;
  s.lr = 1e-2;
  s.weight_decay = 0.05;
  s.eps = 1e-3;
  s.gap = 3;
  s.dense = l.dense;
  return s;
}

using Opt = galore_test::GpuOptimizer<svd::Exact, float>;
using WarmLazy = galore_test::GpuOptimizer<svd::WarmStart, float, schedule::Lazy>;

// The projected layers of kMix (a refresh step refreshes them all).
int projected(const std::vector<LayerSpec>& specs) {
  int n = 0;
  for (const LayerSpec& l : specs) n += l.dense ? 0 : 1;
  return n;
}

// A model of kMix-like layers on the device: weights, gradients, layer ids.
struct Model {
  std::vector<LayerSpec> specs;
  std::vector<LayerId> ids;
  std::vector<std::unique_ptr<Device<float>>> Wf, Gf;
  std::vector<std::unique_ptr<Device<cuda::bf16>>> Wb, Gb;
  std::vector<std::vector<float>> W0;

  template <class O>
  Model(O& opt, const std::vector<LayerSpec>& s) : specs(s) {
    for (std::size_t i = 0; i < specs.size(); ++i) {
      const LayerSpec& l = specs[i];
      const cuda::DType t = l.bf16 ? cuda::DType::BFloat16 : cuda::DType::Float32;
      ids.push_back(l.dense ? opt.add_dense({l.m, l.n}, t)
                            : opt.add_layer({l.m, l.n}, t, ProjectorOptions{6, l.type, 0.25f}));
      std::vector<float> w = galore_test::gaussian(static_cast<std::size_t>(l.m * l.n), 100u + unsigned(i));
      if (l.bf16) w = galore_test::round_to_bf16(w);
      W0.push_back(w);
      Wf.push_back(std::make_unique<Device<float>>(l.bf16 ? std::vector<float>(1) : w));
      Gf.push_back(std::make_unique<Device<float>>(std::vector<float>(l.bf16 ? 1 : w.size(), 0.0f)));
      Wb.push_back(std::make_unique<Device<cuda::bf16>>(l.bf16 ? w : std::vector<float>(1)));
      Gb.push_back(std::make_unique<Device<cuda::bf16>>(std::vector<float>(l.bf16 ? w.size() : 1, 0.0f)));
    }
  }
  std::vector<cuda::StepParam> params() {
    std::vector<cuda::StepParam> p;
    for (std::size_t i = 0; i < specs.size(); ++i) {
      const LayerSpec& l = specs[i];
      if (l.bf16)
        p.push_back(cuda::step_param(ids[i], DeviceView<cuda::bf16>(Wb[i]->data(), l.m, l.n),
                                     DeviceView<const cuda::bf16>(Gb[i]->data(), l.m, l.n)));
      else
        p.push_back(cuda::step_param(ids[i], DeviceView<float>(Wf[i]->data(), l.m, l.n),
                                     DeviceView<const float>(Gf[i]->data(), l.m, l.n)));
    }
    return p;
  }
  void upload_gradient(std::size_t i, const std::vector<float>& g) {
    if (specs[i].bf16) Gb[i]->upload(g);
    else Gf[i]->upload(g);
  }
  std::vector<float> weight(std::size_t i) { return specs[i].bf16 ? Wb[i]->download() : Wf[i]->download(); }
  template <class O>
  void step_each(O& opt, cuda::Context& ctx) {
    for (const cuda::StepParam& p : params()) {
      const LayerSpec& l = specs[p.id.index];
      if (l.bf16)
        opt.step(p.id, static_cast<cuda::bf16*>(p.W), static_cast<const cuda::bf16*>(p.G), ctx);
      else
        opt.step(p.id, static_cast<float*>(p.W), static_cast<const float*>(p.G), ctx);
    }
  }
};

// Gradients per layer and step (bf16 layers: rounded to bf16).
std::vector<std::vector<std::vector<float>>> gradients(const std::vector<LayerSpec>& specs, int steps) {
  std::vector<std::vector<std::vector<float>>> g;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    auto s = galore_test::separated_gradients(specs[i].m, specs[i].n, 10, steps, 300u + 7u * unsigned(i));
    if (specs[i].bf16)
      for (auto& x : s) x = galore_test::round_to_bf16(x);
    g.push_back(std::move(s));
  }
  return g;
}

// The layer's basis (the factor of its side), as floats.
std::vector<float> basis_values(Opt& opt, LayerId id, const LayerSpec& l) {
  const long len = (opt.side(id) == Side::Right ? l.n : l.m) * 6;
  if (l.bf16) {
    const auto b = opt.basis<cuda::bf16>(id);
    return Device<cuda::bf16>::download(b.side == Side::Right ? b.right : b.left, static_cast<std::size_t>(len));
  }
  const auto b = opt.basis<float>(id);
  return Device<float>::download(b.side == Side::Right ? b.right : b.left, static_cast<std::size_t>(len));
}

// Step t's gradients into two models of the same layers.
void upload_both(Model& a, Model& b, const std::vector<std::vector<std::vector<float>>>& grads, int t) {
  for (std::size_t i = 0; i < a.specs.size(); ++i) {
    a.upload_gradient(i, grads[i][static_cast<std::size_t>(t)]);
    b.upload_gradient(i, grads[i][static_cast<std::size_t>(t)]);
  }
}

std::vector<float> moments(Opt& opt, LayerId id, std::size_t n) {
  auto m = Device<float>::download(opt.first_moment(id), n);
  const auto v = Device<float>::download(opt.second_moment(id), n);
  m.insert(m.end(), v.begin(), v.end());
  return m;
}

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { cuda::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
  ~Stream() { cudaStreamDestroy(s); }
};

// kMix twice on one stream, with refresh gap 3: `each` stepped layer by layer
// (model a), `all` through a plan (model b).
struct Twins {
  Stream stream;
  cuda::Context ctx_each{stream.s}, ctx_all{stream.s};
  Opt each{ProjectorOptions{6, ProjectionType::Std, 0.25f}, galore_test::adam_of(spec_of(kMix[0])),
           schedule::FixedGap{3}};
  Opt all{ProjectorOptions{6, ProjectionType::Std, 0.25f}, galore_test::adam_of(spec_of(kMix[0])),
          schedule::FixedGap{3}};
  Model a{each, kMix}, b{all, kMix};
  cuda::StepPlan plan;
  Twins() {
    ctx_each.reserve_workspace(each.workspace_bytes(ctx_each));
    ctx_all.reserve_workspace(all.workspace_bytes(ctx_all));
    plan = all.plan_step_all(b.params(), ctx_all);
  }
};

}  // namespace

TEST_CASE("the batched step equals the per-layer step and the CPU: left, right, staged and dense layers, float and bf16") {
  const int steps = 8;  // gap 3: steps 0, 3 and 6 refresh (batched, eagerly), the others replay the graph
  const auto grads = gradients(kMix, steps);
  Twins twins;
  auto& [stream, ctx_each, ctx_all, each, all, a, b, plan] = twins;
  CHECK(plan.num_layers() == kMix.size());
  int replays = 0;
  std::vector<std::vector<std::vector<float>>> traj(kMix.size());
  for (int t = 0; t < steps; ++t) {
    upload_both(a, b, grads, t);
    a.step_each(each, ctx_each);
    const cuda::StepAllResult r = all.step_all(plan, ctx_all);
    CHECK(r.batched);
    CHECK(r.graph == (t % 3 != 0));
    CHECK(r.refreshed == (t % 3 == 0 ? projected(kMix) : 0));
    replays += r.graph ? 1 : 0;
    ctx_all.synchronize();
    for (std::size_t i = 0; i < kMix.size(); ++i) {
      INFO("step ", t, " layer ", i, " (", kMix[i].m, "x", kMix[i].n, " ", to_string(kMix[i].type),
           kMix[i].dense ? " dense" : "", kMix[i].bf16 ? " bf16" : "", ")");
      const auto wa = a.weight(i), wb = b.weight(i);
      traj[i].push_back(wb);
      // The same arithmetic but other GEMM kernels: float sums in another order.
      const double e = galore_test::relative_change_error(wb, wa, a.W0[i]);
      CHECK(e < (kMix[i].bf16 ? 2e-2 : 1e-4));
      CHECK(all.status(b.ids[i], ctx_all) == StepStatus::Applied);
      if (!kMix[i].dense) CHECK(all.svd_count(b.ids[i]) == each.svd_count(a.ids[i]));
    }
  }
  CHECK(replays == 5);
  CHECK(plan.graph_captured());
  // And against the CPU backend, layer by layer (float layers; the bf16 ones
  // match the per-layer GPU step above, which test_cuda_step compares with the CPU).
  for (std::size_t i = 0; i < kMix.size(); ++i) {
    if (kMix[i].bf16) continue;
    INFO("layer ", i);
    std::vector<std::vector<float>> g(grads[i].begin(), grads[i].end());
    const auto cpu = galore_test::cpu_run(spec_of(kMix[i]), a.W0[i], g);
    for (int t = 0; t < steps; ++t) CHECK(galore_test::relative_change_error(traj[i][t], cpu[t], a.W0[i]) < 1e-3);
  }
}

TEST_CASE("warm-started refreshes batched per chunk equal the per-layer ones, with the lazy schedule's gaps") {
  // svd::WarmStart refreshes each chunk's due layers together (compute_bases:
  // batched orthonormalization); the lazy schedule reads each new basis's first
  // singular vector and doubles the gap whenever its cosine queue (2) is full:
  // refreshes at steps 0, 2, 4 (gap 4), then 8 (gap 8).
  const int steps = 10;
  const auto grads = gradients(kMix, steps);
  Stream stream;
  cuda::Context ctx_each(stream.s), ctx_all(stream.s);
  schedule::Lazy lazy;
  lazy.gap = 2;
  lazy.queue_size = 2;
  lazy.cos_threshold = 0.4;
  const AdamConfig adam = galore_test::adam_of(spec_of(kMix[0]));
  WarmLazy each(ProjectorOptions{6, ProjectionType::Std, 0.25f}, adam, lazy);
  WarmLazy all(ProjectorOptions{6, ProjectionType::Std, 0.25f}, adam, lazy);
  Model a(each, kMix), b(all, kMix);
  ctx_each.reserve_workspace(each.workspace_bytes(ctx_each));
  cuda::StepPlan plan = all.plan_step_all(b.params(), ctx_all);
  std::vector<int> refresh_steps;
  for (int t = 0; t < steps; ++t) {
    upload_both(a, b, grads, t);
    a.step_each(each, ctx_each);
    const cuda::StepAllResult r = all.step_all(plan, ctx_all);
    CHECK(r.batched);
    CHECK(r.graph == (r.refreshed == 0));
    if (r.refreshed > 0) {
      CHECK(r.refreshed == projected(kMix));
      refresh_steps.push_back(t);
    }
    ctx_all.synchronize();
    for (std::size_t i = 0; i < kMix.size(); ++i) {
      INFO("step ", t, " layer ", i);
      CHECK(galore_test::relative_change_error(b.weight(i), a.weight(i), a.W0[i]) < (kMix[i].bf16 ? 2e-2 : 1e-4));
      if (kMix[i].dense) continue;
      CHECK(all.svd_count(b.ids[i]) == each.svd_count(a.ids[i]));
      CHECK(all.schedule_state(b.ids[i]).gap == each.schedule_state(a.ids[i]).gap);
      const float cb = all.schedule_state(b.ids[i]).last_cosine, ca = each.schedule_state(a.ids[i]).last_cosine;
      CHECK(std::isnan(cb) == std::isnan(ca));  // NaN until the second refresh
      if (!std::isnan(ca)) CHECK(cb == doctest::Approx(ca).epsilon(1e-3));
    }
  }
  CHECK(refresh_steps == std::vector<int>{0, 2, 4, 8});
  for (std::size_t i = 0; i < kMix.size(); ++i)
    if (!kMix[i].dense) CHECK(all.schedule_state(b.ids[i]).gap == 8);
}

TEST_CASE("a layer with a non-finite gradient is skipped inside the batch, on a refresh step too; the others step") {
  const int steps = 6;
  auto grads = gradients(kMix, steps);
  // Step 1 replays the graph (gap 3). In it a right float layer, a staged one, a
  // dense one and a bf16 one are skipped (weight decay 0.05: beta is not 1, so
  // the back-projection of a skipped layer must not touch its W). Step 3
  // refreshes: in it a right float layer and a left bf16 one are skipped, so
  // they keep their bases (their candidates, from a non-finite gradient, are
  // not finite) and refresh at step 4 instead.
  grads[0][1][5] = std::numeric_limits<float>::quiet_NaN();
  grads[6][1][11] = std::numeric_limits<float>::infinity();
  grads[9][1][3] = std::numeric_limits<float>::quiet_NaN();
  grads[12][1][7] = std::numeric_limits<float>::infinity();
  grads[8][3][2] = std::numeric_limits<float>::quiet_NaN();
  grads[13][3][4] = std::numeric_limits<float>::infinity();
  const std::vector<std::pair<int, std::size_t>> skips{{1, 0}, {1, 6}, {1, 9}, {1, 12}, {3, 8}, {3, 13}};
  int replays_after = 0;
  Twins twins;
  auto& [stream, ctx_each, ctx_all, each, all, a, b, plan] = twins;
  for (int t = 0; t < steps; ++t) {
    std::vector<std::vector<float>> w_before, m_before, p_before(kMix.size());
    for (std::size_t i = 0; i < kMix.size(); ++i) {
      a.upload_gradient(i, grads[i][t]);
      b.upload_gradient(i, grads[i][t]);
      w_before.push_back(b.weight(i));
      if (t > 0 && !kMix[i].dense) p_before[i] = basis_values(all, b.ids[i], kMix[i]);
      const long n = kMix[i].dense ? kMix[i].m * kMix[i].n : 6 * (all.side(b.ids[i]) == Side::Right ? kMix[i].m : kMix[i].n);
      m_before.push_back(moments(all, b.ids[i], static_cast<std::size_t>(n)));
    }
    a.step_each(each, ctx_each);
    const auto r = all.step_all(plan, ctx_all);
    CHECK(r.batched);
    if (t == 1) CHECK(r.graph);
    // At step 3 layers 0, 6 and 12 (skipped at step 1) are a step behind, not
    // due; 8 and 13 are due but skipped. All five refresh at step 4.
    if (t == 3) CHECK(r.refreshed == projected(kMix) - 5);
    if (t == 4) CHECK(r.refreshed == 5);
    // The skips leave the host unsure of some step counts: steps that might
    // refresh read them (eagerly) until it knows them; later ones replay again.
    if (t > 1 && r.graph) ++replays_after;
    for (std::size_t i = 0; i < kMix.size(); ++i) {
      INFO("step ", t, " layer ", i);
      bool skipped = false;
      for (const auto& s : skips) skipped |= s.first == t && s.second == i;
      CHECK(all.status(b.ids[i], ctx_all) == (skipped ? StepStatus::SkippedNonFinite : StepStatus::Applied));
      CHECK(each.status(a.ids[i], ctx_each) == all.status(b.ids[i], ctx_all));
      const long n = kMix[i].dense ? kMix[i].m * kMix[i].n : 6 * (all.side(b.ids[i]) == Side::Right ? kMix[i].m : kMix[i].n);
      if (skipped) {
        CHECK(b.weight(i) == w_before[i]);
        CHECK(moments(all, b.ids[i], static_cast<std::size_t>(n)) == m_before[i]);
        if (!kMix[i].dense) CHECK(basis_values(all, b.ids[i], kMix[i]) == p_before[i]);
      } else {
        CHECK(b.weight(i) != w_before[i]);
      }
      CHECK(galore_test::relative_change_error(b.weight(i), a.weight(i), a.W0[i]) < (kMix[i].bf16 ? 2e-2 : 1e-4));
      if (!kMix[i].dense) CHECK(all.svd_count(b.ids[i]) == each.svd_count(a.ids[i]));
    }
  }
  CHECK(replays_after > 0);  // a layer skipped in a batch steps again in later batches
  for (const auto& s : skips) CHECK(all.stats(b.ids[s.second], ctx_all).skipped_steps == 1);
}

TEST_CASE("graph replay equals eager execution bit for bit, with learning-rate changes and refreshes between replays") {
  const int steps = 10;
  auto grads = gradients(kMix, steps);
  // Step 8 refreshes (eagerly) after graph replays, and layer 16 is skipped in
  // it, so it refreshes alone at step 9. Layer 16 spreads over many blocks.
  const std::size_t big = 16;
  REQUIRE(kMix[big].m == 12000);
  grads[big][8][100] = std::numeric_limits<float>::quiet_NaN();
  Stream stream;
  cuda::Context ctx_g(stream.s), ctx_e(stream.s);
  auto make = [] {
    return Opt(ProjectorOptions{6, ProjectionType::Std, 0.25f}, galore_test::adam_of(spec_of(kMix[0])),
               schedule::FixedGap{4});
  };
  Opt og = make(), oe = make();
  Model g(og, kMix), e(oe, kMix);
  ctx_g.reserve_workspace(og.workspace_bytes(ctx_g));
  ctx_e.reserve_workspace(oe.workspace_bytes(ctx_e));
  cuda::StepPlan pg = og.plan_step_all(g.params(), ctx_g);
  cuda::StepPlanOptions eager;
  eager.use_graph = false;
  cuda::StepPlan pe = oe.plan_step_all(e.params(), ctx_e, eager);
  int replays = 0;
  for (int t = 0; t < steps; ++t) {
    const double lr = 1e-2 * (1.0 + 0.1 * t);
    og.set_lr(lr);
    oe.set_lr(lr);
    upload_both(g, e, grads, t);
    const auto before = g.weight(big);
    const auto rg = og.step_all(pg, ctx_g);
    const auto re = oe.step_all(pe, ctx_e);
    if (t == 8) {
      CHECK(rg.refreshed == projected(kMix) - 1);
      CHECK(og.status(g.ids[big], ctx_g) == StepStatus::SkippedNonFinite);
      CHECK(g.weight(big) == before);
    }
    if (t == 9) CHECK(rg.refreshed == 1);
    CHECK(rg.batched);
    CHECK(re.batched);
    CHECK(rg.refreshed == re.refreshed);
    CHECK(rg.graph == (t != 0 && t != 4 && t != 8 && t != 9));
    CHECK_FALSE(re.graph);
    replays += rg.graph ? 1 : 0;
    ctx_g.synchronize();
    for (std::size_t i = 0; i < kMix.size(); ++i) {
      INFO("step ", t, " layer ", i);
      CHECK(g.weight(i) == e.weight(i));
    }
  }
  CHECK(replays == 6);  // steps 0, 4 and 8 refresh, and 9 (layer 16's refresh, skipped at 8, is due)
  CHECK(og.svd_count(g.ids[big]) == 3);
  CHECK(pg.graph_captured());
  CHECK_FALSE(pe.graph_captured());
}

TEST_CASE("GEMM algorithms measured at their first call step as the heuristic's do, and never during capture") {
  const int steps = 4;  // gap 3: steps 0 and 3 refresh
  const auto grads = gradients(kMix, steps);
  Stream stream;
  cuda::Context heuristic(stream.s), measured(stream.s), measured_each(stream.s);
  measured.select_gemm_algorithms(cuda::GemmSelection::Measured);
  measured_each.select_gemm_algorithms(cuda::GemmSelection::Measured);
  auto make = [] {
    return Opt(ProjectorOptions{6, ProjectionType::Std, 0.25f}, galore_test::adam_of(spec_of(kMix[0])),
               schedule::FixedGap{3});
  };
  Opt oh = make(), om = make(), oe = make();
  Model h(oh, kMix), m(om, kMix), e(oe, kMix);
  heuristic.reserve_workspace(oh.workspace_bytes(heuristic));
  measured.reserve_workspace(om.workspace_bytes(measured));
  measured_each.reserve_workspace(oe.workspace_bytes(measured_each));
  cuda::StepPlan ph = oh.plan_step_all(h.params(), heuristic), pm = om.plan_step_all(m.params(), measured);
  // plan_step_all measured the batched GEMMs already (on scratch outputs).
  for (const auto& [key, plan] : measured.lt_plans()) CHECK(plan->measured);
  for (int t = 0; t < steps; ++t) {
    upload_both(h, m, grads, t);
    for (std::size_t i = 0; i < kMix.size(); ++i) e.upload_gradient(i, grads[i][static_cast<std::size_t>(t)]);
    (void)oh.step_all(ph, heuristic);
    (void)om.step_all(pm, measured);
    e.step_each(oe, measured_each);
    heuristic.synchronize();
    for (std::size_t i = 0; i < kMix.size(); ++i) {
      INFO("step ", t, " layer ", i);
      const auto wh = h.weight(i);
      // Another algorithm sums in another order: float rounding only (timing
      // runs into the real outputs would have added the update several times).
      CHECK(galore_test::relative_change_error(m.weight(i), wh, h.W0[i]) < (kMix[i].bf16 ? 2e-2 : 1e-4));
      CHECK(galore_test::relative_change_error(e.weight(i), wh, h.W0[i]) < (kMix[i].bf16 ? 2e-2 : 1e-4));
    }
  }
  for (const auto& [key, plan] : measured_each.lt_plans()) CHECK(plan->measured);
  for (const auto& [key, plan] : heuristic.lt_plans()) CHECK_FALSE(plan->measured);
  // A selection applies to problems first met after it: the batched plans made
  // under the heuristic stay as they are, the per-layer ones met now are measured.
  std::vector<cuda::LtPlanKey> before;
  for (const auto& [key, plan] : heuristic.lt_plans()) before.push_back(key);
  heuristic.select_gemm_algorithms(cuda::GemmSelection::Measured);
  (void)oh.step_all(ph, heuristic);
  h.step_each(oh, heuristic);
  heuristic.synchronize();
  REQUIRE(heuristic.lt_plans().size() > before.size());
  for (const auto& [key, plan] : heuristic.lt_plans())
    CHECK(plan->measured == (std::find(before.begin(), before.end(), key) == before.end()));

  // A first call made while the stream is captured keeps the heuristic's
  // choice; the next eager call measures, and C = A B + C once.
  cuda::Context cap(stream.s);
  cap.select_gemm_algorithms(cuda::GemmSelection::Measured);
  const long n = 64;
  const auto a = galore_test::gaussian(n * n, 1u), b = galore_test::gaussian(n * n, 2u), c0 = galore_test::gaussian(n * n, 3u);
  Device<float> A(a), B(b), C(c0);
  auto product = [&] {
    cuda::gemm(cap, cuda::Op::N, cuda::Op::N, 1.0f, DeviceView<const float>(A.data(), n, n),
               DeviceView<const float>(B.data(), n, n), 1.0f, DeviceView<float>(C.data(), n, n));
  };
  cudaGraph_t graph = nullptr;
  cuda::check(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  product();
  cuda::check(cudaStreamEndCapture(stream.s, &graph), "cudaStreamEndCapture");
  cuda::check(cudaGraphDestroy(graph), "cudaGraphDestroy");
  REQUIRE(cap.lt_plans().size() == 1);
  CHECK_FALSE(cap.lt_plans().begin()->second->measured);
  product();
  cap.synchronize();
  CHECK(cap.lt_plans().begin()->second->measured);
  std::vector<float> expect(c0);
  for (long i = 0; i < n; ++i)
    for (long j = 0; j < n; ++j) {
      double sum = c0[static_cast<std::size_t>(i * n + j)];
      for (long k = 0; k < n; ++k) sum += double(a[static_cast<std::size_t>(i * n + k)]) * b[static_cast<std::size_t>(k * n + j)];
      expect[static_cast<std::size_t>(i * n + j)] = static_cast<float>(sum);
    }
  CHECK(galore_test::max_abs_diff(C.download(), expect) < 1e-3);
}

TEST_CASE("on the legacy default stream the batched step runs eagerly") {
  cuda::Context ctx;  // stream 0
  Opt opt(ProjectorOptions{6, ProjectionType::Std, 0.25f}, AdamConfig{}, schedule::FixedGap{100});
  Model m(opt, {{48, 32, ProjectionType::Std}, {48, 32, ProjectionType::Std}});
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  cuda::StepPlan plan = opt.plan_step_all(m.params(), ctx);
  const auto grads = gradients(m.specs, 2);
  for (int t = 0; t < 2; ++t) {
    for (std::size_t i = 0; i < 2; ++i) m.upload_gradient(i, grads[i][t]);
    const auto r = opt.step_all(plan, ctx);
    CHECK(r.batched);
    CHECK(r.refreshed == (t == 0 ? 2 : 0));
    CHECK_FALSE(r.graph);
  }
  CHECK_FALSE(plan.graph_captured());
}

TEST_CASE("the plan's workspace is its chunks' temporaries and the refresh's, and the limit cuts groups into chunks") {
  cuda::Context ctx;
  AdamConfig adam;
  adam.weight_decay = 0.1;  // the scratch output for skipped layers is needed
  Opt opt(ProjectorOptions{6, ProjectionType::Std, 0.25f}, adam, schedule::FixedGap{100});
  // Four right 48x32 float layers, two staged left 40x37 bf16 layers.
  Model m(opt, {{48, 32, ProjectionType::Std}, {48, 32, ProjectionType::Std}, {48, 32, ProjectionType::Std},
                {48, 32, ProjectionType::Std}, {40, 37, ProjectionType::Left, false, true},
                {40, 37, ProjectionType::Left, false, true}});
  auto align = [](std::size_t b) { return (b + 255) / 256 * 256; };
  const std::size_t right = align(4 * 48 * 6) + align(4 * 48 * 6);                                // R, D float
  const std::size_t staged = align(4 * 6 * 40) + align(2 * 6 * 40) + 2 * align(2 * 40 * 40);       // ld 40
  const std::size_t scratch = std::max(align(4 * 48 * 32), align(2 * 40 * 40));
  // A refresh: the policy's scratch for one layer, and the candidate bases of a
  // chunk (right 6 x 32 float, left 40 x 6 bf16).
  const std::size_t svd = std::max(cuda::compute_basis_bytes<float>(ctx, svd::Exact{}, 48, 32, 6, Side::Right),
                                   cuda::compute_basis_bytes<cuda::bf16>(ctx, svd::Exact{}, 40, 37, 6, Side::Left));
  const std::size_t right_basis = align(4 * 6 * 32), left_basis = align(2 * 40 * 6);
  cuda::StepPlan whole = opt.plan_step_all(m.params(), ctx);
  CHECK(whole.num_chunks() == 2);
  CHECK(whole.workspace_bytes() ==
        std::max({4 * right, 2 * staged, svd}) + std::max({4 * right_basis, 2 * left_basis, scratch}));
  cuda::StepPlanOptions small;
  small.workspace_limit = 2 * right;
  cuda::StepPlan cut = opt.plan_step_all(m.params(), ctx, small);
  CHECK(cut.num_chunks() == 2 + 2);  // 4 right layers in 2 chunks, 2 staged ones in 2 (each exceeds the limit)
  CHECK(cut.workspace_bytes() ==
        std::max({2 * right, staged, svd}) + std::max({2 * right_basis, left_basis, scratch}));
  CHECK(cut.device_bytes() > cut.workspace_bytes());
  // svd::WarmStart refreshes a chunk's due layers in batches whose scratch
  // grows with the batch, up to refresh_workspace_limit (one layer at least).
  // (For layers this small the cold policy's scratch for one matrix, which the
  // size also covers, may exceed a warm batch's: then the batches do not split.)
  cuda::Context ctx_warm;
  galore_test::GpuOptimizer<svd::WarmStart> warm(ProjectorOptions{6, ProjectionType::Std, 0.25f}, AdamConfig{},
                                                  schedule::FixedGap{100});
  Model w(warm, {{48, 32, ProjectionType::Std}, {48, 32, ProjectionType::Std}, {48, 32, ProjectionType::Std},
                 {48, 32, ProjectionType::Std}});
  auto batch = [&](Index k) {
    return cuda::compute_bases_bytes<float>(ctx_warm, svd::WarmStart{}, 48, 32, 6, Side::Right, k);
  };
  auto expected = [&](std::size_t limit) {
    return std::max(4 * right, std::min(batch(4), std::max(limit, batch(1)))) + 4 * right_basis;
  };
  CHECK(batch(4) >= batch(1));
  CHECK(warm.plan_step_all(w.params(), ctx_warm).workspace_bytes() == expected(std::size_t{256} << 20));
  cuda::StepPlanOptions one;
  one.refresh_workspace_limit = 0;
  CHECK(warm.plan_step_all(w.params(), ctx_warm, one).workspace_bytes() == expected(0));
  one.refresh_workspace_limit = batch(2);
  CHECK(warm.plan_step_all(w.params(), ctx_warm, one).workspace_bytes() == expected(batch(2)));
  // Refreshed in batches of at most two, the layers step as when refreshed
  // four together (gap 2: steps 0 and 2 refresh, 2 warm-started).
  galore_test::GpuOptimizer<svd::WarmStart> halves(ProjectorOptions{6, ProjectionType::Std, 0.25f}, AdamConfig{},
                                                    schedule::FixedGap{2});
  galore_test::GpuOptimizer<svd::WarmStart> whole4(ProjectorOptions{6, ProjectionType::Std, 0.25f}, AdamConfig{},
                                                    schedule::FixedGap{2});
  Model mh(halves, w.specs), mw(whole4, w.specs);
  cuda::StepPlan ph = halves.plan_step_all(mh.params(), ctx_warm, one), pw = whole4.plan_step_all(mw.params(), ctx_warm);
  const auto g4 = gradients(w.specs, 4);
  for (int t = 0; t < 4; ++t) {
    upload_both(mh, mw, g4, t);
    CHECK(halves.step_all(ph, ctx_warm).refreshed == (t % 2 == 0 ? 4 : 0));
    CHECK(whole4.step_all(pw, ctx_warm).refreshed == (t % 2 == 0 ? 4 : 0));
  }
  for (std::size_t i = 0; i < 4; ++i) {
    CHECK(mh.weight(i) != mh.W0[i]);
    CHECK(galore_test::relative_change_error(mh.weight(i), mw.weight(i), mw.W0[i]) < 1e-4);
  }
  // The device memory the plan allocates is what it reports (layers large
  // enough that cudaMalloc's 2 MiB granularity does not hide the workspace:
  // eight 2048 x 1024 right layers at rank 256, R and D in float, 4 MiB each).
  Opt large(ProjectorOptions{256, ProjectionType::Std, 0.25f}, AdamConfig{}, schedule::FixedGap{100});
  cuda::DeviceBuffer<float> any(64);  // the plan only stores the pointers
  std::vector<cuda::StepParam> params;
  for (int i = 0; i < 8; ++i)
    params.push_back(cuda::step_param(large.add_layer({2048, 1024}, cuda::DType::Float32),
                                      DeviceView<float>(any.data(), 2048, 1024),
                                      DeviceView<const float>(any.data(), 2048, 1024)));
  ctx.synchronize();
  std::size_t free_before = 0, free_after = 0, total = 0;
  cuda::check(cudaMemGetInfo(&free_before, &total), "cudaMemGetInfo");
  {
    cuda::StepPlan big = large.plan_step_all(params, ctx);
    const std::size_t svd_big = cuda::compute_basis_bytes<float>(ctx, svd::Exact{}, 2048, 1024, 256, Side::Right);
    CHECK(big.workspace_bytes() == std::max(8 * 2 * align(4 * 2048 * 256), svd_big) + 8 * align(4 * 256 * 1024));
    cuda::check(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");
    // cudaMalloc hands out 2 MiB pages: the 40 MiB workspace takes its own
    // pages, the small tables may fit a page the process holds already.
    CHECK(free_before - free_after >= big.workspace_bytes());
    CHECK(free_before - free_after <= big.device_bytes() + (std::size_t{4} << 20));
  }
}

TEST_CASE("weights and gradients at odd offsets into larger buffers step in the batch as one by one") {
  // Views one element into their buffers: 4-byte aligned float, 2-byte aligned
  // bf16 (the batched GEMMs are told the alignment: cuBLASLt cannot see it).
  Stream stream;
  cuda::Context ctx(stream.s);
  Opt each(ProjectorOptions{6, ProjectionType::Std, 0.25f}, AdamConfig{}, schedule::FixedGap{100});
  Opt all(ProjectorOptions{6, ProjectionType::Std, 0.25f}, AdamConfig{}, schedule::FixedGap{100});
  const long m = 48, n = 32;
  std::vector<std::unique_ptr<Device<float>>> buffers;
  std::vector<std::unique_ptr<Device<cuda::bf16>>> bbuffers;
  std::vector<cuda::StepParam> pe, pa;
  const auto grads = galore_test::separated_gradients(m, n, 10, 3, 77u);
  for (int copy = 0; copy < 2; ++copy)
    for (int i = 0; i < 4; ++i) {
      Opt& opt = copy == 0 ? each : all;
      const bool bf16 = i >= 2;
      std::vector<float> w(static_cast<std::size_t>(m * n + 1), 0.0f), g(w.size(), 0.0f);
      const auto w0 = galore_test::round_to_bf16(galore_test::gaussian(static_cast<std::size_t>(m * n), 50u + unsigned(i)));
      std::copy(w0.begin(), w0.end(), w.begin() + 1);
      std::copy(grads[static_cast<std::size_t>(i % 3)].begin(), grads[static_cast<std::size_t>(i % 3)].end(), g.begin() + 1);
      if (bf16) g = galore_test::round_to_bf16(g);
      const LayerId id = opt.add_layer({m, n}, bf16 ? cuda::DType::BFloat16 : cuda::DType::Float32);
      auto& list = copy == 0 ? pe : pa;
      if (bf16) {
        bbuffers.push_back(std::make_unique<Device<cuda::bf16>>(w));
        bbuffers.push_back(std::make_unique<Device<cuda::bf16>>(g));
        list.push_back(cuda::step_param(id, DeviceView<cuda::bf16>(bbuffers[bbuffers.size() - 2]->data() + 1, m, n),
                                        DeviceView<const cuda::bf16>(bbuffers.back()->data() + 1, m, n)));
      } else {
        buffers.push_back(std::make_unique<Device<float>>(w));
        buffers.push_back(std::make_unique<Device<float>>(g));
        list.push_back(cuda::step_param(id, DeviceView<float>(buffers[buffers.size() - 2]->data() + 1, m, n),
                                        DeviceView<const float>(buffers.back()->data() + 1, m, n)));
      }
    }
  ctx.reserve_workspace(std::max(each.workspace_bytes(ctx), all.workspace_bytes(ctx)));
  cuda::StepPlan plan = all.plan_step_all(pa, ctx);
  for (int t = 0; t < 3; ++t) {
    for (const cuda::StepParam& p : pe) {
      if (p.dtype == cuda::DType::BFloat16)
        each.step(p.id, static_cast<cuda::bf16*>(p.W), static_cast<const cuda::bf16*>(p.G), ctx);
      else
        each.step(p.id, static_cast<float*>(p.W), static_cast<const float*>(p.G), ctx);
    }
    const cuda::StepAllResult r = all.step_all(plan, ctx);
    CHECK(r.graph == (t > 0));
    CHECK(r.refreshed == (t == 0 ? 4 : 0));
  }
  ctx.synchronize();
  for (std::size_t i = 0; i < 4; ++i) {
    INFO("layer ", i);
    const bool bf16 = i >= 2;
    const std::size_t k = bf16 ? 2 * (i - 2) : 2 * i;  // W of `each`; `all`'s follow the first four
    const auto we = bf16 ? Device<cuda::bf16>::download(bbuffers[k]->data() + 1, m * n)
                         : Device<float>::download(buffers[k]->data() + 1, m * n);
    const auto wa = bf16 ? Device<cuda::bf16>::download(bbuffers[k + 4]->data() + 1, m * n)
                         : Device<float>::download(buffers[k + 4]->data() + 1, m * n);
    const auto w0 = galore_test::round_to_bf16(galore_test::gaussian(static_cast<std::size_t>(m * n), 50u + unsigned(i)));
    CHECK(galore_test::relative_change_error(wa, we, w0) < (bf16 ? 2e-2 : 1e-4));
    CHECK(we != w0);
  }
}

TEST_CASE("plan_step_all checks every parameter and step_all its plan") {
  cuda::Context ctx;
  Opt opt(ProjectorOptions{6, ProjectionType::Std, 0.25f}, AdamConfig{}, schedule::FixedGap{100});
  Model m(opt, {{48, 32, ProjectionType::Std}, {16, 24, ProjectionType::Std, true}});
  const LayerId full = opt.add_layer({48, 32}, cuda::DType::Float32, ProjectorOptions{6, ProjectionType::Full, 0.25f});
  Device<float> Wx(std::vector<float>(48 * 32, 0.0f)), Gx(std::vector<float>(48 * 32, 0.0f));
  auto with = [&](auto change) {
    auto p = m.params();
    change(p);
    return p;
  };
  auto throws = [&](const std::vector<cuda::StepParam>& p, const char* what) {
    INFO(what);
    CHECK_THROWS_AS(opt.plan_step_all(p, ctx), invalid_argument);
  };
  throws(with([](auto& p) { p.push_back(p[0]); }), "a layer twice");
  throws(with([](auto& p) { p[0].id = LayerId{99}; }), "an unknown layer");
  throws(with([](auto& p) { p[0].dtype = cuda::DType::BFloat16; }), "the wrong element type");
  throws(with([](auto& p) { p[0].W = nullptr; }), "a null weight");
  throws(with([](auto& p) { p[0].ldg = 31; }), "a leading dimension below the columns");
  throws(with([](auto& p) { p[1].ldw = 25; }), "a strided dense layer");
  throws(with([&](auto& p) {
           p.push_back(cuda::step_param(full, DeviceView<float>(Wx.data(), 48, 32), DeviceView<const float>(Gx.data(), 48, 32)));
         }),
         "a two-sided layer");
  Opt other(ProjectorOptions{6, ProjectionType::Std, 0.25f});
  cuda::StepPlan foreign = other.plan_step_all(std::vector<cuda::StepParam>{}, ctx);
  CHECK_THROWS_AS(opt.step_all(foreign, ctx), invalid_argument);
  cuda::StepPlan empty;
  CHECK_THROWS_AS(opt.step_all(empty, ctx), invalid_argument);
  // The optimizer is unharmed.
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  cuda::StepPlan plan = opt.plan_step_all(m.params(), ctx);
  m.upload_gradient(0, galore_test::gaussian(48 * 32, 1u));
  m.upload_gradient(1, galore_test::gaussian(16 * 24, 2u));
  opt.step_all(plan, ctx);
  CHECK(opt.status(m.ids[0], ctx) == StepStatus::Applied);
  CHECK(opt.status(m.ids[1], ctx) == StepStatus::Applied);
}
