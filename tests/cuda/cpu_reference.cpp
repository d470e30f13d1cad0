#include "cpu_reference.hpp"

#include <galore/galore.hpp>

#include <sstream>
#include <stdexcept>

namespace galore_test {

using namespace galore;

namespace {

template <class State>
State state_of(const RunSpec& s) {
  if constexpr (std::is_same_v<State, state::Blockwise8bit>) return state::Blockwise8bit{s.block_size, s.min_8bit_size};
  else return State{};
}

// Calls f(quant) with the spec's basis quantization policy.
template <class F>
auto with_quant(const RunSpec& s, F&& f) {
  if (s.basis_nf4) return f(quant::NF4(s.basis_block));
  if (s.basis_bits == 4) return f(quant::MinMax<4>(s.basis_group));
  if (s.basis_bits == 8) return f(quant::MinMax<8>(s.basis_group));
  if (s.basis_bits != 0) throw std::invalid_argument("cpu_reference: basis_bits must be 0, 4 or 8");
  return f(quant::None{});
}

template <class State, class T, class Schedule, class Quant>
std::vector<std::vector<float>> run(const RunSpec& s, const std::vector<float>& W0,
                                    const std::vector<std::vector<float>>& grads, Schedule schedule, Quant quant,
                                    RunInfo* info) {
  const AdamConfig c = adam_of(s);
  GaLoreOptimizer<Projector<svd::Exact, Quant, Schedule>, LowRankAdam<State>> opt(
      ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale}, LowRankAdam<State>(c, state_of<State>(s)),
      schedule, svd::Exact{}, quant);
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
  if (info) {
    const LayerStats st = opt.stats(id);
    info->svd_count = st.svd_count;
    info->gap = st.update_gap;
    info->skipped = st.skipped_steps;
    if constexpr (std::is_same_v<Schedule, schedule::Drift>) {
      const schedule::Drift::State& d = opt.projector(id).schedule_state();
      info->drift_last_refresh = d.last_refresh;
      info->drift_baseline = d.baseline;
      info->drift_last_captured = d.last_captured;
    }
  }
  return out;
}

template <class State, class T>
std::vector<std::vector<float>> run(const RunSpec& s, const std::vector<float>& W0,
                                    const std::vector<std::vector<float>>& grads, RunInfo* info) {
  if (s.basis_bits != 0 || s.basis_nf4) {
    // Q-GaLore's quantized bases: float32 or 8-bit moments; float layers with
    // every schedule, bf16 layers with float32 moments and a fixed gap.
    if constexpr (std::is_same_v<T, float> && !std::is_same_v<State, state::BFloat16>) {
      return with_quant(s, [&](auto quant) {
        if (s.lazy_queue > 0)
          return run<State, T>(s, W0, grads, schedule::Lazy{s.gap, s.lazy_threshold, s.lazy_gamma, s.lazy_queue},
                               quant, info);
        if (s.drift_check_every > 0)
          return run<State, T>(s, W0, grads,
                               schedule::Drift{s.drift_check_every, s.drift_tolerance, s.drift_min_gap, s.gap}, quant,
                               info);
        return run<State, T>(s, W0, grads, schedule::FixedGap{s.gap}, quant, info);
      });
    } else if constexpr (std::is_same_v<State, state::Float32>) {
      if (s.lazy_queue == 0 && s.drift_check_every == 0)
        return with_quant(s, [&](auto quant) {
          return run<State, T>(s, W0, grads, schedule::FixedGap{s.gap}, quant, info);
        });
    }
    throw std::invalid_argument("cpu_reference: no such combination with a quantized basis");
  }
  if (s.lazy_queue > 0)
    return run<State, T>(s, W0, grads, schedule::Lazy{s.gap, s.lazy_threshold, s.lazy_gamma, s.lazy_queue},
                         quant::None{}, info);
  if (s.drift_check_every > 0)
    return run<State, T>(s, W0, grads, schedule::Drift{s.drift_check_every, s.drift_tolerance, s.drift_min_gap, s.gap},
                         quant::None{}, info);
  return run<State, T>(s, W0, grads, schedule::FixedGap{s.gap}, quant::None{}, info);
}

}  // namespace

