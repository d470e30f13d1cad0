// galore_bench_cuda: the CUDA backend on LLaMA shapes, timed with CUDA events
// (Google Benchmark's manual time). One benchmark iteration = one pass over
// every linear layer of the model, per-layer calls on one stream.
//
//   BM_CudaStep/<galore|adamw>/<llama1b/r512|llama7b_8of32/r1024>   bf16 W and G, float32 moments
//   BM_CudaStep/galore_graph/<model>  the same calls captured in a CUDA graph (launch overhead's share)
//   BM_CudaStep/galore8bit/<model>    the same with bitsandbytes' 8-bit blockwise moments (GaLoreAdamW8bit)
//   BM_CudaStep/qgalore/<model>       Q-GaLore: INT8 weights, INT4 bases, 8-bit moments, per layer
//   BM_CudaStep/galore_measured/<model>, BM_CudaStepAll/galore_measured/<model>
//                                 with GemmSelection::Measured: each GEMM's algorithm timed at its first call
//   BM_CudaGemmFloorBatched/<model>  the same GEMMs batched per shape (pointer arrays): the floor of StepAll
//   BM_CudaStepAll/<galore|adamw>/<model>   the whole-model step (step_all), graph replay; adamw: the
//                                 fused multi-tensor full-rank AdamW over the same weights
//   BM_CudaStepAll/galore_eager/<model>     the same launches without the graph (its saving)
//   BM_CudaStepAll/galore_ws<32|64>mib/<model>  graph replay with a smaller workspace limit: smaller
//                                 chunks, whose R and D may stay in L2 between the GEMMs and Adam
// After timing, every StepAll benchmark (and BM_CudaStep, eager) runs one more step between
// cudaProfilerStart and cudaProfilerStop, for a profiler that starts with
// profiling off (ncu --profile-from-start off: tools/probe/profile_step.sh).
//   BM_CudaGemmFloor/<model>      the same two projection GEMMs per layer, bare cuBLAS (the floor; on
//                                 padded copies where the step pads)
//   BM_CudaCopy/<model>           a device copy of the weights (bytes moved = read + write)
//   BM_CudaRefresh/<exact|randomized|warm|warm_rayleigh_ritz>/llama1b/r512
//                                 a basis refresh of every matrix; counter `energy`: captured energy
//                                 relative to the exact top-r, averaged over the first block's 7 matrices.
//                                 warm: one subspace iteration G^T (G P^T) from the previous basis and
//                                 its orthonormalization (svd::WarmStart with rayleigh_ritz off);
//                                 warm_rayleigh_ritz: the same plus Rayleigh-Ritz (WarmStart's default)
//   BM_CudaRefresh/warm_batched/llama1b/r512
//                                 warm, with the matrices of each shape refreshed together
//                                 (cuda::compute_bases: batched orthonormalization)
//   BM_CudaQuant/<quantize|stochastic|dequantize|quantize4|dequantize4|adam8bit>/16777216
//                                 cuda::QuantizedWeight<8>'s kernels over 2^24 float elements (groups
//                                 of 256), the INT4 basis' packed codes (quantize4, dequantize4), and 8-bit blockwise Adam (cuda::adam8bit_step) over as many; counter `of_copy`: a device copy of the same bytes (read +
//                                 write) in the same run, over the kernel's time (1 = copy speed)
//   BM_CudaRefreshAll/<warm|warm_rayleigh_ritz|randomized>/llama1b/r512
//                                 a whole-model step at which every layer refreshes (step_all, gap 1):
//                                 per chunk the due layers' bases together, then the step, eagerly.
//                                 The refresh's own cost is this minus BM_CudaStepAll/galore.
#include <benchmark/benchmark.h>
#include <cuda_profiler_api.h>

#include <galore/cuda.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

using namespace galore;
using cuda::bf16;

