// galore (CUDA backend): CUDA, cuBLAS and cuSOLVER failures as exceptions.
//
// Every runtime and library call of the backend goes through check(), which
// throws galore::cuda::cuda_error carrying the call, the status name and the
// library's text. Kernel launches are checked with check_launch().
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <stdexcept>
#include <string>

#include "../../config.hpp"

namespace galore::cuda {

class cuda_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// cuSOLVER has no status-to-string function.
inline const char* status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED (the handle was not created)";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED (out of device memory)";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE (a bad argument)";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH (unsupported GPU)";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED (a kernel failed)";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "cusolverStatus_t (unlisted value)";
  }
}

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw cuda_error(detail::concat("galore: ", what, " failed: ", cudaGetErrorName(e), ": ", cudaGetErrorString(e)));
}

inline void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw cuda_error(detail::concat("galore: ", what, " failed: ", cublasGetStatusName(s), ": ",
                                    cublasGetStatusString(s)));
}

inline void check(cusolverStatus_t s, const char* what) {
  if (s != CUSOLVER_STATUS_SUCCESS) throw cuda_error(detail::concat("galore: ", what, " failed: ", status_name(s)));
}

// After a kernel launch: a bad configuration shows up here, asynchronously
// raised faults at the next synchronizing call.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

}  // namespace galore::cuda
