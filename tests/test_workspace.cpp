// Step scratch: a steady step (no refresh due) allocates nothing, for every
// projection type, float and bf16 weights, dense layers, the 8-bit state and
// quantized weights; the facade's workspace_bytes() equals the formula; a
// caller's workspace gives the same results as the facade's.
//
// This executable counts allocations two ways: it replaces the global operator
// new (std::vector, std::string, ...), and it builds Eigen with
// EIGEN_RUNTIME_NO_MALLOC and an eigen_assert that counts the heap allocations
// Eigen makes while they are forbidden (Eigen allocates with malloc, not new).
// Eigen's products allocate their packing buffers on the heap above
// EIGEN_STACK_ALLOCATION_LIMIT (128 KiB), inside Eigen, on every product; the
// shapes here stay below it, so that what is counted is the library's own.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>

namespace {
std::atomic<long> g_allocations{0};
}  // namespace

[[noreturn]] void eigen_assert_failed(const char* what, const char* file, int line);
inline void eigen_check(bool ok, const char* what, const char* file, int line) {
  if (ok) return;
  if (std::strstr(what, "heap allocation is forbidden")) {
    g_allocations.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  eigen_assert_failed(what, file, line);
}
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) eigen_check(static_cast<bool>(x), #x, __FILE__, __LINE__)

#include <doctest/doctest.h>

#include <cstdio>
#include <galore/galore.hpp>

#include "support/random.hpp"

void eigen_assert_failed(const char* what, const char* file, int line) {
  std::fprintf(stderr, "Eigen assertion failed: %s (%s:%d)\n", what, file, line);
  std::abort();
}

// GCC 12 takes free() in a replacement operator delete for a mismatch with new.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

using namespace galore;
using galore_test::gaussian;

namespace {

long allocations() { return g_allocations.load(std::memory_order_relaxed); }

// Counts the allocations (new and Eigen's) while it lives.
class AllocationCounter {
 public:
  AllocationCounter() : start_(allocations()) { Eigen::internal::set_is_malloc_allowed(false); }
  ~AllocationCounter() { Eigen::internal::set_is_malloc_allowed(true); }
  long count() const { return allocations() - start_; }

 private:
  long start_;
};

struct Case {
  Shape shape;
  ProjectionType type;
};

}  // namespace

TEST_CASE("a steady GaLore step allocates nothing, and workspace_bytes() is the largest step's scratch") {
  AdamConfig adam;
  adam.lr = 1e-2;
  const Index rank = 4;
  GaLoreAdamW opt(ProjectorOptions{rank, ProjectionType::Std, 0.25f}, LowRankAdam<>(adam), schedule::FixedGap{50});
  const std::vector<Case> cases = {{{40, 24}, ProjectionType::Std},   // right: R 40x4
                                   {{24, 40}, ProjectionType::Std},   // left: R 4x40
                                   {{32, 32}, ProjectionType::Full},  // both: R 4x4, m x r scratch
                                   {{16, 48}, ProjectionType::Right}};
  std::vector<LayerId> ids;
  std::vector<MatrixF> W, G;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    ids.push_back(opt.add_layer(cases[i].shape, ProjectorOptions{rank, cases[i].type, 0.25f}));
    W.push_back(gaussian(cases[i].shape.rows, cases[i].shape.cols, 10 + i));
    G.push_back(gaussian(cases[i].shape.rows, cases[i].shape.cols, 20 + i));
  }
  const LayerId dense = opt.add_dense({8, 16});
  MatrixF Wd = gaussian(8, 16, 30), Gd = gaussian(8, 16, 31);
  // bf16 weights and gradients on a layer of its own shape.
  const LayerId half = opt.add_layer({64, 20});
  Matrix<bfloat16> Wh = gaussian(64, 20, 40).cast<bfloat16>(), Gh = gaussian(64, 20, 41).cast<bfloat16>();

  // No doctest assertion inside the counted region (a report may allocate).
  auto step_all = [&] {
    bool applied = true;
    for (std::size_t i = 0; i < ids.size(); ++i) applied &= opt.step(ids[i], W[i], G[i]).applied();
    applied &= opt.step(dense, Wd, Gd).applied();
    applied &= opt.step(half, Wh, Gh).applied();
    return applied;
  };
  CHECK(step_all());  // the first step refreshes every basis (the SVD allocates)
  long steady = 0;
  bool applied = true;
  {
    const AllocationCounter counter;
    for (int s = 0; s < 5; ++s) applied &= step_all();
    steady = counter.count();
  }
  CHECK(applied);
  CHECK(steady == 0);

  // One workspace (steps ran serially), as large as the largest request:
  // 2 * |R| + (m x r on both sides) + a float panel for bf16.
  std::size_t largest = 0;
  for (const Case& c : cases) {
    const Side side = resolve_side(c.type, c.shape.rows, c.shape.cols);
    const Shape low = low_rank_shape(side, c.shape, rank);
    const Index both = side == Side::Both ? c.shape.rows * rank : 0;
    largest = std::max(largest, static_cast<std::size_t>(2 * low.size() + both));
  }
  CHECK(detail::panel_rows(20) >= 64);  // one panel holds all 64 rows of the bf16 layer
  const Index bf16_panel = 64 * 20;
  largest = std::max(largest, static_cast<std::size_t>(2 * 64 * rank + bf16_panel));
  CHECK(opt.workspace_bytes() == sizeof(float) * largest);
}

