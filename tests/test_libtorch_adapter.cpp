// galore/libtorch.hpp: the torch::optim::Optimizer adapter against galore's own
// facade stepping the same numbers, its checkpoints, and its errors.
#include <galore/libtorch.hpp>  // first: the header stands on its own

#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <vector>

using namespace galore;
namespace lt = galore::libtorch;

namespace {

// A 32 x 48 weight and a 32-element bias (a Linear(48, 32)) and a second
// group's 24 x 40 weight; gradients drawn from a fixed seed.
struct Model {
  torch::Tensor w, b, v;
  explicit Model(torch::ScalarType t = torch::kFloat32) {
    torch::manual_seed(7);
    w = torch::randn({32, 48}).to(t).set_requires_grad(true);
    b = torch::randn({32}).to(t).set_requires_grad(true);
    v = torch::randn({24, 40}).to(t).set_requires_grad(true);
  }
  Model clone() const {
    Model m;
    m.w = w.detach().clone().set_requires_grad(true);
    m.b = b.detach().clone().set_requires_grad(true);
    m.v = v.detach().clone().set_requires_grad(true);
    return m;
  }
  void set_grads(int step) {
    torch::manual_seed(1000 + step);
    for (torch::Tensor* p : {&w, &b, &v}) p->mutable_grad() = torch::randn(p->sizes()).to(p->scalar_type());
  }
};

lt::Options projected() { return lt::Options(0.01).rank(8).update_proj_gap(3).scale(0.5).weight_decay(0.1); }

template <class Opt = GaLoreAdamW>
lt::Optimizer<Opt> make(Model& m) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{m.w, m.b}, std::make_unique<lt::Options>(projected()));
  groups.emplace_back(std::vector<torch::Tensor>{m.v});  // the defaults: plain AdamW
  return lt::Optimizer<Opt>(std::move(groups), lt::Options(0.002));
}

// galore's facades fed the same gradients: group 0 (w projected, b dense), group 1 (v dense).
template <class Opt = GaLoreAdamW>
struct Reference {
  Opt g0, g1;
  LayerId w, b, v;
  std::vector<float> W, B, V;
  static AdamConfig adam(double lr, double wd) {
    AdamConfig a;
    a.lr = lr;
    a.weight_decay = wd;
    return a;
  }
  explicit Reference(const Model& m)
      : g0(ProjectorOptions{8, ProjectionType::Std, 0.5f}, typename Opt::adam_type(adam(0.01, 0.1)),
           typename Opt::SchedulePolicy{3}),
        g1(ProjectorOptions{1, ProjectionType::Std, 0.25f}, typename Opt::adam_type(adam(0.002, 0.0)),
           typename Opt::SchedulePolicy{200}) {
    w = g0.add_layer({32, 48});
    b = g0.add_dense({1, 32});
    v = g1.add_dense({1, 24 * 40});
    W = values(m.w);
    B = values(m.b);
    V = values(m.v);
  }
  static std::vector<float> values(const torch::Tensor& t) {
    const torch::Tensor c = t.detach().to(torch::kFloat32).contiguous();
    return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
  }
  void step(const Model& m) {
    std::vector<float> gw = values(m.w.grad()), gb = values(m.b.grad()), gv = values(m.v.grad());
    g0.step(w, W.data(), gw.data());
    g0.step(b, B.data(), gb.data());
    g1.step(v, V.data(), gv.data());
  }
};

void check_equal(const Model& m, const Reference<>& r) {
  CHECK(Reference<>::values(m.w) == r.W);
  CHECK(Reference<>::values(m.b) == r.B);
  CHECK(Reference<>::values(m.v) == r.V);
}

// Steps [from, to) on two models and their optimizers with the same gradients.
void step_both(Model& a, lt::Optimizer<>& x, Model& b, lt::Optimizer<>& y, int from, int to) {
  for (int t = from; t < to; ++t) {
    a.set_grads(t);
    b.set_grads(t);
    x.step();
    y.step();
  }
}
bool same(const Model& a, const Model& b) {
  return torch::equal(a.w, b.w) && torch::equal(a.b, b.b) && torch::equal(a.v, b.v);
}

std::string saved(const torch::optim::Optimizer& opt) {
  torch::serialize::OutputArchive archive;
  opt.save(archive);
  std::ostringstream os(std::ios::binary);
  archive.save_to(os);
  return os.str();
}
void load(torch::optim::Optimizer& opt, const std::string& bytes) {
  torch::serialize::InputArchive archive;
  std::istringstream is(bytes, std::ios::binary);
  archive.load_from(is);
  opt.load(archive);
}

}  // namespace

