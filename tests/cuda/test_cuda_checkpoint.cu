// Checkpoints of the CUDA facade: the CPU facade's format, resumed across the
// backends, exact resume on the GPU, and loads that change nothing when they fail.
#include <doctest/doctest.h>

#include <galore/cuda.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_reference.hpp"
#include "cuda_support.cuh"

using namespace galore;
using galore_test::CkptLayer;
using galore_test::CkptSpec;
using galore_test::Device;

namespace {

using Weights = std::vector<std::vector<float>>;  // per layer, row-major
using Grads = std::vector<Weights>;               // [step][layer]; empty: the layer does not step

constexpr int kBefore = 5;  // steps before the save (refreshes at 0 and 3, or 0, 2 and 4 with the lazy schedule)
constexpr int kAfter = 6;   // steps after it

// Right-sided float, left-sided bf16 and two-sided float projections, a dense
// layer, and a layer that first steps after the save (no basis when saved).
CkptSpec spec_of(bool lazy, bool bf16_moments) {
  CkptSpec s;
  s.layers = {{"q", 48, 32},
              {"k", 32, 56, false, true},
              {"o", 40, 24, false, false, 4, static_cast<int>(ProjectionType::Full)},
              {"norm", 1, 48, true},
              {"late", 24, 40}};
  s.bf16_moments = bf16_moments;
  if (lazy) {
    // A still subspace (every cosine about 1): with gap 2, a queue of 2 and
    // gamma 2 the refreshes come at steps 0, 2, 4 (the gap grows to 4) and 8
    // (to 8).
    s.gap = 2;
    s.lazy_queue = 2;
  }
  return s;
}

std::size_t index_of(const CkptSpec& s, const std::string& name) {
  for (std::size_t i = 0; i < s.layers.size(); ++i)
    if (s.layers[i].name == name) return i;
  return s.layers.size();
}

Weights initial_weights(const CkptSpec& s) {
  Weights W;
  for (std::size_t i = 0; i < s.layers.size(); ++i) {
    const CkptLayer& l = s.layers[i];
    auto w = galore_test::gaussian(static_cast<std::size_t>(l.rows * l.cols), 50u + static_cast<unsigned>(i));
    W.push_back(l.bf16 ? galore_test::round_to_bf16(w) : w);
  }
  return W;
}

// Every layer steps at every step, except "late", which starts after the save.
Grads make_grads(const CkptSpec& s) {
  const int steps = kBefore + kAfter;
  Grads g(static_cast<std::size_t>(steps), Weights(s.layers.size()));
  for (std::size_t i = 0; i < s.layers.size(); ++i) {
    const CkptLayer& l = s.layers[i];
    const auto seq = galore_test::separated_gradients(l.rows, l.cols, 10, steps, 200u + 17u * static_cast<unsigned>(i),
                                                      l.dense ? 0.5f : 0.01f);
    for (int t = l.name == "late" ? kBefore : 0; t < steps; ++t)
      g[static_cast<std::size_t>(t)][i] = l.bf16 ? galore_test::round_to_bf16(seq[static_cast<std::size_t>(t)])
                                                 : seq[static_cast<std::size_t>(t)];
  }
  return g;
}

Grads slice(const Grads& g, int from, int to) {
  return Grads(g.begin() + from, g.begin() + to);
}

template <class Schedule>
Schedule schedule_of(const CkptSpec& s) {
  if constexpr (std::is_same_v<Schedule, schedule::Lazy>)
    return schedule::Lazy{s.gap, s.lazy_threshold, s.lazy_gamma, s.lazy_queue};
  else
    return schedule::FixedGap{s.gap};
}

// The GPU optimizer of a spec with its layers' weights and gradients in device memory.
template <class M, class Schedule>
struct Gpu {
  using Opt = galore_test::GpuOptimizer<svd::Exact, M, Schedule>;
  CkptSpec spec;
  cuda::Context& ctx;
  Opt opt;
  std::vector<LayerId> ids;
  std::vector<Device<float>> Wf, Gf;
  std::vector<Device<cuda::bf16>> Wh, Gh;

