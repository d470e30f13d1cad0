// galore: how each piece of optimizer state is written to and read from a
// checkpoint payload, and how each policy describes its hyperparameters.
//
// Every read validates what it reads against what the loading optimizer
// expects (shapes, sizes, ranges), so that a payload with a valid checksum but
// inconsistent contents is an error, never a crash or a silently wrong state.
#pragma once

#include <cmath>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "../optim/adam_config.hpp"
#include "../optim/blockwise8bit_state.hpp"
#include "../optim/dense_state.hpp"
#include "../projector.hpp"
#include "../quant/bfloat16.hpp"
#include "../quant/minmax.hpp"
#include "../quant/nf4.hpp"
#include "../quant/none.hpp"
#include "../quantized_weight.hpp"
#include "../rounding/stochastic_rounder.hpp"
#include "../schedule/drift.hpp"
#include "../schedule/fixed_gap.hpp"
#include "../schedule/lazy.hpp"
#include "../svd/exact.hpp"
#include "../svd/randomized.hpp"
#include "../svd/warm_start.hpp"
#include "format.hpp"

namespace galore::checkpoint {

// Hyperparameters as (key, value) text pairs: saved in the configuration
// section and compared field by field on load.
using Items = std::vector<std::pair<std::string, std::string>>;

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
  describe(s.cold, out, p + ".cold");
}
inline void describe(const quant::None&, Items& out, const std::string& p) { out.push_back({p, "none"}); }
inline void describe(const quant::BFloat16&, Items& out, const std::string& p) { out.push_back({p, "bfloat16"}); }
template <int B>
void describe(const quant::MinMax<B>& q, Items& out, const std::string& p) {
  out.push_back({p, "minmax" + text(B)});
  out.push_back({p + ".group_size", text(q.group_size)});
}
inline void describe(const quant::NF4& q, Items& out, const std::string& p) {
  out.push_back({p, "nf4"});
  out.push_back({p + ".block_size", text(q.block_size)});
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
template <class T>
void describe(const state::Dense<T>&, Items& out, const std::string& p) {
  out.push_back({p, std::is_same_v<T, float> ? "float32" : "bfloat16"});
}
inline void describe(const state::Blockwise8bit& s, Items& out, const std::string& p) {
  out.push_back({p, "blockwise8bit"});
  out.push_back({p + ".block_size", text(s.block_size)});
  out.push_back({p + ".min_8bit_size", text(s.min_8bit_size)});
}
template <int B>
void describe(const StochasticRounder<B>& r, Items& out, const std::string& p) {
  out.push_back({p, "rounder" + text(B)});
  out.push_back({p + ".seed", text(r.seed())});
  out.push_back({p + ".mode", to_string(r.mode())});
}
// lr is left out: it is state (learning-rate schedules change it), restored on load.
inline void describe(const AdamConfig& c, Items& out, const std::string& p) {
  out.push_back({p + ".beta1", text(c.beta1)});
  out.push_back({p + ".beta2", text(c.beta2)});
  out.push_back({p + ".eps", text(c.eps)});
  out.push_back({p + ".weight_decay", text(c.weight_decay)});
  out.push_back({p + ".correct_bias", text(c.correct_bias)});
}

// ---- shapes and arrays ----
inline void save(Writer& w, Shape s) {
  w.i64(s.rows);
  w.i64(s.cols);
}
inline Shape load_shape(Reader& r) {
  const std::int64_t rows = r.i64(), cols = r.i64();
  // Each side below 2^31 and the product below 2^40: no overflow downstream.
  if (rows < 0 || cols < 0 || rows >= (std::int64_t{1} << 31) || cols >= (std::int64_t{1} << 31) ||
      rows * cols >= (std::int64_t{1} << 40))
    r.fail("impossible shape " + std::to_string(rows) + "x" + std::to_string(cols));
  return {rows, cols};
}
inline void expect_shape(Reader& r, Shape got, Shape want, const char* what) {
  if (got != want)
    r.fail(std::string(what) + " is " + std::to_string(got.rows) + "x" + std::to_string(got.cols) + ", expected " +
           std::to_string(want.rows) + "x" + std::to_string(want.cols));
}

template <class T>
void save(Writer& w, const Matrix<T>& m) {
  save(w, shape_of(m));
  w.array(m.data(), static_cast<std::size_t>(m.size()));
}
template <class T>
void load_matrix(Reader& r, Matrix<T>& m, Shape want, const char* what) {
  const Shape s = load_shape(r);
  expect_shape(r, s, want, what);
  Matrix<T> tmp(s.rows, s.cols);
  r.exactly(tmp.data(), static_cast<std::uint64_t>(s.size()), what);
  m = std::move(tmp);
}

// ---- projector storages ----
inline void save(Writer& w, const quant::None&, const quant::None::Storage& s) { save(w, s.matrix); }
inline void load(Reader& r, const quant::None&, quant::None::Storage& s, Shape want) {
  load_matrix(r, s.matrix, want, "float32 basis");
}
inline void save(Writer& w, const quant::BFloat16&, const quant::BFloat16::Storage& s) { save(w, s.matrix); }
inline void load(Reader& r, const quant::BFloat16&, quant::BFloat16::Storage& s, Shape want) {
  load_matrix(r, s.matrix, want, "bf16 basis");
}
template <int B>
void save_codes(Writer& w, const quant::GroupQuantized<B>& q) {
  save(w, q.shape());
  w.i64(q.group_size);
  w.array(q.codes.data(), q.codes.size());
  w.array(q.scales.data(), q.scales.size());
  w.array(q.zeros.data(), q.zeros.size());
}
template <int B>
void load_group_quantized(Reader& r, quant::GroupQuantized<B>& q, Shape want, Index want_group, const char* what) {
  const Shape s = load_shape(r);
  expect_shape(r, s, want, what);
  const std::int64_t g = r.i64();
  if (g != want_group) r.fail(std::string(what) + " has group size " + std::to_string(g) + ", expected " + std::to_string(want_group));
  quant::GroupQuantized<B> tmp;
  tmp.resize(s, g);
  r.exactly(tmp.codes.data(), tmp.codes.size(), what);
  r.exactly(tmp.scales.data(), tmp.scales.size(), what);
  r.exactly(tmp.zeros.data(), tmp.zeros.size(), what);
  for (std::uint8_t z : tmp.zeros)
    if (z > quant::GroupQuantized<B>::max_code) r.fail(std::string(what) + " has a zero point out of range");
  for (float sc : tmp.scales)
    if (!(std::isfinite(sc) && sc > 0.0f)) r.fail(std::string(what) + " has a non-positive or non-finite scale");
  q = std::move(tmp);
}
template <int B>
void save(Writer& w, const quant::MinMax<B>&, const quant::GroupQuantized<B>& q) {
  save_codes(w, q);
}
template <int B>
void load(Reader& r, const quant::MinMax<B>& policy, quant::GroupQuantized<B>& q, Shape want) {
  load_group_quantized(r, q, want, quant::resolve_group_size(policy.group_size, want), "quantized basis");
}
inline void save(Writer& w, const quant::NF4&, const quant::NF4::Storage& s) {
  save(w, s.shape());
  w.i64(s.block_size);
  w.array(s.codes.data(), s.codes.size());
  w.array(s.absmax.data(), s.absmax.size());
}
inline void load(Reader& r, const quant::NF4& policy, quant::NF4::Storage& s, Shape want) {
  const Shape sh = load_shape(r);
  expect_shape(r, sh, want, "NF4 basis");
  const std::int64_t block = r.i64();
  if (block != policy.block_size) r.fail("NF4 basis has block size " + std::to_string(block));
  quant::NF4::Storage tmp;
  tmp.shape_ = sh;
  tmp.block_size = block;
  tmp.codes.resize(static_cast<std::size_t>((sh.size() + 1) / 2));
  tmp.absmax.resize(static_cast<std::size_t>((sh.size() + block - 1) / block));
  r.exactly(tmp.codes.data(), tmp.codes.size(), "NF4 codes");
  r.exactly(tmp.absmax.data(), tmp.absmax.size(), "NF4 absmax");
  s = std::move(tmp);
}

// ---- schedule states ----
inline void save(Writer&, const schedule::FixedGap&, const schedule::FixedGap::State&) {}
inline void load(Reader&, const schedule::FixedGap&, schedule::FixedGap::State&, Index) {}
inline void save(Writer& w, const schedule::Lazy&, const schedule::Lazy::State& s) {
  w.i64(s.gap);
  w.array(s.queue.data(), s.queue.size());
  w.array(s.past.data(), static_cast<std::size_t>(s.past.size()));
  w.f32(s.last_cosine);
}
inline void load(Reader& r, const schedule::Lazy& policy, schedule::Lazy::State& s, Index vector_length) {
  schedule::Lazy::State tmp = policy.init();
  tmp.gap = r.i64();
  if (tmp.gap < 1) r.fail("lazy schedule gap " + std::to_string(tmp.gap) + " is not positive");
  const std::vector<float> queue = r.array<float>("cosine queue");
  if (queue.size() > static_cast<std::size_t>(policy.queue_size)) r.fail("cosine queue longer than its size");
  tmp.queue.assign(queue.begin(), queue.end());
  const std::vector<float> past = r.array<float>("previous singular vector");
  if (!past.empty() && static_cast<Index>(past.size()) != vector_length)
    r.fail("previous singular vector has " + std::to_string(past.size()) + " elements, expected " +
           std::to_string(vector_length));
  tmp.past = Eigen::Map<const VectorF>(past.data(), static_cast<Index>(past.size()));
  tmp.last_cosine = r.f32();
  s = std::move(tmp);
}
inline void save(Writer& w, const schedule::Drift&, const schedule::Drift::State& s) {
  w.i64(s.last_refresh);
  w.f64(s.baseline);
  w.f64(s.last_captured);
}
inline void load(Reader& r, const schedule::Drift&, schedule::Drift::State& s, Index) {
  s.last_refresh = r.i64();
  s.baseline = r.f64();
  s.last_captured = r.f64();
  if (s.last_refresh < 0) r.fail("drift schedule refresh step is negative");
}

// ---- Adam moments ----
template <class T>
void save(Writer& w, const state::Dense<T>&, const typename state::Dense<T>::Moments& m) {
  save(w, m.shape());
  w.array(m.m.data(), static_cast<std::size_t>(m.m.size()));
  w.array(m.v.data(), static_cast<std::size_t>(m.v.size()));
}
template <class T>
void load(Reader& r, const state::Dense<T>& policy, typename state::Dense<T>::Moments& out, Shape want) {
  const Shape s = load_shape(r);
  expect_shape(r, s, want, "moments");
  auto tmp = policy.init(s);
  r.exactly(tmp.m.data(), static_cast<std::uint64_t>(s.size()), "first moment");
  r.exactly(tmp.v.data(), static_cast<std::uint64_t>(s.size()), "second moment");
  out = std::move(tmp);
}
inline void save(Writer& w, const state::Blockwise8bit&, const state::Blockwise8bit::Moments& m) {
  save(w, m.shape());
  w.i64(m.block_size);
  w.boolean(m.quantized);
  if (m.quantized) {
    w.array(m.m_code.data(), m.m_code.size());
    w.array(m.v_code.data(), m.v_code.size());
    w.array(m.m_absmax.data(), m.m_absmax.size());
    w.array(m.v_absmax.data(), m.v_absmax.size());
  } else {
    w.array(m.m32.data(), m.m32.size());
    w.array(m.v32.data(), m.v32.size());
  }
}
inline void load(Reader& r, const state::Blockwise8bit& policy, state::Blockwise8bit::Moments& out, Shape want) {
  const Shape s = load_shape(r);
  expect_shape(r, s, want, "8-bit moments");
  auto tmp = policy.init(s);
  if (r.i64() != tmp.block_size) r.fail("8-bit moments have another block size");
  if (r.boolean() != tmp.quantized) r.fail("8-bit moments disagree on the 8-bit / float32 path");
  if (tmp.quantized) {
    r.exactly(tmp.m_code.data(), tmp.m_code.size(), "first-moment codes");
    r.exactly(tmp.v_code.data(), tmp.v_code.size(), "second-moment codes");
    r.exactly(tmp.m_absmax.data(), tmp.m_absmax.size(), "first-moment absmax");
    r.exactly(tmp.v_absmax.data(), tmp.v_absmax.size(), "second-moment absmax");
  } else {
    r.exactly(tmp.m32.data(), tmp.m32.size(), "first moment");
    r.exactly(tmp.v32.data(), tmp.v32.size(), "second moment");
  }
  out = std::move(tmp);
}

// ---- weights held by the trainer ----
template <int B>
void save(Writer& w, const QuantizedWeight<B>& q) {
  save_codes(w, q.codes());
}
template <int B>
void load(Reader& r, QuantizedWeight<B>& out, Shape want, Index group) {
  QuantizedWeight<B> tmp;
  load_group_quantized(r, tmp.codes(), want, group, "quantized weight");
  out = std::move(tmp);
}

}  // namespace galore::checkpoint
