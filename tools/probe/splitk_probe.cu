// Probe: the LLaMA-1B GaLore step's GEMMs (bf16, rank 512) per call, with
// cuBLASLt's heuristic algorithms (top 32) and each one's split-K variants
// (2..8 splits, every reduction scheme it supports), and the same products
// strided-batched over the layers of one shape (24 per layer type) and as
// cublasGemmBatchedEx with pointer arrays. Prints the best per-call time, its
// configuration, and the batched times per matrix.
//   nvcc -O2 -arch=sm_90 splitk_probe.cu -lcublas -lcublasLt
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <algorithm>
#include <vector>
#define CK(x) do { auto e = (x); if ((int)e) { printf("err %d at %s:%d\n", (int)e, __FILE__, __LINE__); return 1; } } while (0)
struct Case { const char* name; int M, N, K; bool ta, tb; bool out_float; float beta; int batch; };
int main() {
  // Column-major problems as galore issues the row-major products (see gemm_probe.cu).
  const Case cases[] = {
    {"proj 2048x2048 (R=G P^T)", 512, 2048, 2048, true, false, true, 0.f, 96},
    {"back 2048x2048 (W+=D P)", 2048, 2048, 512, false, false, false, 1.f, 96},
    {"proj 5461x2048", 512, 5461, 2048, true, false, true, 0.f, 48},
    {"back 5461x2048", 2048, 5461, 512, false, false, false, 1.f, 48},
    {"proj left 2048x5464 (R=P^T G)", 5464, 512, 2048, false, true, true, 0.f, 24},
    {"back left 2048x5464 (W+=P D)", 5464, 2048, 512, false, false, false, 1.f, 24},
  };
  cublasHandle_t h; CK(cublasCreate(&h));
  cublasLtHandle_t lt; CK(cublasLtCreate(&lt));
  size_t wsb = 32 << 20; void* ws; cudaMalloc(&ws, wsb);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  double sum_first = 0, sum_best = 0, sum_batched = 0, sum_ptr = 0, sum_ltptr = 0;
  for (const Case& c : cases) {
    int M = c.M, N = c.N, K = c.K, B = c.batch;
    size_t sa = (size_t)M * K, sb = (size_t)K * N, sc = (size_t)M * N;
    __nv_bfloat16 *A, *Bm; void* C;
    size_t cbytes = (c.out_float ? 4 : 2);
    CK(cudaMalloc(&A, 2 * sa * B)); CK(cudaMalloc(&Bm, 2 * sb * B)); CK(cudaMalloc(&C, cbytes * sc * B));
    cudaMemset(A, 0x3c, 2 * sa * B); cudaMemset(Bm, 0x3c, 2 * sb * B); cudaMemset(C, 0, cbytes * sc * B);
    cudaDataType_t ct = c.out_float ? CUDA_R_32F : CUDA_R_16BF;
    int lda = c.ta ? K : M, ldb = c.tb ? N : K;
    float alpha = 1.f, beta = c.beta;
    auto time = [&](auto f, int reps) { for (int i = 0; i < 3; ++i) f(); cudaEventRecord(a); for (int i = 0; i < reps; ++i) f(); cudaEventRecord(b); cudaEventSynchronize(b); float ms; cudaEventElapsedTime(&ms, a, b); return ms * 1000 / reps; };
    cublasLtMatmulDesc_t op; CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t oa = c.ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = c.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &oa, sizeof oa);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &ob, sizeof ob);
    // The three layouts of one product (column-major, as cuBLASLt takes them).
    auto layouts = [&](cublasLtMatrixLayout_t& a, cublasLtMatrixLayout_t& b, cublasLtMatrixLayout_t& cc) {
      cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, c.ta ? K : M, c.ta ? M : K, lda);
      cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, c.tb ? N : K, c.tb ? K : N, ldb);
      cublasLtMatrixLayoutCreate(&cc, ct, M, N, M);
    };
    cublasLtMatrixLayout_t la, lb, lc;
    layouts(la, lb, lc);
    cublasLtMatmulPreference_t pref; cublasLtMatmulPreferenceCreate(&pref);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
    cublasLtMatmulHeuristicResult_t res[32]; int n = 0;
    cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 32, res, &n);
    auto run = [&](const cublasLtMatmulAlgo_t& al) { return cublasLtMatmul(lt, op, &alpha, A, la, Bm, lb, &beta, C, lc, C, lc, &al, ws, wsb, 0); };
    float first = n ? time([&] { run(res[0].algo); }, 20) : -1.f;
    float best = first; int bi = 0, bsplit = 1; unsigned bscheme = 0; int tried = 0;
    for (int i = 0; i < n; ++i) {
      float t = time([&] { run(res[i].algo); }, 20); ++tried;
      if (t < best) { best = t; bi = i; bsplit = 1; bscheme = 0; }
      int splitk = 0; size_t w = 0;
      cublasLtMatmulAlgoCapGetAttribute(&res[i].algo, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &splitk, sizeof splitk, &w);
      unsigned mask = 0;
      cublasLtMatmulAlgoCapGetAttribute(&res[i].algo, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &mask, sizeof mask, &w);
      if (!splitk) continue;
      for (int s : {2, 3, 4, 6, 8}) for (unsigned scheme : {1u, 2u, 4u}) {
        if (!(mask & scheme)) continue;
        cublasLtMatmulAlgo_t al = res[i].algo;
        cublasLtMatmulAlgoConfigSetAttribute(&al, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &s, sizeof s);
        cublasLtMatmulAlgoConfigSetAttribute(&al, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof scheme);
        cublasLtMatmulHeuristicResult_t chk{};
        if (cublasLtMatmulAlgoCheck(lt, op, la, lb, lc, lc, &al, &chk) != CUBLAS_STATUS_SUCCESS || chk.workspaceSize > wsb) continue;
        float t2 = time([&] { run(al); }, 20); ++tried;
        if (t2 < best) { best = t2; bi = i; bsplit = s; bscheme = scheme; }
      }
    }
    // Strided batched over B layers of this shape.
    cublasLtMatrixLayout_t ba, bb, bc;
    layouts(ba, bb, bc);
    long long s_a = sa, s_b = sb, s_c = sc;
    for (auto [l, st] : {std::pair{ba, s_a}, std::pair{bb, s_b}, std::pair{bc, s_c}}) {
      cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &B, sizeof B);
      cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &st, sizeof st);
    }
    // The fastest of the heuristic's first 8 algorithms for a batched product, and how many it offered.
    auto fastest = [&](cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t cc, const void* pa,
                       const void* pb, void* pc, int& offered) {
      cublasLtMatmulHeuristicResult_t r[8];
      offered = 0;
      cublasLtMatmulAlgoGetHeuristic(lt, op, a, b, cc, cc, pref, 8, r, &offered);
      float t_best = 1e9;
      for (int i = 0; i < offered; ++i)
        t_best = std::min(t_best, time([&] { cublasLtMatmul(lt, op, &alpha, pa, a, pb, b, &beta, pc, cc, pc, cc, &r[i].algo, ws, wsb, 0); }, 5));
      return t_best;
    };
    int bn = 0;
    const float bbest = fastest(ba, bb, bc, A, Bm, C, bn);
    // Pointer arrays (cublasGemmBatchedEx).
    std::vector<const void*> pa(B), pb(B); std::vector<void*> pc(B);
    for (int i = 0; i < B; ++i) { pa[i] = A + sa * i; pb[i] = Bm + sb * i; pc[i] = (char*)C + cbytes * sc * i; }
    void **dpa, **dpb, **dpc;
    cudaMalloc(&dpa, 8 * B); cudaMalloc(&dpb, 8 * B); cudaMalloc(&dpc, 8 * B);
    cudaMemcpy(dpa, pa.data(), 8 * B, cudaMemcpyHostToDevice); cudaMemcpy(dpb, pb.data(), 8 * B, cudaMemcpyHostToDevice); cudaMemcpy(dpc, pc.data(), 8 * B, cudaMemcpyHostToDevice);
    float tptr = time([&] { cublasGemmBatchedEx(h, oa, ob, M, N, K, &alpha, (const void* const*)dpa, CUDA_R_16BF, lda, (const void* const*)dpb, CUDA_R_16BF, ldb, &beta, (void* const*)dpc, ct, M, B, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT); }, 5);
    // Pointer arrays through cuBLASLt (CUBLASLT_BATCH_MODE_POINTER_ARRAY).
    cublasLtMatrixLayout_t pla, plb, plc;
    layouts(pla, plb, plc);
    unsigned mode = CUBLASLT_BATCH_MODE_POINTER_ARRAY;
    for (auto l : {pla, plb, plc}) {
      cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &B, sizeof B);
      cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode, sizeof mode);
    }
    int pn = 0;
    const float tlt = fastest(pla, plb, plc, dpa, dpb, dpc, pn);
    double flop = 2.0 * M * N * K;
    printf("  lt ptr-array: %d algos, best %6.1f us/matrix (%4.0f TF/s)\n", pn, tlt / B, pn ? flop / (tlt / B) * 1e-6 : 0.0);
    sum_ltptr += tlt;
    printf("%-30s lt[0] %6.1f us (%4.0f TF/s)  best %6.1f us (%4.0f TF/s: lt[%d] splitk %d scheme %u; %d tried of %d)  batched x%d: strided %6.1f us/matrix (%4.0f TF/s), ptr-array %6.1f (%4.0f)\n",
           c.name, first, flop / first * 1e-6, best, flop / best * 1e-6, bi, bsplit, bscheme, tried, n, B, bbest / B, flop / (bbest / B) * 1e-6, tptr / B, flop / (tptr / B) * 1e-6);
    sum_first += first * B; sum_best += best * B; sum_batched += bbest; sum_ptr += tptr;
    cudaFree(A); cudaFree(Bm); cudaFree(C); cudaFree(dpa); cudaFree(dpb); cudaFree(dpc);
  }
  printf("LLaMA-1B set (168 matrices, both products): per-call lt[0] %.2f ms, per-call best %.2f ms, strided batched %.2f ms, ptr-array batched %.2f ms, lt ptr-array %.2f ms\n",
         sum_first * 1e-3, sum_best * 1e-3, sum_batched * 1e-3, sum_ptr * 1e-3, sum_ltptr * 1e-3);
  return 0;
}
