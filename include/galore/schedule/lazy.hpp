// galore: Q-GaLore's lazy layer-adaptive refresh schedule (DESIGN.md 2.3).
//
// At each refresh after the first, the cosine similarity between the new and the
// previous first singular vector (both unquantized) joins a queue of the last
// `queue_size` values. When the queue is full and its mean is at least
// `cos_threshold`, the gap grows: gap = int(gap * gamma). The queue is kept after
// a growth. A refresh happens when step % gap == 0, with the gap in force then.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../types.hpp"

namespace galore::schedule {

struct Lazy {
  std::int64_t gap = 200;      // initial update_proj_gap
  double cos_threshold = 0.4;
  double gamma = 2.0;          // gamma_proj
  int queue_size = 5;

  struct State {
    std::int64_t gap = 0;
    std::vector<float> queue;  // oldest first, at most queue_size values
    VectorF past;              // previous first singular vector (empty before the first refresh)
    float last_cosine = NAN;   // the value appended at the latest refresh (NaN if none)
  };

  State init() const {
    detail::require(gap >= 1, "update gap must be at least 1 (got ", gap, ")");
    detail::require(queue_size >= 1, "the cosine queue needs at least one slot (got ", queue_size, ")");
    detail::require(std::isfinite(gamma) && gamma >= 1.0, "gamma must be >= 1 so the gap never shrinks (got ",
                    gamma, ")");
    detail::require(std::isfinite(cos_threshold), "cos_threshold must be finite");
    State s;
    s.gap = gap;
    s.queue.reserve(static_cast<std::size_t>(queue_size));
    return s;
  }

  bool due(const State& s, std::int64_t step) const { return step % s.gap == 0; }

  void on_refresh(State& s, std::int64_t /*step*/, const VectorF& first) const {
    s.last_cosine = NAN;
    if (s.past.size() == first.size() && s.past.size() > 0) {
      s.last_cosine = cosine(s.past, first);
      if (static_cast<int>(s.queue.size()) == queue_size) s.queue.erase(s.queue.begin());
      s.queue.push_back(s.last_cosine);
      if (static_cast<int>(s.queue.size()) == queue_size) {
        double sum = 0.0;
        for (float c : s.queue) sum += c;
        if (sum / queue_size >= cos_threshold)
          s.gap = static_cast<std::int64_t>(static_cast<double>(s.gap) * gamma);
      }
    }
    s.past = first;
  }

  std::int64_t current_gap(const State& s) const { return s.gap; }

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
  static float cosine(const VectorF& a, const VectorF& b) {
    double dot = 0.0, na = 0.0, nb = 0.0;
    for (Index i = 0; i < a.size(); ++i) {
      dot += double(a(i)) * b(i);
      na += double(a(i)) * a(i);
      nb += double(b(i)) * b(i);
    }
    const double denom = std::sqrt(na) * std::sqrt(nb);
    return static_cast<float>(dot / std::max(denom, 1e-8));
  }
};

}  // namespace galore::schedule
