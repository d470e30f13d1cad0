// galore: float products and sums rounded the same way on every backend.
//
// A compiler may contract a*b + c into one fused multiply-add (one rounding
// instead of two): nvcc does by default (--fmad=true), and g++ does whenever the
// target has FMA instructions (-mfma, -march=native) unless -ffp-contract=off.
// On the 8-bit Adam formula that changes 12% of results between nvcc and
// g++ -O3, and 33% between g++ -march=native and g++ -O3. Element-wise math
// that must give the same bits on the CPU and the GPU (the Adam element, the
// quantization codes, stochastic rounding) therefore writes every product that
// feeds a sum as mul(), and every such sum as add(): in device code these are
// __fmul_rn/__fadd_rn, which nvcc never contracts; in host code they are the
// plain operators, which the compiler cannot fuse when the target has no FMA
// (g++'s default x86-64 target). CPU builds that enable FMA must add
// -ffp-contract=off to keep the identity (docs/api.md says so); the
// tests check it (test_elementwise.cpp on the host, test_cuda_elementwise.cu
// against the GPU). Where a fused operation is meant, the code calls fmaf.
#pragma once

#include "../config.hpp"

namespace galore::math {

GALORE_HOST_DEVICE float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

GALORE_HOST_DEVICE float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

}  // namespace galore::math
