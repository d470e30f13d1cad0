// Checkpoints: exact resume for every facade, atomic saves, and every class of
// bad input rejected with a message and without changing anything.
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <galore/galore.hpp>
#include <limits>
#include <memory>

#include "fuzz/checkpoint_mutator.hpp"
#include "support/checkpoint_fixtures.hpp"
#include "support/random.hpp"

using namespace galore;
using galore_test::FacadeKind;
using galore_test::Field;
using galore_test::Fixture;
using galore_test::Image;
using galore_test::Layout;

namespace {

const FacadeKind kKinds[] = {FacadeKind::GaLore, FacadeKind::GaLore8bit, FacadeKind::QGaLore, FacadeKind::AdamW};

// A checkpoint after `steps` steps (the fixture's refresh gaps are 2 and 3, so
// several refreshes and lazy-schedule decisions happen on the way).
std::string checkpoint_after(FacadeKind k, int steps) {
  return galore_fuzz::base_checkpoint(k, steps);  // computed once per (kind, steps)
}

// A trained optimizer and its saved state, to load bad input into: every
// rejected load must leave it exactly as it was.
struct Target {
  Fixture f;
  std::string before;
  explicit Target(FacadeKind k) : f(k) {
    f.step(0);
    before = f.save();
  }
};

void expect_rejected(Target& t, const std::string& bytes, const char* what) {
  Fixture& f = t.f;
  const std::string& before = t.before;
  std::string message;
  try {
    f.load(bytes);
    message = "(accepted)";
  } catch (const checkpoint_error& e) {
    message = e.what();
  } catch (const std::exception& e) {  // every failure to load must be a checkpoint_error
    message = std::string("(not a checkpoint_error) ") + e.what();
    CHECK(message.empty());
  }
  CAPTURE(what);
  CAPTURE(message);
  CHECK(message != "(accepted)");
  CHECK(message.find("galore") != std::string::npos);
  CHECK(f.save() == before);  // nothing changed
  if (message == "(accepted)") f.load(before);  // back to the trained state for the next check
}

// One target per kind, shared by the checks (a rejected load changes nothing).
Target& target_of(FacadeKind k) {
  static std::unique_ptr<Target> targets[static_cast<int>(FacadeKind::Count)];
  auto& t = targets[static_cast<int>(k)];
  if (!t) t = std::make_unique<Target>(k);
  return *t;
}

void expect_rejected(FacadeKind k, const std::string& bytes, const char* what) {
  expect_rejected(target_of(k), bytes, what);
}

}  // namespace

TEST_CASE("resume is exact: N steps, save, load into a fresh optimizer, M steps == N + M steps") {
  for (FacadeKind k : kKinds) {
    CAPTURE(galore_test::name(k));
    const int N = 5, M = 4;
    Fixture straight(k);
    for (int t = 0; t < N + M; ++t) straight.step(t);

    Fixture first(k);
    for (int t = 0; t < N; ++t) first.step(t);
    const std::string saved = first.save();
    Fixture resumed(k);  // fresh: same layers registered, initial weights
    resumed.load(saved);
    CHECK(resumed.save() == saved);  // the loaded state is the saved state
    for (int t = N; t < N + M; ++t) resumed.step(t);

    CHECK(resumed.save() == straight.save());  // weights and every piece of state, bit for bit
    for (std::size_t i = 0; i < straight.W.size(); ++i) CHECK(resumed.W[i] == straight.W[i]);
    for (std::size_t i = 0; i < straight.Q.size(); ++i) CHECK(resumed.Q[i].codes().codes == straight.Q[i].codes().codes);
    resumed.visit([&](auto& o) {
      straight.visit([&](auto& s) {
        CHECK(o.state_bytes() == s.state_bytes());
        for (LayerId id : straight.ids) {
          CHECK(o.stats(id).steps == s.stats(id).steps);
          CHECK(o.stats(id).svd_count == s.stats(id).svd_count);
          CHECK(o.stats(id).update_gap == s.stats(id).update_gap);
        }
        return 0;
      });
      return 0;
    });
  }
}

TEST_CASE("the learning rate is state and comes back with the checkpoint") {
  Fixture a(FacadeKind::GaLore), b(FacadeKind::GaLore);
  a.galore->set_lr(0.0042);
  b.load(a.save());
  CHECK(b.galore->adam_config().lr == 0.0042);
}

TEST_CASE("saving to a path is atomic and leaves no temporary file") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("galore_ckpt_test_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "run.ckpt").string();
  Fixture f(FacadeKind::QGaLore);
  f.step(0);
  save_checkpoint(*f.qgalore, path, &f.weights);
  const std::string first = f.save();
  f.step(1);
  save_checkpoint(*f.qgalore, path, &f.weights);  // replaces the previous checkpoint
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    ++files;
    CHECK(e.path().filename() == "run.ckpt");
  }
  CHECK(files == 1);
  Fixture g(FacadeKind::QGaLore);
  load_checkpoint(*g.qgalore, path, &g.weights);
  CHECK(g.save() == f.save());
  CHECK(g.save() != first);
  CHECK_THROWS_AS(load_checkpoint(*g.qgalore, (dir / "missing.ckpt").string(), &g.weights), checkpoint_error);
  CHECK_THROWS_AS(save_checkpoint(*g.qgalore, (dir / "no/such/dir/x.ckpt").string()), checkpoint_error);
  fs::remove_all(dir);
}