  Gpu(const CkptSpec& s, cuda::Context& c, const Weights& W0)
      : spec(s),
        ctx(c),
        opt(ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale}, adam_of(s), schedule_of<Schedule>(s)) {
    const std::size_t L = s.layers.size();
    Wf.resize(L);
    Gf.resize(L);
    Wh.resize(L);
    Gh.resize(L);
    for (std::size_t i = 0; i < L; ++i) {
      const CkptLayer& l = s.layers[i];
      const Shape shape{l.rows, l.cols};
      const cuda::DType dtype = l.bf16 ? cuda::DType::BFloat16 : cuda::DType::Float32;
      if (l.dense) ids.push_back(opt.add_dense(shape, dtype, l.name));
      else if (l.rank > 0)
        ids.push_back(opt.add_layer(shape, dtype, ProjectorOptions{l.rank, static_cast<ProjectionType>(l.type), s.scale},
                                    l.name));
      else ids.push_back(opt.add_layer(shape, dtype, l.name));
      const std::vector<float> zeros(static_cast<std::size_t>(l.rows * l.cols), 0.0f);
      if (l.bf16) {
        Wh[i] = Device<cuda::bf16>(W0[i]);
        Gh[i] = Device<cuda::bf16>(zeros);
      } else {
        Wf[i] = Device<float>(W0[i]);
        Gf[i] = Device<float>(zeros);
      }
    }
    ctx.reserve_workspace(opt.workspace_bytes(ctx));
  }

  void step(const Weights& g) {
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (g[i].empty()) continue;
      if (spec.layers[i].bf16) {
        Gh[i].upload(g[i]);
        opt.step(ids[i], Wh[i].data(), static_cast<const cuda::bf16*>(Gh[i].data()), ctx);
      } else {
        Gf[i].upload(g[i]);
        opt.step(ids[i], Wf[i].data(), static_cast<const float*>(Gf[i].data()), ctx);
      }
    }
  }
  Weights weights() const {
    Weights W;
    for (std::size_t i = 0; i < ids.size(); ++i) W.push_back(spec.layers[i].bf16 ? Wh[i].download() : Wf[i].download());
    return W;
  }
  void set_weights(const Weights& W) {
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (spec.layers[i].bf16) Wh[i].upload(W[i]);
      else Wf[i].upload(W[i]);
    }
  }
  // Every layer's weight, as the trainer would pass them.
  cuda::DeviceWeightSet weight_set() {
    cuda::DeviceWeightSet set;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const CkptLayer& l = spec.layers[i];
      if (l.bf16) set.add(ids[i], device_view(Wh[i].data(), l.rows, l.cols));
      else set.add(ids[i], device_view(Wf[i].data(), l.rows, l.cols));
    }
    return set;
  }
  std::string save(const cuda::DeviceWeightSet* weights = nullptr) {
    std::ostringstream os(std::ios::binary);
    cuda::save_checkpoint(opt, os, ctx, weights);
    return os.str();
  }
  void load(const std::string& bytes, cuda::DeviceWeightSet* weights = nullptr) {
    std::istringstream is(bytes, std::ios::binary);
    cuda::load_checkpoint(opt, is, ctx, weights);
  }

  Shape moments_shape(std::size_t i) const {
    const CkptLayer& l = spec.layers[i];
    if (l.dense) return {l.rows, l.cols};
    return low_rank_shape(opt.side(ids[i]), {l.rows, l.cols}, l.rank > 0 ? l.rank : spec.rank);
  }
  std::vector<float> first_moment(std::size_t i) const {
    return Device<M>::download(opt.first_moment(ids[i]), static_cast<std::size_t>(moments_shape(i).size()));
  }
  std::vector<float> second_moment(std::size_t i) const {
    return Device<M>::download(opt.second_moment(ids[i]), static_cast<std::size_t>(moments_shape(i).size()));
  }
  // The basis factors in float (empty where the side has none).
  void basis(std::size_t i, std::vector<float>& left, std::vector<float>& right) const {
    const CkptLayer& l = spec.layers[i];
    const auto r = static_cast<std::size_t>(l.rank > 0 ? l.rank : spec.rank);
    const auto m = static_cast<std::size_t>(l.rows), n = static_cast<std::size_t>(l.cols);
    auto get = [&](auto b) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(b.left)>>;
      left = b.left ? Device<T>::download(b.left, m * r) : std::vector<float>{};
      right = b.right ? Device<T>::download(b.right, r * n) : std::vector<float>{};
    };
    if (l.bf16) get(opt.template basis<cuda::bf16>(ids[i]));
    else get(opt.template basis<float>(ids[i]));
  }
};

