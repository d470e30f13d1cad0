// galore: how the CPU facade's state is written to and read from a checkpoint
// payload: projector storages, Adam moments and weights in their Eigen storage,
// and the descriptions of the policies that hold it. The backend-free fields
// (counters, shapes, arrays, schedule states) are in fields.hpp, the other
// policy descriptions in describe.hpp; the functions here call them.
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
#include <string>
#include <type_traits>
#include <utility>

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
#include "describe.hpp"
#include "fields.hpp"
#include "format.hpp"

namespace galore::checkpoint {

// ---- descriptions of the policies that hold Eigen storage ----
inline void describe(const quant::None&, Items& out, const std::string& p) {
  describe(described::QuantNone{}, out, p);
}
inline void describe(const quant::BFloat16&, Items& out, const std::string& p) { out.push_back({p, "bfloat16"}); }
template <int B>
void describe(const quant::MinMax<B>& q, Items& out, const std::string& p) {
  describe(described::MinMax{B, q.group_size}, out, p);
}
inline void describe(const quant::NF4& q, Items& out, const std::string& p) {
  describe(described::NF4{q.block_size}, out, p);
}
template <class T>
void describe(const state::Dense<T>&, Items& out, const std::string& p) {
  describe(described::DenseState{!std::is_same_v<T, float>}, out, p);
}
template <int B>
void describe(const StochasticRounder<B>& r, Items& out, const std::string& p) {
  describe(described::Rounder{B, r.seed(), r.mode()}, out, p);
}

// ---- matrices ----
template <class T>
void save(Writer& w, const Matrix<T>& m) {
  save_matrix(w, shape_of(m), m.data());
}
template <class T>
void load_matrix(Reader& r, Matrix<T>& m, Shape want, const char* what) {
  const std::uint64_t n = expect_matrix<T>(r, want, what);
  Matrix<T> tmp(want.rows, want.cols);
  r.exactly(tmp.data(), n, what);
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
void save(Writer& w, const quant::MinMax<B>&, const quant::GroupQuantized<B>& q) {
  save_codes(w, q);
}
template <int B>
void load(Reader& r, const quant::MinMax<B>& policy, quant::GroupQuantized<B>& q, Shape want) {
  load_group_quantized(r, q, want, quant::resolve_group_size(policy.group_size, want), "quantized basis");
}
inline void save(Writer& w, const quant::NF4&, const quant::NF4::Storage& s) { save_nf4(w, s); }
inline void load(Reader& r, const quant::NF4& policy, quant::NF4::Storage& s, Shape want) {
  load_nf4(r, s, want, policy.block_size);
}

// ---- Adam moments ----
template <class T>
void save(Writer& w, const state::Dense<T>&, const typename state::Dense<T>::Moments& m) {
  save_dense_moments(w, m.shape(), m.m.data(), m.v.data());
}
template <class T>
void load(Reader& r, const state::Dense<T>& policy, typename state::Dense<T>::Moments& out, Shape want) {
  const std::uint64_t n = expect_dense_moments<T>(r, want);
  auto tmp = policy.init(want);
  read_dense_moments(r, tmp.m.data(), tmp.v.data(), n);
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