TEST_CASE("truncated checkpoints are rejected at every length") {
  for (FacadeKind k : kKinds) {
    CAPTURE(galore_test::name(k));
    const std::string good = checkpoint_after(k, 3);
    Target target(k);
    // Every prefix would take long for the larger files: all of the first 512
    // bytes, then a stride through the rest, and the last 64.
    for (std::size_t n = 0; n < good.size(); n += (n < 512 || n + 64 >= good.size()) ? 1 : 97)
      expect_rejected(target, good.substr(0, n), "truncated");
  }
}

TEST_CASE("flipped bits are caught (by the checksums or the header checks)") {
  for (FacadeKind k : kKinds) {
    CAPTURE(galore_test::name(k));
    const std::string good = checkpoint_after(k, 3);
    Target target(k);
    std::mt19937 gen(5);
    for (int trial = 0; trial < 200; ++trial) {
      std::string bad = good;
      const std::size_t byte = trial < 40 ? static_cast<std::size_t>(trial) : gen() % bad.size();
      bad[byte] = static_cast<char>(bad[byte] ^ (1 << (gen() % 8)));
      expect_rejected(target, bad, "bit flip");
    }
  }
}

TEST_CASE("wrong magic, version, byte order or section count") {
  const std::string good = checkpoint_after(FacadeKind::GaLore, 2);
  std::string bad = good;
  bad[0] = 'X';
  expect_rejected(FacadeKind::GaLore, bad, "magic");
  bad = good;
  bad[8] = 2;  // format version 2
  expect_rejected(FacadeKind::GaLore, bad, "version");
  bad = good;
  bad[12] = 9;  // library major version 9
  expect_rejected(FacadeKind::GaLore, bad, "library version");
  bad = good;
  bad[24] = 9;  // byte-order marker
  expect_rejected(FacadeKind::GaLore, bad, "byte order");
  bad = good;
  bad[28] = 7;  // section count
  expect_rejected(FacadeKind::GaLore, bad, "section count");
  expect_rejected(FacadeKind::GaLore, "", "empty");
  expect_rejected(FacadeKind::GaLore, std::string(1000, '\0'), "zeros");
}

TEST_CASE("a checkpoint of another configuration or layout is an error, not a silent change") {
  // Another facade kind.
  expect_rejected(FacadeKind::GaLore8bit, checkpoint_after(FacadeKind::GaLore, 2), "8-bit vs float states");
  expect_rejected(FacadeKind::GaLore, checkpoint_after(FacadeKind::AdamW, 2), "dense vs projected layers");
  expect_rejected(FacadeKind::QGaLore, checkpoint_after(FacadeKind::GaLore8bit, 2), "Q-GaLore vs GaLore-8bit");
  // Same kind, one hyperparameter changed.
  auto with = [](auto edit) {
    Fixture f(FacadeKind::GaLore);
    f.step(0);
    const std::string good = f.save();
    AdamConfig adam = f.galore->adam_config();
    ProjectorOptions proj = f.galore->projection_options();
    std::int64_t gap = 3;
    edit(adam, proj, gap);
    GaLoreAdamW other(proj, LowRankAdam<>(adam), schedule::FixedGap{gap});
    for (int i = 0; i < 3; ++i)
      i < 2 ? other.add_layer(Fixture::kShapes[i], "p" + std::to_string(i)) : other.add_dense(Fixture::kShapes[i], "d2");
    std::istringstream is(good);
    std::string message;
    try {
      load_checkpoint(other, is);
    } catch (const checkpoint_error& e) {
      message = e.what();
    }
    return message;
  };
  CHECK(with([](AdamConfig& a, ProjectorOptions&, std::int64_t&) { a.beta2 = 0.99; }).find("adam.beta2") != std::string::npos);
  CHECK(with([](AdamConfig& a, ProjectorOptions&, std::int64_t&) { a.weight_decay = 0; }).find("weight_decay") != std::string::npos);
  CHECK(with([](AdamConfig&, ProjectorOptions& p, std::int64_t&) { p.rank = 8; }).find("projection.rank") != std::string::npos);
  CHECK(with([](AdamConfig&, ProjectorOptions&, std::int64_t& g) { g = 5; }).find("schedule.gap") != std::string::npos);
  // The learning rate alone differs: accepted (it is state).
  CHECK(with([](AdamConfig& a, ProjectorOptions&, std::int64_t&) { a.lr = 0.5; }).find("weights") != std::string::npos);
}

