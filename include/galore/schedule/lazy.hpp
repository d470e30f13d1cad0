// galore: Q-GaLore's lazy layer-adaptive refresh schedule (q_galore_torch's
// GaLoreProjector with its cosine queue).
//
// At each refresh after the first, the cosine similarity between the new and the
// previous first singular vector (both unquantized) joins a queue of the last
// `queue_size` values. When the queue is full and its mean is at least
// `cos_threshold`, the gap grows: gap = int(gap * gamma), saturating at the largest
// int64 (the reference's Python int never overflows; an int64 must not). The queue
// is kept after a growth. A refresh happens when step % gap == 0, with the gap in
// force then.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "../config.hpp"
#include "../core/span.hpp"

namespace galore::schedule {

struct Lazy {
  std::int64_t gap = 200;      // initial update_proj_gap
  double cos_threshold = 0.4;
  double gamma = 2.0;          // gamma_proj
  int queue_size = 5;

  struct State {
    std::int64_t gap = 0;
    std::vector<float> queue;  // oldest first, at most queue_size values
    std::vector<float> past;   // previous first singular vector (empty before the first refresh)
    float last_cosine = NAN;   // the value appended at the latest refresh (NaN if none)
  };

  State init() const {
    detail::require(gap >= 1, "update gap must be at least 1 (got ", gap, ")");
    detail::require(queue_size >= 1, "the cosine queue needs at least one slot (got ", queue_size, ")");
    detail::require(std::isfinite(gamma) && gamma >= 1.0, "gamma must be >= 1 so the gap never shrinks (got ",
                    gamma, ")");
    detail::require(cos_threshold >= -1.0 && cos_threshold <= 1.0,
                    "cos_threshold must be in [-1, 1], the range of a mean cosine (got ", cos_threshold,
                    "); gamma = 1 keeps the gap fixed");
    State s;
    s.gap = gap;
    s.queue.reserve(static_cast<std::size_t>(queue_size));
    return s;
  }

  bool due(const State& s, std::int64_t step) const { return step % s.gap == 0; }

  void on_refresh(State& s, std::int64_t /*step*/, Span<const float> first) const {
    // A copied State (the projector advances a copy, then moves it in) has lost
    // the capacity init() reserved; state_bytes() counts it.
    s.queue.reserve(static_cast<std::size_t>(queue_size));
    s.last_cosine = NAN;
    if (static_cast<Index>(s.past.size()) == first.size() && !s.past.empty()) {
      s.last_cosine = cosine(s.past, first);
      if (static_cast<int>(s.queue.size()) == queue_size) s.queue.erase(s.queue.begin());
      s.queue.push_back(s.last_cosine);
      if (static_cast<int>(s.queue.size()) == queue_size) {
        double sum = 0.0;
        for (float c : s.queue) sum += c;
        if (sum / queue_size >= cos_threshold) s.gap = grown(s.gap, gamma);
      }
    }
    s.past.assign(first.begin(), first.end());
  }

  std::int64_t current_gap(const State& s) const { return s.gap; }

  // int(gap * gamma) as the reference computes it (a double product, truncated),
  // or the largest int64 when that does not fit.
  static std::int64_t grown(std::int64_t gap, double gamma) {
    const double g = static_cast<double>(gap) * gamma;
    constexpr double limit = 9223372036854775808.0;  // 2^63: the first double beyond int64
    return g < limit ? static_cast<std::int64_t>(g) : std::numeric_limits<std::int64_t>::max();
  }

  // Bytes held: the previous first singular vector and the cosine queue.
  std::size_t state_bytes(const State& s) const {
    return sizeof(float) * (static_cast<std::size_t>(s.past.size()) + s.queue.capacity());
  }
  // The same once a first singular vector of `length` elements is held.
  std::size_t state_bytes_for(Index length) const {
    return sizeof(float) * static_cast<std::size_t>(length + queue_size);
  }

  // Signed cosine similarity, accumulated in double and rounded to float as
  // torch's float32 result.
  static float cosine(Span<const float> a, Span<const float> b) {
    double dot = 0.0, na = 0.0, nb = 0.0;
    for (Index i = 0; i < a.size(); ++i) {
      dot += double(a[i]) * b[i];
      na += double(a[i]) * a[i];
      nb += double(b[i]) * b[i];
    }
    const double denom = std::sqrt(na) * std::sqrt(nb);
    return static_cast<float>(dot / std::max(denom, 1e-8));
  }
};

}  // namespace galore::schedule
