// bitsandbytes' 8-bit blockwise Adam moments on the GPU (cuda::Blockwise8bitMoments,
// cuda::adam8bit_step) against the CPU's state::Blockwise8bit on identical
// inputs, bit for bit: codes, absmax and the update, step after step, for
// blocks of 256 and 2048 elements and a short last block, with gradients out
// of Adam's range (their elements keep their state); memory against the
// formula; the errors.
#include <doctest/doctest.h>

#include <galore/cuda.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_reference.hpp"
#include "cuda_support.cuh"

using namespace galore;
using galore_test::Device;

namespace {

template <class T>
std::size_t mismatches(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return std::max(a.size(), b.size());
  std::size_t k = 0;
  for (std::size_t i = 0; i < a.size(); ++i) k += !(a[i] == b[i]);
  return k;
}

}  // namespace

TEST_CASE("8-bit blockwise Adam on the GPU is the CPU's state::Blockwise8bit, bit for bit") {
  cuda::Context ctx;
  const cuda::DynamicMaps maps;
  const double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  for (const long block : {256L, 2048L}) {
    // Several blocks and a short last one; gradients of several magnitudes.
    const std::size_t n = static_cast<std::size_t>(5 * block + 77);
    INFO("block ", block);
    const int steps = 5;
    std::vector<std::vector<float>> grads;
    for (int t = 0; t < steps; ++t) {
      auto g = galore_test::gaussian(n, 90u + unsigned(t), t == 2 ? 1e-6f : 1.0f);
      g[3] = std::numeric_limits<float>::quiet_NaN();  // kept state, d = 0
      g[n - 1] = std::numeric_limits<float>::infinity();
      g[static_cast<std::size_t>(block)] = 1e30f;  // beyond Adam's range (2^60)
      for (std::size_t i = static_cast<std::size_t>(2 * block); i < static_cast<std::size_t>(3 * block); ++i)
        g[i] = 0.0f;  // an all-zero block at every step: absmax 0, zero codes
      grads.push_back(std::move(g));
    }
    const auto cpu = galore_test::cpu_adam_8bit_blockwise(grads, block, lr, beta1, beta2, eps);
    cuda::Blockwise8bitMoments mo(static_cast<std::int64_t>(n), static_cast<int>(block));
    CHECK(mo.bytes() == 2 * n + 8 * static_cast<std::size_t>((n + block - 1) / block));
    CHECK(mo.bytes() == cuda::Blockwise8bitMoments::bytes_for(static_cast<std::int64_t>(n), static_cast<int>(block)));
    Device<float> d(std::vector<float>(n, -1.0f));
    for (int t = 0; t < steps; ++t) {
      INFO("step ", t + 1);
      Device<float> g(grads[static_cast<std::size_t>(t)]);
      cuda::adam8bit_step(ctx, mo, maps, g.data(), d.data(),
                          math::adam8bit_coefficients(lr, beta1, beta2, eps, t + 1, true));
      std::vector<std::uint8_t> mc, vc;
      std::vector<float> ma, va;
      mo.download(mc, vc, ma, va, ctx);
      const auto& c = cpu[static_cast<std::size_t>(t)];
      CHECK(mismatches(mc, c.m_code) == 0);
      CHECK(mismatches(vc, c.v_code) == 0);
      CHECK(mismatches(ma, c.m_absmax) == 0);
      CHECK(mismatches(va, c.v_absmax) == 0);
      const auto dg = d.download();
      CHECK(mismatches(dg, c.d) == 0);
      CHECK(dg[3] == 0.0f);
      CHECK(dg[n - 1] == 0.0f);
    }
  }
}

TEST_CASE("Blockwise8bitMoments refuses empty tensors and blocks beyond 4096") {
  CHECK_THROWS_AS(cuda::Blockwise8bitMoments(0), invalid_argument);
  CHECK_THROWS_AS(cuda::Blockwise8bitMoments(100, 0), invalid_argument);
  CHECK_THROWS_AS(cuda::Blockwise8bitMoments(100, 4097), invalid_argument);
  CHECK_NOTHROW(cuda::Blockwise8bitMoments(100, 4096));
}
