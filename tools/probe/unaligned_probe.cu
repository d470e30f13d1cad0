// Probe: LLaMA-1B's down projection (2048 x 5461 bf16, rows of 10922 bytes, not
// 16-byte aligned; rank 512, left basis) through galore's GEMM wrapper, as the
// GaLore step issues it and with aligned (padded) copies, plus the copies:
// what staging an unaligned operand would cost and save. CUDA events, 50
// repetitions after 5 warm-ups.
//   nvcc -O3 -arch=sm_90 -std=c++17 -I include --expt-relaxed-constexpr unaligned_probe.cu -lcublas -lcublasLt -lcusolver
#include <galore/cuda.hpp>

#include <cstdio>

using namespace galore;
using cuda::bf16;

namespace {

cudaEvent_t ev0, ev1;
template <class F>
float time_us(cuda::Context& ctx, F f) {
  for (int i = 0; i < 5; ++i) f();
  cudaEventRecord(ev0, ctx.stream());
  for (int i = 0; i < 50; ++i) f();
  cudaEventRecord(ev1, ctx.stream());
  cudaEventSynchronize(ev1);
  float ms = 0;
  cudaEventElapsedTime(&ms, ev0, ev1);
  return ms * 1000 / 50;
}

// Scalar copy, consecutive threads on consecutive elements, 8 loads in flight per thread.
template <class T>
__global__ void copy_scalar(const T* __restrict__ src, long sld, T* __restrict__ dst, long dld, long rows, long cols) {
  const long span = blockDim.x * 8L;
  for (long row = blockIdx.y; row < rows; row += gridDim.y)
    for (long base = blockIdx.x * span + threadIdx.x; base < cols; base += gridDim.x * span) {
      T x[8];
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (base + k * blockDim.x < cols) x[k] = src[row * sld + base + k * blockDim.x];
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (base + k * blockDim.x < cols) dst[row * dld + base + k * blockDim.x] = x[k];
    }
}

// Contiguous (unaligned rows) -> padded: 16-byte loads of the flat source, element stores.
__global__ void pack_vector_loads(const bf16* __restrict__ src, long n, long cols, bf16* __restrict__ dst, long dld) {
  const long chunks = n / 8;
  for (long c = blockIdx.x * (long)blockDim.x + threadIdx.x; c < chunks; c += (long)gridDim.x * blockDim.x) {
    const uint4 v = reinterpret_cast<const uint4*>(src)[c];
    const bf16* e = reinterpret_cast<const bf16*>(&v);
    long i = c * 8, row = i / cols, col = i % cols;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      dst[row * dld + col] = e[k];
      if (++col == cols) {
        col = 0;
        ++row;
      }
    }
  }
  for (long i = chunks * 8 + blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    dst[(i / cols) * dld + i % cols] = src[i];
}

// Padded -> contiguous: element loads, 16-byte stores of the flat destination.
__global__ void unpack_vector_stores(const bf16* __restrict__ src, long sld, long n, long cols, bf16* __restrict__ dst) {
  const long chunks = n / 8;
  for (long c = blockIdx.x * (long)blockDim.x + threadIdx.x; c < chunks; c += (long)gridDim.x * blockDim.x) {
    uint4 v;
    bf16* e = reinterpret_cast<bf16*>(&v);
    long i = c * 8, row = i / cols, col = i % cols;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      e[k] = src[row * sld + col];
      if (++col == cols) {
        col = 0;
        ++row;
      }
    }
    reinterpret_cast<uint4*>(dst)[c] = v;
  }
  for (long i = chunks * 8 + blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    dst[i] = src[(i / cols) * sld + i % cols];
}

// W = beta W + alpha U (U float, padded), W contiguous bf16.
__global__ void axpby(const float* __restrict__ u, long uld, bf16* __restrict__ w, long n, long cols, float alpha,
                      float beta) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    w[i] = __float2bfloat16_rn(beta * __bfloat162float(w[i]) + alpha * u[(i / cols) * uld + i % cols]);
}

}  // namespace

