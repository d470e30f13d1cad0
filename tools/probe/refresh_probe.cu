// Probe: where a warm refresh's time goes. Times, for the r = 512 problems of
// LLaMA-1B's shapes (len = 2048 and 5461 rows), each building block of
// CholeskyQR and of Rayleigh-Ritz in float64 and float32: Gram by GEMM and by
// SYRK, Cholesky (potrf), the triangular solve (trsm), and the r x r
// eigensolver (syevd), and Cholesky batched over 24 and 96 matrices
// (potrfBatched). CUDA events, 20 repetitions after 3 warm-ups.
//   nvcc -O2 -arch=sm_90 refresh_probe.cu -lcublas -lcusolver
#include <cublas_v2.h>
#include <cusolverDn.h>

#include <cstdio>
#include <vector>

#define CK(x)                                                                   \
  do {                                                                          \
    auto e = (x);                                                               \
    if ((int)e) {                                                               \
      std::printf("err %d at %s:%d\n", (int)e, __FILE__, __LINE__);             \
      return 1;                                                                 \
    }                                                                           \
  } while (0)

template <class T>
__global__ void fill(T* x, long n, unsigned seed) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    x[i] = (T)((h & 0xffffff) / 16777216.0 - 0.5);
  }
}
template <class T>
__global__ void spd(T* c, int l) {  // c <- c + l * I
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < l; i += gridDim.x * blockDim.x) c[(long)i * l + i] += (T)l;
}

cudaEvent_t ev0, ev1;
template <class F>
float time_us(F f) {
  for (int i = 0; i < 3; ++i) f();
  cudaEventRecord(ev0);
  for (int i = 0; i < 20; ++i) f();
  cudaEventRecord(ev1);
  cudaEventSynchronize(ev1);
  float ms = 0;
  cudaEventElapsedTime(&ms, ev0, ev1);
  return ms * 1000 / 20;
}

template <class T>
int run(cublasHandle_t h, cusolverDnHandle_t s, cusolverDnParams_t params, int len, int l, const char* name) {
  const cudaDataType_t dt = sizeof(T) == 8 ? CUDA_R_64F : CUDA_R_32F;
  T *X, *C, *C0, *W;
  int* info;
  CK(cudaMalloc(&X, sizeof(T) * len * l));
  CK(cudaMalloc(&C, sizeof(T) * l * l));
  CK(cudaMalloc(&C0, sizeof(T) * l * l));
  CK(cudaMalloc(&W, sizeof(T) * l));
  CK(cudaMalloc(&info, sizeof(int)));
  fill<<<1024, 256>>>(X, (long)len * l, 1);
  const T one = 1, zero = 0;
  cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
  float gemm = time_us([&] {
    if constexpr (sizeof(T) == 8)
      cublasDgemm(h, CUBLAS_OP_N, CUBLAS_OP_T, l, l, len, &one, X, l, X, l, &zero, C0, l);
    else
      cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_T, l, l, len, &one, X, l, X, l, &zero, C0, l);
  });
  float syrk = time_us([&] {
    if constexpr (sizeof(T) == 8)
      cublasDsyrk(h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, l, len, &one, X, l, &zero, C, l);
    else
      cublasSsyrk(h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, l, len, &one, X, l, &zero, C, l);
  });
  spd<<<4, 256>>>(C0, l);
  size_t dev = 0, host = 0;
  CK(cusolverDnXpotrf_bufferSize(s, params, CUBLAS_FILL_MODE_LOWER, l, dt, C, l, dt, &dev, &host));
  void *dwork, *hwork = host ? malloc(host) : nullptr;
  CK(cudaMalloc(&dwork, dev + 1));
  float potrf = time_us([&] {
    cudaMemcpyAsync(C, C0, sizeof(T) * l * l, cudaMemcpyDeviceToDevice);
    cusolverDnXpotrf(s, params, CUBLAS_FILL_MODE_LOWER, l, dt, C, l, dt, dwork, dev, hwork, host, info);
  });
  float copy = time_us([&] { cudaMemcpyAsync(C, C0, sizeof(T) * l * l, cudaMemcpyDeviceToDevice); });
  float trsm = time_us([&] {
    if constexpr (sizeof(T) == 8)
      cublasDtrsm(h, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, l, len, &one, C, l,
                  X, l);
    else
      cublasStrsm(h, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, l, len, &one, C, l,
                  X, l);
  });
  size_t edev = 0, ehost = 0;
  CK(cusolverDnXsyevd_bufferSize(s, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, l, dt, C, l, dt, W, dt,
                                 &edev, &ehost));
  void *edwork, *ehwork = ehost ? malloc(ehost) : nullptr;
  CK(cudaMalloc(&edwork, edev + 1));
  float syevd = time_us([&] {
    cudaMemcpyAsync(C, C0, sizeof(T) * l * l, cudaMemcpyDeviceToDevice);
    cusolverDnXsyevd(s, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, l, dt, C, l, dt, W, dt, edwork, edev,
                     ehwork, ehost, info);
  });
  std::printf("%-7s len %5d l %4d: gram gemm %7.1f us  syrk %7.1f  potrf %7.1f  trsm %7.1f  syevd %8.1f (copy %5.1f)\n",
              name, len, l, gemm, syrk, potrf - copy, trsm, syevd - copy, copy);
  cudaFree(X);
  cudaFree(C);
  cudaFree(C0);
  cudaFree(W);
  cudaFree(info);
  cudaFree(dwork);
  cudaFree(edwork);
  free(hwork);
  free(ehwork);
  return 0;
}