TEST_CASE("the adapter's steps are galore's steps on the same numbers, bit for bit") {
  Model m;
  Reference<> ref(m);
  auto opt = make(m);
  for (int t = 0; t < 7; ++t) {  // two refreshes (gap 3)
    m.set_grads(t);
    ref.step(m);
    opt.step();
  }
  check_equal(m, ref);
  CHECK(opt.galore_optimizer(0).stats(opt.layer_of(m.w)).svd_count == 3);
  CHECK_FALSE(opt.galore_optimizer(0).is_projected(opt.layer_of(m.b)));
  CHECK(opt.state_bytes() == ref.g0.state_bytes() + ref.g1.state_bytes());
  // The formula: w (32 x 48, rank 8, Std: P is 32 x 8) holds 8 x 48 moments twice
  // and P in float; b and v hold two float moments per element.
  CHECK(opt.state_bytes() == 4 * (2 * 8 * 48 + 32 * 8) + 4 * 2 * 32 + 4 * 2 * 24 * 40);
}

TEST_CASE("the learning rate is read from the group's options at every step (torch's schedulers)") {
  Model m;
  Reference<> ref(m);
  auto opt = make(m);
  for (int t = 0; t < 4; ++t) {
    const double lr0 = 0.01 * std::pow(0.5, t), lr1 = 0.002 * (t + 1);
    static_cast<lt::Options&>(opt.param_groups()[0].options()).lr(lr0);
    opt.param_groups()[1].options().set_lr(lr1);  // what torch::optim::LRScheduler calls
    ref.g0.set_lr(lr0);
    ref.g1.set_lr(lr1);
    m.set_grads(t);
    ref.step(m);
    opt.step();
  }
  check_equal(m, ref);
}

TEST_CASE("per-layer steps (step(param)) equal the whole step, and a parameter without a gradient is left alone") {
  Model a, b;
  auto whole = make(a), per_layer = make(b);
  for (int t = 0; t < 5; ++t) {
    a.set_grads(t);
    b.set_grads(t);
    whole.step();
    for (const torch::Tensor& p : {b.w, b.b, b.v}) CHECK(per_layer.step(p).applied());
  }
  CHECK(torch::equal(a.w, b.w));
  CHECK(torch::equal(a.b, b.b));
  CHECK(torch::equal(a.v, b.v));
  a.set_grads(9);
  a.b.mutable_grad() = torch::Tensor();
  const torch::Tensor before = a.b.detach().clone();
  whole.step();
  CHECK(torch::equal(a.b, before));
}

TEST_CASE("bfloat16 parameters step as galore's bfloat16 facade does") {
  Model m(torch::kBFloat16);
  auto opt = make(m);
  GaLoreAdamW ref(ProjectorOptions{8, ProjectionType::Std, 0.5f}, LowRankAdam<>(Reference<>::adam(0.01, 0.1)),
                  schedule::FixedGap{3});
  const LayerId w = ref.add_layer({32, 48});
  torch::Tensor W = m.w.detach().clone();
  for (int t = 0; t < 5; ++t) {
    m.set_grads(t);
    opt.step();
    ref.step(w, reinterpret_cast<bfloat16*>(W.data_ptr<at::BFloat16>()),
             reinterpret_cast<const bfloat16*>(m.w.grad().data_ptr<at::BFloat16>()));
  }
  CHECK(torch::equal(m.w, W));
}

TEST_CASE("Q-GaLore's INT4 bases and 8-bit moments through the adapter equal its facade on float weights") {
  Model m;
  Reference<QGaLoreAdamW8bit> ref(m);
  auto opt = make<QGaLoreAdamW8bit>(m);
  for (int t = 0; t < 7; ++t) {
    m.set_grads(t);
    ref.step(m);
    opt.step();
  }
  CHECK(Reference<>::values(m.w) == ref.W);
  CHECK(Reference<>::values(m.v) == ref.V);
  CHECK(opt.state_bytes() == ref.g0.state_bytes() + ref.g1.state_bytes());
}