// A checkpoint split into its header and sections (tag and payload), for
// comparing two files section by section.
struct Sections {
  std::string header;
  std::vector<std::pair<std::uint32_t, std::string>> sections;
  explicit Sections(const std::string& bytes) {
    REQUIRE(bytes.size() >= 36);
    header = bytes.substr(0, 36);
    std::size_t at = 36;
    while (at < bytes.size()) {
      REQUIRE(bytes.size() - at >= 16);
      std::uint32_t tag;
      std::uint64_t length;
      std::memcpy(&tag, bytes.data() + at, 4);
      std::memcpy(&length, bytes.data() + at + 4, 8);
      REQUIRE(length <= bytes.size() - at - 16);
      sections.emplace_back(tag, bytes.substr(at, 16 + static_cast<std::size_t>(length)));
      at += 16 + static_cast<std::size_t>(length);
    }
  }
};

// Relative errors of continued trajectories, the tolerances of test_cuda_step:
// float32 1e-3, bf16 moments 1e-2, bf16 weights 0.12 (the GPU keeps a bf16
// layer's basis in bf16, the CPU in float32).
double tolerance(const CkptSpec& s, std::size_t i) {
  if (s.layers[i].bf16) return 0.12;
  return s.bf16_moments ? 1e-2 : 1e-3;
}

void check_continued(const CkptSpec& s, const std::vector<Weights>& gpu, const std::vector<Weights>& cpu,
                     const Weights& base) {
  REQUIRE(gpu.size() == cpu.size());
  for (std::size_t t = 0; t < gpu.size(); ++t)
    for (std::size_t i = 0; i < s.layers.size(); ++i) {
      INFO("layer ", s.layers[i].name, ", step ", t, " after the save");
      if (gpu[t][i] == base[i] && cpu[t][i] == base[i]) continue;  // "late" before it moved
      CHECK(galore_test::relative_change_error(gpu[t][i], cpu[t][i], base[i]) < tolerance(s, i));
      for (float x : gpu[t][i]) REQUIRE(std::isfinite(x));
    }
}

// Runs test<M, Schedule>(spec) for float and bf16 moments, fixed-gap and lazy schedules.
#define GALORE_FOR_EACH_CASE(test)                                   \
  do {                                                                \
    SUBCASE("fixed gap, float32 moments") {                           \
      test<float, schedule::FixedGap>(spec_of(false, false));         \
    }                                                                 \
    SUBCASE("fixed gap, bf16 moments") {                              \
      test<cuda::bf16, schedule::FixedGap>(spec_of(false, true));     \
    }                                                                 \
    SUBCASE("lazy, float32 moments") {                                \
      test<float, schedule::Lazy>(spec_of(true, false));              \
    }                                                                 \
    SUBCASE("lazy, bf16 moments") {                                   \
      test<cuda::bf16, schedule::Lazy>(spec_of(true, true));          \
    }                                                                 \
  } while (0)

