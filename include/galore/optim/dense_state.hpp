// galore: Adam moments stored densely in float32 or bfloat16 (math in float32).
//
// A state policy owns how Adam's moments are stored and how one Adam step runs on
// them. Its interface (used by LowRankAdam):
//
//   struct Moments { std::size_t bytes() const; Shape shape() const; ... };
//   Moments init(Shape) const;                   // zero moments
//   std::size_t bytes_for(Shape) const;          // what init() allocates
//   template <class Sink>
//   void update(Moments&, const float* g, std::int64_t t, const AdamConfig&, Sink&& sink) const;
//
// update() advances the moments with the gradient g (flat, row-major, t 1-based)
// and hands the descent step d in chunks to sink(offset, d, length); the caller
// applies W -= d (after back-projection). Chunks keep d in cache, so a dense
// (full-rank) update needs no temporary of W's size. With OpenMP, large updates
// call the sink from several threads at once, always for disjoint ranges.
//
// Range: every element of g must satisfy |g| <= AdamConfig::max_input (callers
// check it: LowRankAdam::update, galore_step, adamw_step); then m and v stay
// finite (|m| <= max |g|, v <= max g^2, up to rounding), and every element of d is
// clamped to +-AdamConfig::max_update, so d is finite for any valid AdamConfig.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../detail/elementwise.hpp"
#include "../policies.hpp"
#include "../types.hpp"
#include "adam_config.hpp"

namespace galore::state {

// Elements per chunk handed to a sink; small enough for stack arrays.
inline constexpr Index kChunk = 1024;
using ChunkArray = Eigen::Array<float, Eigen::Dynamic, 1, 0, kChunk, 1>;

// galore_torch's AdamW: m/(sqrt(v) + eps), step size lr*sqrt(1-b2^t)/(1-b1^t).
// Element for element the same bits as math::adam_element (the CUDA backend's
// formula), vectorized with Eigen.
template <class T>
struct Dense {
  static_assert(is_supported_scalar_v<T>, "state::Dense stores float or bfloat16 moments");

  struct Moments {
    Eigen::Array<T, Eigen::Dynamic, 1> m, v;
    Shape shape_;
    Shape shape() const { return shape_; }
    std::size_t bytes() const { return 2 * sizeof(T) * static_cast<std::size_t>(m.size()); }
  };

  Moments init(Shape s) const {
    Moments mo;
    mo.shape_ = s;
    mo.m = Eigen::Array<T, Eigen::Dynamic, 1>::Zero(s.size());
    mo.v = Eigen::Array<T, Eigen::Dynamic, 1>::Zero(s.size());
    return mo;
  }

  std::size_t bytes_for(Shape s) const { return 2 * sizeof(T) * static_cast<std::size_t>(s.size()); }

  template <class Sink>
  void update(Moments& mo, const float* g, std::int64_t t, const AdamConfig& c, Sink&& sink) const {
    const float b1 = static_cast<float>(c.beta1), b2 = static_cast<float>(c.beta2);
    const float a1 = static_cast<float>(1.0 - c.beta1), a2 = static_cast<float>(1.0 - c.beta2);
    const float eps = static_cast<float>(c.eps);
    const float step = c.step_size_float(t);
    const float cap = AdamConfig::max_update;
    const Index n = mo.m.size();
    const Index chunks = (n + kChunk - 1) / kChunk;
    // Chunks are independent: with OpenMP they are spread over threads (the sink
    // receives disjoint ranges).
GALORE_OMP(omp parallel for schedule(static) if (n >= (Index{1} << 16)))
    for (Index c = 0; c < chunks; ++c) {
      const Index off = c * kChunk;
      const Index len = std::min(kChunk, n - off);
      const Eigen::Map<const Eigen::ArrayXf> ga(g + off, len);
      auto m = mo.m.segment(off, len);
      auto v = mo.v.segment(off, len);
      const ChunkArray mf = b1 * m.template cast<float>() + a1 * ga;
      const ChunkArray vf = b2 * v.template cast<float>() + a2 * ga.square();
      ChunkArray root(len);
      galore::detail::sqrt_exact(vf.data(), root.data(), len);  // not vf.sqrt(): see sqrt_exact
      const ChunkArray d = (step * mf / (root + eps)).max(-cap).min(cap);
      m = mf.template cast<T>();
      v = vf.template cast<T>();
      sink(off, d.data(), len);
    }
  }
};

// state::Float32 and state::BFloat16 name Dense<float> and Dense<bfloat16> (policies.hpp).

}  // namespace galore::state
