// galore: what a per-layer step reports, and the handles of registered layers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "../core/shape.hpp"

namespace galore {

enum class StepStatus : std::uint8_t {
  Applied,           // the weight and the state were updated
  // Weight and state are untouched: G held NaN or Inf, the projected gradient (G
  // on dense layers) held an element beyond +-AdamConfig::max_input, whose square
  // could overflow float32, or a due refresh could not compute a finite basis.
  SkippedNonFinite,
};

struct StepResult {
  StepStatus status = StepStatus::Applied;
  bool refreshed = false;  // the projector recomputed its basis during this step (never on a skipped step)
  bool applied() const { return status == StepStatus::Applied; }
};

// A registered layer of an optimizer facade (returned by add_layer / add_dense).
struct LayerId {
  std::size_t index = 0;
  friend bool operator==(LayerId a, LayerId b) { return a.index == b.index; }
  friend bool operator!=(LayerId a, LayerId b) { return a.index != b.index; }
};

struct LayerStats {
  std::string name;
  Shape shape;
  bool projected = false;
  std::int64_t steps = 0;          // applied steps (Adam's t)
  std::int64_t skipped_steps = 0;  // steps skipped (StepStatus::SkippedNonFinite)
  std::int64_t svd_count = 0;      // basis refreshes (projected layers)
  std::int64_t update_gap = 0;     // the refresh gap in force (projected layers)
  std::size_t state_bytes = 0;     // moments + projector
};

}  // namespace galore