TEST_CASE("a NaN gradient skips that parameter: weight and state untouched") {
  Model a, b;
  auto opt = make(a), twin = make(b);
  step_both(a, opt, b, twin, 0, 2);
  a.set_grads(2);
  a.w.mutable_grad()[3][5] = std::numeric_limits<float>::quiet_NaN();
  const torch::Tensor before = a.w.detach().clone();
  opt.step();
  CHECK(opt.status(a.w) == StepStatus::SkippedNonFinite);
  CHECK(opt.status(a.b) == StepStatus::Applied);
  CHECK(torch::equal(a.w, before));
  CHECK(opt.galore_optimizer(0).stats(opt.layer_of(a.w)).skipped_steps == 1);
  // The skipped step left w's state as the twin's, which did not take it.
  for (int t = 3; t < 6; ++t) {
    a.set_grads(t);
    b.set_grads(t);
    opt.step(a.w);
    twin.step(b.w);
  }
  CHECK(torch::equal(a.w, b.w));
}

TEST_CASE("save and load resume exactly; an archive that does not fit changes nothing") {
  Model a;
  auto opt = make(a);
  for (int t = 0; t < 4; ++t) {
    a.set_grads(t);
    opt.step();
  }
  const std::string bytes = saved(opt);
  Model b = a.clone();
  auto resumed = make(b);
  load(resumed, bytes);
  CHECK(resumed.state_bytes() == opt.state_bytes());
  step_both(a, opt, b, resumed, 4, 8);
  CHECK(same(a, b));

  // Another model's archive (a transposed weight), and one of fewer groups.
  Model c = a.clone(), d = a.clone();
  auto target = make(c), twin = make(d);
  Model other = a.clone();
  other.w = torch::randn({48, 32}).set_requires_grad(true);
  auto wrong = make(other);
  other.set_grads(0);
  other.w.mutable_grad() = torch::randn({48, 32});
  wrong.step();
  CHECK_THROWS_AS(load(target, saved(wrong)), checkpoint_error);
  lt::Optimizer<> single(std::vector<torch::Tensor>{other.v}, lt::Options(0.01));
  CHECK_THROWS_WITH_AS(load(target, saved(single)), doctest::Contains("1 parameter groups"), checkpoint_error);
  step_both(c, target, d, twin, 0, 3);
  CHECK(same(c, d));
}

TEST_CASE("groups and parameters added after construction are registered") {
  Model m;
  lt::Optimizer<> opt(std::vector<torch::Tensor>{m.v}, lt::Options(0.002));
  opt.add_param_group(torch::optim::OptimizerParamGroup({m.w, m.b}, std::make_unique<lt::Options>(projected())));
  m.set_grads(0);
  opt.step();
  CHECK(opt.galore_optimizer(1).is_projected(opt.layer_of(m.w)));
  CHECK(opt.galore_optimizer(1).steps(opt.layer_of(m.b)) == 1);
}

TEST_CASE("bad input is refused with a message, and nothing changes") {
  Model m;
  auto opt = make(m);
  m.set_grads(0);
  torch::Tensor stranger = torch::randn({4, 4}, torch::requires_grad());
  CHECK_THROWS_WITH_AS(opt.step(stranger), doctest::Contains("not a parameter of this optimizer"), c10::Error);
  m.w.mutable_grad() = m.w.grad().to(torch::kFloat64);
  const torch::Tensor before = m.w.detach().clone();
  CHECK_THROWS_WITH_AS(opt.step(m.w), doctest::Contains("but its gradient is"), c10::Error);
  CHECK(torch::equal(m.w, before));
  m.w.mutable_grad() = torch::randn({48, 32}).t();  // right shape, not contiguous
  CHECK_THROWS_WITH_AS(opt.step(m.w), doctest::Contains("contiguous"), c10::Error);
  torch::Tensor d = torch::randn({8, 8}, torch::dtype(torch::kFloat64).requires_grad(true));
  lt::Optimizer<> doubles(std::vector<torch::Tensor>{d}, lt::Options(0.01));
  d.mutable_grad() = torch::randn({8, 8}, torch::kFloat64);
  CHECK_THROWS_WITH_AS(doubles.step(), doctest::Contains("float32 or bfloat16"), c10::Error);
  // Options of another optimizer in a group.
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{m.v}, std::make_unique<torch::optim::AdamWOptions>(0.01));
  CHECK_THROWS_WITH_AS(lt::Optimizer<>(std::move(groups)), doctest::Contains("galore::libtorch::Options"), c10::Error);
  // A rank beyond the weight's smaller side: galore's own check, at construction.
  std::vector<torch::optim::OptimizerParamGroup> big;
  big.emplace_back(std::vector<torch::Tensor>{m.w}, std::make_unique<lt::Options>(lt::Options(0.01).rank(40)));
  CHECK_THROWS_AS(lt::Optimizer<>(std::move(big)), galore::invalid_argument);
}