template <class M, class Schedule>
void gpu_resume_is_exact(const CkptSpec& s) {
  cuda::Context ctx;
  const Grads g = make_grads(s);
  Gpu<M, Schedule> a(s, ctx, initial_weights(s));
  for (int t = 0; t < kBefore; ++t) a.step(g[static_cast<std::size_t>(t)]);
  a.opt.set_lr(2e-2);
  const std::string bytes = a.save();
  const Weights at_save = a.weights();

  // A fresh optimizer (its own weights and one step of its own first), loaded.
  Gpu<M, Schedule> b(s, ctx, initial_weights(s));
  b.step(g[1]);
  b.load(bytes);
  b.set_weights(at_save);
  CHECK(b.save() == bytes);
  CHECK(b.opt.adam_config().lr == 2e-2);
  for (int t = kBefore; t < kBefore + kAfter; ++t) {
    INFO("step ", t);
    a.step(g[static_cast<std::size_t>(t)]);
    b.step(g[static_cast<std::size_t>(t)]);
    CHECK(a.weights() == b.weights());
  }
  // Moments, bases, counters, SVD counts and schedule states: all in the file.
  CHECK(a.save() == b.save());
  for (std::size_t i = 0; i < s.layers.size(); ++i) {
    const LayerStats sa = a.opt.stats(a.ids[i], ctx), sb = b.opt.stats(b.ids[i], ctx);
    CHECK(sa.steps == sb.steps);
    CHECK(sa.svd_count == sb.svd_count);
    CHECK(sa.update_gap == sb.update_gap);
  }
  if constexpr (std::is_same_v<Schedule, schedule::Lazy>) CHECK(a.opt.stats(a.ids[0], ctx).update_gap == 8);
}

template <class M, class Schedule>
void gpu_to_cpu(const CkptSpec& s) {
  cuda::Context ctx;
  const Grads g = make_grads(s);
  Gpu<M, Schedule> gpu(s, ctx, initial_weights(s));
  for (int t = 0; t < kBefore; ++t) gpu.step(g[static_cast<std::size_t>(t)]);
  gpu.opt.set_lr(2e-2);
  const std::string bytes = gpu.save();
  const Weights at_save = gpu.weights();

  // The CPU reads the GPU's state exactly: it saves the same bytes back.
  const auto loaded = galore_test::cpu_checkpoint_run(s, bytes, at_save, {});
  CHECK(loaded.checkpoint == bytes);
  CHECK(loaded.lr == 2e-2);
  for (std::size_t i = 0; i < s.layers.size(); ++i) {
    INFO("layer ", s.layers[i].name);
    const auto& c = loaded.layers[i];
    const LayerStats st = gpu.opt.stats(gpu.ids[i], ctx);
    CHECK(c.steps == st.steps);
    CHECK(c.svd_count == st.svd_count);
    CHECK(c.m == gpu.first_moment(i));
    CHECK(c.v == gpu.second_moment(i));
    if (c.has_basis) {
      std::vector<float> left, right;
      gpu.basis(i, left, right);
      CHECK(c.left == left);
      CHECK(c.right == right);
    }
  }
  CHECK_FALSE(loaded.layers[index_of(s, "late")].has_basis);

  std::vector<Weights> on_gpu;
  for (int t = kBefore; t < kBefore + kAfter; ++t) {
    gpu.step(g[static_cast<std::size_t>(t)]);
    on_gpu.push_back(gpu.weights());
  }
  const auto cpu = galore_test::cpu_checkpoint_run(s, bytes, at_save, slice(g, kBefore, kBefore + kAfter));
  check_continued(s, on_gpu, cpu.W, at_save);
  for (std::size_t i = 0; i < s.layers.size(); ++i) {
    INFO("layer ", s.layers[i].name);
    const LayerStats st = gpu.opt.stats(gpu.ids[i], ctx);
    CHECK(cpu.layers[i].steps == st.steps);
    CHECK(cpu.layers[i].svd_count == st.svd_count);
  }
}

