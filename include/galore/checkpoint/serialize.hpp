// galore: how each piece of optimizer state is written to and read from a
// checkpoint payload, and how each policy describes its hyperparameters.
//
// Every read validates what it reads against what the loading optimizer
// expects (shapes, sizes, ranges), so that a payload with a valid checksum but
// inconsistent contents is an error, never a crash or a silently wrong state.
// A checksum detects damage, not a hostile or buggy writer: every count is
// checked against the bytes left before anything is allocated for it, and every
// value against the range the library works in (docs/checkpoint.md lists them).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
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
  // Described only when off, so that files written before the option existed
  // (which always used Rayleigh-Ritz) keep loading.
  if (!s.rayleigh_ritz) out.push_back({p + ".rayleigh_ritz", "0"});
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

// ---- value checks ----
// Fails unless every value is finite (bf16 values are checked as floats).
template <class T>
void expect_finite(Reader& r, const T* p, std::size_t n, const char* what) {
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<float>(p[i]))) r.fail(std::string(what) + " holds a NaN or an infinity");
}
// Fails unless every value is finite and >= 0.
template <class T>
void expect_finite_nonnegative(Reader& r, const T* p, std::size_t n, const char* what) {
  for (std::size_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(p[i]);
    if (!(std::isfinite(v) && v >= 0.0f)) r.fail(std::string(what) + " holds a negative, NaN or infinite value");
  }
}
// A counter (steps, skipped steps, SVD count, a schedule's step): in [0, kMaxCounter].
inline std::int64_t counter(Reader& r, const char* what) {
  const std::int64_t v = r.i64();
  if (v < 0 || v > kMaxCounter)
    r.fail(std::string(what) + " " + std::to_string(v) + " is outside [0, 2^62]");
  return v;
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
  r.expect_array(static_cast<std::uint64_t>(s.size()), sizeof(T), what);
  Matrix<T> tmp(s.rows, s.cols);
  r.exactly(tmp.data(), static_cast<std::uint64_t>(s.size()), what);
  m = std::move(tmp);
}

// ---- projector storages ----
inline void save(Writer& w, const quant::None&, const quant::None::Storage& s) { save(w, s.matrix); }
inline void load(Reader& r, const quant::None&, quant::None::Storage& s, Shape want) {
  MatrixF m;
  load_matrix(r, m, want, "float32 basis");
  expect_finite(r, m.data(), static_cast<std::size_t>(m.size()), "float32 basis");
  s.matrix = std::move(m);
}
inline void save(Writer& w, const quant::BFloat16&, const quant::BFloat16::Storage& s) { save(w, s.matrix); }
inline void load(Reader& r, const quant::BFloat16&, quant::BFloat16::Storage& s, Shape want) {
  decltype(s.matrix) m;
  load_matrix(r, m, want, "bf16 basis");
  expect_finite(r, m.data(), static_cast<std::size_t>(m.size()), "bf16 basis");
  s.matrix = std::move(m);
}
template <int B>
void save_codes(Writer& w, const quant::GroupQuantized<B>& q) {
  save(w, q.shape());
  w.i64(q.group_size);
  w.array(q.codes.data(), q.codes.size());
  w.array(q.scales.data(), q.scales.size());
  w.array(q.zeros.data(), q.zeros.size());
}
// Codes, scales and zeros of min-max quantization. A value dequantizes to
// scale * (code - zero) with |code - zero| <= max_code, so a scale in
// (0, FLT_MAX / max_code] keeps every dequantized value finite; the zero point is
// a code, in [0, max_code]. Every code is valid.
template <int B>
void load_group_quantized(Reader& r, quant::GroupQuantized<B>& q, Shape want, Index want_group, const char* what) {
  using Q = quant::GroupQuantized<B>;
  const Shape s = load_shape(r);
  expect_shape(r, s, want, what);
  const std::int64_t g = r.i64();
  if (g != want_group) r.fail(std::string(what) + " has group size " + std::to_string(g) + ", expected " + std::to_string(want_group));
  const auto n_codes = static_cast<std::uint64_t>((s.size() + Q::per_byte - 1) / Q::per_byte);
  const auto n_groups = static_cast<std::uint64_t>(Q::groups_for(s.size(), g));
  r.expect_left(3 * 8 + n_codes + n_groups * (sizeof(float) + 1), what);
  Q tmp;
  tmp.resize(s, g);
  r.exactly(tmp.codes.data(), tmp.codes.size(), what);
  r.exactly(tmp.scales.data(), tmp.scales.size(), what);
  r.exactly(tmp.zeros.data(), tmp.zeros.size(), what);
  for (std::uint8_t z : tmp.zeros)
    if (z > Q::max_code) r.fail(std::string(what) + " has a zero point out of range");
  const float max_scale = std::numeric_limits<float>::max() / Q::max_code;
  for (float sc : tmp.scales)
    if (!(sc > 0.0f && sc <= max_scale))
      r.fail(std::string(what) + " has a scale outside (0, FLT_MAX / " + text(Q::max_code) + "]");
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
  const auto n_codes = static_cast<std::uint64_t>((sh.size() + 1) / 2);
  const auto n_blocks = static_cast<std::uint64_t>((sh.size() + block - 1) / block);
  r.expect_left(2 * 8 + n_codes + n_blocks * sizeof(float), "NF4 basis");
  quant::NF4::Storage tmp;
  tmp.shape_ = sh;
  tmp.block_size = block;
  tmp.codes.resize(static_cast<std::size_t>(n_codes));
  tmp.absmax.resize(static_cast<std::size_t>(n_blocks));
  r.exactly(tmp.codes.data(), tmp.codes.size(), "NF4 codes");
  r.exactly(tmp.absmax.data(), tmp.absmax.size(), "NF4 absmax");
  // Values are an NF4 level in [-1, 1] times the absmax: finite if it is.
  expect_finite_nonnegative(r, tmp.absmax.data(), tmp.absmax.size(), "NF4 absmax");
  s = std::move(tmp);
}