// Batched Cholesky of `batch` SPD l x l matrices (cusolverDn<t>potrfBatched),
// per matrix: what a refresh batched per shape group would pay.
template <class T>
int run_batched(cusolverDnHandle_t s, int l, int batch, const char* name) {
  T *C, *C0;
  T** ptrs;
  int* info;
  const size_t per = (size_t)l * l;
  CK(cudaMalloc(&C, sizeof(T) * per * batch));
  CK(cudaMalloc(&C0, sizeof(T) * per * batch));
  CK(cudaMalloc(&ptrs, sizeof(T*) * batch));
  CK(cudaMalloc(&info, sizeof(int) * batch));
  std::vector<T*> host(batch);
  for (int b = 0; b < batch; ++b) {
    host[b] = C + per * b;
    fill<<<64, 256>>>(C0 + per * b, (long)per, 7 + b);
    spd<<<4, 256>>>(C0 + per * b, l);
  }
  CK(cudaMemcpy(ptrs, host.data(), sizeof(T*) * batch, cudaMemcpyHostToDevice));
  // fill + l*I is not symmetric; symmetrize by taking the lower triangle only (potrf reads one triangle).
  float copy = time_us([&] { cudaMemcpyAsync(C, C0, sizeof(T) * per * batch, cudaMemcpyDeviceToDevice); });
  float t = time_us([&] {
    cudaMemcpyAsync(C, C0, sizeof(T) * per * batch, cudaMemcpyDeviceToDevice);
    if constexpr (sizeof(T) == 8)
      cusolverDnDpotrfBatched(s, CUBLAS_FILL_MODE_LOWER, l, (double**)ptrs, l, info, batch);
    else
      cusolverDnSpotrfBatched(s, CUBLAS_FILL_MODE_LOWER, l, (float**)ptrs, l, info, batch);
  });
  std::printf("%-7s potrfBatched l %4d batch %3d: %8.1f us, %6.1f us per matrix\n", name, l, batch, t - copy,
              (t - copy) / batch);
  // Then L^-1 by trsmBatched against identities (C0 as the right-hand sides:
  // the time does not depend on their values).
  if constexpr (sizeof(T) == 8) {
    cublasHandle_t h;
    CK(cublasCreate(&h));
    T** rhs;
    CK(cudaMalloc(&rhs, sizeof(T*) * batch));
    std::vector<T*> host_rhs(batch);
    for (int b = 0; b < batch; ++b) host_rhs[b] = C0 + per * b;
    CK(cudaMemcpy(rhs, host_rhs.data(), sizeof(T*) * batch, cudaMemcpyHostToDevice));
    const double one = 1.0;
    float tr = time_us([&] {
      cublasDtrsmBatched(h, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, l, l, &one,
                         (const double* const*)ptrs, l, (double* const*)rhs, l, batch);
    });
    std::printf("%-7s trsmBatched  l %4d batch %3d: %8.1f us, %6.1f us per matrix\n", name, l, batch, tr, tr / batch);
    cudaFree(rhs);
    cublasDestroy(h);
  }
  cudaFree(C);
  cudaFree(C0);
  cudaFree(ptrs);
  cudaFree(info);
  return 0;
}

int main() {
  cublasHandle_t h;
  cusolverDnHandle_t s;
  cusolverDnParams_t params;
  CK(cublasCreate(&h));
  CK(cusolverDnCreate(&s));
  CK(cusolverDnCreateParams(&params));
  cudaEventCreate(&ev0);
  cudaEventCreate(&ev1);
  for (int len : {2048, 5461}) {
    if (run<double>(h, s, params, len, 512, "float64")) return 1;
    if (run<float>(h, s, params, len, 512, "float32")) return 1;
  }
  for (int l : {64, 128, 256}) {
    if (run<double>(h, s, params, 2048, l, "float64")) return 1;
    if (run<float>(h, s, params, 2048, l, "float32")) return 1;
  }
  for (int batch : {24, 96}) {
    if (run_batched<double>(s, 512, batch, "float64")) return 1;
    if (run_batched<float>(s, 512, batch, "float32")) return 1;
  }
  return 0;
}