template <class M, class Schedule>
void cpu_to_gpu(const CkptSpec& s) {
  cuda::Context ctx;
  const Grads g = make_grads(s);
  const auto before = galore_test::cpu_checkpoint_run(s, "", initial_weights(s), slice(g, 0, kBefore), 2e-2);
  const Weights at_save = before.W.back();

  Gpu<M, Schedule> gpu(s, ctx, initial_weights(s));
  gpu.step(g[0]);  // state of its own, replaced by the load
  gpu.load(before.checkpoint);
  gpu.set_weights(at_save);
  CHECK(gpu.opt.adam_config().lr == 2e-2);
  for (std::size_t i = 0; i < s.layers.size(); ++i) {
    INFO("layer ", s.layers[i].name);
    const auto& c = before.layers[i];
    const LayerStats st = gpu.opt.stats(gpu.ids[i], ctx);
    CHECK(st.steps == c.steps);
    CHECK(st.skipped_steps == c.skipped);
    CHECK(st.svd_count == c.svd_count);
    CHECK(gpu.first_moment(i) == c.m);
    CHECK(gpu.second_moment(i) == c.v);
    if (c.has_basis) {
      // A bf16 layer keeps the float32 basis rounded to nearest even bf16.
      std::vector<float> left, right;
      gpu.basis(i, left, right);
      CHECK(left == (s.layers[i].bf16 ? galore_test::round_to_bf16(c.left) : c.left));
      CHECK(right == (s.layers[i].bf16 ? galore_test::round_to_bf16(c.right) : c.right));
    }
  }
  // Saved back, every section but the bf16 layer's (whose basis was rounded) is the CPU's.
  const Sections cpu_file(before.checkpoint), gpu_file(gpu.save());
  CHECK(gpu_file.header == cpu_file.header);
  REQUIRE(gpu_file.sections.size() == cpu_file.sections.size());
  for (std::size_t k = 0; k < cpu_file.sections.size(); ++k)
    if (k != 1 + index_of(s, "k")) CHECK(gpu_file.sections[k] == cpu_file.sections[k]);

  std::vector<Weights> on_gpu;
  for (int t = kBefore; t < kBefore + kAfter; ++t) {
    gpu.step(g[static_cast<std::size_t>(t)]);
    on_gpu.push_back(gpu.weights());
  }
  const auto cpu = galore_test::cpu_checkpoint_run(s, before.checkpoint, at_save, slice(g, kBefore, kBefore + kAfter));
  check_continued(s, on_gpu, cpu.W, at_save);
}

template <class M, class Schedule>
void same_bytes(const CkptSpec& s) {
  cuda::Context ctx;
  const Grads g = make_grads(s);
  // Before any step every value is exact: the whole file is the CPU's.
  Gpu<M, Schedule> gpu(s, ctx, initial_weights(s));
  const auto cpu0 = galore_test::cpu_checkpoint_run(s, "", initial_weights(s), {});
  CHECK(gpu.save() == cpu0.checkpoint);
  // After steps, the header, the configuration (the learning rate included), the
  // layer that has not stepped and the end section.
  for (int t = 0; t < kBefore; ++t) gpu.step(g[static_cast<std::size_t>(t)]);
  gpu.opt.set_lr(3e-2);
  const auto cpu = galore_test::cpu_checkpoint_run(s, "", initial_weights(s), slice(g, 0, kBefore), 3e-2);
  const Sections a(gpu.save()), b(cpu.checkpoint);
  CHECK(a.header == b.header);
  REQUIRE(a.sections.size() == b.sections.size());
  CHECK(a.sections.front() == b.sections.front());
  CHECK(a.sections[1 + index_of(s, "late")] == b.sections[1 + index_of(s, "late")]);
  CHECK(a.sections.back() == b.sections.back());
}

}  // namespace

TEST_CASE("a GPU checkpoint resumes on the GPU bit for bit") { GALORE_FOR_EACH_CASE(gpu_resume_is_exact); }

TEST_CASE("a GPU checkpoint loads on the CPU exactly and continues as on the GPU") {
  GALORE_FOR_EACH_CASE(gpu_to_cpu);
}

TEST_CASE("a CPU checkpoint loads on the GPU exactly and continues as on the CPU") {
  GALORE_FOR_EACH_CASE(cpu_to_gpu);
}

TEST_CASE("the GPU writes the CPU's bytes where the state is the same") { GALORE_FOR_EACH_CASE(same_bytes); }

