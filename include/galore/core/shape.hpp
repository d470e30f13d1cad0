// galore: Index and Shape, shared by every backend (no Eigen, no CUDA).
#pragma once

#include <cstddef>

#include "../config.hpp"

namespace galore {

// Eigen's default index type, so that Eigen sizes convert without a cast.
using Index = std::ptrdiff_t;

struct Shape {
  Index rows = 0;
  Index cols = 0;
  GALORE_HOST_DEVICE Index size() const { return rows * cols; }
  friend bool operator==(const Shape& a, const Shape& b) { return a.rows == b.rows && a.cols == b.cols; }
  friend bool operator!=(const Shape& a, const Shape& b) { return !(a == b); }
};

}  // namespace galore