namespace {

struct Model {
  std::string name;
  Index hidden, intermediate, layers, rank;
};
const Model kLlama1B{"llama1b/r512", 2048, 5461, 24, 512};
const Model kLlama7B8{"llama7b_8of32/r1024", 4096, 11008, 8, 1024};

std::vector<Shape> linear_shapes(const Model& m) {
  std::vector<Shape> s;
  for (Index l = 0; l < m.layers; ++l) {
    for (int i = 0; i < 4; ++i) s.push_back({m.hidden, m.hidden});
    s.push_back({m.intermediate, m.hidden});
    s.push_back({m.intermediate, m.hidden});
    s.push_back({m.hidden, m.intermediate});
  }
  return s;
}

void fill_gaussian(cuda::Context& ctx, bf16* out, std::size_t n, std::uint64_t seed) {
  cuda::DeviceBuffer<float> tmp(n);
  cuda::impl::gaussian<<<2048, 256, 0, ctx.stream()>>>(tmp.data(), 1, static_cast<std::int64_t>(n), seed);
  cuda::check_launch("gaussian");
  cuda::impl::convert<<<2048, 256, 0, ctx.stream()>>>(tmp.data(), out, static_cast<std::int64_t>(n));
  cuda::check_launch("convert");
  ctx.synchronize();
}

// A gradient-like matrix: rank-k signal with decaying spectrum plus 5% noise:
// G = A diag(0.995^i) B + noise, A m x k, B k x n Gaussian.
void fill_gradient(cuda::Context& ctx, bf16* G, Shape s, std::uint64_t seed, Index k = 1024) {
  cuda::DeviceBuffer<float> A(static_cast<std::size_t>(s.rows * k)), B(static_cast<std::size_t>(k * s.cols)),
      Gf(static_cast<std::size_t>(s.size()));
  cuda::impl::gaussian<<<2048, 256, 0, ctx.stream()>>>(A.data(), s.rows, k, seed);
  cuda::impl::gaussian<<<2048, 256, 0, ctx.stream()>>>(B.data(), k, s.cols, seed + 1);
  cuda::impl::gaussian<<<2048, 256, 0, ctx.stream()>>>(Gf.data(), s.rows, s.cols, seed + 2);
  cuda::check_launch("gaussian");
  // Decay: scale row i of B by 0.995^i (a host-built diagonal applied by a tiny GEMM would cost more code).
  std::vector<float> d(static_cast<std::size_t>(k * k), 0.0f);
  for (Index i = 0; i < k; ++i) d[static_cast<std::size_t>(i * k + i)] = std::pow(0.995f, static_cast<float>(i));
  cuda::DeviceBuffer<float> D(d.size()), DB(static_cast<std::size_t>(k * s.cols));
  cuda::check(cudaMemcpy(D.data(), d.data(), sizeof(float) * d.size(), cudaMemcpyHostToDevice), "cudaMemcpy");
  cuda::gemm(ctx, cuda::Op::N, cuda::Op::N, 1.0f, DeviceView<const float>(D.data(), k, k),
             DeviceView<const float>(B.data(), k, s.cols), 0.0f, DeviceView<float>(DB.data(), k, s.cols));
  // Signal Frobenius norm ~ sqrt(m * n * sum d^2); noise at 5% of it.
  double sum_d2 = 0.0;
  for (Index i = 0; i < k; ++i) sum_d2 += std::pow(0.995, 2.0 * static_cast<double>(i));
  const float noise = 0.05f * static_cast<float>(std::sqrt(sum_d2));
  cuda::gemm(ctx, cuda::Op::N, cuda::Op::N, 1.0f, DeviceView<const float>(A.data(), s.rows, k),
             DeviceView<const float>(DB.data(), k, s.cols), noise, DeviceView<float>(Gf.data(), s.rows, s.cols));
  cuda::impl::convert<<<2048, 256, 0, ctx.stream()>>>(Gf.data(), G, s.size());
  cuda::check_launch("convert");
  ctx.synchronize();
}

// Every linear layer's weight and gradient, allocated once per model.
struct Weights {
  std::vector<Shape> shapes;
  std::vector<cuda::DeviceBuffer<bf16>> W, G;
  std::size_t elements = 0;
};
Weights& weights_for(const Model& m, cuda::Context& ctx) {
  static std::unique_ptr<Weights> held;
  static std::string held_for;
  if (!held || held_for != m.name) {
    held.reset();
    held = std::make_unique<Weights>();
    held_for = m.name;
    held->shapes = linear_shapes(m);
    std::uint64_t seed = 1;
    for (Shape s : held->shapes) {
      held->W.emplace_back(static_cast<std::size_t>(s.size()));
      held->G.emplace_back(static_cast<std::size_t>(s.size()));
      fill_gaussian(ctx, held->W.back().data(), static_cast<std::size_t>(s.size()), seed++);
      fill_gaussian(ctx, held->G.back().data(), static_cast<std::size_t>(s.size()), seed++);
      held->elements += static_cast<std::size_t>(s.size());
    }
  }
  return *held;
}

struct Timer {
  cudaEvent_t start{}, stop{};
  Timer() {
    cuda::check(cudaEventCreate(&start), "cudaEventCreate");
    cuda::check(cudaEventCreate(&stop), "cudaEventCreate");
  }
  ~Timer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  template <class F>
  double seconds(cuda::Context& ctx, F&& f) {
    cuda::check(cudaEventRecord(start, ctx.stream()), "cudaEventRecord");
    f();
    cuda::check(cudaEventRecord(stop, ctx.stream()), "cudaEventRecord");
    cuda::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0.0f;
    cuda::check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    return ms * 1e-3;
  }
};

// Google Benchmark's loop over `pass` timed with CUDA events, after one
// untimed pass (plans, first-touch).
template <class F>
void time_passes(benchmark::State& state, cuda::Context& ctx, F&& pass) {
  pass();
  ctx.synchronize();
  Timer timer;
  for (auto _ : state) state.SetIterationTime(timer.seconds(ctx, pass));
}

double gemm_flops(const Model& m) {
  double f = 0.0;
  for (Shape s : linear_shapes(m)) f += 4.0 * static_cast<double>(m.rank) * static_cast<double>(s.size());
  return f;
}

// A non-blocking stream (graphs cannot capture the legacy default stream).
struct Stream {
  cudaStream_t s = nullptr;
  Stream() { cuda::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

// Per-layer steps, one call per layer on one stream. use_graph: the same
// calls captured once in a CUDA graph and replayed (a diagnostic: what launch
// overhead costs the eager calls). Counter host_ms: the host's time to enqueue
// one eager pass (when it nears the GPU's time, the host sets the pace).
// State: the moments' policy (float32, or bitsandbytes' 8-bit blockwise).
template <class State = state::Float32>
void BM_CudaStep(benchmark::State& state, const Model& m, bool galore_step, bool use_graph,
                 cuda::GemmSelection selection) {
  const Stream stream;
  cuda::Context ctx(stream.s);
  ctx.select_gemm_algorithms(selection);
  Weights& w = weights_for(m, ctx);
  cuda::GaLoreOptimizer<Projector<svd::Randomized>, LowRankAdam<State>> opt(
      ProjectorOptions{m.rank, ProjectionType::Std, 0.25f}, AdamConfig{}, schedule::FixedGap{1000000000});
  std::vector<LayerId> ids;
  for (Shape s : w.shapes)
    ids.push_back(galore_step ? opt.add_layer(s, cuda::DType::BFloat16) : opt.add_dense(s, cuda::DType::BFloat16));
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  auto pass = [&] {
    for (std::size_t i = 0; i < ids.size(); ++i)
      opt.step(ids[i], w.W[i].data(), static_cast<const bf16*>(w.G[i].data()), ctx);
  };
  pass();  // the first step refreshes every basis
  ctx.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  pass();
  const auto t1 = std::chrono::steady_clock::now();
  ctx.synchronize();
  state.counters["host_ms"] = std::chrono::duration<double, std::milli>(t1 - t0).count();
  if (use_graph) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    cuda::check(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    pass();
    cuda::check(cudaStreamEndCapture(stream.s, &graph), "cudaStreamEndCapture");
    cuda::check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    time_passes(state, ctx, [&] { cuda::check(cudaGraphLaunch(exec, stream.s), "cudaGraphLaunch"); });
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  } else {
    time_passes(state, ctx, pass);
    cuda::check(cudaProfilerStart(), "cudaProfilerStart");
    pass();
    ctx.synchronize();
    cuda::check(cudaProfilerStop(), "cudaProfilerStop");
  }
  state.counters["layers"] = static_cast<double>(ids.size());
  state.counters["state_MiB"] = static_cast<double>(opt.state_bytes()) / (1 << 20);
  if (galore_step) state.counters["gemm_TFLOPs"] = benchmark::Counter(gemm_flops(m) * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
}

// Q-GaLore per layer: every weight an INT8 QuantizedWeight<8> (groups of 256,
// re-quantized by stochastic rounding), INT4 bases (a group per row) and 8-bit
// moments, QGaLoreAdamW8bit's policies but the randomized SVD and a fixed gap
// (the steady step; no refresh is timed). Counter weights_MiB: the INT8
// weights' bytes.
void BM_CudaStepQGaLore(benchmark::State& state, const Model& m) {
  const Stream stream;
  cuda::Context ctx(stream.s);
  Weights& w = weights_for(m, ctx);
  cuda::GaLoreOptimizer<Projector<svd::Randomized, quant::Int4, schedule::FixedGap>, LowRankAdam<state::Blockwise8bit>>
      opt(ProjectorOptions{m.rank, ProjectionType::Std, 0.25f}, AdamConfig{}, schedule::FixedGap{1000000000});
  std::vector<LayerId> ids;
  std::vector<cuda::QuantizedWeight<8>> Q;
  std::size_t weight_bytes = 0;
  for (std::size_t i = 0; i < w.shapes.size(); ++i) {
    const Shape s = w.shapes[i];
    ids.push_back(opt.add_layer(s, cuda::DType::BFloat16));
    Q.emplace_back(s);
    Q.back().quantize(DeviceView<const bf16>(w.W[i].data(), s.rows, s.cols), ctx);
    weight_bytes += Q.back().bytes();
  }
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  auto pass = [&] {
    for (std::size_t i = 0; i < ids.size(); ++i)
      opt.step(ids[i], Q[i], DeviceView<const bf16>(w.G[i].data(), w.shapes[i].rows, w.shapes[i].cols), ctx);
  };
  pass();  // the first step refreshes every basis
  ctx.synchronize();
  time_passes(state, ctx, pass);
  state.counters["layers"] = static_cast<double>(ids.size());
  state.counters["state_MiB"] = static_cast<double>(opt.state_bytes()) / (1 << 20);
  state.counters["weights_MiB"] = static_cast<double>(weight_bytes) / (1 << 20);
}

// Every weight registered with opt (projected, or dense AdamW layers) and its step_all parameter.
template <class Opt>
std::vector<cuda::StepParam> register_all(Opt& opt, Weights& w, bool projected) {
  std::vector<cuda::StepParam> params;
  for (std::size_t i = 0; i < w.shapes.size(); ++i) {
    const Shape s = w.shapes[i];
    const LayerId id = projected ? opt.add_layer(s, cuda::DType::BFloat16) : opt.add_dense(s, cuda::DType::BFloat16);
    params.push_back(cuda::step_param(id, DeviceView<bf16>(w.W[i].data(), s.rows, s.cols),
                                      DeviceView<const bf16>(w.G[i].data(), s.rows, s.cols)));
  }
  return params;
}

// The whole-model step (plan_step_all / step_all): per chunk of same-shape
// layers one batched projection GEMM, one Adam kernel, one batched
// back-projection; the steady step replayed as a CUDA graph. adamw: every layer
// dense, all in one multi-tensor AdamW kernel (the fused full-rank baseline).
void BM_CudaStepAll(benchmark::State& state, const Model& m, bool galore_step, bool use_graph,
                    std::size_t workspace_limit, cuda::GemmSelection selection) {
  const Stream stream;
  {
    cuda::Context ctx(stream.s);
    ctx.select_gemm_algorithms(selection);
    Weights& w = weights_for(m, ctx);
    cuda::GaLoreOptimizer<Projector<svd::Randomized>> opt(ProjectorOptions{m.rank, ProjectionType::Std, 0.25f},
                                                           AdamConfig{}, schedule::FixedGap{1000000000});
    const std::vector<cuda::StepParam> params = register_all(opt, w, galore_step);
    cuda::StepPlanOptions options;
    options.use_graph = use_graph;
    options.workspace_limit = workspace_limit;
    cuda::StepPlan plan = opt.plan_step_all(params, ctx, options);
    opt.step_all(plan, ctx);  // the first step refreshes every basis (eagerly)
    const cuda::StepAllResult first = opt.step_all(plan, ctx);  // captures the graph
    ctx.synchronize();
    if (first.graph != use_graph) state.SkipWithError("the steady step was not launched as asked (graph or eager)");
    Timer timer;
    for (auto _ : state) state.SetIterationTime(timer.seconds(ctx, [&] { opt.step_all(plan, ctx); }));
    cuda::check(cudaProfilerStart(), "cudaProfilerStart");
    opt.step_all(plan, ctx);
    ctx.synchronize();
    cuda::check(cudaProfilerStop(), "cudaProfilerStop");
    state.counters["layers"] = static_cast<double>(params.size());
    state.counters["chunks"] = static_cast<double>(plan.num_chunks());
    state.counters["workspace_MiB"] = static_cast<double>(plan.workspace_bytes()) / (1 << 20);
    state.counters["state_MiB"] = static_cast<double>(opt.state_bytes()) / (1 << 20);
    if (galore_step)
      state.counters["gemm_TFLOPs"] = benchmark::Counter(gemm_flops(m) * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  }
}

void BM_CudaGemmFloor(benchmark::State& state, const Model& m) {
  cuda::Context ctx;
  Weights& w = weights_for(m, ctx);
  // The step's two products: right R = G P^T (float out), W = W - D P (bf16);
  // left R = P^T G, W = W - P D, on copies padded to a multiple of 8 columns
  // where the step pads them (staging.cuh; the copies themselves are not timed).
  std::vector<cuda::DeviceBuffer<bf16>> P, D, Gpad, Wpad;
  std::vector<cuda::DeviceBuffer<float>> R;
  for (Shape s : w.shapes) {
    const bool right = s.rows >= s.cols;
    const Index cols = right ? s.cols : cuda::padded_cols(s.cols);
    P.emplace_back(static_cast<std::size_t>(m.rank * (right ? s.cols : s.rows)));
    D.emplace_back(static_cast<std::size_t>(m.rank * (right ? s.rows : cols)));
    R.emplace_back(static_cast<std::size_t>(m.rank * (right ? s.rows : cols)));
    fill_gaussian(ctx, P.back().data(), P.back().size(), 7);
    fill_gaussian(ctx, D.back().data(), D.back().size(), 8);
    const bool pad = cols != s.cols;
    Gpad.emplace_back(pad ? static_cast<std::size_t>(s.rows * cols) : 0);
    Wpad.emplace_back(pad ? static_cast<std::size_t>(s.rows * cols) : 0);
    if (pad) {
      fill_gaussian(ctx, Gpad.back().data(), Gpad.back().size(), 9);
      fill_gaussian(ctx, Wpad.back().data(), Wpad.back().size(), 10);
    }
  }
  auto pass = [&] {
    for (std::size_t i = 0; i < w.shapes.size(); ++i) {
      const Shape s = w.shapes[i];
      if (s.rows >= s.cols) {
        const DeviceView<const bf16> G(w.G[i].data(), s.rows, s.cols);
        const DeviceView<bf16> W(w.W[i].data(), s.rows, s.cols);
        cuda::gemm(ctx, cuda::Op::N, cuda::Op::T, 1.0f, G, DeviceView<const bf16>(P[i].data(), m.rank, s.cols), 0.0f,
                   DeviceView<float>(R[i].data(), s.rows, m.rank));
        cuda::gemm(ctx, cuda::Op::N, cuda::Op::N, -1e-9f, DeviceView<const bf16>(D[i].data(), s.rows, m.rank),
                   DeviceView<const bf16>(P[i].data(), m.rank, s.cols), 1.0f, W);
      } else {
        const bool pad = Gpad[i].size() > 0;
        const Index cols = pad ? cuda::padded_cols(s.cols) : s.cols;
        const DeviceView<const bf16> G(pad ? Gpad[i].data() : w.G[i].data(), s.rows, cols);
        const DeviceView<bf16> W(pad ? Wpad[i].data() : w.W[i].data(), s.rows, cols);
        cuda::gemm(ctx, cuda::Op::T, cuda::Op::N, 1.0f, DeviceView<const bf16>(P[i].data(), s.rows, m.rank), G, 0.0f,
                   DeviceView<float>(R[i].data(), m.rank, cols));
        cuda::gemm(ctx, cuda::Op::N, cuda::Op::N, -1e-9f, DeviceView<const bf16>(P[i].data(), s.rows, m.rank),
                   DeviceView<const bf16>(D[i].data(), m.rank, cols), 1.0f, W);
      }
    }
  };
  time_passes(state, ctx, pass);
  state.counters["TFLOPs"] = benchmark::Counter(gemm_flops(m) * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
}

// The batched step's GEMMs alone: per group of same-shape layers, the
// projection and the back-projection as two pointer-array batched GEMMs
// (cuda::gemm_batched), on padded copies where the step pads (left layers whose
// column count is not a multiple of 8). The floor of BM_CudaStepAll.
void BM_CudaGemmFloorBatched(benchmark::State& state, const Model& m) {
  cuda::Context ctx;
  Weights& w = weights_for(m, ctx);
  struct Group {
    Shape shape;
    bool right = true;
    Index cols = 0;  // padded when the step pads
    std::vector<std::size_t> layers;
    std::vector<cuda::DeviceBuffer<bf16>> P, D, Gpad, Wpad;
    std::vector<cuda::DeviceBuffer<float>> R;
    cuda::DeviceBuffer<void*> arrays;  // proj A, B, C, back A, B, C
  };
  std::vector<Group> groups;
  for (std::size_t i = 0; i < w.shapes.size(); ++i) {
    const Shape s = w.shapes[i];
    auto g = std::find_if(groups.begin(), groups.end(), [&](const Group& x) { return x.shape.rows == s.rows && x.shape.cols == s.cols; });
    if (g == groups.end()) {
      groups.emplace_back();
      g = groups.end() - 1;
      g->shape = s;
      g->right = s.rows >= s.cols;
      g->cols = g->right ? s.cols : cuda::padded_cols(s.cols);
    }
    g->layers.push_back(i);
  }
  for (Group& g : groups) {
    const Index m_ = g.shape.rows, n = g.cols, r = m.rank;
    const std::size_t k = g.layers.size();
    std::vector<void*> host(6 * k);
    for (std::size_t j = 0; j < k; ++j) {
      const std::size_t i = g.layers[j];
      const bool pad = g.cols != g.shape.cols;
      g.P.emplace_back(static_cast<std::size_t>(r * (g.right ? n : m_)));
      g.D.emplace_back(static_cast<std::size_t>(r * (g.right ? m_ : n)));
      g.R.emplace_back(static_cast<std::size_t>(r * (g.right ? m_ : n)));
      fill_gaussian(ctx, g.P.back().data(), g.P.back().size(), 7);
      fill_gaussian(ctx, g.D.back().data(), g.D.back().size(), 8);
      if (pad) {
        g.Gpad.emplace_back(static_cast<std::size_t>(m_ * n));
        g.Wpad.emplace_back(static_cast<std::size_t>(m_ * n));
        fill_gaussian(ctx, g.Gpad.back().data(), g.Gpad.back().size(), 9);
        fill_gaussian(ctx, g.Wpad.back().data(), g.Wpad.back().size(), 10);
      }
      void* G = pad ? g.Gpad.back().data() : w.G[i].data();
      void* W = pad ? g.Wpad.back().data() : w.W[i].data();
      void* P = g.P.back().data();
      void* D = g.D.back().data();
      host[j] = g.right ? G : P;
      host[k + j] = g.right ? P : G;
      host[2 * k + j] = g.R.back().data();
      host[3 * k + j] = g.right ? D : P;
      host[4 * k + j] = g.right ? P : D;
      host[5 * k + j] = W;
    }
    g.arrays = cuda::DeviceBuffer<void*>(host.size());
    cuda::check(cudaMemcpy(g.arrays.data(), host.data(), sizeof(void*) * host.size(), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  const float scalars[4] = {1.0f, 0.0f, -1e-9f, 1.0f};
  cuda::DeviceBuffer<float> dev_scalars(4);
  cuda::check(cudaMemcpy(dev_scalars.data(), scalars, sizeof scalars, cudaMemcpyHostToDevice), "cudaMemcpy");
  const float* one = dev_scalars.data();
  auto pass = [&] {
    for (Group& g : groups) {
      const Index m_ = g.shape.rows, n = g.cols, r = m.rank;
      const int k = static_cast<int>(g.layers.size());
      auto in = [&](int slot) { return reinterpret_cast<const bf16* const*>(g.arrays.data() + slot * k); };
      float* const* R = reinterpret_cast<float* const*>(g.arrays.data() + 2 * k);
      if (g.right)  // R = G P^T
        cuda::gemm_batched<bf16, float>(ctx, cuda::Op::N, cuda::Op::T, m_, r, n, one, in(0), n, in(1), n, one + 1, R, r,
                                        k, 256u);
      else  // R = P^T G
        cuda::gemm_batched<bf16, float>(ctx, cuda::Op::T, cuda::Op::N, r, n, m_, one, in(0), r, in(1), n, one + 1, R, n,
                                        k, 256u);
      // W -= D P (right) or P D (left): m x r times r x n either way.
      cuda::gemm_batched<bf16, bf16>(ctx, cuda::Op::N, cuda::Op::N, m_, n, r, one + 2, in(3), r, in(4), n, one + 3,
                                     reinterpret_cast<bf16* const*>(g.arrays.data() + 5 * k), n, k, 256u);
    }
  };
  time_passes(state, ctx, pass);
  state.counters["TFLOPs"] = benchmark::Counter(gemm_flops(m) * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_CudaCopy(benchmark::State& state, const Model& m) {
  cuda::Context ctx;
  Weights& w = weights_for(m, ctx);
  cuda::DeviceBuffer<bf16> dst(w.elements);
  auto pass = [&] {
    std::size_t at = 0;
    for (std::size_t i = 0; i < w.W.size(); ++i) {
      cuda::check(cudaMemcpyAsync(dst.data() + at, w.W[i].data(), w.W[i].bytes(), cudaMemcpyDeviceToDevice, ctx.stream()),
                  "cudaMemcpyAsync");
      at += w.W[i].size();
    }
  };
  time_passes(state, ctx, pass);
  state.counters["GBps"] = benchmark::Counter(2.0 * sizeof(bf16) * static_cast<double>(w.elements) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

// Refresh of every matrix with one policy; gradients are gradient-like, and the
// warm start starts from the randomized basis of a drifted earlier gradient.
template <class Policy>
void BM_CudaRefresh(benchmark::State& state, Policy policy, bool warm, bool batched) {
  const Model& m = kLlama1B;
  cuda::Context ctx;
  const std::vector<Shape> shapes = linear_shapes(m);
  std::vector<cuda::DeviceBuffer<bf16>> G, P, Pnew;
  std::size_t ws_bytes = 0;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const Shape s = shapes[i];
    const Index side_len = s.rows >= s.cols ? s.cols : s.rows;
    G.emplace_back(static_cast<std::size_t>(s.size()));
    // Matrices of the same shape share signal and differ by noise: cheap to make, same spectrum.
    fill_gradient(ctx, G.back().data(), s, 100 + 3 * (i % 7));
    P.emplace_back(static_cast<std::size_t>(m.rank * side_len));
    Pnew.emplace_back(static_cast<std::size_t>(m.rank * side_len));
    ws_bytes = std::max({ws_bytes, cuda::compute_basis_bytes<bf16>(ctx, policy, s.rows, s.cols, m.rank, Side::Right),
                         cuda::compute_basis_bytes<bf16>(ctx, svd::Randomized{}, s.rows, s.cols, m.rank, Side::Right),
                         cuda::compute_basis_bytes<bf16>(ctx, svd::Exact{}, s.rows, s.cols, m.rank, Side::Right)});
  }
  ctx.reserve_workspace(ws_bytes);
  auto basis_of = [&](std::size_t i, cuda::DeviceBuffer<bf16>& buf) {
    const Shape s = shapes[i];
    cuda::DeviceBasis<bf16> b;
    b.rows = s.rows;
    b.cols = s.cols;
    b.rank = m.rank;
    b.side = s.rows >= s.cols ? Side::Right : Side::Left;
    (b.side == Side::Right ? b.right : b.left) = buf.data();
    return b;
  };
  if (warm) {  // previous bases: the randomized basis of each gradient before a 2% drift
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      auto ws = ctx.arena();
      cuda::compute_basis(ctx, ws, svd::Randomized{}, DeviceView<const bf16>(G[i].data(), shapes[i].rows, shapes[i].cols),
                          m.rank, basis_of(i, P[i]), nullptr);
    }
    for (std::size_t i = 0; i < shapes.size(); ++i) {  // drift: G += 2% fresh noise (via a GEMM-free axpy in float)
      cuda::DeviceBuffer<bf16> noise(G[i].size());
      fill_gaussian(ctx, noise.data(), noise.size(), 900 + i);
      cuda::DeviceBuffer<float> a(G[i].size()), b(G[i].size());
      cuda::impl::convert<<<2048, 256, 0, ctx.stream()>>>(G[i].data(), a.data(), static_cast<std::int64_t>(G[i].size()));
      cuda::impl::convert<<<2048, 256, 0, ctx.stream()>>>(noise.data(), b.data(), static_cast<std::int64_t>(G[i].size()));
      const float alpha = 0.02f;
      cuda::check(cublasSaxpy(ctx.blas(), static_cast<int>(G[i].size()), &alpha, b.data(), 1, a.data(), 1), "cublasSaxpy");
      cuda::impl::convert<<<2048, 256, 0, ctx.stream()>>>(a.data(), G[i].data(), static_cast<std::int64_t>(G[i].size()));
      ctx.synchronize();
    }
  }
  // Same-shape groups for the batched variant: matrix indices by shape.
  std::vector<std::vector<std::size_t>> groups;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    auto g = std::find_if(groups.begin(), groups.end(), [&](const auto& x) {
      return shapes[x[0]].rows == shapes[i].rows && shapes[x[0]].cols == shapes[i].cols;
    });
    if (g == groups.end()) groups.push_back({i});
    else g->push_back(i);
  }
  if constexpr (std::is_same_v<Policy, svd::WarmStart>) {
    if (batched) {
      for (const auto& g : groups) {
        const Shape s = shapes[g[0]];
        ws_bytes = std::max(ws_bytes, cuda::compute_bases_bytes<bf16>(ctx, policy, s.rows, s.cols, m.rank,
                                                                      basis_of(g[0], P[g[0]]).side,
                                                                      static_cast<Index>(g.size())));
      }
      ctx.reserve_workspace(ws_bytes);
    }
  }
  auto pass = [&] {
    if constexpr (std::is_same_v<Policy, svd::WarmStart>) {
      if (batched) {
        for (const auto& g : groups) {
          std::vector<DeviceView<const bf16>> views;
          std::vector<cuda::DeviceBasis<bf16>> outs, prev;
          for (std::size_t i : g) {
            views.emplace_back(G[i].data(), shapes[i].rows, shapes[i].cols);
            outs.push_back(basis_of(i, Pnew[i]));
            prev.push_back(basis_of(i, P[i]));
          }
          auto ws = ctx.arena();
          cuda::compute_bases(ctx, ws, policy, Span<const DeviceView<const bf16>>(views), m.rank,
                              Span<const cuda::DeviceBasis<bf16>>(outs), Span<const cuda::DeviceBasis<bf16>>(prev));
        }
        return;
      }
    }
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      auto ws = ctx.arena();
      const cuda::DeviceBasis<bf16> prev = basis_of(i, P[i]);
      cuda::compute_basis(ctx, ws, policy, DeviceView<const bf16>(G[i].data(), shapes[i].rows, shapes[i].cols), m.rank,
                          basis_of(i, Pnew[i]), warm ? &prev : nullptr);
    }
  };
  time_passes(state, ctx, pass);
  // Captured energy of the refreshed basis against the exact one, over the first block (7 matrices).
  double ratio = 0.0;
  for (std::size_t i = 0; i < 7; ++i) {
    const Shape s = shapes[i];
    const bool right = s.rows >= s.cols;
    cuda::DeviceBuffer<bf16> Pex(P[i].size());
    {
      auto ws = ctx.arena();
      cuda::compute_basis(ctx, ws, svd::Exact{}, DeviceView<const bf16>(G[i].data(), s.rows, s.cols), m.rank,
                          basis_of(i, Pex), nullptr);
    }
    auto captured = [&](cuda::DeviceBuffer<bf16>& basis) {
      const Index len = right ? s.rows : s.cols;
      cuda::DeviceBuffer<float> R(static_cast<std::size_t>(len * m.rank));
      const DeviceView<const bf16> Gv(G[i].data(), s.rows, s.cols);
      if (right)
        cuda::gemm(ctx, cuda::Op::N, cuda::Op::T, 1.0f, Gv, DeviceView<const bf16>(basis.data(), m.rank, s.cols), 0.0f,
                   DeviceView<float>(R.data(), s.rows, m.rank));
      else
        cuda::gemm(ctx, cuda::Op::T, cuda::Op::N, 1.0f, DeviceView<const bf16>(basis.data(), s.rows, m.rank), Gv, 0.0f,
                   DeviceView<float>(R.data(), m.rank, s.cols));
      float nrm = 0.0f;
      cuda::check(cublasSnrm2(ctx.blas(), static_cast<int>(R.size()), R.data(), 1, &nrm), "cublasSnrm2");
      return static_cast<double>(nrm) * nrm;
    };
    ratio += captured(Pnew[i]) / captured(Pex);
  }
  state.counters["energy"] = ratio / 7.0;
  state.counters["matrices"] = static_cast<double>(shapes.size());
}

// The INT8 weight's kernels (the finiteness check of quantize() and
// requantize_rows() left out: the step will rely on its skip decision), the
// INT4 basis' (packed codes, groups of 256), and 8-bit Adam.
enum class QuantKernel { Quantize, Stochastic, Dequantize, Quantize4, Dequantize4, Adam8bit };
void BM_CudaQuant(benchmark::State& state, QuantKernel kernel) {
  const std::int64_t n = std::int64_t{1} << 24, cols = 4096, rows = n / cols;
  cuda::Context ctx;
  cuda::DeviceBuffer<float> x(static_cast<std::size_t>(n));
  cuda::impl::gaussian<<<2048, 256, 0, ctx.stream()>>>(x.data(), rows, cols, 5);
  cuda::check_launch("gaussian");
  cuda::QuantizedWeight<8> q({rows, cols});
  q.quantize(DeviceView<const float>(x.data(), rows, cols), ctx);
  cuda::QuantizedWeight<4> q4({rows, cols});
  q4.quantize(DeviceView<const float>(x.data(), rows, cols), ctx);
  const bool four = kernel == QuantKernel::Quantize4 || kernel == QuantKernel::Dequantize4;
  std::uint32_t step = 0;
  cuda::Blockwise8bitMoments moments(kernel == QuantKernel::Adam8bit ? n : 1);
  const cuda::DynamicMaps maps;
  cuda::DeviceBuffer<float> d(kernel == QuantKernel::Adam8bit ? static_cast<std::size_t>(n) : 1);
  auto pass = [&] {
    switch (kernel) {
      case QuantKernel::Quantize:
        cuda::impl::launch_quantize_groups<float, false>(x.data(), cols, cols, 0, n, q.group_size(), q.codes(),
                                                         q.scales(), q.zeros(), 0, 0, 0, nullptr, ctx.stream());
        break;
      case QuantKernel::Stochastic:
        cuda::impl::launch_quantize_groups<float, true>(x.data(), cols, cols, 0, n, q.group_size(), q.codes(),
                                                        q.scales(), q.zeros(), 7, 1, ++step, nullptr, ctx.stream());
        break;
      case QuantKernel::Dequantize:
        q.dequantize(DeviceView<float>(x.data(), rows, cols), ctx);
        break;
      case QuantKernel::Quantize4:
        cuda::impl::launch_quantize_packed4(x.data(), cols, cols, n, q4.group_size(), q4.codes(), q4.scales(),
                                            q4.zeros(), ctx.stream());
        break;
      case QuantKernel::Dequantize4:
        q4.dequantize(DeviceView<float>(x.data(), rows, cols), ctx);
        break;
      case QuantKernel::Adam8bit:
        cuda::adam8bit_step(ctx, moments, maps, x.data(), d.data(),
                            math::adam8bit_coefficients(1e-3, 0.9, 0.999, 1e-8, ++step, true));
        break;
    }
  };
  time_passes(state, ctx, pass);
  // Bytes moved: 4 per float read or written, 1 per code read or written (half
  // a byte for 4-bit codes), 5 per group; 8-bit Adam reads g and two codes and
  // writes two codes and d, plus two absmax per block of 256 read and written.
  const std::size_t bytes = kernel == QuantKernel::Adam8bit
                                ? static_cast<std::size_t>(n) * 12 + static_cast<std::size_t>(moments.blocks()) * 16
                                : static_cast<std::size_t>(n) * 4 + static_cast<std::size_t>(four ? n / 2 : n) +
                                      static_cast<std::size_t>(q.num_groups()) * 5;
  cuda::DeviceBuffer<unsigned char> a(bytes / 2), b(bytes / 2);
  Timer timer;
  double copy = 0.0, own = 0.0;
  for (int i = 0; i < 20; ++i) {
    own += timer.seconds(ctx, pass);
    copy += timer.seconds(ctx, [&] {
      cuda::check(cudaMemcpyAsync(b.data(), a.data(), a.bytes(), cudaMemcpyDeviceToDevice, ctx.stream()), "cudaMemcpyAsync");
    });
  }
  state.counters["GBps"] = benchmark::Counter(static_cast<double>(bytes) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["of_copy"] = copy / own;
}

// A whole-model step at which every layer refreshes: gap 1, so every pass is
// a refresh step (the first one cold, the later ones warm).
template <class Policy>
void BM_CudaRefreshAll(benchmark::State& state, const Model& m, Policy policy, std::size_t workspace_limit) {
  const Stream stream;
  {
    cuda::Context ctx(stream.s);
    Weights& w = weights_for(m, ctx);
    cuda::GaLoreOptimizer<Projector<Policy>> opt(ProjectorOptions{m.rank, ProjectionType::Std, 0.25f}, AdamConfig{},
                                                  schedule::FixedGap{1}, policy);
    const std::vector<cuda::StepParam> params = register_all(opt, w, true);
    cuda::StepPlanOptions options;
    options.workspace_limit = workspace_limit;
    cuda::StepPlan plan = opt.plan_step_all(params, ctx, options);
    cuda::StepAllResult last;
    time_passes(state, ctx, [&] { last = opt.step_all(plan, ctx); });
    if (last.refreshed != static_cast<int>(params.size())) state.SkipWithError("a step did not refresh every layer");
    state.counters["layers"] = static_cast<double>(params.size());
    state.counters["chunks"] = static_cast<double>(plan.num_chunks());
    state.counters["workspace_MiB"] = static_cast<double>(plan.workspace_bytes()) / (1 << 20);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("galore_bench_cuda: no CUDA device, nothing to measure\n");
    return 0;
  }
  for (const Model* m : {&kLlama1B, &kLlama7B8}) {
    benchmark::RegisterBenchmark(("BM_CudaCopy/" + m->name).c_str(), BM_CudaCopy, *m)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaGemmFloor/" + m->name).c_str(), BM_CudaGemmFloor, *m)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaGemmFloorBatched/" + m->name).c_str(), BM_CudaGemmFloorBatched, *m)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaStep/galore/" + m->name).c_str(), BM_CudaStep<>, *m, true, false, cuda::GemmSelection::Heuristic)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaStep/galore_measured/" + m->name).c_str(), BM_CudaStep<>, *m, true, false, cuda::GemmSelection::Measured)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaStep/galore_graph/" + m->name).c_str(), BM_CudaStep<>, *m, true, true, cuda::GemmSelection::Heuristic)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaStep/adamw/" + m->name).c_str(), BM_CudaStep<>, *m, false, false, cuda::GemmSelection::Heuristic)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaStep/galore8bit/" + m->name).c_str(), BM_CudaStep<state::Blockwise8bit>, *m, true, false, cuda::GemmSelection::Heuristic)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaStep/qgalore/" + m->name).c_str(), BM_CudaStepQGaLore, *m)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    const std::size_t limit = cuda::StepPlanOptions{}.workspace_limit, mib = std::size_t{1} << 20;
    benchmark::RegisterBenchmark(("BM_CudaStepAll/galore/" + m->name).c_str(), BM_CudaStepAll, *m, true, true, limit, cuda::GemmSelection::Heuristic)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaStepAll/galore_measured/" + m->name).c_str(), BM_CudaStepAll, *m, true, true, limit, cuda::GemmSelection::Measured)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaStepAll/galore_eager/" + m->name).c_str(), BM_CudaStepAll, *m, true, false, limit, cuda::GemmSelection::Heuristic)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaStepAll/galore_ws32mib/" + m->name).c_str(), BM_CudaStepAll, *m, true, true, 32 * mib, cuda::GemmSelection::Heuristic)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaStepAll/galore_ws64mib/" + m->name).c_str(), BM_CudaStepAll, *m, true, true, 64 * mib, cuda::GemmSelection::Heuristic)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark(("BM_CudaStepAll/adamw/" + m->name).c_str(), BM_CudaStepAll, *m, false, true, limit, cuda::GemmSelection::Heuristic)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
  }
  benchmark::RegisterBenchmark("BM_CudaRefresh/exact/llama1b/r512", BM_CudaRefresh<svd::Exact>, svd::Exact{}, false, false)
      ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(1);
  benchmark::RegisterBenchmark("BM_CudaRefresh/randomized/llama1b/r512", BM_CudaRefresh<svd::Randomized>, svd::Randomized{}, false, false)
      ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
  svd::WarmStart subspace;
  subspace.rayleigh_ritz = false;
  benchmark::RegisterBenchmark("BM_CudaRefresh/warm/llama1b/r512", BM_CudaRefresh<svd::WarmStart>, subspace, true, false)
      ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
  benchmark::RegisterBenchmark("BM_CudaRefresh/warm_batched/llama1b/r512", BM_CudaRefresh<svd::WarmStart>, subspace,
                               true, true)
      ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
  benchmark::RegisterBenchmark("BM_CudaRefresh/warm_rayleigh_ritz/llama1b/r512", BM_CudaRefresh<svd::WarmStart>,
                               svd::WarmStart{}, true, false)
      ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
  for (const auto& [name, kernel] : {std::pair{"quantize", QuantKernel::Quantize}, std::pair{"stochastic", QuantKernel::Stochastic},
                                     std::pair{"dequantize", QuantKernel::Dequantize}, std::pair{"quantize4", QuantKernel::Quantize4},
                                     std::pair{"dequantize4", QuantKernel::Dequantize4}, std::pair{"adam8bit", QuantKernel::Adam8bit}})
    benchmark::RegisterBenchmark((std::string("BM_CudaQuant/") + name + "/16777216").c_str(), BM_CudaQuant, kernel)
        ->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
  const std::size_t limit = cuda::StepPlanOptions{}.workspace_limit;
  benchmark::RegisterBenchmark("BM_CudaRefreshAll/warm/llama1b/r512", BM_CudaRefreshAll<svd::WarmStart>, kLlama1B,
                               subspace, limit)
      ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
  // The same with other workspace limits: chunks (and so refresh batches) larger or smaller.
  benchmark::RegisterBenchmark("BM_CudaRefreshAll/warm_ws32mib/llama1b/r512", BM_CudaRefreshAll<svd::WarmStart>, kLlama1B,
                               subspace, std::size_t{32} << 20)
      ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
  benchmark::RegisterBenchmark("BM_CudaRefreshAll/warm_1gib/llama1b/r512", BM_CudaRefreshAll<svd::WarmStart>, kLlama1B,
                               subspace, std::size_t{1} << 30)
      ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
  benchmark::RegisterBenchmark("BM_CudaRefreshAll/warm_rayleigh_ritz/llama1b/r512", BM_CudaRefreshAll<svd::WarmStart>,
                               kLlama1B, svd::WarmStart{}, limit)
      ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
  benchmark::RegisterBenchmark("BM_CudaRefreshAll/randomized/llama1b/r512", BM_CudaRefreshAll<svd::Randomized>, kLlama1B,
                               svd::Randomized{}, limit)
      ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(2);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