TEST_CASE("a failed load throws checkpoint_error and leaves the optimizer and its device memory unchanged") {
  cuda::Context ctx;
  const CkptSpec s = spec_of(true, false);
  const Grads g = make_grads(s);
  using G = Gpu<float, schedule::Lazy>;
  G a(s, ctx, initial_weights(s));
  for (int t = 0; t < kBefore; ++t) a.step(g[static_cast<std::size_t>(t)]);
  const std::string good = a.save();
  const Weights W = a.weights();

  // A CPU file with the trainer's weights, loaded without a DeviceWeightSet: refused.
  const std::string with_weights =
      galore_test::cpu_checkpoint_run(s, "", initial_weights(s), slice(g, 0, 2), 0.0, true).checkpoint;
  std::vector<std::pair<std::string, std::string>> bad;  // (what, bytes)
  {
    CkptSpec other = s;
    other.gap = 3;
    bad.emplace_back("another schedule gap", G(other, ctx, initial_weights(other)).save());
    bad.emplace_back("bf16 moments", Gpu<cuda::bf16, schedule::Lazy>(spec_of(true, true), ctx, initial_weights(s)).save());
    other = s;
    other.layers.pop_back();
    bad.emplace_back("one layer fewer", G(other, ctx, initial_weights(other)).save());
    other = s;
    other.layers.push_back({"extra", 8, 8, true});
    bad.emplace_back("one layer more", G(other, ctx, initial_weights(other)).save());
    other = s;
    other.layers[0].name = "renamed";
    bad.emplace_back("a renamed layer", G(other, ctx, initial_weights(other)).save());
    other = s;
    other.layers[2].rank = 3;
    bad.emplace_back("another rank", G(other, ctx, initial_weights(other)).save());
    bad.emplace_back("weights", with_weights);
    bad.emplace_back("bytes after the end", good + "x");
  }
  // Truncations, ending inside every section (the last ones inside the end section).
  for (std::size_t n = 0; n < good.size(); n += 97) bad.emplace_back("truncated to " + std::to_string(n), good.substr(0, n));
  for (std::size_t k = 1; k <= 24; ++k) bad.emplace_back("truncated by " + std::to_string(k), good.substr(0, good.size() - k));
  // Flipped bits (caught by the checksums and header checks).
  std::mt19937 gen(7);
  for (int k = 0; k < 100; ++k) {
    std::string b = good;
    const std::size_t at = std::uniform_int_distribution<std::size_t>(0, b.size() - 1)(gen);
    b[at] = static_cast<char>(b[at] ^ (1 << (k % 8)));
    bad.emplace_back("bit flipped at " + std::to_string(at), b);
  }

  for (const auto& entry : bad) {
    INFO(entry.first);
    CHECK_THROWS_AS(a.load(entry.second), checkpoint_error);
  }
  {
    INFO("the weights section");
    CHECK_THROWS_WITH_AS(a.load(with_weights), doctest::Contains("weights"), checkpoint_error);
  }
  // Nothing changed: the same state saves the same bytes, and the next steps are
  // those of a fresh optimizer loaded from it.
  CHECK(a.save() == good);
  CHECK(a.weights() == W);
  G b(s, ctx, W);
  b.load(good);
  for (int t = kBefore; t < kBefore + 2; ++t) {
    a.step(g[static_cast<std::size_t>(t)]);
    b.step(g[static_cast<std::size_t>(t)]);
  }
  CHECK(a.weights() == b.weights());
  CHECK(a.save() == b.save());
}

TEST_CASE("the trainer's weights travel with the checkpoint between the backends (DeviceWeightSet)") {
  cuda::Context ctx;
  const CkptSpec s = spec_of(false, false);  // float and bf16 layers
  const Grads g = make_grads(s);
  const Weights W0 = initial_weights(s);
  Weights zeros;
  for (const auto& w : W0) zeros.emplace_back(w.size(), 0.0f);

  // GPU -> GPU: the weights are restored into other device buffers, bit for bit.
  Gpu<float, schedule::FixedGap> a(s, ctx, W0);
  for (int t = 0; t < kBefore; ++t) a.step(g[static_cast<std::size_t>(t)]);
  cuda::DeviceWeightSet wa = a.weight_set();
  const std::string bytes = a.save(&wa);
  const Weights at_save = a.weights();
  CHECK(bytes.size() > a.save().size());
  Gpu<float, schedule::FixedGap> b(s, ctx, zeros);
  cuda::DeviceWeightSet wb = b.weight_set();
  b.load(bytes, &wb);
  CHECK(b.weights() == at_save);
  CHECK(b.save(&wb) == bytes);

  // GPU -> CPU: the CPU loads the weights into its WeightSet (float and bf16
  // matrices) and saves the same bytes back.
  const auto cpu = galore_test::cpu_checkpoint_run(s, bytes, zeros, {}, 0.0, true);
  CHECK(cpu.checkpoint == bytes);

  // CPU -> GPU: the CPU's weights after its steps arrive on the GPU exactly.
  const auto before = galore_test::cpu_checkpoint_run(s, "", W0, slice(g, 0, kBefore), 0.0, true);
  Gpu<float, schedule::FixedGap> c(s, ctx, zeros);
  cuda::DeviceWeightSet wc = c.weight_set();
  c.load(before.checkpoint, &wc);
  CHECK(c.weights() == before.W.back());
}

