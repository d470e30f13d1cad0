// galore: refresh when the subspace has drifted, not on a fixed clock.
//
// The basis captures a fraction c = |R|^2 / |G|^2 of a gradient's energy (R the
// projected gradient; |G - P P^T G|^2 / |G|^2 = 1 - c for an orthonormal P).
// Every `check_every` steps, once `min_gap` steps have passed since a refresh,
// the projector measures c, which costs one read of G: R is computed anyway.
// The first measurement after a refresh is the baseline c0 (measured on a later
// gradient than the one the SVD saw, which the basis fits too well, noise
// included). When c < (1 - tolerance) * c0 the basis no longer fits the
// gradients and the projector refreshes at once; it also refreshes after
// `max_gap` steps whatever the measurements say.
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.hpp"
#include "../core/span.hpp"

namespace galore::schedule {

struct Drift {
  std::int64_t check_every = 10;
  double tolerance = 0.1;      // relative loss of captured energy that triggers a refresh
  std::int64_t min_gap = 10;   // no measurement sooner than this after a refresh
  std::int64_t max_gap = 1000; // refresh at least this often

  struct State {
    std::int64_t last_refresh = 0;
    double baseline = NAN;        // c0: the first measurement after the last refresh
    double last_captured = NAN;   // the latest measurement
  };

  State init() const {
    detail::require(check_every >= 1, "check_every must be at least 1 (got ", check_every, ")");
    detail::require(min_gap >= 1 && max_gap >= min_gap, "need 1 <= min_gap <= max_gap (got ", min_gap, ", ",
                    max_gap, ")");
    detail::require(std::isfinite(tolerance) && tolerance > 0.0 && tolerance < 1.0,
                    "tolerance must be in (0, 1) (got ", tolerance, ")");
    return {};
  }

  bool due(const State& s, std::int64_t step) const { return step - s.last_refresh >= max_gap; }

  void on_refresh(State& s, std::int64_t step, Span<const float>) const {
    s.last_refresh = step;
    s.baseline = NAN;
  }

  bool wants_measurement(const State& s, std::int64_t step, bool just_refreshed) const {
    const std::int64_t since = step - s.last_refresh;
    return !just_refreshed && since >= min_gap && since % check_every == 0;
  }

  bool on_measurement(State& s, std::int64_t /*step*/, double captured, bool just_refreshed) const {
    s.last_captured = captured;
    if (just_refreshed || std::isnan(s.baseline)) {
      if (!just_refreshed) s.baseline = captured;
      return false;
    }
    return captured < (1.0 - tolerance) * s.baseline;
  }

  std::int64_t current_gap(const State&) const { return max_gap; }
  std::size_t state_bytes(const State&) const { return 0; }  // no heap state
  std::size_t state_bytes_for(Index) const { return 0; }
};

}  // namespace galore::schedule
