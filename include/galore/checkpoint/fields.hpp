// galore: how the fields of a checkpoint are written and read on plain host
// memory: counters, shapes, matrices and dense Adam moments as arrays of float32
// or bf16, and the schedules' states.
//
// Backend-free: the CPU facade (serialize.hpp, over its Eigen storage) and the
// CUDA facade (backend/cuda/checkpoint.cuh, over host copies of device memory)
// write and read these fields with the same code, so their bytes agree.
//
// Every read validates what it reads against what the loading optimizer expects
// (shapes, sizes, ranges), so that a payload with a valid checksum but
// inconsistent contents is an error, never a crash or a silently wrong state.
// A checksum detects damage, not a hostile or buggy writer: every count is
// checked against the bytes left before anything is allocated for it, and every
// value against the range the library works in (docs/checkpoint.md lists them).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/shape.hpp"
#include "../optim/blockwise8bit_state.hpp"
#include "../quant/group_quantized.hpp"
#include "../quant/nf4_codes.hpp"
#include "../schedule/drift.hpp"
#include "../schedule/fixed_gap.hpp"
#include "../schedule/lazy.hpp"
#include "format.hpp"

namespace galore::checkpoint {

// An element's value: a float32, or a bfloat16 given as any 2-byte type holding
// its bits (Eigen::bfloat16, __nv_bfloat16, std::uint16_t), widened exactly.
template <class T>
float element_value(const T& x) {
  static_assert(std::is_same_v<T, float> || sizeof(T) == 2, "checkpoint arrays hold float32 or bf16 values");
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    std::uint16_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &wide, sizeof f);
    return f;
  }
}

// ---- value checks ----
// Fails unless every value is finite.
template <class T>
void expect_finite(Reader& r, const T* p, std::size_t n, const char* what) {
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(element_value(p[i]))) r.fail(std::string(what) + " holds a NaN or an infinity");
}
// Fails unless every value is finite and >= 0.
template <class T>
void expect_finite_nonnegative(Reader& r, const T* p, std::size_t n, const char* what) {
  for (std::size_t i = 0; i < n; ++i) {
    const float v = element_value(p[i]);
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

// ---- shapes ----
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

// ---- matrices (row-major) ----
template <class T>
void save_matrix(Writer& w, Shape s, const T* data) {
  save(w, s);
  w.array(data, static_cast<std::size_t>(s.size()));
}
// Reads a matrix's shape, which must be `want`, and checks that all its elements
// are in the payload; returns their count n. The caller then allocates n
// elements and reads them with r.exactly(out, n, what), so nothing is allocated
// for elements the input does not hold.
template <class T>
std::uint64_t expect_matrix(Reader& r, Shape want, const char* what) {
  const Shape s = load_shape(r);
  expect_shape(r, s, want, what);
  const auto n = static_cast<std::uint64_t>(s.size());
  r.expect_array(n, sizeof(T), what);
  return n;
}

// ---- the trainer's weights (WeightSet; cuda::DeviceWeightSet) ----
// Each entry: u64 layer | u8 kind | the weight (a matrix, or an INT8 weight's codes).
enum class WeightKind : std::uint8_t { Float32 = 1, BFloat16 = 2, Int8 = 3 };
inline const char* to_string(WeightKind k) {
  switch (k) {
    case WeightKind::Float32: return "float32";
    case WeightKind::BFloat16: return "bf16";
    case WeightKind::Int8: return "INT8";
  }
  return "unknown";
}
inline void save_weight_entry(Writer& w, std::size_t layer, WeightKind kind) {
  w.u64(layer);
  w.u8(static_cast<std::uint8_t>(kind));
}
// Reads weight k's layer and kind, which must be those the caller passed to load into.
inline void expect_weight_entry(Reader& r, std::uint64_t k, std::size_t layer, WeightKind kind) {
  const std::uint64_t got_layer = r.u64();
  const std::uint8_t got_kind = r.u8();
  if (got_layer != layer || got_kind != static_cast<std::uint8_t>(kind))
    r.fail("weight " + std::to_string(k) + " is layer " + std::to_string(got_layer) + " of kind " +
           std::to_string(got_kind) + ", but layer " + std::to_string(layer) + " of kind " +
           std::to_string(static_cast<int>(kind)) + " (" + to_string(kind) + ") was passed");
}

// ---- dense Adam moments (state::Dense<T>: float32 or bf16) ----
template <class T>
void save_dense_moments(Writer& w, Shape s, const T* m, const T* v) {
  save(w, s);
  w.array(m, static_cast<std::size_t>(s.size()));
  w.array(v, static_cast<std::size_t>(s.size()));
}
// Reads the shape, which must be `want`, and checks that both moments are in the
// payload; returns the element count n of each. read_dense_moments then fills
// the caller's two arrays of n elements.
template <class T>
std::uint64_t expect_dense_moments(Reader& r, Shape want) {
  const Shape s = load_shape(r);
  expect_shape(r, s, want, "moments");
  const auto n = static_cast<std::uint64_t>(s.size());
  r.expect_left(2 * (8 + n * sizeof(T)), "moments");
  return n;
}
// First moments finite, second moments finite and >= 0.
template <class T>
void read_dense_moments(Reader& r, T* m, T* v, std::uint64_t n) {
  r.exactly(m, n, "first moment");
  r.exactly(v, n, "second moment");
  expect_finite(r, m, static_cast<std::size_t>(n), "first moment");
  expect_finite_nonnegative(r, v, static_cast<std::size_t>(n), "second moment");
}

// ---- 8-bit Adam moments ----
// bitsandbytes' 8-bit blockwise moments (state::Blockwise8bit).
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

// ---- group-wise min-max codes (quantized bases and INT8 weights) ----
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
  if (g != want_group)
    r.fail(std::string(what) + " has group size " + std::to_string(g) + ", expected " + std::to_string(want_group));
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
      r.fail(std::string(what) + " has a scale outside (0, FLT_MAX / " +
             std::to_string(static_cast<int>(Q::max_code)) + "]");
  q = std::move(tmp);
}

// NF4 codes (quant::NF4's storage): two per byte, an absmax per block.
inline void save_nf4(Writer& w, const quant::NF4Codes& s) {
  save(w, s.shape());
  w.i64(s.block_size);
  w.array(s.codes.data(), s.codes.size());
  w.array(s.absmax.data(), s.absmax.size());
}
// Every code is valid; values are an NF4 level in [-1, 1] times the absmax:
// finite if it is.
inline void load_nf4(Reader& r, quant::NF4Codes& out, Shape want, Index want_block) {
  const Shape sh = load_shape(r);
  expect_shape(r, sh, want, "NF4 basis");
  const std::int64_t block = r.i64();
  if (block != want_block) r.fail("NF4 basis has block size " + std::to_string(block));
  const auto n_codes = static_cast<std::uint64_t>((sh.size() + 1) / 2);
  const auto n_blocks = static_cast<std::uint64_t>((sh.size() + block - 1) / block);
  r.expect_left(2 * 8 + n_codes + n_blocks * sizeof(float), "NF4 basis");
  quant::NF4Codes tmp;
  tmp.resize(sh, block);
  r.exactly(tmp.codes.data(), tmp.codes.size(), "NF4 codes");
  r.exactly(tmp.absmax.data(), tmp.absmax.size(), "NF4 absmax");
  expect_finite_nonnegative(r, tmp.absmax.data(), tmp.absmax.size(), "NF4 absmax");
  out = std::move(tmp);
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

}  // namespace galore::checkpoint
