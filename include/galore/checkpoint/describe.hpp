// galore: how a facade's configuration is described in a checkpoint: every
// hyperparameter as a (key, value) text pair, saved in the configuration section
// and compared item by item on load.
//
// Backend-free: the CPU facade (galore/checkpoint.hpp) and the CUDA facade
// (backend/cuda/checkpoint.cuh) build their items with config_items() below, so
// that equal configurations give equal items and a file moves between them. The
// policies whose types hold Eigen storage (quantizers, Adam state formats, the
// rounder) are described in serialize.hpp, through the `described` forms here.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../optim/adam_config.hpp"
#include "../optim/blockwise8bit_state.hpp"
#include "../projector_options.hpp"
#include "../rounding/rounding_mode.hpp"
#include "../schedule/drift.hpp"
#include "../schedule/fixed_gap.hpp"
#include "../schedule/lazy.hpp"
#include "../svd/exact.hpp"
#include "../svd/randomized.hpp"
#include "../svd/warm_start.hpp"

namespace galore::checkpoint {

// Hyperparameters as (key, value) text pairs. A class of this namespace rather
// than an alias of std::vector: describe() called from config_items() then also
// finds, by argument-dependent lookup, the overloads declared after it
// (serialize.hpp's, or a custom policy's in this namespace).
struct Items : std::vector<std::pair<std::string, std::string>> {
  using vector::vector;
};

template <class T>
std::string text(const T& v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

// ---- policy descriptions (a custom policy provides its own overload) ----
inline void describe(const svd::Exact&, Items& out, const std::string& p) { out.push_back({p, "exact"}); }
inline void describe(const svd::Randomized& s, Items& out, const std::string& p) {
  out.push_back({p, "randomized"});
  out.push_back({p + ".oversample", text(s.oversample)});
  out.push_back({p + ".power_iterations", text(s.power_iterations)});
  out.push_back({p + ".seed", text(s.seed)});
}
inline void describe(const svd::WarmStart& s, Items& out, const std::string& p) {
  out.push_back({p, "warm_start"});
  out.push_back({p + ".iterations", text(s.iterations)});
  // Described only when off, so that files written before the option existed
  // (which always used Rayleigh-Ritz) keep loading.
  if (!s.rayleigh_ritz) out.push_back({p + ".rayleigh_ritz", "0"});
  describe(s.cold, out, p + ".cold");
}
inline void describe(const schedule::FixedGap& s, Items& out, const std::string& p) {
  out.push_back({p, "fixed_gap"});
  out.push_back({p + ".gap", text(s.gap)});
}
inline void describe(const schedule::Lazy& s, Items& out, const std::string& p) {
  out.push_back({p, "lazy"});
  out.push_back({p + ".gap", text(s.gap)});
  out.push_back({p + ".cos_threshold", text(s.cos_threshold)});
  out.push_back({p + ".gamma", text(s.gamma)});
  out.push_back({p + ".queue_size", text(s.queue_size)});
}
inline void describe(const schedule::Drift& s, Items& out, const std::string& p) {
  out.push_back({p, "drift"});
  out.push_back({p + ".check_every", text(s.check_every)});
  out.push_back({p + ".tolerance", text(s.tolerance)});
  out.push_back({p + ".min_gap", text(s.min_gap)});
  out.push_back({p + ".max_gap", text(s.max_gap)});
}
// lr is left out: it is state (learning-rate schedules change it), restored on load.
inline void describe(const AdamConfig& c, Items& out, const std::string& p) {
  out.push_back({p + ".beta1", text(c.beta1)});
  out.push_back({p + ".beta2", text(c.beta2)});
  out.push_back({p + ".eps", text(c.eps)});
  out.push_back({p + ".weight_decay", text(c.weight_decay)});
  out.push_back({p + ".correct_bias", text(c.correct_bias)});
}

// Policies by what a file says of them, for a facade that holds no object of the
// CPU's type: the CUDA facade keeps what quant::None, quant::MinMax, quant::NF4, state::Dense<T> and the
// rounder describe, without their Eigen storage. serialize.hpp describes the CPU
// types through these, so both write the same items.
namespace described {
struct QuantNone {};  // quant::None: the basis in float32
struct DenseState {   // state::Dense<float> or state::Dense<bfloat16>
  bool bfloat16;
};
struct MinMax {  // quant::MinMax<bits>: the basis as group-wise min-max codes
  int bits;
  Index group_size;
};
struct NF4 {  // quant::NF4: the basis in NF4 codes
  Index block_size;
};
struct Rounder {  // StochasticRounder<bits>
  int bits;
  std::uint64_t seed;
  RoundingMode mode;
};
}  // namespace described

inline void describe(const described::QuantNone&, Items& out, const std::string& p) { out.push_back({p, "none"}); }
inline void describe(const described::MinMax& q, Items& out, const std::string& p) {
  out.push_back({p, "minmax" + text(q.bits)});
  out.push_back({p + ".group_size", text(q.group_size)});
}
inline void describe(const described::NF4& q, Items& out, const std::string& p) {
  out.push_back({p, "nf4"});
  out.push_back({p + ".block_size", text(q.block_size)});
}
inline void describe(const described::DenseState& s, Items& out, const std::string& p) {
  out.push_back({p, s.bfloat16 ? "bfloat16" : "float32"});
}
inline void describe(const state::Blockwise8bit& s, Items& out, const std::string& p) {
  out.push_back({p, "blockwise8bit"});
  out.push_back({p + ".block_size", text(s.block_size)});
  out.push_back({p + ".min_8bit_size", text(s.min_8bit_size)});
}
inline void describe(const described::Rounder& r, Items& out, const std::string& p) {
  out.push_back({p, "rounder" + text(r.bits)});
  out.push_back({p + ".seed", text(r.seed)});
  out.push_back({p + ".mode", to_string(r.mode)});
}

// A facade's configuration items, in file order.
template <class SVD, class Quant, class Schedule, class State, class Rounder>
Items config_items(const SVD& svd, const Quant& quant, const Schedule& schedule, const State& state,
                   const AdamConfig& adam, const Rounder& rounder, const ProjectorOptions& projection) {
  Items items;
  items.push_back({"facade", "GaLoreOptimizer"});
  describe(svd, items, "svd");
  describe(quant, items, "quant");
  describe(schedule, items, "schedule");
  describe(state, items, "state");
  describe(adam, items, "adam");
  describe(rounder, items, "rounder");
  items.push_back({"projection.rank", text(projection.rank)});
  items.push_back({"projection.type", to_string(projection.type)});
  items.push_back({"projection.scale", text(projection.scale)});
  return items;
}

}  // namespace galore::checkpoint
