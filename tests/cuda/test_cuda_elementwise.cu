// The element-wise math the backends share (include/galore/math, Philox,
// bitsandbytes' code search), run in device code and compared with the CPU's
// production paths bit for bit: the Adam element against state::Float32 (Eigen,
// vectorized), the 8-bit optimizer's formula against state::Blockwise8bit, min-max
// codes against quant::quantize_minmax, stochastic-rounding codes against
// StochasticRounder (its AVX2 lanes where the CPU has them), Philox draws, and
// the nearest 8-bit code. nvcc compiles this file with its default FMA
// contraction on: the shared functions must not depend on it (math/fp.hpp).
#include <doctest/doctest.h>

#include <galore/cuda.hpp>
#include <galore/math/adam8bit.hpp>
#include <galore/math/quant_codes.hpp>
#include <galore/quant/dynamic_map.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cpu_reference.hpp"
#include "cuda_support.cuh"

using namespace galore;
using galore_test::Device;

namespace {

constexpr int kThreads = 256;
int blocks_for(std::size_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

__global__ void adam_kernel(const float* g, float* m, float* v, float* d, std::size_t n, float step,
                            math::AdamCoefficients c) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const math::AdamElement e = math::adam_element(g[i], m[i], v[i], step, c);
  m[i] = e.m;
  v[i] = e.v;
  d[i] = e.d;
}

__global__ void adam8bit_kernel(const float* g, float* m, float* v, float* d, std::size_t n,
                                math::Adam8bitCoefficients c) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const math::AdamElement e = math::adam8bit_element(g[i], m[i], v[i], c);
  m[i] = e.m;
  v[i] = e.v;
  d[i] = math::clamp_update(e.d);
}

// One thread per element; each finds its group's extremes itself (groups are small).
__global__ void codes_kernel(const float* x, std::size_t n, int group, std::uint64_t seed, std::uint32_t layer,
                             std::uint32_t step, std::uint8_t* nearest, std::uint8_t* stochastic, float* scales,
                             std::uint8_t* zeros) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const std::size_t g0 = i / group * group;
  const std::size_t g1 = g0 + group < n ? g0 + group : n;
  float lo = x[g0], hi = x[g0];
  for (std::size_t k = g0 + 1; k < g1; ++k) {
    lo = fminf(lo, x[k]);
    hi = fmaxf(hi, x[k]);
  }
  float scale, zero;
  math::minmax_scale_zero(lo, hi, 255.0f, scale, zero);
  nearest[i] = math::minmax_code(x[i], scale, zero, 255.0f);
  stochastic[i] = math::stochastic_code(x[i], scale, zero, 255.0f, math::stochastic_bits(seed, layer, step, i));
  if (i == g0) {
    scales[i / group] = scale;
    zeros[i / group] = static_cast<std::uint8_t>(zero);
  }
}

__global__ void philox_kernel(std::uint32_t* out, std::size_t n, std::uint32_t k0, std::uint32_t k1) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const Philox4x32 p = philox4x32_10(static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(i * 2654435761u),
                                     7u, 9u, k0, k1);
  for (int j = 0; j < 4; ++j) out[4 * i + j] = p.v[j];
}

__global__ void nearest_code_kernel(const float* map, const float* x, std::uint8_t* out, std::size_t n,
                                    bool is_signed) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  out[i] = quant::nearest_code(map, x[i], is_signed);
}

// Adam's inputs over many magnitudes: gradients from 1e-8 to 1e4 with moments
// that fit them, and some exact zeros.
struct AdamInputs {
  std::vector<float> g, m, v;
};
AdamInputs adam_inputs(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> expo(-8.0f, 4.0f), unit(-1.0f, 1.0f);
  AdamInputs in;
  for (std::size_t i = 0; i < n; ++i) {
    const float scale = std::pow(10.0f, expo(gen));
    in.g.push_back(i % 97 == 0 ? 0.0f : unit(gen) * scale);
    in.m.push_back(unit(gen) * scale);
    in.v.push_back(std::abs(unit(gen)) * scale * scale);
  }
  return in;
}