TEST_CASE("the warm start's rayleigh_ritz is part of the configuration, and described only when off") {
  using WarmOpt = GaLoreOptimizer<Projector<svd::WarmStart>, LowRankAdam<>>;
  auto make = [](bool rayleigh_ritz) {
    svd::WarmStart warm;
    warm.rayleigh_ritz = rayleigh_ritz;
    auto opt = std::make_unique<WarmOpt>(ProjectorOptions{4, ProjectionType::Std, 0.25f}, LowRankAdam<>(),
                                         schedule::FixedGap{2}, warm);
    opt->add_layer({24, 16}, "w");
    return opt;
  };
  auto save = [](const WarmOpt& opt) {
    std::ostringstream os;
    save_checkpoint(opt, os);
    return os.str();
  };
  auto loads = [](WarmOpt& opt, const std::string& bytes) {
    std::istringstream is(bytes);
    try {
      load_checkpoint(opt, is);
      return std::string();
    } catch (const checkpoint_error& e) {
      return std::string(e.what());
    }
  };
  const auto on = make(true), off = make(false);
  MatrixF W = galore_test::gaussian(24, 16, 1), G = galore_test::gaussian(24, 16, 2);
  on->step(LayerId{0}, W, G);
  off->step(LayerId{0}, W, G);
  const std::string with_rr = save(*on), without_rr = save(*off);
  // The default writes the description of files from before the option (no such item).
  CHECK(with_rr.find("rayleigh_ritz") == std::string::npos);
  CHECK(without_rr.find("rayleigh_ritz") != std::string::npos);
  CHECK(loads(*make(true), with_rr).empty());
  CHECK(loads(*make(false), without_rr).empty());
  CHECK(loads(*make(false), with_rr).find("rayleigh_ritz") != std::string::npos);
  CHECK_FALSE(loads(*make(true), without_rr).empty());
}

TEST_CASE("layer names, shapes and counts must match") {
  const std::string good = checkpoint_after(FacadeKind::GaLore, 2);
  auto load_into = [&](auto add_layers) {
    GaLoreAdamW other({16, ProjectionType::Std, 0.25f}, LowRankAdam<>([] { AdamConfig a; a.lr = 0.01; a.weight_decay = 0.01; return a; }()),
                      schedule::FixedGap{3});
    add_layers(other);
    std::istringstream is(good);
    std::string message = "(accepted)";
    try {
      load_checkpoint(other, is);
    } catch (const checkpoint_error& e) {
      message = e.what();
    }
    return message;
  };
  CHECK(load_into([](GaLoreAdamW& o) { o.add_layer({96, 64}, "p0"); }).find("sections") != std::string::npos);
  CHECK(load_into([](GaLoreAdamW& o) {
          o.add_layer({96, 64}, "p0");
          o.add_layer({48, 80}, "renamed");
          o.add_dense({1, 64}, "d2");
        }).find("'renamed'") != std::string::npos);
  CHECK(load_into([](GaLoreAdamW& o) {
          o.add_layer({96, 64}, "p0");
          o.add_layer({48, 81}, "p1");
          o.add_dense({1, 64}, "d2");
        }).find("48x81") != std::string::npos);
}

TEST_CASE("forged lengths and sizes are rejected without huge allocations") {
  const std::string good = checkpoint_after(FacadeKind::GaLore, 2);
  // The first section starts after the 36-byte header: u32 tag, u64 length, u32 crc.
  std::string bad = good;
  const std::uint64_t huge = std::uint64_t{1} << 39;  // 512 GiB: under the hard limit, far over the input
  std::memcpy(&bad[36 + 4], &huge, 8);
  expect_rejected(FacadeKind::GaLore, bad, "huge section length");
  const std::uint64_t impossible = ~std::uint64_t{0};
  std::memcpy(&bad[36 + 4], &impossible, 8);
  expect_rejected(FacadeKind::GaLore, bad, "impossible section length");

  // A layer section whose shape overflows, with a checksum that matches the forgery.
  std::istringstream is(good);
  char header[36];
  is.read(header, 36);
  auto conf = checkpoint::read_section(is, 0);
  auto layer = checkpoint::read_section(is, 1);
  checkpoint::Writer w;
  w.str("p0");
  w.i64(std::int64_t{1} << 40);
  w.i64(std::int64_t{1} << 40);
  std::ostringstream forged(std::ios::binary);
  forged.write(header, 36);
  checkpoint::write_section(forged, conf.tag, conf.payload);
  checkpoint::write_section(forged, layer.tag, w.bytes());
  forged << is.rdbuf();
  expect_rejected(FacadeKind::GaLore, forged.str(), "overflowing shape");
}

TEST_CASE("weights to restore must match what the checkpoint holds") {
  Fixture f(FacadeKind::GaLore);
  f.step(0);
  std::ostringstream without(std::ios::binary);
  save_checkpoint(*f.galore, without);
  Fixture g(FacadeKind::GaLore);
  std::istringstream is(without.str());
  CHECK_THROWS_WITH_AS(load_checkpoint(*g.galore, is, &g.weights), doctest::Contains("holds no weights"),
                       checkpoint_error);
  std::istringstream is2(f.save());
  CHECK_THROWS_WITH_AS(load_checkpoint(*g.galore, is2), doctest::Contains("weights"), checkpoint_error);
  WeightSet twice;
  CHECK_THROWS_AS(twice.add(g.ids[0], g.W[0]).add(g.ids[0], g.W[1]), galore::invalid_argument);
}

TEST_CASE("seed corpus for fuzz_checkpoint") {
  // ctest sets GALORE_FUZZ_CORPUS to write one valid checkpoint per facade kind
  // (first byte: the kind the fuzzer loads it into).
  const char* dir = std::getenv("GALORE_FUZZ_CORPUS");
  if (!dir) return;
  std::filesystem::create_directories(dir);
  for (FacadeKind k : kKinds)
    for (int steps : {0, 1, 4}) {
      std::ofstream out(std::string(dir) + "/" + galore_test::name(k) + "_" + std::to_string(steps) + ".bin",
                        std::ios::binary);
      out.put(static_cast<char>(k));
      out << checkpoint_after(k, steps);
      CHECK(out.good());
    }
}

// ---- crafted checkpoints: valid checksums, values out of range ----