// ---- schedule states ----
inline void save(Writer&, const schedule::FixedGap&, const schedule::FixedGap::State&) {}
inline void load(Reader&, const schedule::FixedGap&, schedule::FixedGap::State&, Index) {}
inline void save(Writer& w, const schedule::Lazy&, const schedule::Lazy::State& s) {
  w.i64(s.gap);
  w.array(s.queue.data(), s.queue.size());
  w.array(s.past.data(), s.past.size());
  w.f32(s.last_cosine);
}
// The gap grows to int64(gap * gamma) when the queue's mean reaches the
// threshold, so a loaded gap must satisfy gap * gamma <= 2^62: the growth then
// stays in range. Cosines are in [-1, 1]; the last one is NaN before the second
// refresh.
inline void load(Reader& r, const schedule::Lazy& policy, schedule::Lazy::State& s, Index vector_length) {
  schedule::Lazy::State tmp = policy.init();
  tmp.gap = r.i64();
  // floor(2^62 / gamma) in integers (gamma >= 1: init() checked it), so that the
  // comparison is exact.
  const auto max_gap = static_cast<std::int64_t>(std::floor(static_cast<double>(kMaxCounter) / policy.gamma));
  if (tmp.gap < 1 || tmp.gap > max_gap)
    r.fail("lazy schedule gap " + std::to_string(tmp.gap) + " is outside [1, 2^62 / gamma]");
  const std::uint64_t n_queue = r.count(sizeof(float), "cosine queue");
  if (n_queue > static_cast<std::uint64_t>(policy.queue_size)) r.fail("cosine queue longer than its size");
  tmp.queue.resize(static_cast<std::size_t>(n_queue));
  for (float& c : tmp.queue) {
    c = r.f32();
    if (!(c >= -1.0f && c <= 1.0f)) r.fail("a cosine in the queue is outside [-1, 1]");
  }
  const std::uint64_t n_past = r.count(sizeof(float), "previous singular vector");
  if (n_past != 0 && n_past != static_cast<std::uint64_t>(vector_length))
    r.fail("previous singular vector has " + std::to_string(n_past) + " elements, expected " +
           std::to_string(vector_length));
  tmp.past.resize(static_cast<std::size_t>(n_past));
  for (float& x : tmp.past) x = r.f32();
  expect_finite(r, tmp.past.data(), tmp.past.size(), "previous singular vector");
  tmp.last_cosine = r.f32();
  if (!(std::isnan(tmp.last_cosine) || (tmp.last_cosine >= -1.0f && tmp.last_cosine <= 1.0f)))
    r.fail("the last cosine is outside [-1, 1]");
  s = std::move(tmp);
}
inline void save(Writer& w, const schedule::Drift&, const schedule::Drift::State& s) {
  w.i64(s.last_refresh);
  w.f64(s.baseline);
  w.f64(s.last_captured);
}
// Captured fractions are |R|^2 / |G|^2: >= 0 (+inf when |R|^2 overflows a
// float), NaN before the first measurement.
inline void load(Reader& r, const schedule::Drift&, schedule::Drift::State& s, Index) {
  schedule::Drift::State tmp;
  tmp.last_refresh = counter(r, "drift schedule refresh step");
  tmp.baseline = r.f64();
  tmp.last_captured = r.f64();
  for (double c : {tmp.baseline, tmp.last_captured})
    if (!(std::isnan(c) || c >= 0.0)) r.fail("a drift measurement is negative");
  s = tmp;
}