TEST_CASE("a steady step allocates nothing with 8-bit moments, quantized bases and INT8 weights") {
  AdamConfig adam;
  adam.lr = 1e-2;
  state::Blockwise8bit eight_bit;
  eight_bit.min_8bit_size = 256;  // R below is 64 x 4 = 256 elements: the 8-bit path
  QGaLoreAdamW8bit opt(ProjectorOptions{4, ProjectionType::Std, 0.25f},
                       LowRankAdam<state::Blockwise8bit>(adam, eight_bit), schedule::Lazy{50});
  const LayerId id = opt.add_layer({64, 20});
  MatrixF w0 = gaussian(64, 20, 50, 0.05f);
  QuantizedWeight<8> W(w0, 20);
  const MatrixF G = gaussian(64, 20, 51);
  CHECK(opt.step(id, W, G).refreshed);
  CHECK(opt.moments(id).quantized);
  long steady = 0;
  bool applied = true;
  {
    const AllocationCounter counter;
    for (int s = 0; s < 4; ++s) applied &= opt.step(id, W, G).applied();
    steady = counter.count();
  }
  CHECK(applied);
  CHECK(steady == 0);
}

TEST_CASE("galore_step with a caller's workspace equals the facade's step") {
  AdamConfig adam;
  adam.lr = 1e-2;
  adam.weight_decay = 0.1;
  for (ProjectionType type : {ProjectionType::Std, ProjectionType::Left, ProjectionType::Full}) {
    GaLoreAdamW opt(ProjectorOptions{3, type, 0.5f}, LowRankAdam<>(adam), schedule::FixedGap{2});
    const LayerId id = opt.add_layer({30, 20});
    Projector<> p({30, 20}, ProjectorOptions{3, type, 0.5f}, schedule::FixedGap{2});
    const LowRankAdam<> lra(adam);
    auto moments = lra.init(p.low_rank_shape());
    std::int64_t step = 0;
    StepWorkspace ws;
    MatrixF W1 = gaussian(30, 20, 60), W2 = W1;
    for (int s = 0; s < 5; ++s) {
      const MatrixF G = gaussian(30, 20, 70 + s);
      opt.step(id, W1, G);
      galore_step(p, lra, moments, step, MatrixRef<float>(W2), ConstMatrixRef<float>(G), ws);
      CHECK(W1 == W2);  // the same operations in the same order: bit for bit
    }
    CHECK(ws.bytes() == opt.workspace_bytes());
  }
}