namespace {

constexpr std::int64_t kMaxCounter = std::int64_t{1} << 62;
constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();
const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();
const float kFltMax = std::numeric_limits<float>::max();

// Sections of the fixture's checkpoints: 0 CONF, 1 and 2 the projected layers,
// 3 the dense one, 4 WGHT, 5 END.
using Edit = std::function<void(Image&, const Layout&)>;

void expect_forgery_rejected(FacadeKind k, int steps, const char* what, const Edit& edit) {
  Image im = Image::parse(checkpoint_after(k, steps));
  edit(im, galore_test::layout_of(k));
  expect_rejected(k, im.bytes(), what);
}

void expect_forgery_accepted(FacadeKind k, int steps, const char* what, const Edit& edit) {
  CAPTURE(what);
  Image im = Image::parse(checkpoint_after(k, steps));
  edit(im, galore_test::layout_of(k));
  Fixture f(k);
  const std::string bytes = im.bytes();
  CHECK_NOTHROW(f.load(bytes));
  CHECK(f.save() == bytes);
  CHECK_NOTHROW(f.step(11));
}

// Sets a field of a section to v (element i of an array field).
template <class T>
Edit set(std::size_t section, const char* name, T v, std::uint64_t i = 0) {
  return [=](Image& im, const Layout& l) { galore_test::poke(im, galore_test::field(im, l, section, name), v, i); };
}

// The same for optimizers other than the fixture's: two projected layers
// (96 x 64, 48 x 80) and one dense (1 x 64), three steps before saving.
template <class Opt>
struct Custom {
  std::function<std::unique_ptr<Opt>()> make;
  Layout layout;
  mutable std::string saved_;            // after three steps, computed once
  mutable std::unique_ptr<Opt> target_;  // after one step, loaded into by expect_rejected
  mutable std::string target_before_;

  Custom(std::function<std::unique_ptr<Opt>()> m, Layout l) : make(std::move(m)), layout(l) {}

  std::unique_ptr<Opt> build(int steps) const {
    auto o = make();
    o->add_layer(Fixture::kShapes[0], "p0");
    o->add_layer(Fixture::kShapes[1], "p1");
    o->add_dense(Fixture::kShapes[2], "d2");
    for (int t = 0; t < steps; ++t)
      for (std::size_t i = 0; i < 3; ++i) {
        MatrixF W = galore_test::fixture_matrix(Fixture::kShapes[i], 10 + static_cast<unsigned>(i), 1.0f);
        o->step(LayerId{i}, W, galore_test::fixture_matrix(Fixture::kShapes[i], 1000 * t + static_cast<unsigned>(i), 0.1f));
      }
    return o;
  }
  static std::string save(const Opt& o) {
    std::ostringstream os(std::ios::binary);
    save_checkpoint(o, os);
    return os.str();
  }
  std::string saved() const {
    if (saved_.empty()) saved_ = save(*build(3));
    return saved_;
  }

  void expect_rejected(const char* what, const Edit& edit) const {
    CAPTURE(what);
    Image im = Image::parse(saved());
    edit(im, layout);
    if (!target_) {
      target_ = build(1);
      target_before_ = save(*target_);
    }
    Opt* target = target_.get();
    const std::string& before = target_before_;
    std::istringstream is(im.bytes());
    std::string message = "(accepted)";
    try {
      load_checkpoint(*target, is);
    } catch (const checkpoint_error& e) {
      message = e.what();
    } catch (const std::exception& e) {
      message = std::string("(not a checkpoint_error) ") + e.what();
    }
    CAPTURE(message);
    CHECK(message.rfind("galore checkpoint", 0) == 0);
    CHECK(save(*target) == before);
    if (message == "(accepted)") target_.reset();
  }
  void expect_accepted() const {
    const std::string bytes = saved();
    auto target = build(1);
    std::istringstream is(bytes);
    CHECK_NOTHROW(load_checkpoint(*target, is));
    CHECK(save(*target) == bytes);
  }
};

using NF4Opt = GaLoreOptimizer<Projector<svd::Exact, quant::NF4, schedule::FixedGap>, LowRankAdam<state::BFloat16>>;
using DriftOpt = GaLoreOptimizer<Projector<svd::Exact, quant::BFloat16, schedule::Drift>, LowRankAdam<state::Blockwise8bit>>;

const Custom<NF4Opt> kNF4{[] { return std::make_unique<NF4Opt>(ProjectorOptions{16, ProjectionType::Std, 0.25f}); },
                          {Layout::Schedule::Fixed, Layout::Storage::NF4, Layout::Moments::BFloat16}};
// 8-bit moments from 1024 elements, so that the 96 x 16 moments take the 8-bit path.
const Custom<DriftOpt> kDrift{[] {
                                return std::make_unique<DriftOpt>(ProjectorOptions{16, ProjectionType::Std, 0.25f},
                                                                  LowRankAdam<state::Blockwise8bit>(AdamConfig{}, state::Blockwise8bit{256, 1024}),
                                                                  schedule::Drift{1, 0.1, 1, 3});
                              },
                              {Layout::Schedule::Drift, Layout::Storage::BFloat16, Layout::Moments::Blockwise8bit}};

}  // namespace

