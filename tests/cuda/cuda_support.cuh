// Helpers of the CUDA tests: device copies of host vectors, gradient sequences
// with a well separated spectrum, comparisons.
#pragma once

#include <galore/cuda.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_reference.hpp"

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

// Steps the registered layer `id` of opt from W0 through grads (T: its element
// type; ctx's workspace reserved); W after every step, in float.
template <class T, class Opt>
std::vector<std::vector<float>> step_through(Opt& opt, galore::LayerId id, galore::cuda::Context& ctx,
                                             const std::vector<float>& W0,
                                             const std::vector<std::vector<float>>& grads) {
  Device<T> W(W0), G(grads.front());
  std::vector<std::vector<float>> out;
  for (const auto& g : grads) {
    G.upload(g);
    opt.step(id, W.data(), static_cast<const T*>(G.data()), ctx);
    ctx.synchronize();
    out.push_back(W.download());
  }
  return out;
}

// Two INT8 weights compared: the GPU's GEMMs sum in another order than
// Eigen's (and a bf16 layer's GPU keeps P and D in bf16, the CPU in float), so
// a value near a code boundary may round the other way, and a group whose
// extreme moved by a code gets a slightly other scale. Differences of the
// dequantized values in units of the CPU group's scale (one code), and the
// fraction of codes that agree. Wrong rounding bits or a wrong update would
// change most codes.
struct CodeAgreement {
  double same = 0.0;               // fraction of equal codes
  double mean = 0.0, worst = 0.0;  // |W_gpu - W_cpu| / scale
};
inline CodeAgreement code_agreement(const std::vector<std::uint8_t>& codes, const std::vector<float>& scales,
                                    const std::vector<std::uint8_t>& zeros, const CpuCodes& cpu, long group) {
  CodeAgreement a;
  const std::size_t n = codes.size();
  std::size_t same = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t g = i / static_cast<std::size_t>(group);
    same += codes[i] == cpu.codes[i];
    const double wg = scales[g] * (double(codes[i]) - zeros[g]);
    const double wc = cpu.scales[g] * (double(cpu.codes[i]) - cpu.zeros[g]);
    const double d = std::fabs(wg - wc) / cpu.scales[g];
    a.mean += d / static_cast<double>(n);
    a.worst = std::max(a.worst, d);
  }
  a.same = static_cast<double>(same) / static_cast<double>(n);
  return a;
}

// A GPU optimizer over a checkpoint spec's layers (float weights; dense ones
// where the spec says), Opt built by make(spec): steps them, saves, loads.
template <class Opt>
struct GpuRun {
  galore::cuda::Context ctx;
  Opt opt;
  std::vector<galore::LayerId> ids;
  std::vector<Device<float>> W, G;
  template <class Make>
  GpuRun(const CkptSpec& s, const std::vector<std::vector<float>>& W0, Make make) : opt(make(s)) {
    for (std::size_t i = 0; i < s.layers.size(); ++i) {
      const auto& l = s.layers[i];
      const galore::Shape shape{l.rows, l.cols};
      const auto dtype = galore::cuda::DType::Float32;
      if (l.dense) ids.push_back(opt.add_dense(shape, dtype, l.name));
      else if (l.rank > 0)  // projection options of its own, as the CPU's checkpoint run gives it
        ids.push_back(opt.add_layer(
            shape, dtype, galore::ProjectorOptions{l.rank, static_cast<galore::ProjectionType>(l.type), s.scale},
            l.name));
      else ids.push_back(opt.add_layer(shape, dtype, l.name));
      W.emplace_back(W0[i]);
      G.emplace_back(W0[i]);
    }
    ctx.reserve_workspace(opt.workspace_bytes(ctx));
  }
  // W of every layer after each step (steps[t][layer]: the gradients).
  std::vector<std::vector<std::vector<float>>> run(const std::vector<std::vector<std::vector<float>>>& steps) {
    std::vector<std::vector<std::vector<float>>> out;
    for (const auto& step : steps) {
      std::vector<std::vector<float>> w;
      for (std::size_t i = 0; i < ids.size(); ++i) {
        G[i].upload(step[i]);
        opt.step(ids[i], W[i].data(), static_cast<const float*>(G[i].data()), ctx);
        w.push_back(W[i].download());
      }
      out.push_back(std::move(w));
    }
    return out;
  }
  std::string save() {
    std::ostringstream os(std::ios::binary);
    galore::cuda::save_checkpoint(opt, os, ctx);
    return os.str();
  }
  void load(const std::string& file) {
    std::istringstream is(file, std::ios::binary);
    galore::cuda::load_checkpoint(opt, is, ctx);
  }
};

}  // namespace galore_test