std::vector<std::vector<float>> cpu_run(const RunSpec& spec, std::vector<float> W,
                                        const std::vector<std::vector<float>>& grads, bool bf16, RunInfo* info) {
  if (spec.blockwise8bit)
    return bf16 ? run<state::Blockwise8bit, bfloat16>(spec, W, grads, info)
                : run<state::Blockwise8bit, float>(spec, W, grads, info);
  if (spec.bf16_moments)
    return bf16 ? run<state::BFloat16, bfloat16>(spec, W, grads, info)
                : run<state::BFloat16, float>(spec, W, grads, info);
  return bf16 ? run<state::Float32, bfloat16>(spec, W, grads, info) : run<state::Float32, float>(spec, W, grads, info);
}

void cpu_exact_basis(long rows, long cols, long rank, int type, const std::vector<float>& G,
                     std::vector<float>& left, std::vector<float>& right) {
  const Eigen::Map<const MatrixF> g(G.data(), rows, cols);
  Basis b;
  eigen::compute_basis(svd::Exact{}, g, rank, resolve_side(static_cast<ProjectionType>(type), rows, cols), nullptr, b);
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

void cpu_adam_dense(std::vector<float>& m, std::vector<float>& v, const std::vector<float>& g,
                    std::vector<float>& d, std::int64_t t, double lr, double beta1, double beta2, double eps) {
  const galore::AdamConfig c{lr, beta1, beta2, eps, 0.0, true};
  const galore::state::Float32 policy;
  auto mo = policy.init({1, static_cast<galore::Index>(g.size())});
  for (std::size_t i = 0; i < g.size(); ++i) mo.m(static_cast<galore::Index>(i)) = m[i], mo.v(static_cast<galore::Index>(i)) = v[i];
  d.assign(g.size(), 0.0f);
  policy.update(mo, g.data(), t, c, [&](galore::Index off, const float* chunk, galore::Index len) {
    std::copy(chunk, chunk + len, d.begin() + off);
  });
  for (std::size_t i = 0; i < g.size(); ++i) m[i] = mo.m(static_cast<galore::Index>(i)), v[i] = mo.v(static_cast<galore::Index>(i));
}

void cpu_adam_8bit_formula(std::vector<float>& m, std::vector<float>& v, const std::vector<float>& g,
                           std::vector<float>& d, std::int64_t t, double lr, double beta1, double beta2,
                           double eps) {
  const galore::AdamConfig c{lr, beta1, beta2, eps, 0.0, true};
  galore::state::Blockwise8bit policy;
  policy.min_8bit_size = static_cast<galore::Index>(g.size()) + 1;  // the float32 path
  auto mo = policy.init({1, static_cast<galore::Index>(g.size())});
  mo.m32 = m;
  mo.v32 = v;
  d.assign(g.size(), 0.0f);
  policy.update(mo, g.data(), t, c, [&](galore::Index off, const float* chunk, galore::Index len) {
    std::copy(chunk, chunk + len, d.begin() + off);
  });
  m = mo.m32;
  v = mo.v32;
}

namespace {
template <class Encoder>
CpuCodes codes_with(const std::vector<float>& x, long group, const Encoder& encode) {
  galore::quant::GroupQuantized<8> q;
  q.resize({1, static_cast<galore::Index>(x.size())}, group);
  galore::quant::quantize_range(x.data(), 0, static_cast<galore::Index>(x.size()), encode, q);
  return {q.codes, q.scales, q.zeros};
}
}  // namespace

CpuCodes cpu_minmax_codes(const std::vector<float>& x, long group) {
  return codes_with(x, group, galore::quant::NearestEncoder<8>{});
}

CpuCodes cpu_minmax_codes4(const std::vector<float>& x, long rows, long cols, long group) {
  const Eigen::Map<const galore::MatrixF> w(x.data(), rows, cols);
  const galore::quant::GroupQuantized<4> q = galore::quant::quantize_minmax<4>(w, group);
  return {q.codes, q.scales, q.zeros};
}

CpuCodes cpu_nf4_codes(const std::vector<float>& x, long rows, long cols, long block) {
  const galore::MatrixF w = Eigen::Map<const galore::MatrixF>(x.data(), rows, cols);
  galore::quant::NF4::Storage q;
  galore::quant::NF4(block).store(w, q);
  return {q.codes, q.absmax, {}};
}

CpuCodes cpu_stochastic_codes(const std::vector<float>& x, long group, std::uint64_t seed, std::uint32_t layer,
                              std::uint32_t step) {
  const galore::StochasticRounder<8> rounder(seed);
  return codes_with(x, group, rounder.bind(layer, step));
}

CpuCodes cpu_int8_weight(long rows, long cols, long group, const std::vector<float>& W0, long row0,
                         const std::vector<float>& values, std::uint64_t seed, std::uint32_t layer,
                         std::uint32_t step) {
  const Eigen::Map<const galore::MatrixF> w(W0.data(), rows, cols);
  galore::QuantizedWeight<8> q(w, group);
  if (!values.empty()) {
    const Eigen::Map<const galore::MatrixF> v(values.data(), static_cast<galore::Index>(values.size()) / cols, cols);
    const galore::StochasticRounder<8> rounder(seed);
    q.quantize_rows(row0, v, rounder.bind(layer, step));
  }
  return {q.codes().codes, q.codes().scales, q.codes().zeros};
}

namespace {
template <class State, class Schedule, class Quant>
std::vector<CpuCodes> int8_run(const RunSpec& s, long group, std::uint64_t seed, long layer_index,
                               const std::vector<float>& W0, const std::vector<std::vector<float>>& grads,
                               bool bf16_grads, Schedule schedule, Quant quant, RunInfo* info) {
  GaLoreOptimizer<Projector<svd::Exact, Quant, Schedule>, LowRankAdam<State>, StochasticRounder<8>> opt(
      ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale},
      LowRankAdam<State>(adam_of(s), state_of<State>(s)), schedule, svd::Exact{}, quant, StochasticRounder<8>(seed));
  for (long i = 0; i < layer_index; ++i) (void)opt.add_dense({1, 1});
  const LayerId id = opt.add_layer({s.rows, s.cols});
  QuantizedWeight<8> W(Eigen::Map<const MatrixF>(W0.data(), s.rows, s.cols), group);
  std::vector<CpuCodes> out;
  for (const auto& g : grads) {
    if (bf16_grads) {
      Matrix<bfloat16> G(s.rows, s.cols);
      for (Index i = 0; i < G.size(); ++i) G.data()[i] = static_cast<bfloat16>(g[static_cast<std::size_t>(i)]);
      opt.step(id, W, ConstMatrixRef<bfloat16>(G));
    } else {
      opt.step(id, W, ConstMatrixRef<float>(Eigen::Map<const MatrixF>(g.data(), s.rows, s.cols)));
    }
    out.push_back({W.codes().codes, W.codes().scales, W.codes().zeros});
  }
  if (info) {
    const LayerStats st = opt.stats(id);
    info->svd_count = st.svd_count;
    info->gap = st.update_gap;
    info->skipped = st.skipped_steps;
  }
  return out;
}

template <class State>
std::vector<CpuCodes> int8_run(const RunSpec& s, long group, std::uint64_t seed, long layer_index,
                               const std::vector<float>& W0, const std::vector<std::vector<float>>& grads,
                               bool bf16_grads, RunInfo* info) {
  return with_quant(s, [&](auto quant) {
    if (s.lazy_queue > 0)
      return int8_run<State>(s, group, seed, layer_index, W0, grads, bf16_grads,
                             schedule::Lazy{s.gap, s.lazy_threshold, s.lazy_gamma, s.lazy_queue}, quant, info);
    return int8_run<State>(s, group, seed, layer_index, W0, grads, bf16_grads, schedule::FixedGap{s.gap}, quant,
                           info);
  });
}
}  // namespace