TEST_CASE("crafted counters outside [0, 2^62] are rejected (the next step would overflow them)") {
  for (FacadeKind k : kKinds) {
    CAPTURE(galore_test::name(k));
    for (std::size_t layer : {1, 3}) {
      for (std::int64_t v : {kInt64Max, kMaxCounter + 1, std::int64_t{-1}}) {
        CAPTURE(v);
        expect_forgery_rejected(k, 2, "step", set<std::int64_t>(layer, "layer.step", v));
        expect_forgery_rejected(k, 2, "skipped", set<std::int64_t>(layer, "layer.skipped", v));
      }
      expect_forgery_accepted(k, 2, "step at the bound", set<std::int64_t>(layer, "layer.step", kMaxCounter));
      expect_forgery_accepted(k, 2, "skipped at the bound", set<std::int64_t>(layer, "layer.skipped", kMaxCounter));
    }
    if (k == FacadeKind::AdamW) continue;
    for (std::int64_t v : {kInt64Max, kMaxCounter + 1})
      expect_forgery_rejected(k, 2, "svd count", set<std::int64_t>(1, "proj.svd_count", v));
    // Without a basis the SVD count is 0; with one it is positive.
    expect_forgery_rejected(k, 0, "svd count without a basis", set<std::int64_t>(1, "proj.svd_count", 3));
    expect_forgery_accepted(k, 2, "svd count at the bound", set<std::int64_t>(1, "proj.svd_count", kMaxCounter));
  }
}

TEST_CASE("crafted moments: first moments must be finite, second moments finite and >= 0") {
  for (FacadeKind k : kKinds) {
    CAPTURE(galore_test::name(k));
    for (std::size_t layer : {1, 2, 3}) {
      Image im = Image::parse(checkpoint_after(k, 2));
      bool found = false;
      for (const Field& f : galore_test::fields(im, galore_test::layout_of(k))) {
        // float32 moments, or the 8-bit path's per-block absmax (the fixture's
        // 8-bit kinds quantize the projected layers' moments).
        const bool absmax = f.name == "moments.m_absmax" || f.name == "moments.v_absmax";
        if (f.section != layer || (f.name != "moments.m" && f.name != "moments.v" && !absmax)) continue;
        found = true;
        const bool nonnegative = f.name != "moments.m";
        const std::uint64_t i = absmax ? 1 : 5;
        for (float v : {kNaN, kInf, -kInf, nonnegative ? -1.0f : kNaN, nonnegative ? -1e-30f : -kInf}) {
          CAPTURE(f.name);
          CAPTURE(v);
          expect_forgery_rejected(k, 2, "moment", set<float>(layer, f.name.c_str(), v, i));
        }
        expect_forgery_accepted(k, 2, "large finite moment", set<float>(layer, f.name.c_str(), 1e30f, i));
      }
      CHECK(found);
    }
  }
  // bf16 moments (the NF4 optimizer's) and 8-bit moments with their absmax.
  for (float v : {kNaN, kInf, -1.0f}) {
    kNF4.expect_rejected("bf16 second moment", set<std::uint16_t>(1, "moments.v", static_cast<std::uint16_t>(
        std::isnan(v) ? 0x7FC0 : std::isinf(v) ? 0x7F80 : 0xBF80), 3));
    kNF4.expect_rejected("bf16 first moment", set<std::uint16_t>(2, "moments.m", static_cast<std::uint16_t>(
        std::isnan(v) ? 0xFFC0 : 0xFF80), 3));
    kDrift.expect_rejected("8-bit first-moment absmax", set<float>(1, "moments.m_absmax", v));
    kDrift.expect_rejected("8-bit second-moment absmax", set<float>(1, "moments.v_absmax", v, 2));
    kDrift.expect_rejected("8-bit float32-path second moment", set<float>(3, "moments.v", v == -1.0f ? -2.0f : v, 7));
    kDrift.expect_rejected("8-bit float32-path first moment", set<float>(3, "moments.m", std::isfinite(v) ? kNaN : -v, 9));
  }
  kNF4.expect_accepted();
  kDrift.expect_accepted();
}

TEST_CASE("crafted bases: values finite, quantization scales positive and small enough to dequantize finitely") {
  for (float v : {kNaN, kInf, -kInf})
    for (FacadeKind k : {FacadeKind::GaLore, FacadeKind::GaLore8bit}) {
      CAPTURE(v);
      expect_forgery_rejected(k, 2, "float32 basis", set<float>(1, "basis.values", v, 17));
    }
  kDrift.expect_rejected("bf16 basis NaN", set<std::uint16_t>(2, "basis.values", 0x7FC0, 4));
  kDrift.expect_rejected("bf16 basis Inf", set<std::uint16_t>(1, "basis.values", 0xFF80, 4));
  // INT4 basis: dequantized values are scale * (code - zero) with |code - zero| <= 15.
  for (float v : {kNaN, kInf, 0.0f, -1.0f, -0.0f, kFltMax, kFltMax / 14.0f}) {
    CAPTURE(v);
    expect_forgery_rejected(FacadeKind::QGaLore, 2, "INT4 scale", set<float>(1, "basis.scales", v, 1));
  }
  expect_forgery_rejected(FacadeKind::QGaLore, 2, "INT4 zero", set<std::uint8_t>(2, "basis.zeros", 16, 0));
  expect_forgery_accepted(FacadeKind::QGaLore, 2, "INT4 scale at the bound",
                          set<float>(1, "basis.scales", kFltMax / 15.0f, 1));
  // NF4 basis: values are an NF4 level in [-1, 1] times the block's absmax.
  for (float v : {kNaN, kInf, -1.0f}) kNF4.expect_rejected("NF4 absmax", set<float>(1, "basis.absmax", v, 1));
  // The trainer's INT8 weights: the same scale rule.
  for (float v : {kNaN, kInf, 0.0f, kFltMax / 200.0f})
    expect_forgery_rejected(FacadeKind::QGaLore, 2, "INT8 weight scale", set<float>(4, "weight.scales", v, 0));
}

