// Shared by galore's benchmarks: LLaMA layer shapes and reproducible matrices.
#pragma once

#include <galore/galore.hpp>
#include <Eigen/QR>
#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace galore_bench {

using namespace galore;

// The benchmarked models and their GaLore ranks (the paper's).
struct BenchModel {
  const char* name;
  Index rank;
};
inline const std::vector<BenchModel>& bench_models() {
  static const std::vector<BenchModel> m = {{"llama60m", 128}, {"llama130m", 256}};
  return m;
}

inline std::vector<Shape> linear_shapes(const std::string& model) {
  std::vector<Shape> s;
  for (const auto& p : memory::llama_linear_layers(memory::llama_preset(model))) s.push_back(p.shape);
  return s;
}

inline MatrixF random_matrix(Shape s, unsigned seed, float sigma = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  MatrixF A(s.rows, s.cols);
  for (Index i = 0; i < A.size(); ++i) A.data()[i] = d(gen);
  return A;
}

// A gradient-like matrix: singular values decaying as 0.97^i (the signal, with
// its singular vectors drawn from `seed`) plus Gaussian noise whose Frobenius
// norm is `noise` times the signal's. Gradients of trained layers have such
// low stable rank; noise that swamps the signal would make "the top-r subspace"
// meaningless.
inline MatrixF gradient_like(Shape s, unsigned seed, float noise = 0.05f) {
  const Index k = std::min(s.rows, s.cols);
  MatrixF U = random_matrix({s.rows, k}, seed), V = random_matrix({s.cols, k}, seed + 1);
  U = Eigen::HouseholderQR<Eigen::MatrixXf>(U).householderQ() * Eigen::MatrixXf::Identity(s.rows, k);
  V = Eigen::HouseholderQR<Eigen::MatrixXf>(V).householderQ() * Eigen::MatrixXf::Identity(s.cols, k);
  Eigen::VectorXf sv(k);
  for (Index i = 0; i < k; ++i) sv(i) = std::pow(0.97f, static_cast<float>(i));
  MatrixF G = U * sv.asDiagonal() * V.transpose();
  if (noise > 0.0f) {
    const float sigma = noise * sv.norm() / std::sqrt(static_cast<float>(s.rows * s.cols));
    G += random_matrix(s, seed + 2, sigma);
  }
  return G;
}

}  // namespace galore_bench
