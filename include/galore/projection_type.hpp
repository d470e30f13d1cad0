// galore: the five projection types of galore_torch and the side each one picks.
#pragma once

#include <string>
#include <string_view>

#include "config.hpp"
#include "core/shape.hpp"

namespace galore {

// How a gradient G (m x n) is projected at rank r (galore_torch's proj_type).
enum class ProjectionType {
  Std,         // m >= n: right (R = G P^T, P r x n); otherwise left (R = P^T G, P m x r)
  ReverseStd,  // the opposite choice of Std
  Left,        // always left
  Right,       // always right
  Full,        // both: R = P^T G Q^T (r x r)
};

// Which singular vectors a projector keeps.
enum class Side {
  Left,   // P = U[:, :r], m x r
  Right,  // P = Vh[:r, :], r x n
  Both,   // P = U[:, :r] and Q = Vh[:r, :]
};

inline const char* to_string(ProjectionType t) {
  switch (t) {
    case ProjectionType::Std: return "std";
    case ProjectionType::ReverseStd: return "reverse_std";
    case ProjectionType::Left: return "left";
    case ProjectionType::Right: return "right";
    case ProjectionType::Full: return "full";
  }
  return "invalid";
}

inline const char* to_string(Side s) {
  switch (s) {
    case Side::Left: return "left";
    case Side::Right: return "right";
    case Side::Both: return "both";
  }
  return "invalid";
}

// Parses the reference's spelling ("std", "reverse_std", "left", "right", "full").
inline ProjectionType parse_projection_type(std::string_view name) {
  for (auto t : {ProjectionType::Std, ProjectionType::ReverseStd, ProjectionType::Left,
                 ProjectionType::Right, ProjectionType::Full})
    if (name == to_string(t)) return t;
  throw invalid_argument(detail::concat("galore: unknown projection type '", name,
                                        "'; expected one of std, reverse_std, left, right, full"));
}

inline Side resolve_side(ProjectionType type, Index rows, Index cols) {
  switch (type) {
    case ProjectionType::Std: return rows >= cols ? Side::Right : Side::Left;
    case ProjectionType::ReverseStd: return rows >= cols ? Side::Left : Side::Right;
    case ProjectionType::Left: return Side::Left;
    case ProjectionType::Right: return Side::Right;
    case ProjectionType::Full: return Side::Both;
  }
  throw invalid_argument(detail::concat("galore: unknown projection type value ",
                                        static_cast<int>(type),
                                        "; use one of the ProjectionType enumerators"));
}

// Shape of the projected gradient R for a gradient of `shape` at `rank`.
inline Shape low_rank_shape(Side side, Shape shape, Index rank) {
  switch (side) {
    case Side::Left: return {rank, shape.cols};
    case Side::Right: return {shape.rows, rank};
    case Side::Both: return {rank, rank};
  }
  return {};
}

}  // namespace galore