template <class T>
std::vector<T> download_raw(const T* p, std::size_t n) {
  std::vector<T> out(n);
  cuda::check(cudaMemcpy(out.data(), p, sizeof(T) * n, cudaMemcpyDeviceToHost), "download");
  return out;
}

template <class T>
std::size_t mismatches(const std::vector<T>& a, const std::vector<T>& b) {
  REQUIRE(a.size() == b.size());
  std::size_t bad = 0;
  for (std::size_t i = 0; i < a.size(); ++i) bad += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
  return bad;
}

}  // namespace

// Runs `kernel(g, m, v, d, n, coefficients...)` on the inputs and compares m, v
// and d with the CPU's `reference(m, v, g, d)` bit for bit.
template <class Launch, class Reference>
void compare_adam(unsigned seed, Launch launch, Reference reference) {
  const std::size_t n = std::size_t{1} << 20;
  AdamInputs in = adam_inputs(n, seed);
  Device<float> g(in.g), m(in.m), v(in.v), d{std::vector<float>(n)};
  launch(g.data(), m.data(), v.data(), d.data(), n);
  cuda::check(cudaDeviceSynchronize(), "Adam kernel");
  std::vector<float> cd;
  reference(in.m, in.v, in.g, cd);
  CHECK(mismatches(m.download(), in.m) == 0);
  CHECK(mismatches(v.download(), in.v) == 0);
  CHECK(mismatches(d.download(), cd) == 0);
}

TEST_CASE("the GPU's Adam element is the CPU's state::Float32 step, bit for bit") {
  const double lr = 3e-3, b1 = 0.9, b2 = 0.999, eps = 1e-6;
  const std::int64_t t = 5;
  const math::AdamCoefficients c{static_cast<float>(b1), static_cast<float>(1.0 - b1), static_cast<float>(b2),
                                 static_cast<float>(1.0 - b2), static_cast<float>(eps)};
  const float step = math::adam_step_size_float(lr, b1, b2, t, true);
  compare_adam(
      11, [&](const float* g, float* m, float* v, float* d, std::size_t n) {
        adam_kernel<<<blocks_for(n), kThreads>>>(g, m, v, d, n, step, c);
      },
      [&](std::vector<float>& m, std::vector<float>& v, const std::vector<float>& g, std::vector<float>& d) {
        galore_test::cpu_adam_dense(m, v, g, d, t, lr, b1, b2, eps);
      });
}

TEST_CASE("the GPU's 8-bit optimizer formula is the CPU's, bit for bit, with coefficients from the host") {
  const double lr = 1e-3, b1 = 0.9, b2 = 0.995, eps = 1e-8;
  const std::int64_t t = 3;
  const math::Adam8bitCoefficients c = math::adam8bit_coefficients(lr, b1, b2, eps, t, true);
  compare_adam(
      12, [&](const float* g, float* m, float* v, float* d, std::size_t n) {
        adam8bit_kernel<<<blocks_for(n), kThreads>>>(g, m, v, d, n, c);
      },
      [&](std::vector<float>& m, std::vector<float>& v, const std::vector<float>& g, std::vector<float>& d) {
        galore_test::cpu_adam_8bit_formula(m, v, g, d, t, lr, b1, b2, eps);
      });
}

