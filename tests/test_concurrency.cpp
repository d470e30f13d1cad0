// Per-layer steps of different layers from several threads at once (as trainers
// do from their backward threads) give exactly the serial result. Run under
// ThreadSanitizer by .ci/run.
#include <doctest/doctest.h>

#include <galore/galore.hpp>
#include <thread>
#include <vector>

#include "support/random.hpp"

using namespace galore;
using galore_test::gaussian;

namespace {

template <class Opt, class Weight>
struct Model {
  Opt opt;
  std::vector<LayerId> ids;
  std::vector<Weight> W;
  std::vector<Shape> shapes;

  explicit Model(Opt o) : opt(std::move(o)) {
    for (int i = 0; i < 8; ++i) {
      const Shape s{40 + 8 * (i % 3), 24 + 8 * (i % 2)};
      shapes.push_back(s);
      ids.push_back(i == 7 ? opt.add_dense(s) : opt.add_layer(s, "layer" + std::to_string(i)));
      if constexpr (std::is_same_v<Weight, MatrixF>) W.push_back(gaussian(s.rows, s.cols, i));
      else W.emplace_back(gaussian(s.rows, s.cols, i), 64);
    }
  }

  void step_layer(int i, int t) {
    const MatrixF G = gaussian(shapes[i].rows, shapes[i].cols, 100 * t + i, 0.1f);
    if constexpr (std::is_same_v<Weight, MatrixF>) {
      opt.step(ids[i], W[i], G);
    } else {
      MatrixF dense = W[i].dequantize();
      if (i == 7) opt.step(ids[i], dense, G), W[i] = Weight(dense, 64);
      else opt.step(ids[i], W[i], G);
    }
  }

  void serial(int steps) {
    for (int t = 0; t < steps; ++t)
      for (int i = 0; i < 8; ++i) step_layer(i, t);
  }

  // Four threads per step, each stepping two layers.
  void threaded(int steps) {
    for (int t = 0; t < steps; ++t) {
      std::vector<std::thread> threads;
      for (int k = 0; k < 4; ++k)
        threads.emplace_back([this, k, t] {
          step_layer(k, t);
          step_layer(k + 4, t);
        });
      for (auto& th : threads) th.join();
    }
  }
};

template <class Opt, class Weight>
void check_same(Opt a, Opt b) {
  Model<Opt, Weight> serial(std::move(a)), threaded(std::move(b));
  serial.serial(5);
  threaded.threaded(5);
  for (int i = 0; i < 8; ++i) {
    if constexpr (std::is_same_v<Weight, MatrixF>) CHECK(serial.W[i] == threaded.W[i]);
    else CHECK(serial.W[i].codes().codes == threaded.W[i].codes().codes);
    CHECK(serial.opt.stats(serial.ids[i]).steps == threaded.opt.stats(threaded.ids[i]).steps);
  }
  CHECK(serial.opt.state_bytes() == threaded.opt.state_bytes());
}

}  // namespace

TEST_CASE("concurrent per-layer steps on different layers equal serial steps") {
  const ProjectorOptions proj{8, ProjectionType::Std, 0.25f};
  SUBCASE("GaLore-AdamW") {
    check_same<GaLoreAdamW, MatrixF>(GaLoreAdamW(proj, LowRankAdam<>(), schedule::FixedGap{2}),
                                     GaLoreAdamW(proj, LowRankAdam<>(), schedule::FixedGap{2}));
  }
  SUBCASE("GaLore-AdamW8bit") {
    check_same<GaLoreAdamW8bit, MatrixF>(
        GaLoreAdamW8bit(proj, LowRankAdam<state::Blockwise8bit>(), schedule::FixedGap{2}),
        GaLoreAdamW8bit(proj, LowRankAdam<state::Blockwise8bit>(), schedule::FixedGap{2}));
  }
  SUBCASE("Q-GaLore-AdamW8bit with INT8 weights") {
    auto make = [&] {
      return QGaLoreAdamW8bit(proj, LowRankAdam<state::Blockwise8bit>(), schedule::Lazy{2, 0.2, 2, 2},
                              svd::Exact{}, quant::Int4{64}, StochasticRounder<8>(3));
    };
    check_same<QGaLoreAdamW8bit, QuantizedWeight<8>>(make(), make());
  }
}
