// Checkpoints: exact resume for every facade, atomic saves, and every class of
// bad input rejected with a message and without changing anything.
#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <galore/galore.hpp>

#include "support/checkpoint_fixtures.hpp"

using namespace galore;
using galore_test::FacadeKind;
using galore_test::Fixture;

namespace {

const FacadeKind kKinds[] = {FacadeKind::GaLore, FacadeKind::GaLore8bit, FacadeKind::QGaLore, FacadeKind::AdamW};

// A checkpoint after `steps` steps (the fixture's refresh gaps are 2 and 3, so
// several refreshes and lazy-schedule decisions happen on the way).
std::string checkpoint_after(FacadeKind k, int steps) {
  Fixture f(k);
  for (int t = 0; t < steps; ++t) f.step(t);
  return f.save();
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
  } catch (const galore::invalid_argument& e) {
    message = e.what();
  }
  CAPTURE(what);
  CAPTURE(message);
  CHECK(message != "(accepted)");
  CHECK(message.find("galore") != std::string::npos);
  CHECK(f.save() == before);  // nothing changed
}

void expect_rejected(FacadeKind k, const std::string& bytes, const char* what) {
  Target t(k);
  expect_rejected(t, bytes, what);
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
