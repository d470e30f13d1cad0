#include "cpu_reference.hpp"

#include <galore/galore.hpp>

namespace galore_test {

using namespace galore;

namespace {

template <class State, class T>
std::vector<std::vector<float>> run(const RunSpec& s, const std::vector<float>& W0,
                                    const std::vector<std::vector<float>>& grads) {
  AdamConfig c;
  c.lr = s.lr;
  c.weight_decay = s.weight_decay;
  c.eps = s.eps;
  c.correct_bias = s.correct_bias;
  GaLoreOptimizer<Projector<svd::Exact, quant::None, schedule::FixedGap>, LowRankAdam<State>> opt(
      ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale}, LowRankAdam<State>(c),
      schedule::FixedGap{s.gap});
  const Shape shape{s.rows, s.cols};
  const LayerId id = s.dense ? opt.add_dense(shape) : opt.add_layer(shape);
  Matrix<T> W(s.rows, s.cols);
  for (Index i = 0; i < W.size(); ++i) W.data()[i] = static_cast<T>(W0[static_cast<std::size_t>(i)]);
  std::vector<std::vector<float>> out;
  for (std::size_t t = 0; t < grads.size(); ++t) {
    if (!s.lrs.empty()) opt.set_lr(s.lrs[t]);
    Matrix<T> G(s.rows, s.cols);
    for (Index i = 0; i < G.size(); ++i) G.data()[i] = static_cast<T>(grads[t][static_cast<std::size_t>(i)]);
    opt.step(id, W, G);
    std::vector<float> w(static_cast<std::size_t>(W.size()));
    for (Index i = 0; i < W.size(); ++i) w[static_cast<std::size_t>(i)] = static_cast<float>(W.data()[i]);
    out.push_back(std::move(w));
  }
  return out;
}

}  // namespace

std::vector<std::vector<float>> cpu_run(const RunSpec& spec, std::vector<float> W,
                                        const std::vector<std::vector<float>>& grads, bool bf16) {
  if (spec.bf16_moments)
    return bf16 ? run<state::BFloat16, bfloat16>(spec, W, grads) : run<state::BFloat16, float>(spec, W, grads);
  return bf16 ? run<state::Float32, bfloat16>(spec, W, grads) : run<state::Float32, float>(spec, W, grads);
}

void cpu_exact_basis(long rows, long cols, long rank, int type, const std::vector<float>& G,
                     std::vector<float>& left, std::vector<float>& right) {
  const Eigen::Map<const MatrixF> g(G.data(), rows, cols);
  Basis b;
  svd::Exact{}.compute(g, rank, resolve_side(static_cast<ProjectionType>(type), rows, cols), nullptr, b);
  left.assign(b.left.data(), b.left.data() + b.left.size());
  right.assign(b.right.data(), b.right.data() + b.right.size());
}

std::vector<float> cpu_singular_values(long rows, long cols, const std::vector<float>& G) {
  const Eigen::Map<const MatrixF> g(G.data(), rows, cols);
  const Eigen::VectorXf s = svd::singular_values(g);
  return {s.data(), s.data() + s.size()};
}

std::vector<float> round_to_bf16(const std::vector<float>& x) {
  std::vector<float> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = static_cast<float>(static_cast<bfloat16>(x[i]));
  return y;
}

}  // namespace galore_test
