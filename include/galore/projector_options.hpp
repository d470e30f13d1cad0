// galore: the options of one layer's projection (rank, type, scale), shared by
// every backend.
#pragma once

#include "core/shape.hpp"
#include "projection_type.hpp"

namespace galore {

struct ProjectorOptions {
  Index rank = 128;
  ProjectionType type = ProjectionType::Std;
  float scale = 0.25f;  // alpha: the back-projection is multiplied by it
};

}  // namespace galore
