// galore: the CUDA backend. Include it from translation units that nvcc
// compiles; it adds device views, the GPU optimizer facade, its checkpoints and
// its primitives (galore::cuda) to the backend-independent pieces.
// galore/galore.hpp (the CPU backend) never includes CUDA headers.
#pragma once

#if !defined(__CUDACC__)
#error "galore/cuda.hpp needs a CUDA compiler (nvcc): compile this translation unit as CUDA"
#endif

#include "config.hpp"
#include "core/matrix_view.hpp"
#include "core/shape.hpp"
#include "core/system.hpp"
#include "math/adam.hpp"

#include "backend/cuda/adam.cuh"
#include "backend/cuda/adam8bit.cuh"
#include "backend/cuda/basis_kernels.cuh"
#include "backend/cuda/batched_adam.cuh"
#include "backend/cuda/batched_refresh.cuh"
#include "backend/cuda/batched_step.cuh"
#include "backend/cuda/checkpoint.cuh"
#include "backend/cuda/context.cuh"
#include "backend/cuda/device_buffer.cuh"
#include "backend/cuda/dtype.cuh"
#include "backend/cuda/error.cuh"
#include "backend/cuda/gemm.cuh"
#include "backend/cuda/optimizer.cuh"
#include "backend/cuda/reduce.cuh"
#include "backend/cuda/quantized_weight.cuh"
#include "backend/cuda/refresh.cuh"
