// galore: version, portability macros and the library's exception types.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#define GALORE_VERSION_MAJOR 0
#define GALORE_VERSION_MINOR 1
#define GALORE_VERSION_PATCH 0
#define GALORE_VERSION_STRING "0.1.0"

// Functions that the CUDA backend can also call from device code. Without nvcc
// this is plain `inline`, so CPU users never need the CUDA toolkit.
#if defined(__CUDACC__)
#define GALORE_HOST_DEVICE __host__ __device__ inline
#else
#define GALORE_HOST_DEVICE inline
#endif

// What this translation unit can use. The backend itself follows from the types a
// caller passes (Eigen matrices on the CPU, device views on the GPU); these macros
// only say what can be compiled here. The CUDA backend needs a translation unit
// that nvcc (or clang in CUDA mode) compiles, whatever the build options say.
#define GALORE_HAS_EIGEN_BACKEND 1
#if defined(__CUDACC__)
#define GALORE_HAS_CUDA_BACKEND 1
#else
#define GALORE_HAS_CUDA_BACKEND 0
#endif

// OpenMP worksharing in the library's kernels. Without -fopenmp it expands to
// nothing, so users who build without OpenMP and with -Wall -Werror see no
// "unknown pragma" warning and get the same (serial) results.
#if defined(_OPENMP)
#define GALORE_OMP(directive) _Pragma(#directive)
#else
#define GALORE_OMP(directive)
#endif

namespace galore {

struct Version {
  int major, minor, patch;
};
inline constexpr Version version{GALORE_VERSION_MAJOR, GALORE_VERSION_MINOR,
                                 GALORE_VERSION_PATCH};

// A precondition broken by the caller (bad shape, rank out of range, unknown
// option). The message says what to fix.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  return os.str();
}

// Throws galore::invalid_argument with the parts of the message joined, only
// when the condition fails (the message is not built on the happy path).
template <class... Parts>
void require(bool condition, Parts&&... parts) {
  if (!condition) throw invalid_argument(concat("galore: ", std::forward<Parts>(parts)...));
}

// Calls p.validate() when the policy has one (SVD, quantization, state and
// rounding policies may; schedules validate in init()).
template <class P, class = void>
struct has_validate : std::false_type {};
template <class P>
struct has_validate<P, std::void_t<decltype(std::declval<const P&>().validate())>> : std::true_type {};
template <class P>
void validate_policy(const P& p) {
  if constexpr (has_validate<P>::value) p.validate();
}

// Lets a static_assert in a primary template fire only when it is instantiated.
template <class...>
inline constexpr bool dependent_false = false;

}  // namespace detail
}  // namespace galore
