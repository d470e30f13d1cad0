// galore: the names of the policy bundles, declared without any backend.
//
// An optimizer is spelled the same on every system:
//   GaLoreOptimizer<Projector<SVDPolicy, QuantPolicy, SchedulePolicy>, LowRankAdam<StatePolicy>>
// Projector<...> and LowRankAdam<...> name the policies; each backend builds its
// own state from those names, as ensmallen's policies build theirs per matrix
// type: the CPU facade (galore/galore.hpp) instantiates the Eigen classes
// defined in projector.hpp and optim/low_rank_adam.hpp, and the CUDA facade
// (galore/cuda.hpp) reads the same names through ProjectorPolicies and
// AdamPolicies below and lays the moments and the basis out in device memory.
// The SVD and schedule policies hold hyperparameters only, so both backends
// take the same objects. This header includes no Eigen and no CUDA header.
#pragma once

#include "schedule/fixed_gap.hpp"
#include "svd/exact.hpp"

// Eigen's bfloat16 (Eigen/src/Core/arch/Default/BFloat16.h declares it the same
// way): the name of the 16-bit moment state, which a CUDA translation unit can
// spell without including Eigen.
namespace Eigen {
struct bfloat16;
}

namespace galore {

using bfloat16 = Eigen::bfloat16;

namespace quant {
struct None;  // quant/none.hpp
template <int Bits>
struct MinMax;  // quant/minmax.hpp: group-wise min-max codes
using Int4 = MinMax<4>;
using Int8 = MinMax<8>;
struct NF4;  // quant/nf4.hpp: QLoRA's 4-bit NormalFloat
}

namespace state {
template <class T>
struct Dense;          // optim/dense_state.hpp: moments stored densely in T
struct Blockwise8bit;  // optim/blockwise8bit_state.hpp: bitsandbytes' 8-bit blockwise moments
using Float32 = Dense<float>;
using BFloat16 = Dense<bfloat16>;
}  // namespace state

template <class SVDPolicy = svd::Exact, class QuantPolicy = quant::None, class SchedulePolicy = schedule::FixedGap>
class Projector;  // projector.hpp (the CPU's)
template <class StatePolicy = state::Float32>
class LowRankAdam;  // optim/low_rank_adam.hpp (the CPU's)

// The policies a Projector<...> or LowRankAdam<...> names; undefined for any
// other type (is_projector_v and is_low_rank_adam_v say which), so a facade can
// reject it with a readable message.
template <class P>
struct ProjectorPolicies;
template <class SVDPolicy, class QuantPolicy, class SchedulePolicy>
struct ProjectorPolicies<Projector<SVDPolicy, QuantPolicy, SchedulePolicy>> {
  using svd = SVDPolicy;
  using quant = QuantPolicy;
  using schedule = SchedulePolicy;
};
template <class P>
inline constexpr bool is_projector_v = false;
template <class SVDPolicy, class QuantPolicy, class SchedulePolicy>
inline constexpr bool is_projector_v<Projector<SVDPolicy, QuantPolicy, SchedulePolicy>> = true;

template <class A>
struct AdamPolicies;
template <class StatePolicy>
struct AdamPolicies<LowRankAdam<StatePolicy>> {
  using state = StatePolicy;
};
template <class A>
inline constexpr bool is_low_rank_adam_v = false;
template <class StatePolicy>
inline constexpr bool is_low_rank_adam_v<LowRankAdam<StatePolicy>> = true;

}  // namespace galore
