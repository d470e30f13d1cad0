// Helpers of the CUDA tests: device copies of host vectors, gradient sequences
// with a well separated spectrum, comparisons.
#pragma once

#include <galore/cuda.hpp>

#include <cmath>
#include <random>
#include <type_traits>
#include <vector>

namespace galore_test {

// The GPU facade whose moments the device keeps in M (float or cuda::bf16),
// spelled with the policy names both backends take (galore/policies.hpp).
template <class M>
using StateOf = galore::state::Dense<std::conditional_t<std::is_same_v<M, float>, float, galore::bfloat16>>;
template <class SVD = galore::svd::Exact, class M = float, class Schedule = galore::schedule::FixedGap>
using GpuOptimizer = galore::cuda::GaLoreOptimizer<galore::Projector<SVD, galore::quant::None, Schedule>,
                                                   galore::LowRankAdam<StateOf<M>>>;

template <class T>
struct Device {
  galore::cuda::DeviceBuffer<T> buf;
  Device() = default;
  explicit Device(const std::vector<float>& host) : buf(host.size()) { upload(host); }
  void upload(const std::vector<float>& host) {
    std::vector<T> tmp(host.size());
    for (std::size_t i = 0; i < host.size(); ++i) tmp[i] = static_cast<T>(host[i]);
    galore::cuda::check(cudaMemcpy(buf.data(), tmp.data(), sizeof(T) * tmp.size(), cudaMemcpyHostToDevice), "upload");
  }
  std::vector<float> download() const { return download(buf.data(), buf.size()); }
  static std::vector<float> download(const T* p, std::size_t n) {
    std::vector<T> tmp(n);
    galore::cuda::check(cudaMemcpy(tmp.data(), p, sizeof(T) * n, cudaMemcpyDeviceToHost), "download");
    std::vector<float> out(n);
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<float>(tmp[i]);
    return out;
  }
  T* data() { return buf.data(); }
};

inline std::vector<float> gaussian(std::size_t n, unsigned seed, float sigma = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> x(n);
  for (float& v : x) v = d(gen);
  return x;
}

// Gradients sum_i s_i a_i b_i^T + noise with s_i = 10 * 0.7^i over k terms: the
// top singular vectors are well separated, so two correct SVDs agree on each of
// them (not only on the subspace), as CPU-vs-GPU comparisons need.
inline std::vector<std::vector<float>> separated_gradients(long m, long n, long k, int steps, unsigned seed,
                                                           float noise = 0.01f) {
  const std::vector<float> a = gaussian(static_cast<std::size_t>(m * k), seed);
  const std::vector<float> b = gaussian(static_cast<std::size_t>(k * n), seed + 1);
  std::vector<std::vector<float>> out;
  for (int t = 0; t < steps; ++t) {
    std::vector<float> g = gaussian(static_cast<std::size_t>(m * n), seed + 2 + t, noise);
    for (long i = 0; i < m; ++i)
      for (long j = 0; j < n; ++j) {
        double s = 0.0;
        for (long q = 0; q < k; ++q)
          s += 10.0 * std::pow(0.7, q) * a[i * k + q] * b[q * n + j] / std::sqrt(double(m) * n);
        g[i * n + j] += static_cast<float>(s);
      }
    out.push_back(std::move(g));
  }
  return out;
}

inline double norm(const std::vector<float>& x) {
  double s = 0.0;
  for (float v : x) s += double(v) * v;
  return std::sqrt(s);
}

// |a - b| / |b - base|: the error relative to the change from base.
inline double relative_change_error(const std::vector<float>& a, const std::vector<float>& b,
                                    const std::vector<float>& base) {
  double e = 0.0, d = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    e += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    d += (double(b[i]) - base[i]) * (double(b[i]) - base[i]);
  }
  return std::sqrt(e) / std::sqrt(d);
}

inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double e = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) e = std::max(e, std::abs(double(a[i]) - b[i]));
  return e;
}

}  // namespace galore_test