TEST_CASE("crafted schedule states: lazy gap, cosine queue and singular vector; drift steps and measurements") {
  const FacadeKind k = FacadeKind::QGaLore;  // lazy schedule with gamma 2 and a queue of 2
  // The gap grows to gap * gamma: it must stay within 2^62.
  for (std::int64_t v : {kInt64Max, kMaxCounter, (kMaxCounter >> 1) + 1, std::int64_t{0}, std::int64_t{-4}}) {
    CAPTURE(v);
    expect_forgery_rejected(k, 7, "lazy gap", set<std::int64_t>(1, "lazy.gap", v));
  }
  expect_forgery_accepted(k, 7, "lazy gap at the bound", set<std::int64_t>(1, "lazy.gap", kMaxCounter >> 1));
  for (float v : {kNaN, kInf, 1.5f, -1.0001f}) {
    CAPTURE(v);
    expect_forgery_rejected(k, 7, "cosine queue value", set<float>(1, "lazy.queue", v, 1));
    expect_forgery_rejected(k, 7, "last cosine", set<float>(2, "lazy.last_cosine", std::isnan(v) ? 2.0f : v));
  }
  expect_forgery_rejected(k, 7, "previous singular vector", set<float>(1, "lazy.past", kNaN, 3));
  expect_forgery_rejected(k, 7, "previous singular vector", set<float>(2, "lazy.past", -kInf, 0));
  expect_forgery_rejected(k, 7, "queue longer than its size", [](Image& im, const Layout& l) {
    galore_test::replace_array<float>(im, galore_test::field(im, l, 1, "lazy.queue"), {0.5f, 0.5f, 0.5f});
  });
  expect_forgery_rejected(k, 7, "no previous singular vector though a basis exists", [](Image& im, const Layout& l) {
    galore_test::replace_array<float>(im, galore_test::field(im, l, 1, "lazy.past"), {});
  });
  expect_forgery_rejected(k, 2, "more cosines than refreshes", [](Image& im, const Layout& l) {
    galore_test::poke<std::int64_t>(im, galore_test::field(im, l, 1, "proj.svd_count"), 1);
    galore_test::replace_array<float>(im, galore_test::field(im, l, 1, "lazy.queue"), {0.5f});
  });
  expect_forgery_accepted(k, 7, "last cosine NaN (no cosine yet)", set<float>(2, "lazy.last_cosine", kNaN));

  kDrift.expect_rejected("drift refresh step", set<std::int64_t>(1, "drift.last_refresh", kInt64Max));
  kDrift.expect_rejected("drift refresh step", set<std::int64_t>(1, "drift.last_refresh", kMaxCounter + 1));
  kDrift.expect_rejected("drift baseline", set<double>(1, "drift.baseline", -0.5));
  kDrift.expect_rejected("drift measurement", set<double>(2, "drift.last_captured", -std::numeric_limits<double>::infinity()));
}

TEST_CASE("the configuration must match item for item, whatever the items are called") {
  const std::string good = checkpoint_after(FacadeKind::GaLore, 2);
  // An extra item keyed "(nothing)" (once the loader's placeholder for a missing item).
  for (const char* key : {"(nothing)", "facade", ""}) {
    CAPTURE(key);
    expect_forgery_rejected(FacadeKind::GaLore, 2, "extra configuration item", [key](Image& im, const Layout& l) {
      const Field lr = galore_test::field(im, l, 0, "conf.lr");
      std::string item;
      for (const std::string& text : {std::string(key), std::string("x")}) {
        const std::uint64_t n = text.size();
        item.append(reinterpret_cast<const char*>(&n), 8);
        item += text;
      }
      im.sections[0].payload.insert(lr.offset, item);
      std::uint64_t count;
      std::memcpy(&count, im.sections[0].payload.data(), 8);
      galore_test::poke<std::uint64_t>(im, galore_test::field(im, l, 0, "conf.count"), count + 1);
    });
  }
}

TEST_CASE("the file holds exactly the sections its header announces, and nothing after the end section") {
  const FacadeKind k = FacadeKind::GaLore;
  expect_forgery_rejected(k, 2, "a byte after the end section", [](Image& im, const Layout&) { im.trailing = "x"; });
  expect_forgery_rejected(k, 2, "a second end section",
                          [](Image& im, const Layout&) { im.trailing = Image::section_bytes(im.sections.back()); });
  // A header announcing a weights section the file does not have.
  Fixture f(k);
  f.step(0);
  std::ostringstream without(std::ios::binary);
  save_checkpoint(*f.galore, without);
  Image im = Image::parse(without.str());
  im.set_section_count(im.header_u32(28) + 1);
  Target target(k);
  Fixture& g = target.f;
  std::istringstream is(im.bytes());
  CHECK_THROWS_AS(load_checkpoint(*g.galore, is), checkpoint_error);
  CHECK(g.save() == target.before);
}

