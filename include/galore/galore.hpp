// galore: gradient low-rank projection (GaLore) and quantized GaLore (Q-GaLore)
// for C++ trainers. This is the one header users include for the CPU backend.
#pragma once

#include "config.hpp"
#include "types.hpp"

#include "basis.hpp"
#include "checkpoint.hpp"
#include "projection.hpp"
#include "projection_type.hpp"
#include "projector.hpp"

#include "quant/bfloat16.hpp"
#include "quant/dynamic_map.hpp"
#include "quant/minmax.hpp"
#include "quant/nf4.hpp"
#include "quant/none.hpp"
#include "quantized_weight.hpp"
#include "rounding/philox.hpp"
#include "rounding/stochastic_rounder.hpp"
#include "schedule/drift.hpp"
#include "schedule/fixed_gap.hpp"
#include "schedule/lazy.hpp"
#include "backend/eigen/svd.hpp"
#include "svd/energy.hpp"
#include "svd/exact.hpp"
#include "svd/randomized.hpp"
#include "svd/warm_start.hpp"

#include "memory/llama.hpp"
#include "memory/planner.hpp"

#include "optim/adam_config.hpp"
#include "optim/blockwise8bit_state.hpp"
#include "optim/dense_state.hpp"
#include "optim/galore_optimizer.hpp"
#include "optim/galore_step.hpp"
#include "optim/low_rank_adam.hpp"
#include "optim/step_result.hpp"
