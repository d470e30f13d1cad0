// The smallest complete GPU use of galore: min_W |X W - Y|^2 on the device,
// trained by GaLore-AdamW with bf16 weights and gradients. The trainer's own
// math (the gradient) uses cuBLAS through galore::cuda::gemm; galore steps W.
//
//   ./least_squares_cuda [steps]
#include <galore/cuda.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace galore;
using cuda::bf16;

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("least_squares_cuda: no CUDA device\n");
    return 0;
  }
  const int steps = argc > 1 ? std::atoi(argv[1]) : 300;
  const Index samples = 512, in = 256, out = 128;

  // A target whose weight matrix has a decaying spectrum, as trained layers do.
  std::mt19937 gen(42);
  std::normal_distribution<float> normal;
  std::vector<float> X(samples * in), A(in * 16), B(16 * out), Wstar(in * out, 0.0f);
  for (float& x : X) x = normal(gen) / std::sqrt(float(in));
  for (float& a : A) a = normal(gen);
  for (float& b : B) b = normal(gen);
  for (Index i = 0; i < in; ++i)
    for (Index j = 0; j < out; ++j) {
      for (Index k = 0; k < 16; ++k) Wstar[i * out + j] += A[i * 16 + k] * B[k * out + j] / 4.0f;
      Wstar[i * out + j] += 0.05f * normal(gen);
    }

  cuda::Context ctx;  // the legacy default stream; pass your own cudaStream_t otherwise
  cuda::DeviceBuffer<float> dX(X.size()), dWstar(Wstar.size()), dY(samples * out), dWf(in * out), dE(samples * out),
      dGf(in * out);
  cuda::DeviceBuffer<bf16> dW(in * out), dG(in * out);
  cuda::check(cudaMemcpy(dX.data(), X.data(), 4 * X.size(), cudaMemcpyHostToDevice), "copy X");
  cuda::check(cudaMemcpy(dWstar.data(), Wstar.data(), 4 * Wstar.size(), cudaMemcpyHostToDevice), "copy W*");
  cuda::check(cudaMemset(dW.data(), 0, dW.bytes()), "zero W");
  const DeviceView<const float> Xv(dX.data(), samples, in);
  cuda::gemm(ctx, cuda::Op::N, cuda::Op::N, 1.0f, Xv, DeviceView<const float>(dWstar.data(), in, out), 0.0f,
             device_view(dY.data(), samples, out));

  AdamConfig adam;
  adam.lr = 0.2;  // GaLore takes ~10x AdamW's learning rate
  cuda::GaLoreOptimizer<> opt(ProjectorOptions{32, ProjectionType::Std, 0.25f}, adam, schedule::FixedGap{50});
  const LayerId w = opt.add_layer({in, out}, cuda::DType::BFloat16, "W");
  ctx.reserve_workspace(opt.workspace_bytes(ctx));

  std::vector<float> e(samples * out);
  auto widen = [&](const bf16* from, float* to, Index n) {  // the trainer keeps float copies for its own math
    cuda::impl::convert<<<64, 256, 0, ctx.stream()>>>(from, to, n);
    cuda::check_launch("convert");
  };
  auto narrow = [&](const float* from, bf16* to, Index n) {
    cuda::impl::convert<<<64, 256, 0, ctx.stream()>>>(from, to, n);
    cuda::check_launch("convert");
  };
  std::printf("%6s %14s\n", "step", "loss");
  for (int step = 0; step <= steps; ++step) {
    widen(dW.data(), dWf.data(), in * out);
    // E = X W - Y
    cuda::check(cudaMemcpyAsync(dE.data(), dY.data(), dY.bytes(), cudaMemcpyDeviceToDevice, ctx.stream()), "copy");
    cuda::gemm(ctx, cuda::Op::N, cuda::Op::N, 1.0f, Xv, DeviceView<const float>(dWf.data(), in, out), -1.0f,
               device_view(dE.data(), samples, out));
    if (step % (steps / 10 > 0 ? steps / 10 : 1) == 0 || step == steps) {
      cuda::check(cudaMemcpy(e.data(), dE.data(), dE.bytes(), cudaMemcpyDeviceToHost), "copy E");
      double loss = 0.0;
      for (float x : e) loss += double(x) * x;
      std::printf("%6d %14.6f\n", step, loss / (samples * out));
    }
    if (step == steps) break;
    // G = 2/(samples*out) X^T E, handed to galore in bf16.
    cuda::gemm(ctx, cuda::Op::T, cuda::Op::N, 2.0f / (samples * out), Xv, DeviceView<const float>(dE.data(), samples, out),
               0.0f, device_view(dGf.data(), in, out));
    narrow(dGf.data(), dG.data(), in * out);
    opt.step(w, dW.data(), static_cast<const bf16*>(dG.data()), ctx);
  }
  std::printf("step status: %s; optimizer state on the device: %zu bytes (AdamW would hold %zu)\n",
              opt.status(w, ctx) == StepStatus::Applied ? "applied" : "skipped", opt.state_bytes(),
              std::size_t(2 * 4 * in * out));
  return 0;
}
