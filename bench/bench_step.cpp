// BM_Step/<optimizer>/<model>/r<rank>: one optimizer step over all linear layers
// of a LLaMA configuration; BM_Gemm/<model>/r<rank>: the two projection products
// alone, the floor of the step.
#include <benchmark/benchmark.h>

#include <galore/galore.hpp>
#include <random>
#include <string>
#include <vector>

using namespace galore;

namespace {

struct Model {
  const char* name;
  Index hidden, inter, layers;
};
const Model kModels[] = {{"llama60m", 512, 1376, 8}, {"llama130m", 768, 2048, 12}};

std::vector<Shape> linear_shapes(const Model& m) {
  std::vector<Shape> s;
  for (Index l = 0; l < m.layers; ++l) {
    for (int i = 0; i < 4; ++i) s.push_back({m.hidden, m.hidden});
    s.push_back({m.inter, m.hidden});
    s.push_back({m.inter, m.hidden});
    s.push_back({m.hidden, m.inter});
  }
  return s;
}

MatrixF random_matrix(Shape s, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d;
  MatrixF A(s.rows, s.cols);
  for (Index i = 0; i < A.size(); ++i) A.data()[i] = d(gen);
  return A;
}

void BM_StepGaLore(benchmark::State& state, Model model, Index rank) {
  const auto shapes = linear_shapes(model);
  GaLoreAdamW opt({rank, ProjectionType::Std, 0.25f}, LowRankAdam<>(), schedule::FixedGap{1 << 30});
  std::vector<LayerId> ids;
  std::vector<MatrixF> W, G;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    ids.push_back(opt.add_layer(shapes[i]));
    W.push_back(random_matrix(shapes[i], 2 * i));
    G.push_back(random_matrix(shapes[i], 2 * i + 1) * 1e-3f);
    opt.step(ids.back(), W.back(), G.back());  // the first step refreshes: keep it out of the timing
  }
  for (auto _ : state)
    for (std::size_t i = 0; i < ids.size(); ++i) opt.step(ids[i], W[i], G[i]);
  state.counters["state_MiB"] = opt.state_bytes() / 1048576.0;
}

void BM_Gemm(benchmark::State& state, Model model, Index rank) {
  const auto shapes = linear_shapes(model);
  std::vector<MatrixF> W, G, P;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const bool right = shapes[i].rows >= shapes[i].cols;
    W.push_back(random_matrix(shapes[i], 2 * i));
    G.push_back(random_matrix(shapes[i], 2 * i + 1));
    P.push_back(right ? random_matrix({rank, shapes[i].cols}, 3 * i) : random_matrix({shapes[i].rows, rank}, 3 * i));
  }
  MatrixF R;
  for (auto _ : state)
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      if (shapes[i].rows >= shapes[i].cols) {
        R.noalias() = G[i] * P[i].transpose();
        W[i].noalias() -= 1e-3f * (R * P[i]);
      } else {
        R.noalias() = P[i].transpose() * G[i];
        W[i].noalias() -= 1e-3f * (P[i] * R);
      }
    }
}

const int registered = [] {
  for (const Model& m : kModels) {
    const Index rank = m.hidden / 4;
    const std::string suffix = std::string(m.name) + "/r" + std::to_string(rank);
    benchmark::RegisterBenchmark(("BM_Step/galore/" + suffix).c_str(), BM_StepGaLore, m, rank)
        ->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::RegisterBenchmark(("BM_Gemm/" + suffix).c_str(), BM_Gemm, m, rank)
        ->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  return 0;
}();

}  // namespace
