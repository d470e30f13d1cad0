// galore: system tags. A tag names where a matrix lives and so which backend's
// primitives operate on it, as the system of an iterator does in Thrust: the
// backend follows from the types a caller passes, never from a global switch.
#pragma once

#include <type_traits>

namespace galore::system {

struct eigen {};  // host memory, Eigen primitives (galore/galore.hpp)
struct cuda {};   // device memory, CUDA primitives (galore/cuda.hpp)

template <class S>
inline constexpr bool is_system_v = std::is_same_v<S, eigen> || std::is_same_v<S, cuda>;

template <class S>
inline const char* name() {
  static_assert(is_system_v<S>, "galore: not a system tag; use galore::system::eigen or galore::system::cuda");
  return std::is_same_v<S, eigen> ? "eigen" : "cuda";
}

}  // namespace galore::system
