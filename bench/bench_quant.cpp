// BM_Quant/<kernel>/<elements>: the quantization kernels with the bytes they
// read and write (bytes_per_second), next to BM_Memcpy/<elements>, the
// bandwidth floor (a float copy: reads and writes 4 bytes per element), split
// over the OpenMP threads as the kernels are.
//   quantize            float32 -> INT8 min-max codes, groups of 256, round to nearest
//   dequantize          INT8 codes -> float32
//   stochastic_rounding float32 -> INT8 codes with Philox stochastic rounding
//   adam8bit            a step of bitsandbytes' 8-bit blockwise Adam moments
//                       (state::Blockwise8bit): reads g and two codes, writes
//                       two codes and the update (12 bytes per element)
#include <benchmark/benchmark.h>

#include <cstring>

#include "common.hpp"

namespace {

using namespace galore_bench;

void BM_Memcpy(benchmark::State& state) {
  const Index n = state.range(0);
  const MatrixF a = random_matrix({1, n}, 1);
  MatrixF b(1, n);
  const Index chunk = 1 << 14, chunks = (n + chunk - 1) / chunk;
  for (auto _ : state) {
GALORE_OMP(omp parallel for schedule(static))
    for (Index c = 0; c < chunks; ++c)
      std::memcpy(b.data() + c * chunk, a.data() + c * chunk,
                  sizeof(float) * static_cast<std::size_t>(std::min(chunk, n - c * chunk)));
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * 8);
}

// Group-wise INT8 quantization of n floats with fresh scales and zeros; the
// encoder for each iteration comes from encoder_at(iteration).
template <class EncoderAt>
void quantize_loop(benchmark::State& state, unsigned seed, EncoderAt encoder_at) {
  const Index n = state.range(0);
  const MatrixF w = random_matrix({1, n}, seed);
  quant::GroupQuantized<8> q;
  q.resize({1, n}, 256);
  std::uint32_t iteration = 0;
  for (auto _ : state) {
    quant::quantize_range(w.data(), 0, n, encoder_at(++iteration), q);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * 5);
}

void BM_Quantize(benchmark::State& state) {
  quantize_loop(state, 2, [](std::uint32_t) { return quant::NearestEncoder<8>{}; });
}

void BM_Dequantize(benchmark::State& state) {
  const Index n = state.range(0);
  const auto q = quant::quantize_minmax<8>(random_matrix({1, n}, 3), 256);
  MatrixF out(1, n);
  for (auto _ : state) {
    quant::dequantize_range(q, 0, n, out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * 5);
}

// Each iteration is a new optimizer step, so new random numbers.
void BM_StochasticRounding(benchmark::State& state) {
  const StochasticRounder<8> rounder(9);
  quantize_loop(state, 4, [&](std::uint32_t step) { return rounder.bind(3, step); });
}

void BM_Adam8bit(benchmark::State& state) {
  const Index n = state.range(0);
  const MatrixF g = random_matrix({1, n}, 5);
  const state::Blockwise8bit policy;
  auto mo = policy.init({1, n});
  const AdamConfig c;
  std::vector<float> d(static_cast<std::size_t>(n));
  std::int64_t t = 0;
  policy.update(mo, g.data(), ++t, c, [](Index, const float*, Index) {});  // nonzero state
  for (auto _ : state) {
    policy.update(mo, g.data(), ++t, c, [&](Index off, const float* x, Index len) {
      std::memcpy(d.data() + off, x, sizeof(float) * static_cast<std::size_t>(len));
    });
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * 12);
}

// 256 Ki elements (cache-resident) and 16 Mi (memory-bound).
const int registered = [] {
  for (Index n : {Index{1} << 18, Index{1} << 24}) {
    benchmark::RegisterBenchmark("BM_Memcpy", BM_Memcpy)->Arg(n);
    benchmark::RegisterBenchmark("BM_Quant/quantize", BM_Quantize)->Arg(n);
    benchmark::RegisterBenchmark("BM_Quant/dequantize", BM_Dequantize)->Arg(n);
    benchmark::RegisterBenchmark("BM_Quant/stochastic_rounding", BM_StochasticRounding)->Arg(n);
    benchmark::RegisterBenchmark("BM_Quant/adam8bit", BM_Adam8bit)->Arg(n);
  }
  return 0;
}();

}  // namespace