// Checks of a schedule state against the projector's SVD count. A schedule sees
// every refresh (on_refresh), so its state follows from how many there were.
template <class Policy, class State>
void check_schedule_state(Reader&, const Policy&, const State&, std::int64_t) {}
// The lazy schedule keeps the first singular vector of the latest refresh, and
// appends one cosine per refresh after the first.
inline void check_schedule_state(Reader& r, const schedule::Lazy&, const schedule::Lazy::State& s,
                                 std::int64_t svd_count) {
  if ((s.past.size() > 0) != (svd_count > 0))
    r.fail("the lazy schedule's previous singular vector disagrees with the SVD count");
  if (static_cast<std::int64_t>(s.queue.size()) > std::max<std::int64_t>(svd_count - 1, 0))
    r.fail("the cosine queue holds more values than there were refreshes after the first");
}

// ---- Adam moments ----
template <class T>
void save(Writer& w, const state::Dense<T>&, const typename state::Dense<T>::Moments& m) {
  save(w, m.shape());
  w.array(m.m.data(), static_cast<std::size_t>(m.m.size()));
  w.array(m.v.data(), static_cast<std::size_t>(m.v.size()));
}
// First moments finite, second moments finite and >= 0.
template <class T>
void load(Reader& r, const state::Dense<T>& policy, typename state::Dense<T>::Moments& out, Shape want) {
  const Shape s = load_shape(r);
  expect_shape(r, s, want, "moments");
  const auto n = static_cast<std::uint64_t>(s.size());
  r.expect_left(2 * (8 + n * sizeof(T)), "moments");
  auto tmp = policy.init(s);
  r.exactly(tmp.m.data(), n, "first moment");
  r.exactly(tmp.v.data(), n, "second moment");
  expect_finite(r, tmp.m.data(), static_cast<std::size_t>(n), "first moment");
  expect_finite_nonnegative(r, tmp.v.data(), static_cast<std::size_t>(n), "second moment");
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
  if (r.i64() != policy.block_size) r.fail("8-bit moments have another block size");
  const bool quantized = s.size() >= policy.min_8bit_size;
  if (r.boolean() != quantized) r.fail("8-bit moments disagree on the 8-bit / float32 path");
  const auto n = static_cast<std::uint64_t>(s.size());
  const auto blocks = static_cast<std::uint64_t>((s.size() + policy.block_size - 1) / policy.block_size);
  r.expect_left(quantized ? 4 * 8 + 2 * n + 2 * blocks * sizeof(float) : 2 * (8 + n * sizeof(float)), "8-bit moments");
  auto tmp = policy.init(s);
  if (tmp.quantized) {
    // Codes index the 256-entry dynamic maps (every code is valid); a block's
    // values are its code's map value times the block's absmax.
    r.exactly(tmp.m_code.data(), tmp.m_code.size(), "first-moment codes");
    r.exactly(tmp.v_code.data(), tmp.v_code.size(), "second-moment codes");
    r.exactly(tmp.m_absmax.data(), tmp.m_absmax.size(), "first-moment absmax");
    r.exactly(tmp.v_absmax.data(), tmp.v_absmax.size(), "second-moment absmax");
    expect_finite_nonnegative(r, tmp.m_absmax.data(), tmp.m_absmax.size(), "first-moment absmax");
    expect_finite_nonnegative(r, tmp.v_absmax.data(), tmp.v_absmax.size(), "second-moment absmax");
  } else {
    r.exactly(tmp.m32.data(), tmp.m32.size(), "first moment");
    r.exactly(tmp.v32.data(), tmp.v32.size(), "second moment");
    expect_finite(r, tmp.m32.data(), tmp.m32.size(), "first moment");
    expect_finite_nonnegative(r, tmp.v32.data(), tmp.v32.size(), "second moment");
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