TEST_CASE("min-max and stochastic-rounding codes on the GPU are the CPU's, bit for bit") {
  const int group = 64;
  std::vector<float> x = galore_test::gaussian(std::size_t{1} << 18, 13);
  // Groups of constants (range below 1e-5), of huge values, and with exact
  // half-way quotients.
  for (int k = 0; k < group; ++k) {
    x[static_cast<std::size_t>(k)] = 0.25f;
    x[static_cast<std::size_t>(group + k)] = 1e30f * (k % 2 == 0 ? 1.0f : -0.5f);
    x[static_cast<std::size_t>(2 * group + k)] = static_cast<float>(k) * 0.5f;
  }
  const std::size_t n = x.size(), groups = n / group;
  const std::uint64_t seed = 0x123456789abcdefULL;
  const std::uint32_t layer = 3, step = 41;
  Device<float> dx(x);
  cuda::DeviceBuffer<std::uint8_t> nearest(n), stochastic(n), zeros(groups);
  cuda::DeviceBuffer<float> scales(groups);
  codes_kernel<<<blocks_for(n), kThreads>>>(dx.data(), n, group, seed, layer, step, nearest.data(),
                                            stochastic.data(), scales.data(), zeros.data());
  cuda::check(cudaDeviceSynchronize(), "codes_kernel");
  const galore_test::CpuCodes cn = galore_test::cpu_minmax_codes(x, group);
  const galore_test::CpuCodes cs = galore_test::cpu_stochastic_codes(x, group, seed, layer, step);
  CHECK(mismatches(download_raw(scales.data(), groups), cn.scales) == 0);
  CHECK(mismatches(download_raw(zeros.data(), groups), cn.zeros) == 0);
  CHECK(mismatches(download_raw(nearest.data(), n), cn.codes) == 0);
  CHECK(mismatches(download_raw(stochastic.data(), n), cs.codes) == 0);
  CHECK(cs.scales == cn.scales);  // rounding changes codes only
}

TEST_CASE("Philox4x32-10 draws on the GPU are the CPU's") {
  const std::size_t n = std::size_t{1} << 16;
  cuda::DeviceBuffer<std::uint32_t> out(4 * n);
  philox_kernel<<<blocks_for(n), kThreads>>>(out.data(), n, 0xdeadbeefu, 0x01234567u);
  cuda::check(cudaDeviceSynchronize(), "philox_kernel");
  std::vector<std::uint32_t> host(4 * n);
  for (std::size_t i = 0; i < n; ++i) {
    const Philox4x32 p = philox4x32_10(static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(i * 2654435761u),
                                       7u, 9u, 0xdeadbeefu, 0x01234567u);
    for (int j = 0; j < 4; ++j) host[4 * i + static_cast<std::size_t>(j)] = p.v[j];
  }
  CHECK(mismatches(download_raw(out.data(), 4 * n), host) == 0);
  // The published known-answer vector of Philox4x32-10 (Random123, kat_vectors):
  // counter and key all zero.
  const Philox4x32 zero = philox4x32_10(0, 0, 0, 0, 0, 0);
  CHECK(zero.v[0] == 0x6627e8d5u);
  CHECK(zero.v[1] == 0xe169c58du);
  CHECK(zero.v[2] == 0xbc57ac4cu);
  CHECK(zero.v[3] == 0x9b00dbd8u);
}

TEST_CASE("bitsandbytes' nearest-code search gives the same 8-bit codes on the GPU") {
  for (bool is_signed : {true, false}) {
    const std::vector<float> map = galore_test::cpu_dynamic_map(is_signed);
    std::vector<float> x = galore_test::gaussian(std::size_t{1} << 18, is_signed ? 14 : 15, 0.3f);
    for (float& e : x) e = is_signed ? std::fmax(-1.0f, std::fmin(1.0f, e)) : std::fmin(1.0f, std::fabs(e));
    for (std::size_t k = 0; k + 1 < map.size(); ++k) x[k] = (map[k] + map[k + 1]) * 0.5f;  // exact midpoints
    Device<float> dmap(map), dx(x);
    cuda::DeviceBuffer<std::uint8_t> out(x.size());
    nearest_code_kernel<<<blocks_for(x.size()), kThreads>>>(dmap.data(), dx.data(), out.data(), x.size(), is_signed);
    cuda::check(cudaDeviceSynchronize(), "nearest_code_kernel");
    std::vector<std::uint8_t> host(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) host[i] = quant::nearest_code(map.data(), x[i], is_signed);
    CHECK(mismatches(download_raw(out.data(), x.size()), host) == 0);
  }
}