TEST_CASE("a DeviceWeightSet takes strided views and leaves the padding alone") {
  cuda::Context ctx;
  const long rows = 6, cols = 10, ld = 16;
  std::vector<float> padded(static_cast<std::size_t>(rows * ld), 7.0f), packed;
  for (long i = 0; i < rows; ++i)
    for (long j = 0; j < cols; ++j) {
      padded[static_cast<std::size_t>(i * ld + j)] = static_cast<float>(i * cols + j);
      packed.push_back(static_cast<float>(i * cols + j));
    }
  cuda::GaLoreAdamW opt(ProjectorOptions{2});
  const LayerId id = opt.add_layer({rows, cols}, cuda::DType::Float32, "w");
  Device<float> Wp(padded);
  cuda::DeviceWeightSet strided;
  strided.add(id, device_view(Wp.data(), rows, cols, ld));
  std::ostringstream os(std::ios::binary);
  cuda::save_checkpoint(opt, os, ctx, &strided);

  // Into a contiguous buffer: the packed rows.
  cuda::GaLoreAdamW other(ProjectorOptions{2});
  const LayerId id2 = other.add_layer({rows, cols}, cuda::DType::Float32, "w");
  Device<float> Wc(std::vector<float>(packed.size(), 0.0f));
  cuda::DeviceWeightSet contiguous;
  contiguous.add(id2, device_view(Wc.data(), rows, cols));
  std::istringstream is(os.str(), std::ios::binary);
  cuda::load_checkpoint(other, is, ctx, &contiguous);
  CHECK(Wc.download() == packed);

  // Into a strided buffer: the rows, with the padding as it was.
  std::vector<float> target(padded.size(), -1.0f), want = target;
  for (long i = 0; i < rows; ++i)
    for (long j = 0; j < cols; ++j) want[static_cast<std::size_t>(i * ld + j)] = static_cast<float>(i * cols + j);
  Device<float> Wt(target);
  cuda::DeviceWeightSet into;
  into.add(id, device_view(Wt.data(), rows, cols, ld));
  std::istringstream is2(os.str(), std::ios::binary);
  cuda::load_checkpoint(opt, is2, ctx, &into);
  CHECK(Wt.download() == want);
}