std::vector<CpuCodes> cpu_int8_run(const RunSpec& s, long group, std::uint64_t seed, long layer_index,
                                   const std::vector<float>& W0, const std::vector<std::vector<float>>& grads,
                                   bool bf16_grads, RunInfo* info) {
  return s.blockwise8bit ? int8_run<state::Blockwise8bit>(s, group, seed, layer_index, W0, grads, bf16_grads, info)
                         : int8_run<state::Float32>(s, group, seed, layer_index, W0, grads, bf16_grads, info);
}

std::vector<Cpu8bitStep> cpu_adam_8bit_blockwise(const std::vector<std::vector<float>>& grads, long block_size,
                                                 double lr, double beta1, double beta2, double eps) {
  const galore::AdamConfig c{lr, beta1, beta2, eps, 0.0, true};
  galore::state::Blockwise8bit policy;
  policy.block_size = block_size;
  policy.min_8bit_size = 0;  // the 8-bit path for any size
  const auto n = static_cast<galore::Index>(grads.front().size());
  auto mo = policy.init({1, n});
  std::vector<Cpu8bitStep> out;
  for (std::size_t t = 0; t < grads.size(); ++t) {
    Cpu8bitStep s;
    s.d.assign(static_cast<std::size_t>(n), 0.0f);
    policy.update(mo, grads[t].data(), static_cast<std::int64_t>(t + 1), c,
                  [&](galore::Index off, const float* chunk, galore::Index len) {
                    std::copy(chunk, chunk + len, s.d.begin() + off);
                  });
    s.m_code = mo.m_code;
    s.v_code = mo.v_code;
    s.m_absmax = mo.m_absmax;
    s.v_absmax = mo.v_absmax;
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<float> cpu_dynamic_map(bool is_signed) {
  const galore::quant::CodeMap& map =
      is_signed ? galore::quant::dynamic_map_signed() : galore::quant::dynamic_map_unsigned();
  return {map.begin(), map.end()};
}

namespace {

template <class State, class Schedule, class Quant>
CpuCheckpointRun checkpoint_run(const CkptSpec& s, Schedule schedule, Quant quant, const std::string& checkpoint,
                                const std::vector<std::vector<float>>& W0,
                                const std::vector<std::vector<std::vector<float>>>& grads, double lr_after,
                                bool with_weights) {
  const AdamConfig c = adam_of(s);
  GaLoreOptimizer<Projector<svd::Exact, Quant, Schedule>, LowRankAdam<State>> opt(
      ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale}, LowRankAdam<State>(c), schedule,
      svd::Exact{}, quant);
  const std::size_t L = s.layers.size();
  std::vector<LayerId> ids;
  std::vector<MatrixF> Wf(L);
  std::vector<Matrix<bfloat16>> Wh(L);
  std::vector<QuantizedWeight<8>> Wq(L);
  WeightSet weights;
  for (std::size_t i = 0; i < L; ++i) {
    const CkptLayer& l = s.layers[i];
    const Shape shape{l.rows, l.cols};
    if (l.dense) ids.push_back(opt.add_dense(shape, l.name));
    else if (l.rank > 0)
      ids.push_back(opt.add_layer(shape, ProjectorOptions{l.rank, static_cast<ProjectionType>(l.type), s.scale}, l.name));
    else ids.push_back(opt.add_layer(shape, l.name));
    Wf[i] = Eigen::Map<const MatrixF>(W0[i].data(), l.rows, l.cols);
    if (l.int8) {
      Wq[i] = QuantizedWeight<8>(Wf[i], 256);
      weights.add(ids[i], Wq[i]);
    } else if (l.bf16) {
      Wh[i] = Wf[i].cast<bfloat16>();
      weights.add(ids[i], Wh[i]);
    } else {
      weights.add(ids[i], Wf[i]);
    }
  }
  if (!checkpoint.empty()) {
    std::istringstream is(checkpoint, std::ios::binary);
    load_checkpoint(opt, is, with_weights ? &weights : nullptr);
  }
  CpuCheckpointRun run;
  for (const auto& step : grads) {
    std::vector<std::vector<float>> w(L);
    for (std::size_t i = 0; i < L; ++i) {
      const CkptLayer& l = s.layers[i];
      if (!step[i].empty()) {
        const Eigen::Map<const MatrixF> g(step[i].data(), l.rows, l.cols);
        if (l.int8) opt.step(ids[i], Wq[i], ConstMatrixRef<float>(g));
        else if (l.bf16) opt.step(ids[i], Wh[i], Matrix<bfloat16>(g.cast<bfloat16>()));
        else opt.step(ids[i], Wf[i], g);
      }
      const MatrixF now = l.int8 ? Wq[i].dequantize() : l.bf16 ? MatrixF(Wh[i].cast<float>()) : Wf[i];
      w[i].assign(now.data(), now.data() + now.size());
    }
    run.W.push_back(std::move(w));
  }
  for (std::size_t i = 0; i < L; ++i) {
    const CkptLayer& l = s.layers[i];
    const MatrixF now = l.int8 ? Wq[i].dequantize() : l.bf16 ? MatrixF(Wh[i].cast<float>()) : Wf[i];
    run.W_end.emplace_back(now.data(), now.data() + now.size());
  }
  if (lr_after > 0.0) opt.set_lr(lr_after);
  std::ostringstream os(std::ios::binary);
  save_checkpoint(opt, os, with_weights ? &weights : nullptr);
  run.checkpoint = os.str();
  run.lr = opt.adam_config().lr;
  for (std::size_t i = 0; i < L; ++i) {
    CpuLayerState st;
    if constexpr (!std::is_same_v<State, state::Blockwise8bit>) {
      const auto& mo = opt.moments(ids[i]);
      for (Index k = 0; k < mo.m.size(); ++k) {
        st.m.push_back(static_cast<float>(mo.m(k)));
        st.v.push_back(static_cast<float>(mo.v(k)));
      }
    }
    const LayerStats stats = opt.stats(ids[i]);
    st.steps = stats.steps;
    st.skipped = stats.skipped_steps;
    st.svd_count = stats.svd_count;
    if (opt.is_projected(ids[i]) && opt.projector(ids[i]).has_basis()) {
      const auto& p = opt.projector(ids[i]);
      st.has_basis = true;
      BasisScratch scratch;
      const BasisView b = p.basis(scratch);  // dequantized when quantized
      if (b.left) st.left.assign(b.left->data(), b.left->data() + b.left->size());
      if (b.right) st.right.assign(b.right->data(), b.right->data() + b.right->size());
    }
    run.layers.push_back(std::move(st));
  }
  return run;
}

template <class State>
CpuCheckpointRun checkpoint_run(const CkptSpec& s, const std::string& checkpoint,
                                const std::vector<std::vector<float>>& W0,
                                const std::vector<std::vector<std::vector<float>>>& grads, double lr_after,
                                bool with_weights) {
  auto with_schedule = [&](auto quant) {
    if (s.lazy_queue > 0)
      return checkpoint_run<State>(s, schedule::Lazy{s.gap, s.lazy_threshold, s.lazy_gamma, s.lazy_queue}, quant,
                                   checkpoint, W0, grads, lr_after, with_weights);
    return checkpoint_run<State>(s, schedule::FixedGap{s.gap}, quant, checkpoint, W0, grads, lr_after, with_weights);
  };
  if (s.basis_nf4) return with_schedule(quant::NF4(s.basis_block));
  if (s.basis_bits == 4) return with_schedule(quant::MinMax<4>(s.basis_group));
  if (s.basis_bits == 8) return with_schedule(quant::MinMax<8>(s.basis_group));
  if (s.basis_bits != 0) throw std::invalid_argument("cpu_reference: checkpoints with basis_bits 0, 4 or 8");
  return with_schedule(quant::None{});
}

}  // namespace

CpuCheckpointRun cpu_checkpoint_run(const CkptSpec& spec, const std::string& checkpoint,
                                    const std::vector<std::vector<float>>& W0,
                                    const std::vector<std::vector<std::vector<float>>>& grads, double lr_after,
                                    bool with_weights) {
  if (spec.blockwise8bit)
    return checkpoint_run<state::Blockwise8bit>(spec, checkpoint, W0, grads, lr_after, with_weights);
  return spec.bf16_moments
             ? checkpoint_run<state::BFloat16>(spec, checkpoint, W0, grads, lr_after, with_weights)
             : checkpoint_run<state::Float32>(spec, checkpoint, W0, grads, lr_after, with_weights);
}

}  // namespace galore_test