int main() {
  cudaEventCreate(&ev0);
  cudaEventCreate(&ev1);
  cuda::Context ctx;
  const Index m = 2048, n = 5461, r = 512, np = 5464;
  cuda::DeviceBuffer<bf16> G(m * n), W(m * n), Gp(m * np), Wp(m * np), P(m * r), D(r * np);
  cuda::DeviceBuffer<float> R(r * np), U(m * np);
  cuda::DeviceBuffer<float> tmp(m * np);
  cuda::impl::gaussian<<<2048, 256, 0, ctx.stream()>>>(tmp.data(), 1, m * np, 1);
  for (auto* b : {&G, &W, &Gp, &Wp}) cuda::impl::convert<<<2048, 256, 0, ctx.stream()>>>(tmp.data(), b->data(), m * n);
  cuda::impl::convert<<<2048, 256, 0, ctx.stream()>>>(tmp.data(), P.data(), m * r);
  cuda::impl::convert<<<2048, 256, 0, ctx.stream()>>>(tmp.data(), D.data(), r * np);
  ctx.synchronize();
  const DeviceView<const bf16> Pv(P.data(), m, r);
  auto proj = [&](const bf16* g, Index gld, Index rld) {
    cuda::gemm(ctx, cuda::Op::T, cuda::Op::N, 1.0f, Pv, DeviceView<const bf16>(g, m, n, gld), 0.0f,
               DeviceView<float>(R.data(), r, n, rld));
  };
  auto back = [&](Index dld, bf16* w, Index wld, Index cols = 5461) {
    cuda::gemm(ctx, cuda::Op::N, cuda::Op::N, -1e-3f, Pv, DeviceView<const bf16>(D.data(), r, cols, dld), 1.0f,
               DeviceView<bf16>(w, m, cols, wld));
  };
  auto proj_cols = [&](const bf16* g, Index gld, Index rld, Index cols) {
    cuda::gemm(ctx, cuda::Op::T, cuda::Op::N, 1.0f, Pv, DeviceView<const bf16>(g, m, cols, gld), 0.0f,
               DeviceView<float>(R.data(), r, cols, rld));
  };
  const dim3 g2(3, 1365);
  std::printf("down projection 2048 x 5461 bf16, rank 512 (times in us)\n");
  std::printf("proj, G and R unaligned            %8.1f\n", time_us(ctx, [&] { proj(G.data(), n, n); }));
  std::printf("proj, G unaligned, R padded        %8.1f\n", time_us(ctx, [&] { proj(G.data(), n, np); }));
  std::printf("proj, G and R padded               %8.1f\n", time_us(ctx, [&] { proj(Gp.data(), np, np); }));
  std::printf("proj, padded to 5464 columns        %8.1f\n", time_us(ctx, [&] { proj_cols(Gp.data(), np, np, np); }));
  std::printf("proj, 5456 columns, ld 5461        %8.1f\n", time_us(ctx, [&] { proj_cols(G.data(), n, n, 5456); }));
  std::printf("proj, 5456 columns, ld 5464        %8.1f\n", time_us(ctx, [&] { proj_cols(Gp.data(), np, np, 5456); }));
  std::printf("back, padded to 5464 columns        %8.1f\n", time_us(ctx, [&] { back(np, Wp.data(), np, np); }));
  std::printf("back, 5456 columns, ld 5461        %8.1f\n", time_us(ctx, [&] { back(np, W.data(), n, 5456); }));
  std::printf("back, 5456 columns, ld 5464        %8.1f\n", time_us(ctx, [&] { back(np, Wp.data(), np, 5456); }));
  std::printf("gate/up shape: proj 5461x2048 G P^T %8.1f\n", time_us(ctx, [&] {
    cuda::gemm(ctx, cuda::Op::N, cuda::Op::T, 1.0f, DeviceView<const bf16>(Gp.data(), n, m), DeviceView<const bf16>(P.data(), r, m),
               0.0f, DeviceView<float>(R.data(), n, r));
  }));
  std::printf("back, D and W unaligned            %8.1f\n", time_us(ctx, [&] { back(n, W.data(), n); }));
  std::printf("back, D padded, W unaligned        %8.1f\n", time_us(ctx, [&] { back(np, W.data(), n); }));
  std::printf("back, D and W padded               %8.1f\n", time_us(ctx, [&] { back(np, Wp.data(), np); }));
  std::printf("back as U = P D (float, padded)    %8.1f\n", time_us(ctx, [&] {
    cuda::gemm(ctx, cuda::Op::N, cuda::Op::N, 1.0f, Pv, DeviceView<const bf16>(D.data(), r, n, np), 0.0f,
               DeviceView<float>(U.data(), m, n, np));
  }));
  std::printf("  then W = bW + aU                 %8.1f\n", time_us(ctx, [&] {
    axpby<<<2048, 256, 0, ctx.stream()>>>(U.data(), np, W.data(), m * n, n, -1e-3f, 1.0f);
  }));
  std::printf("copy G -> padded, scalar x8        %8.1f\n", time_us(ctx, [&] {
    copy_scalar<<<g2, 256, 0, ctx.stream()>>>(G.data(), n, Gp.data(), np, m, n);
  }));
  std::printf("copy padded -> W, scalar x8        %8.1f\n", time_us(ctx, [&] {
    copy_scalar<<<g2, 256, 0, ctx.stream()>>>(Wp.data(), np, W.data(), n, m, n);
  }));
  std::printf("copy G -> padded, 16-byte loads    %8.1f\n", time_us(ctx, [&] {
    pack_vector_loads<<<2048, 256, 0, ctx.stream()>>>(G.data(), m * n, n, Gp.data(), np);
  }));
  std::printf("copy padded -> W, 16-byte stores   %8.1f\n", time_us(ctx, [&] {
    unpack_vector_stores<<<2048, 256, 0, ctx.stream()>>>(Wp.data(), np, m * n, n, W.data());
  }));
  std::printf("cudaMemcpy2DAsync G -> padded      %8.1f\n", time_us(ctx, [&] {
    cudaMemcpy2DAsync(Gp.data(), np * 2, G.data(), n * 2, n * 2, m, cudaMemcpyDeviceToDevice, ctx.stream());
  }));
  std::printf("cudaMemcpyAsync (contiguous, same bytes) %8.1f\n", time_us(ctx, [&] {
    cudaMemcpyAsync(Gp.data(), G.data(), m * n * 2, cudaMemcpyDeviceToDevice, ctx.stream());
  }));
  const cudaError_t e = cudaDeviceSynchronize();
  std::printf("status: %s\n", cudaGetErrorString(e));
  return e == cudaSuccess ? 0 : 1;
}
