// galore: the fixed refresh schedule of galore_torch (refresh when step % gap == 0).
//
// A schedule policy holds hyperparameters; its per-layer State is built by init():
//
//   State init() const;                                   // validates the hyperparameters
//   bool due(const State&, std::int64_t step) const;      // refresh before this step?
//   void on_refresh(State&, std::int64_t step, Span<const float> first_singular_vector) const;
//   std::int64_t current_gap(const State&) const;
//
// The projector always refreshes when it has no basis yet, whatever due() says.
// Schedules hold host-side bookkeeping only, so both backends share them: the
// CUDA facade hands on_refresh() a host copy of the first singular vector.
// A schedule that watches drift (schedule/drift.hpp) also provides
//   bool wants_measurement(const State&, std::int64_t step, bool just_refreshed) const;
//   bool on_measurement(State&, std::int64_t step, double captured, bool just_refreshed) const;
// and is shown, after each projection it asks for, the fraction of the
// gradient's energy the basis captured; returning true asks for a refresh now.
#pragma once

#include <cstdint>

#include "../config.hpp"
#include "../core/span.hpp"

namespace galore::schedule {

struct FixedGap {
  std::int64_t gap = 200;  // update_proj_gap

  struct State {};

  State init() const {
    detail::require(gap >= 1, "update gap must be at least 1 (got ", gap, ")");
    return {};
  }
  bool due(const State&, std::int64_t step) const { return step % gap == 0; }
  void on_refresh(State&, std::int64_t, Span<const float>) const {}
  std::int64_t current_gap(const State&) const { return gap; }
};

}  // namespace galore::schedule