TEST_CASE("DeviceWeightSet errors are caught before anything is written or changed") {
  cuda::Context ctx;
  const CkptSpec s = spec_of(false, false);
  const Grads g = make_grads(s);
  using G = Gpu<float, schedule::FixedGap>;
  G a(s, ctx, initial_weights(s));
  for (int t = 0; t < kBefore; ++t) a.step(g[static_cast<std::size_t>(t)]);
  cuda::DeviceWeightSet all = a.weight_set();
  const std::string plain = a.save(), with = a.save(&all);
  // Then a state and weights that differ from the file's, so that a load that
  // changed anything before failing would show.
  a.step(g[kBefore]);
  const Weights W = a.weights();
  const std::string now = a.save(&all);
  REQUIRE(now != with);
  const std::size_t q = index_of(s, "q"), k = index_of(s, "k");
  auto view_q = [&] { return device_view(a.Wf[q].data(), 48, 32); };

  CHECK_THROWS_AS(cuda::DeviceWeightSet().add(a.ids[q], view_q()).add(a.ids[q], view_q()), galore::invalid_argument);
  CHECK_THROWS_AS(cuda::DeviceWeightSet().add(a.ids[q], device_view<float>(nullptr, 48, 32)),
                  galore::invalid_argument);
  CHECK_THROWS_AS(cuda::DeviceWeightSet().add(a.ids[q], device_view(a.Wf[q].data(), 48, 32, 16)),
                  galore::invalid_argument);

  // Sets a save must refuse (nothing written) and a load must refuse (nothing changed).
  std::vector<std::pair<std::string, cuda::DeviceWeightSet>> refused;
  refused.emplace_back("an unregistered layer", cuda::DeviceWeightSet().add(LayerId{99}, view_q()));
  refused.emplace_back("a weight of another shape",
                       cuda::DeviceWeightSet().add(a.ids[q], device_view(a.Wf[q].data(), 32, 48)));
  Device<float> k_as_float(std::vector<float>(32 * 56, 0.0f));  // layer "k" holds bf16
  refused.emplace_back("a weight of another element type",
                       cuda::DeviceWeightSet().add(a.ids[k], device_view(k_as_float.data(), 32, 56)));
  for (auto& entry : refused) {
    INFO(entry.first);
    std::ostringstream os(std::ios::binary);
    CHECK_THROWS_AS(cuda::save_checkpoint(a.opt, os, ctx, &entry.second), galore::invalid_argument);
    CHECK(os.str().empty());
    CHECK_THROWS_AS(a.load(with, &entry.second), checkpoint_error);
  }
  // Loads whose weights do not match the file's.
  Device<cuda::bf16> q_as_bf16(std::vector<float>(48 * 32, 0.0f));
  cuda::DeviceWeightSet other_kind;
  for (std::size_t i = 0; i < s.layers.size(); ++i) {
    const CkptLayer& l = s.layers[i];
    if (i == q) other_kind.add(a.ids[i], device_view(q_as_bf16.data(), l.rows, l.cols));
    else if (l.bf16) other_kind.add(a.ids[i], device_view(a.Wh[i].data(), l.rows, l.cols));
    else other_kind.add(a.ids[i], device_view(a.Wf[i].data(), l.rows, l.cols));
  }
  CHECK_THROWS_WITH_AS(a.load(with, &other_kind), doctest::Contains("holds bfloat16 elements"), checkpoint_error);
  cuda::DeviceWeightSet fewer;
  fewer.add(a.ids[k], device_view(a.Wh[k].data(), 32, 56));
  CHECK_THROWS_WITH_AS(a.load(with, &fewer), doctest::Contains("weights"), checkpoint_error);
  CHECK_THROWS_WITH_AS(a.load(plain, &all), doctest::Contains("holds no weights"), checkpoint_error);
  CHECK_THROWS_AS(a.load(with), checkpoint_error);  // weights in the file, none passed

  CHECK(a.weights() == W);
  CHECK(q_as_bf16.download() == std::vector<float>(48 * 32, 0.0f));
  CHECK(a.save(&all) == now);
}

TEST_CASE("saving to a path replaces the file atomically; loading from a path") {
  cuda::Context ctx;
  const CkptSpec s = spec_of(false, false);
  const Grads g = make_grads(s);
  Gpu<float, schedule::FixedGap> a(s, ctx, initial_weights(s));
  for (int t = 0; t < kBefore; ++t) a.step(g[static_cast<std::size_t>(t)]);
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("galore_cuda_ckpt_" + std::to_string(std::random_device{}()));
  fs::create_directories(dir);
  const std::string path = (dir / "run.ckpt").string();
  {
    std::ofstream(path) << "an older file";
  }
  cuda::save_checkpoint(a.opt, path, ctx);
  std::size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir)) files += e.is_regular_file() ? 1 : 0;
  CHECK(files == 1);  // no temporary left
  Gpu<float, schedule::FixedGap> b(s, ctx, a.weights());
  cuda::load_checkpoint(b.opt, path, ctx);
  CHECK(b.save() == a.save());
  CHECK_THROWS_AS(cuda::load_checkpoint(b.opt, (dir / "missing.ckpt").string(), ctx), checkpoint_error);
  fs::remove_all(dir);
}