TEST_CASE("loading reports every failure as checkpoint_error, even from a stream that throws") {
  const std::string good = checkpoint_after(FacadeKind::GaLore, 2);
  Target target(FacadeKind::GaLore);
  for (std::size_t n : {std::size_t{0}, std::size_t{10}, std::size_t{100}, good.size() - 1}) {
    CAPTURE(n);
    std::istringstream is(good.substr(0, n), std::ios::binary);
    is.exceptions(std::ios::failbit | std::ios::badbit | std::ios::eofbit);
    std::string message = "(accepted)";
    try {
      load_checkpoint(*target.f.galore, is, &target.f.weights);
    } catch (const checkpoint_error& e) {
      message = e.what();
    } catch (const std::exception& e) {
      message = std::string("(not a checkpoint_error) ") + e.what();
    }
    CAPTURE(message);
    CHECK(message.rfind("galore checkpoint", 0) == 0);
    CHECK(target.f.save() == target.before);
  }
  // A stream with exceptions on must still load a good checkpoint.
  Fixture g(FacadeKind::GaLore);
  std::istringstream is(good, std::ios::binary);
  is.exceptions(std::ios::badbit);
  CHECK_NOTHROW(load_checkpoint(*g.galore, is, &g.weights));
  CHECK(g.save() == good);
}

TEST_CASE("a WeightSet is checked against the optimizer when saving, before anything is written") {
  Fixture f(FacadeKind::GaLore);
  f.step(0);
  MatrixF wrong(3, 5);
  Matrix<bfloat16> wrong16(96, 63);
  QuantizedWeight<8> empty;
  MatrixF extra = galore_test::fixture_matrix({96, 64}, 3, 1.0f);
  std::vector<std::pair<const char*, WeightSet>> bad;
  bad.push_back({"unknown layer", WeightSet()});
  bad.back().second.add(LayerId{7}, extra);
  bad.push_back({"wrong float32 shape", WeightSet()});
  bad.back().second.add(f.ids[0], wrong);
  bad.push_back({"wrong bf16 shape", WeightSet()});
  bad.back().second.add(f.ids[0], wrong16);
  bad.push_back({"empty INT8 weight", WeightSet()});
  bad.back().second.add(f.ids[1], empty);

  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("galore_ckpt_ws_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "run.ckpt").string();
  save_checkpoint(*f.galore, path, &f.weights);
  const std::string before = f.save();
  for (auto& [what, ws] : bad) {
    CAPTURE(what);
    std::ostringstream os(std::ios::binary);
    CHECK_THROWS_AS(save_checkpoint(*f.galore, os, &ws), galore::invalid_argument);
    CHECK(os.str().empty());  // nothing written
    CHECK_THROWS_AS(save_checkpoint(*f.galore, path, &ws), galore::invalid_argument);
    std::ifstream in(path, std::ios::binary);
    CHECK(std::string(std::istreambuf_iterator<char>(in), {}) == before);  // the previous file is intact
  }
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir)) files += e.path().filename() != "run.ckpt";
  CHECK(files == 0);
  fs::remove_all(dir);
}

TEST_CASE("a WeightSet naming a layer the optimizer does not have is refused when loading") {
  Fixture f(FacadeKind::GaLore);
  f.step(0);
  // A checkpoint holding one weight, forged to name layer 7, loaded with a WeightSet
  // that names layer 7 too: the forgery must not make the loader look up layer 7.
  WeightSet one;
  one.add(f.ids[0], f.W[0]);
  std::ostringstream os(std::ios::binary);
  save_checkpoint(*f.galore, os, &one);
  Image im = Image::parse(os.str());
  const Layout l = galore_test::layout_of(FacadeKind::GaLore);
  galore_test::poke<std::uint64_t>(im, galore_test::field(im, l, 4, "weight.layer"), 7);
  for (std::uint64_t layer : {std::uint64_t{7}, std::uint64_t{3}, ~std::uint64_t{0}}) {
    CAPTURE(layer);
    galore_test::poke<std::uint64_t>(im, galore_test::field(im, l, 4, "weight.layer"), layer);
    Fixture g(FacadeKind::GaLore);
    const std::string before = g.save();
    MatrixF w = f.W[0];
    WeightSet bad;
    bad.add(LayerId{static_cast<std::size_t>(layer)}, w);
    std::istringstream is(im.bytes(), std::ios::binary);
    CHECK_THROWS_AS(load_checkpoint(*g.galore, is, &bad), checkpoint_error);
    CHECK(g.save() == before);
    CHECK(w == f.W[0]);
  }
}

// ---- saving to paths: special files, symbolic links, temporaries ----

