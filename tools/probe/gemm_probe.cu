// Probe: for the LLaMA-1B GaLore step's GEMM shapes (bf16, rank 512), time
// cublasGemmEx's default choice against every algorithm cuBLASLt's heuristic
// offers (top 16), to see how far the eager GEMM floor is from the best
// single-call algorithm. nvcc -O2 -arch=sm_90 gemm_probe.cu -lcublas -lcublasLt
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <vector>
#define CK(x) do { auto e = (x); if ((int)e) { printf("err %d at %s:%d\n", (int)e, __FILE__, __LINE__); return 1; } } while (0)
struct Case { const char* name; int M, N, K; bool ta, tb; bool out_float; float beta; };
int main() {
  // Column-major view of the row-major products (as galore issues them).
  // proj right: R(m x r) = G(m x n) P^T  -> col-major C^T(r x m) = P (r x n as col n x r, op T) ... expressed as cublas(opB, opA, N=r, M=m, K=n)
  const Case cases[] = {
    {"proj 2048x2048 (R=G P^T)", 512, 2048, 2048, true, false, true, 0.f},
    {"back 2048x2048 (W+=D P)", 2048, 2048, 512, false, false, false, 1.f},
    {"proj 5461x2048", 512, 5461, 2048, true, false, true, 0.f},
    {"back 5461x2048", 2048, 5461, 512, false, false, false, 1.f},
    {"proj left 2048x5461 (R=P^T G)", 5461, 512, 2048, false, true, true, 0.f},
    {"back left 2048x5461 (W+=P D)", 5461, 2048, 512, false, false, false, 1.f},
  };
  cublasHandle_t h; CK(cublasCreate(&h));
  cublasLtHandle_t lt; CK(cublasLtCreate(&lt));
  size_t wsb = 64 << 20; void* ws; cudaMalloc(&ws, wsb);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  for (const Case& c : cases) {
    int M = c.M, N = c.N, K = c.K;
    __nv_bfloat16 *A, *B; void* C;
    cudaMalloc(&A, 2ull * M * K); cudaMalloc(&B, 2ull * K * N); cudaMalloc(&C, 4ull * M * N);
    cudaMemset(A, 0x3c, 2ull * M * K); cudaMemset(B, 0x3c, 2ull * K * N); cudaMemset(C, 0, 4ull * M * N);
    cudaDataType_t ct = c.out_float ? CUDA_R_32F : CUDA_R_16BF;
    int lda = c.ta ? K : M, ldb = c.tb ? N : K;
    float alpha = 1.f, beta = c.beta;
    auto time = [&](auto f) { for (int i = 0; i < 3; ++i) f(); cudaEventRecord(a); for (int i = 0; i < 20; ++i) f(); cudaEventRecord(b); cudaEventSynchronize(b); float ms; cudaEventElapsedTime(&ms, a, b); return ms * 1000 / 20; };
    float t0 = time([&] { cublasGemmEx(h, c.ta ? CUBLAS_OP_T : CUBLAS_OP_N, c.tb ? CUBLAS_OP_T : CUBLAS_OP_N, M, N, K, &alpha, A, CUDA_R_16BF, lda, B, CUDA_R_16BF, ldb, &beta, C, ct, M, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT); });
    cublasLtMatmulDesc_t op; CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t oa = c.ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = c.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &oa, sizeof oa);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &ob, sizeof ob);
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, c.ta ? K : M, c.ta ? M : K, lda);
    cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, c.tb ? N : K, c.tb ? K : N, ldb);
    cublasLtMatrixLayoutCreate(&lc, ct, M, N, M);
    cublasLtMatmulPreference_t pref; cublasLtMatmulPreferenceCreate(&pref);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
    cublasLtMatmulHeuristicResult_t res[16]; int n = 0;
    cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 16, res, &n);
    float best = 1e9; int bi = -1;
    for (int i = 0; i < n; ++i) {
      float t = time([&] { cublasLtMatmul(lt, op, &alpha, A, la, B, lb, &beta, C, lc, C, lc, &res[i].algo, ws, wsb, 0); });
      if (t < best) { best = t; bi = i; }
    }
    double flop = 2.0 * M * N * K;
    printf("%-32s gemmEx %7.1f us (%5.0f TF/s)  lt[0] %7.1f  best lt[%d] %7.1f us (%5.0f TF/s) of %d\n", c.name, t0, flop / t0 * 1e-6,
           n ? time([&] { cublasLtMatmul(lt, op, &alpha, A, la, B, lb, &beta, C, lc, C, lc, &res[0].algo, ws, wsb, 0); }) : -1.f,
           bi, best, flop / best * 1e-6, n);
    cudaFree(A); cudaFree(B); cudaFree(C);
  }
  return 0;
}
