// BM_Refresh/<policy>/<m>x<n>/r<rank>: one basis refresh on a realistic gradient
// (a decaying spectrum plus noise). For `warm` the previous basis comes from the
// gradient a few optimizer steps earlier (the same spectrum, vectors moved a
// little). The counter `energy` is the captured energy against the exact top-r.
#include <benchmark/benchmark.h>

#include "common.hpp"

namespace {

using namespace galore_bench;

// The gradient "a few steps later": the same spectrum with its singular vectors
// moved (a 20% admixture of another gradient-like matrix) and fresh noise.
MatrixF later(const MatrixF& G, Shape s, unsigned seed) { return G + 0.2f * gradient_like(s, seed); }

template <class Policy>
void BM_Refresh(benchmark::State& state, Policy policy, Shape s, Index rank, bool warm) {
  const MatrixF G0 = gradient_like(s, 11);
  const MatrixF G = warm ? later(G0, s, 23) : G0;
  const Side side = s.rows >= s.cols ? Side::Right : Side::Left;
  Basis previous, fresh;
  eigen::compute_basis(svd::Exact{}, G0, rank, side, nullptr, previous);
  const BasisView prev(previous);
  for (auto _ : state) {
    eigen::compute_basis(policy, G, rank, side, warm ? &prev : nullptr, fresh);
    benchmark::DoNotOptimize(fresh.right.data());
    benchmark::DoNotOptimize(fresh.left.data());
  }
  state.counters["energy"] = svd::captured_energy(G, fresh);
  if (warm) state.counters["stale_energy"] = svd::captured_energy(G, prev);
}

const int registered = [] {
  const Shape shapes[] = {{768, 768}, {2048, 768}, {768, 2048}, {512, 512}, {1376, 512}, {512, 1376}};
  for (Shape s : shapes) {
    const Index rank = s.rows == 512 || s.cols == 512 ? 128 : 256;  // LLaMA-60M at 128, 130M at 256
    const std::string suffix = std::to_string(s.rows) + "x" + std::to_string(s.cols) + "/r" + std::to_string(rank);
    benchmark::RegisterBenchmark(("BM_Refresh/exact/" + suffix).c_str(), BM_Refresh<svd::Exact>, svd::Exact{}, s,
                                 rank, false)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("BM_Refresh/randomized/" + suffix).c_str(), BM_Refresh<svd::Randomized>,
                                 svd::Randomized{}, s, rank, false)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("BM_Refresh/warm/" + suffix).c_str(), BM_Refresh<svd::WarmStart>, svd::WarmStart{},
                                 s, rank, true)
        ->Unit(benchmark::kMillisecond);
  }
  return 0;
}();

}  // namespace
