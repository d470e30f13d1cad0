// BM_Step/<optimizer>/<model>/r<rank>: one optimizer step over all linear layers
// of a LLaMA configuration (no refresh inside the timed region), float32 weights
// and gradients (INT8 weights for qgalore). BM_Gemm/<model>/r<rank>: only the two
// projection products of the same layers, the floor of a GaLore step.
#include <benchmark/benchmark.h>

#include "common.hpp"

namespace {

using namespace galore_bench;

constexpr std::int64_t kNoRefresh = std::int64_t{1} << 40;

template <class Opt, class Weight>
void run_steps(benchmark::State& state, Opt& opt, bool dense, const std::vector<Shape>& shapes) {
  std::vector<LayerId> ids;
  std::vector<Weight> W;
  std::vector<MatrixF> G;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    ids.push_back(dense ? opt.add_dense(shapes[i]) : opt.add_layer(shapes[i]));
    const MatrixF w = random_matrix(shapes[i], 2 * i, 0.02f);
    if constexpr (std::is_same_v<Weight, MatrixF>) W.push_back(w);
    else W.emplace_back(w, 256);
    G.push_back(random_matrix(shapes[i], 2 * i + 1, 1e-3f));
    opt.step(ids.back(), W.back(), G.back());  // the first step refreshes: kept out of the timing
  }
  for (auto _ : state)
    for (std::size_t i = 0; i < ids.size(); ++i) opt.step(ids[i], W[i], G[i]);
  state.counters["state_MiB"] = static_cast<double>(opt.state_bytes()) / 1048576.0;
  state.counters["layers"] = static_cast<double>(shapes.size());
}

void BM_Step(benchmark::State& state, std::string optimizer, std::string model, Index rank) {
  const auto shapes = linear_shapes(model);
  const ProjectorOptions proj{rank, ProjectionType::Std, 0.25f};
  if (optimizer == "adamw") {
    GaLoreAdamW opt(proj);
    run_steps<GaLoreAdamW, MatrixF>(state, opt, true, shapes);
  } else if (optimizer == "galore") {
    GaLoreAdamW opt(proj, LowRankAdam<>(), schedule::FixedGap{kNoRefresh});
    run_steps<GaLoreAdamW, MatrixF>(state, opt, false, shapes);
  } else if (optimizer == "galore8bit") {
    GaLoreAdamW8bit opt(proj, LowRankAdam<state::Blockwise8bit>(), schedule::FixedGap{kNoRefresh});
    run_steps<GaLoreAdamW8bit, MatrixF>(state, opt, false, shapes);
  } else {
    QGaLoreAdamW8bit opt(proj, LowRankAdam<state::Blockwise8bit>(), schedule::Lazy{kNoRefresh, 0.4, 2, 5},
                         svd::Exact{}, quant::Int4{256}, StochasticRounder<8>(1));
    run_steps<QGaLoreAdamW8bit, QuantizedWeight<8>>(state, opt, false, shapes);
  }
}

void BM_Gemm(benchmark::State& state, std::string model, Index rank) {
  const auto shapes = linear_shapes(model);
  std::vector<MatrixF> W, G, P;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const bool right = shapes[i].rows >= shapes[i].cols;
    W.push_back(random_matrix(shapes[i], 2 * i));
    G.push_back(random_matrix(shapes[i], 2 * i + 1));
    P.push_back(right ? random_matrix({rank, shapes[i].cols}, 3 * i) : random_matrix({shapes[i].rows, rank}, 3 * i));
  }
  MatrixF R;
  for (auto _ : state) {
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      if (shapes[i].rows >= shapes[i].cols) {
        R.noalias() = G[i] * P[i].transpose();
        W[i].noalias() -= 1e-3f * (R * P[i]);
      } else {
        R.noalias() = P[i].transpose() * G[i];
        W[i].noalias() -= 1e-3f * (P[i] * R);
      }
    }
    benchmark::ClobberMemory();
  }
  double flops = 0;
  for (Shape s : shapes) flops += 4.0 * static_cast<double>(rank) * static_cast<double>(s.size());
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

const int registered = [] {
  for (const BenchModel& m : bench_models()) {
    const std::string suffix = std::string(m.name) + "/r" + std::to_string(m.rank);
    for (const char* opt : {"adamw", "galore", "galore8bit", "qgalore"})
      benchmark::RegisterBenchmark(("BM_Step/" + std::string(opt) + "/" + suffix).c_str(), BM_Step, opt, m.name,
                                   m.rank)
          ->Unit(benchmark::kMillisecond)
          ;
    benchmark::RegisterBenchmark(("BM_Gemm/" + suffix).c_str(), BM_Gemm, m.name, m.rank)
        ->Unit(benchmark::kMillisecond)
        ;
  }
  return 0;
}();

}  // namespace
