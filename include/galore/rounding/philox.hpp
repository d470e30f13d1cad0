// galore: the Philox4x32-10 counter-based generator (Salmon et al., SC'11).
//
// A pure function of (counter, key): the random numbers of element i at step t
// of layer l are the same whatever order, thread or device computes them.
#pragma once

#include <cstdint>

#include "../config.hpp"

namespace galore {

struct Philox4x32 {
  std::uint32_t v[4];
};

namespace detail {
GALORE_HOST_DEVICE void philox_mulhilo(std::uint32_t a, std::uint32_t b, std::uint32_t& hi,
                                       std::uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  // The device's high multiply: the 64-bit product compiles to an extra add
  // after each multiply there (a sixth of the stochastic-rounding kernel's work).
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(p >> 32);
  lo = static_cast<std::uint32_t>(p);
#endif
}
}  // namespace detail

// Ten rounds of Philox4x32 on counter c with key (k0, k1).
GALORE_HOST_DEVICE Philox4x32 philox4x32_10(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2,
                                            std::uint32_t c3, std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr std::uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0, lo0, hi1, lo1;
    detail::philox_mulhilo(M0, c0, hi0, lo0);
    detail::philox_mulhilo(M1, c2, hi1, lo1);
    const std::uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  return {{c0, c1, c2, c3}};
}

// A uniform float in [0, 1) from the top 24 bits of x: every value is exact.
GALORE_HOST_DEVICE float uniform_from_bits(std::uint32_t x) {
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
}

}  // namespace galore