namespace {

namespace fs = std::filesystem;

struct TempDir {
  fs::path path;
  explicit TempDir(const char* name) {
    path = fs::temp_directory_path() / (std::string(name) + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
};

std::string file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST_CASE("saving refuses to replace anything but a regular file") {
  TempDir dir("galore_ckpt_special");
  Fixture f(FacadeKind::GaLore);
  f.step(0);
  const fs::path fifo = dir.path / "pipe.ckpt";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  const fs::path sub = dir.path / "dir.ckpt";
  fs::create_directories(sub / "inside");
  fs::create_symlink(fifo, dir.path / "link_to_pipe.ckpt");
  for (const fs::path& p : {fifo, sub, dir.path / "link_to_pipe.ckpt"}) {
    CAPTURE(p.string());
    std::string message;
    try {
      save_checkpoint(*f.galore, p.string(), &f.weights);
    } catch (const checkpoint_error& e) {
      message = e.what();
    }
    CAPTURE(message);
    CHECK(message.find("not a regular file") != std::string::npos);
  }
  CHECK(fs::is_fifo(fs::symlink_status(fifo)));  // still the FIFO
  CHECK(fs::is_directory(sub / "inside"));
  CHECK(fs::is_symlink(fs::symlink_status(dir.path / "link_to_pipe.ckpt")));
  CHECK(dir.names() == std::vector<std::string>{"dir.ckpt", "link_to_pipe.ckpt", "pipe.ckpt"});  // no temporaries left
}

TEST_CASE("saving through a symbolic link writes the file at the end of the link") {
  TempDir dir("galore_ckpt_symlink");
  fs::create_directories(dir.path / "runs");
  Fixture f(FacadeKind::GaLore);
  f.step(0);
  // link -> runs/a.ckpt (existing), chained: chain -> link; dangling -> runs/new.ckpt (not there yet).
  const fs::path target = dir.path / "runs" / "a.ckpt";
  { std::ofstream(target) << "old"; }
  fs::create_symlink("runs/a.ckpt", dir.path / "link.ckpt");
  fs::create_symlink("link.ckpt", dir.path / "chain.ckpt");
  fs::create_symlink(dir.path / "runs" / "new.ckpt", dir.path / "dangling.ckpt");
  ::chmod(target.c_str(), 0640);

  save_checkpoint(*f.galore, (dir.path / "chain.ckpt").string(), &f.weights);
  CHECK(fs::is_symlink(fs::symlink_status(dir.path / "chain.ckpt")));
  CHECK(fs::is_symlink(fs::symlink_status(dir.path / "link.ckpt")));
  CHECK(file_bytes(target) == f.save());
  CHECK((fs::status(target).permissions() & fs::perms::all) ==
        (fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read));  // mode kept

  save_checkpoint(*f.galore, (dir.path / "dangling.ckpt").string(), &f.weights);
  CHECK(fs::is_symlink(fs::symlink_status(dir.path / "dangling.ckpt")));
  CHECK(file_bytes(dir.path / "runs" / "new.ckpt") == f.save());
  CHECK(dir.names() == std::vector<std::string>{"chain.ckpt", "dangling.ckpt", "link.ckpt", "runs"});

  // A loop of links is an error.
  fs::create_symlink("loop_b.ckpt", dir.path / "loop_a.ckpt");
  fs::create_symlink("loop_a.ckpt", dir.path / "loop_b.ckpt");
  CHECK_THROWS_AS(save_checkpoint(*f.galore, (dir.path / "loop_a.ckpt").string()), checkpoint_error);
}

TEST_CASE("temporaries of interrupted saves to the same path are removed by the next save, nothing else") {
  TempDir dir("galore_ckpt_leftovers");
  Fixture f(FacadeKind::GaLore);
  f.step(0);
  // 999999999 is above any pid_max, so no process has it; pid 1 always runs.
  const std::vector<std::string> leftovers = {"run.ckpt.galore-tmp-999999999-0123456789abcdef",
                                              "run.ckpt.galore-tmp-999999998-fedcba9876543210"};
  const std::vector<std::string> kept = {
      "run.ckpt.galore-tmp-1-0123456789abcdef",             // a save in progress in a live process
      "other.ckpt.galore-tmp-999999999-0123456789abcdef",   // another target
      "run.ckpt.galore-tmp-999999999-0123456789abcdeg",     // not the pattern
      "run.ckpt.galore-tmp-999999999-0123456789abcdef0",
      "run.ckpt.galore-tmp--0123456789abcdef",
      "xrun.ckpt.galore-tmp-999999999-0123456789abcdef",
      "run.ckpt.tmp.999999999.0"};
  for (const auto& n : leftovers) std::ofstream(dir.path / n) << "partial";
  for (const auto& n : kept) std::ofstream(dir.path / n) << "keep";
  save_checkpoint(*f.galore, (dir.path / "run.ckpt").string(), &f.weights);
  std::vector<std::string> want = kept;
  want.push_back("run.ckpt");
  std::sort(want.begin(), want.end());
  CHECK(dir.names() == want);
  CHECK(file_bytes(dir.path / "run.ckpt") == f.save());
}

// ---- value mutations under valid checksums ----

TEST_CASE("value mutations under valid checksums are rejected, or accepted and saved back unchanged") {
  // The body of fuzz_checkpoint_values, driven by a fixed-seed generator.
  std::mt19937 gen(20240917);
  int accepted = 0, rejected = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int run = 0; run < 3000; ++run) {
    std::vector<std::uint8_t> program(48);
    for (auto& b : program) b = static_cast<std::uint8_t>(gen());
    const galore_fuzz::Outcome out = galore_fuzz::run_value_mutation(program.data(), program.size());
    if (out.bad) {
      CAPTURE(run);
      CAPTURE(out.message);
      FAIL_CHECK("property failed");
    }
    (out.accepted ? accepted : rejected) += 1;
  }
  MESSAGE("value mutations: ", accepted, " accepted, ", rejected, " rejected in ",
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), " s");
  CHECK(rejected > 0);
  CHECK(accepted > 0);
}
