// Q-GaLore's quantized bases on the GPU (quant::MinMax<4> and <8> in
// cuda::GaLoreOptimizer, cuda::QGaLoreAdamW8bit): against q_galore_torch's
// golden projector cases, against the CPU facade with the same policies, and
// their memory, skipped steps, errors and checkpoints.
#include <doctest/doctest.h>

#include <galore/cuda.hpp>
#include <galore/math/quant_codes.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "cpu_reference.hpp"
#include "cuda_support.cuh"
#include "golden_reader.hpp"

using namespace galore;
using galore_test::Device;

namespace galore_test {

// An SVD policy that hands out given one-sided bases: factors[*step] (the
// golden case's unquantized ortho_float of the step in progress, as
// test_cuda_golden.cu replays its cases, or one matrix with the quantizers need
// no orthonormality).
struct HandOut {
  const std::vector<std::vector<float>>* factors = nullptr;
  const long* step = nullptr;
};

template <class T>
std::size_t compute_basis_bytes(cuda::Context&, const HandOut&, Index, Index, Index, Side) {
  return 0;
}

template <class T>
void compute_basis(cuda::Context& ctx, cuda::WorkspaceArena&, const HandOut& p, DeviceView<const T>, Index,
                   const cuda::DeviceBasis<T>& out, const cuda::DeviceBasis<T>*) {
  static_assert(std::is_same_v<T, float>, "float layers");
  const std::vector<float>& P = (*p.factors)[static_cast<std::size_t>(*p.step)];
  cuda::check(cudaMemcpyAsync(out.left ? out.left : out.right, P.data(), sizeof(float) * P.size(),
                              cudaMemcpyHostToDevice, ctx.stream()),
              "cudaMemcpyAsync");
  ctx.synchronize();  // the host vector is pageable
}

}  // namespace galore_test

namespace {

// A quantized factor in host memory (min-max, or NF4: absmax in `scales`).
struct HostCodes {
  std::vector<std::uint8_t> codes, zeros;
  std::vector<float> scales;
  Index group = 0;
  int bits = 0;
  bool nf4 = false;
  std::size_t size = 0;

  std::uint8_t code(std::size_t i) const {
    return bits == 8 ? codes[i] : static_cast<std::uint8_t>((codes[i / 2] >> (4 * (i % 2))) & 15u);
  }
  std::vector<float> dequantized() const {
    std::vector<float> out(size);
    for (std::size_t i = 0; i < size; ++i) {
      const std::size_t g = i / static_cast<std::size_t>(group);
      out[i] = nf4 ? quant::nf4_value(code(i)) * scales[g]
                   : math::minmax_value(code(i), scales[g], static_cast<float>(zeros[g]));
    }
    return out;
  }
  bool operator==(const HostCodes& o) const {
    return codes == o.codes && zeros == o.zeros && scales == o.scales && group == o.group;
  }
};

HostCodes download(const cuda::DeviceQuantizedFactor& f) {
  HostCodes h;
  h.group = f.group_size;
  h.bits = f.bits;
  h.nf4 = f.nf4;
  h.size = static_cast<std::size_t>(f.shape.size());
  h.codes.resize(f.code_bytes());
  h.scales.resize(static_cast<std::size_t>(f.groups()));
  h.zeros.resize(f.zero_bytes());
  cuda::check(cudaDeviceSynchronize(), "sync");
  cuda::check(cudaMemcpy(h.codes.data(), f.codes, h.codes.size(), cudaMemcpyDeviceToHost), "download");
  cuda::check(cudaMemcpy(h.scales.data(), f.scales, 4 * h.scales.size(), cudaMemcpyDeviceToHost), "download");
  if (!h.zeros.empty())
    cuda::check(cudaMemcpy(h.zeros.data(), f.zeros, h.zeros.size(), cudaMemcpyDeviceToHost), "download");
  return h;
}

// The factor a one-sided layer keeps.
const cuda::DeviceQuantizedFactor& one_factor(const cuda::DeviceQuantizedBasis& b) {
  return b.side == Side::Left ? b.left : b.right;
}

// The CPU's codes of x (rows x cols) in groups of `group` (-1: per row).
galore_test::CpuCodes cpu_codes(int bits, const std::vector<float>& x, long rows, long cols, long group) {
  if (bits == 4) return galore_test::cpu_minmax_codes4(x, rows, cols, group);
  return galore_test::cpu_minmax_codes(x, group == -1 ? cols : group);
}

template <class Quant, class State = state::Float32, class Schedule = schedule::FixedGap, class SVD = svd::Exact>
using QOptOf = cuda::GaLoreOptimizer<Projector<SVD, Quant, Schedule>, LowRankAdam<State>>;
template <int Bits, class State = state::Float32, class Schedule = schedule::FixedGap, class SVD = svd::Exact>
using QOpt = QOptOf<quant::MinMax<Bits>, State, Schedule, SVD>;

// The GPU's settings of a RunSpec's basis quantization.
template <class Quant>
auto quant_settings(const galore_test::RunSpec& s) {
  if constexpr (std::is_same_v<Quant, quant::NF4>) return quant::NF4Settings{s.basis_block};
  else return quant::MinMaxSettings{s.basis_group};
}

template <class F>
void with_bits(long bits, F&& f) {
  if (bits == 4) f(std::integral_constant<int, 4>{});
  else if (bits == 8) f(std::integral_constant<int, 8>{});
  else FAIL("unsupported n_bit ", bits);
}

std::size_t mismatches(const std::vector<float>& a, const std::vector<float>& b) {
  std::size_t n = a.size() == b.size() ? 0 : 1;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) n += a[i] != b[i];
  return n;
}

}  // namespace

TEST_CASE("golden qgalore_projector on the GPU: codes, dequantized bases, projections, gaps, SVD counts, cosines") {
  const auto cases = galore_test::golden_qgalore_cases();
  REQUIRE_MESSAGE(!cases.empty(), "no qgalore_projector case in ", galore_test::golden_folder());
  for (const galore_test::GoldenQGaLore& c : cases) {
    CAPTURE(c.name);
    with_bits(c.bits, [&](auto bits) {
      constexpr int B = decltype(bits)::value;
      long step = 0;
      using Opt = QOpt<B, state::Float32, schedule::Lazy, galore_test::HandOut>;
      AdamConfig adam;
      adam.beta1 = 0.0;  // the first moment is then the projected gradient R itself
      cuda::Context ctx;
      Opt opt(ProjectorOptions{c.rank, ProjectionType::Std, static_cast<float>(c.scale)}, adam,
              schedule::Lazy{c.gap, c.cos_threshold, c.gamma, static_cast<int>(c.queue_size)},
              galore_test::HandOut{&c.ortho_float, &step}, WeightRounding{}, {}, quant::MinMaxSettings{c.group_size});
      const LayerId id = opt.add_layer({c.m, c.n}, cuda::DType::Float32);
      ctx.reserve_workspace(opt.workspace_bytes(ctx));
      const Side side = opt.side(id);
      const long rows = side == Side::Right ? c.rank : c.m, cols = side == Side::Right ? c.n : c.rank;
      Device<float> W(galore_test::gaussian(static_cast<std::size_t>(c.m * c.n), 9u)), G(c.G[0]);
      for (step = 0; step < c.steps; ++step) {
        CAPTURE(step);
        const auto t = static_cast<std::size_t>(step);
        const std::int64_t count_before = opt.svd_count(id);
        G.upload(c.G[t]);
        opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
        REQUIRE(opt.status(id, ctx) == StepStatus::Applied);
        const HostCodes ours = download(one_factor(opt.quantized_basis(id)));
        const galore_test::CpuCodes cpu = cpu_codes(B, c.ortho_float[t], rows, cols, c.group_size);
        CHECK(ours.codes == cpu.codes);  // the CPU's quantizer, bit for bit
        CHECK(ours.scales == cpu.scales);
        CHECK(ours.zeros == cpu.zeros);
        CHECK(mismatches(ours.dequantized(), c.ortho_dequant[t]) == 0);  // the reference's, bit for bit
        const auto R = Device<float>::download(opt.first_moment(id), c.low_rank[t].size());
        CHECK(galore_test::relative_change_error(R, c.low_rank[t], std::vector<float>(R.size(), 0.0f)) <= 1e-5);
        const LayerStats st = opt.stats(id, ctx);
        CHECK(st.update_gap == static_cast<std::int64_t>(c.gaps[t]));
        CHECK(st.svd_count == static_cast<std::int64_t>(c.svd_counts[t]));
        const float our_cos = opt.svd_count(id) > count_before ? opt.schedule_state(id).last_cosine : NAN;
        CHECK(std::isnan(c.cosines[t]) == std::isnan(our_cos));
        if (!std::isnan(c.cosines[t])) CHECK(std::abs(our_cos - c.cosines[t]) <= 1e-5f);
      }
    });
  }
}

namespace {

// The GPU run of a RunSpec with a quantized basis (T: the weights' and
// gradients' element type): W after every step, in float.
template <class Quant, class State, class T, class Schedule>
std::vector<std::vector<float>> gpu_run(const galore_test::RunSpec& s, const Schedule& schedule,
                                        const std::vector<float>& W0, const std::vector<std::vector<float>>& grads,
                                        galore_test::RunInfo& info) {
  using Opt = QOptOf<Quant, State, Schedule>;
  cuda::Context ctx;
  const ProjectorOptions po{s.rank, static_cast<ProjectionType>(s.type), s.scale};
  const auto q = quant_settings<Quant>(s);
  Opt opt = [&] {
    if constexpr (std::is_same_v<State, state::Blockwise8bit>)
      return Opt(po, galore_test::adam_of(s), schedule, svd::Exact{}, WeightRounding{},
                 state::Blockwise8bit{s.block_size, s.min_8bit_size}, q);
    else
      return Opt(po, galore_test::adam_of(s), schedule, svd::Exact{}, WeightRounding{}, {}, q);
  }();
  const LayerId id = opt.add_layer({s.rows, s.cols}, cuda::dtype_of<T>());
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  const auto out = galore_test::step_through<T>(opt, id, ctx, W0, grads);
  const LayerStats stats = opt.stats(id, ctx);
  info.svd_count = stats.svd_count;
  info.gap = stats.update_gap;
  info.skipped = stats.skipped_steps;
  return out;
}

template <class Quant, class State, class T = float>
std::vector<std::vector<float>> gpu_run(const galore_test::RunSpec& s, const std::vector<float>& W0,
                                        const std::vector<std::vector<float>>& grads, galore_test::RunInfo& info) {
  if (s.lazy_queue > 0)
    return gpu_run<Quant, State, T>(s, schedule::Lazy{s.gap, s.lazy_threshold, s.lazy_gamma, s.lazy_queue}, W0,
                                    grads, info);
  if (s.drift_check_every > 0)
    return gpu_run<Quant, State, T>(
        s, schedule::Drift{s.drift_check_every, s.drift_tolerance, s.drift_min_gap, s.gap}, W0, grads, info);
  return gpu_run<Quant, State, T>(s, schedule::FixedGap{s.gap}, W0, grads, info);
}

std::vector<std::vector<float>> round_all(std::vector<std::vector<float>> x) {
  for (auto& v : x) v = galore_test::round_to_bf16(v);
  return x;
}

template <class T>
struct Tag {
  using type = T;
};
// Calls f(Tag<Quant>{}) with the RunSpec's quantization policy type (which the
// CUDA translation unit names but does not define).
template <class F>
void with_quant(const galore_test::RunSpec& s, F&& f) {
  if (s.basis_nf4) f(Tag<quant::NF4>{});
  else if (s.basis_bits == 4) f(Tag<quant::MinMax<4>>{});
  else if (s.basis_bits == 8) f(Tag<quant::MinMax<8>>{});
  else FAIL("no quantized basis in the spec");
}

}  // namespace

TEST_CASE("quantized bases on the GPU follow the CPU: INT4, INT8, NF4, every side, 8-bit moments, every schedule, bf16") {
  enum Schedule { Fixed, Lazy, Drift };
  struct Case {
    long m, n;
    ProjectionType type;
    int bits;     // 0: NF4
    long group;   // min-max group, or NF4 block
    bool blockwise8bit;
    Schedule schedule;
    bool bf16 = false;
  };
  const Case cases[] = {{48, 32, ProjectionType::Std, 4, -1, false, Fixed},   // right, a group per row
                        {32, 96, ProjectionType::Std, 4, 32, false, Fixed},   // left, groups of 32
                        {37, 29, ProjectionType::Left, 4, 7, false, Fixed},   // left, staged, odd groups
                        {40, 40, ProjectionType::Full, 4, -1, false, Fixed},  // both sides
                        {48, 32, ProjectionType::Std, 8, -1, false, Lazy},    // INT8 basis, lazy
                        {64, 48, ProjectionType::Std, 4, -1, true, Lazy},     // QGaLoreAdamW8bit's policies
                        {48, 32, ProjectionType::Std, 0, 64, false, Fixed},   // NF4, blocks of 64
                        {32, 96, ProjectionType::Std, 0, 7, true, Lazy},      // NF4, odd blocks, 8-bit, lazy
                        {48, 32, ProjectionType::Std, 4, -1, false, Drift},   // the drift schedule
                        {40, 40, ProjectionType::Full, 0, 16, false, Drift},  // NF4, both sides, drift
                        {48, 32, ProjectionType::Std, 4, -1, false, Fixed, true}};  // a bf16 layer
  for (const Case& c : cases) {
    galore_test::RunSpec s;
    s.rows = c.m;
    s.cols = c.n;
    s.rank = 6;
    s.type = static_cast<int>(c.type);
    s.lr = 1e-2;
    s.weight_decay = 0.05;
    s.eps = 1e-3;
    s.gap = 2;
    s.basis_bits = c.bits;
    s.basis_group = c.group;
    s.basis_nf4 = c.bits == 0;
    s.basis_block = c.group;
    s.blockwise8bit = c.blockwise8bit;
    s.block_size = 64;
    s.min_8bit_size = 64;
    if (c.schedule == Lazy) s.lazy_queue = 2, s.lazy_threshold = 0.5;
    if (c.schedule == Drift) s.drift_check_every = 1, s.drift_tolerance = 0.02, s.drift_min_gap = 1, s.gap = 6;
    INFO(c.m, "x", c.n, " ", to_string(c.type), c.bits == 0 ? " NF4" : " INT", c.bits, " group ", c.group,
         c.blockwise8bit ? " 8-bit" : "", c.schedule == Lazy ? " lazy" : c.schedule == Drift ? " drift" : "",
         c.bf16 ? " bf16" : "");
    const auto grads_f = galore_test::separated_gradients(c.m, c.n, 10, 8, 31u + static_cast<unsigned>(c.m));
    const auto W0_f = galore_test::gaussian(static_cast<std::size_t>(c.m * c.n), 5u);
    galore_test::RunInfo gi, ci;
    std::vector<std::vector<float>> gpu;
    // A bf16 layer's inputs are bf16 on both backends; its GPU basis is bf16 too.
    const auto grads = c.bf16 ? round_all(grads_f) : grads_f;
    const auto W0 = c.bf16 ? galore_test::round_to_bf16(W0_f) : W0_f;
    with_quant(s, [&](auto tag) {
      using Quant = typename decltype(tag)::type;
      gpu = c.bf16            ? gpu_run<Quant, state::Float32, cuda::bf16>(s, W0, grads, gi)
            : c.blockwise8bit ? gpu_run<Quant, state::Blockwise8bit>(s, W0, grads, gi)
                              : gpu_run<Quant, state::Float32>(s, W0, grads, gi);
    });
    const auto cpu = galore_test::cpu_run(s, W0, grads, c.bf16, &ci);
    REQUIRE(gpu.size() == cpu.size());
    for (std::size_t t = 0; t < gpu.size(); ++t) {
      INFO("step ", t);
      CHECK(galore_test::relative_change_error(gpu[t], cpu[t], W0) < (c.bf16 ? 0.1 : c.blockwise8bit ? 1e-2 : 1e-3));
    }
    CHECK(gi.svd_count == ci.svd_count);
    CHECK(gi.gap == ci.gap);
  }
}

TEST_CASE("cuda::QGaLoreAdamW8bit on an INT8 weight is the CPU's QGaLoreAdamW8bit, with a skipped refresh step") {
  galore_test::RunSpec s;
  s.rows = 512;
  s.cols = 256;
  s.rank = 32;
  s.lr = 1e-2;
  s.weight_decay = 0.05;
  s.eps = 1e-3;
  s.gap = 2;
  s.lazy_queue = 2;
  s.lazy_threshold = 0.4;
  s.blockwise8bit = true;
  s.basis_bits = 4;
  const std::uint64_t seed = 0xC0FFEEULL;
  const int steps = 8;  // step 4 is a refresh step with a NaN gradient: skipped, then refreshed at step 5
  auto grads = galore_test::separated_gradients(s.rows, s.cols, 12, steps, 91u);
  grads[4][123] = std::numeric_limits<float>::quiet_NaN();
  const auto w0 = galore_test::gaussian(static_cast<std::size_t>(s.rows * s.cols), 92u, 0.1f);
  galore_test::RunInfo ci;
  const auto cpu = galore_test::cpu_int8_run(s, 256, seed, 0, w0, grads, false, &ci);

  cuda::Context ctx;
  cuda::QGaLoreAdamW8bit opt(ProjectorOptions{s.rank, ProjectionType::Std, s.scale}, galore_test::adam_of(s),
                             schedule::Lazy{s.gap, s.lazy_threshold, s.lazy_gamma, s.lazy_queue}, svd::Exact{},
                             WeightRounding{seed, RoundingMode::Stochastic});
  const LayerId id = opt.add_layer({s.rows, s.cols}, cuda::DType::Float32);
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  Device<float> W0(w0), G(grads[0]);
  cuda::QuantizedWeight<8> W({s.rows, s.cols});
  W.quantize(DeviceView<const float>(W0.data(), s.rows, s.cols), ctx);
  HostCodes basis_before;
  for (int t = 0; t < steps; ++t) {
    INFO("step ", t);
    G.upload(grads[static_cast<std::size_t>(t)]);
    const std::int64_t svd_before = opt.svd_count(id);
    opt.step(id, W, DeviceView<const float>(G.data(), s.rows, s.cols), ctx);
    const HostCodes basis = download(one_factor(opt.quantized_basis(id)));
    if (t == 4) {
      CHECK(opt.status(id, ctx) == StepStatus::SkippedNonFinite);
      CHECK(basis == basis_before);  // the refresh was not adopted
      CHECK(opt.svd_count(id) == svd_before);
    } else {
      CHECK(opt.status(id, ctx) == StepStatus::Applied);
    }
    std::vector<std::uint8_t> codes, zeros;
    std::vector<float> scales;
    W.download(codes, scales, zeros, ctx);
    const galore_test::CodeAgreement a =
        galore_test::code_agreement(codes, scales, zeros, cpu[static_cast<std::size_t>(t)], 256);
    CHECK(a.same >= 0.99);
    CHECK(a.mean <= 0.02);
    CHECK(a.worst <= 3.0);
    basis_before = basis;
  }
  const LayerStats st = opt.stats(id, ctx);
  CHECK(st.skipped_steps == 1);
  CHECK(st.svd_count == ci.svd_count);
  CHECK(st.update_gap == ci.gap);
}


namespace {
// The codes the GPU optimizer stores for the basis factor P it is handed at
// its first step (an m x n layer of rank r).
template <class Quant, class Settings>
HostCodes gpu_codes_of(const std::vector<float>& P, long m, long n, long r, bool left, Settings settings) {
  using Opt = QOptOf<Quant, state::Float32, schedule::FixedGap, galore_test::HandOut>;
  const std::vector<std::vector<float>> factors{P};
  const long first = 0;
  cuda::Context ctx;
  Opt opt(ProjectorOptions{r, ProjectionType::Std, 0.25f}, AdamConfig{}, schedule::FixedGap{100},
          galore_test::HandOut{&factors, &first}, WeightRounding{}, {}, settings);
  const LayerId id = opt.add_layer({m, n}, cuda::DType::Float32);
  REQUIRE(opt.side(id) == (left ? Side::Left : Side::Right));
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  Device<float> W(galore_test::gaussian(static_cast<std::size_t>(m * n), 1u)),
      G(galore_test::gaussian(static_cast<std::size_t>(m * n), 2u));
  opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
  REQUIRE(opt.status(id, ctx) == StepStatus::Applied);
  return download(one_factor(opt.quantized_basis(id)));
}
void check_same(const HostCodes& ours, const galore_test::CpuCodes& cpu) {
  CHECK(ours.codes == cpu.codes);
  CHECK(ours.scales == cpu.scales);
  CHECK(ours.zeros == cpu.zeros);
}
}  // namespace

TEST_CASE("the GPU's INT4, INT8 and NF4 basis codes are the CPU's, bit for bit, for the same basis") {
  // Left (24 x 200: P is 24 x 6) and right (200 x 24: P is 6 x 24) layers;
  // groups per row, of 7 (across rows, odd: two groups share a byte of INT4
  // codes) and of 64; NF4 blocks of 5, 64 and 256 (more than the factor).
  // Values over several magnitudes, exact zeros, an all-zero row.
  const bool sides[] = {true, false};
  for (const bool left : sides) {
    const char* side = left ? "left" : "right";
    const long m = left ? 24 : 200, n = left ? 200 : 24, r = 6;
    const long rows = left ? m : r, cols = left ? r : n;
    std::vector<float> P = galore_test::gaussian(static_cast<std::size_t>(rows * cols), 77u);
    for (std::size_t i = 0; i < P.size(); i += 5) P[i] *= 1e-3f;
    for (std::size_t i = 3; i < P.size(); i += 11) P[i] = 0.0f;
    for (long j = 0; j < cols; ++j) P[static_cast<std::size_t>(cols + j)] = 0.0f;  // row 1
    for (const long g : {-1L, 7L, 64L}) {
      INFO(side, " group ", g);
      check_same(gpu_codes_of<quant::MinMax<4>>(P, m, n, r, left, quant::MinMaxSettings{g}),
                 galore_test::cpu_minmax_codes4(P, rows, cols, g));
      check_same(gpu_codes_of<quant::MinMax<8>>(P, m, n, r, left, quant::MinMaxSettings{g}),
                 cpu_codes(8, P, rows, cols, g));
    }
    for (const long b : {5L, 64L, 256L}) {
      INFO(side, " NF4 block ", b);
      check_same(gpu_codes_of<quant::NF4>(P, m, n, r, left, quant::NF4Settings{b}),
                 galore_test::cpu_nf4_codes(P, rows, cols, b));
    }
  }
}

TEST_CASE("a quantized basis's device memory is the formula; bad settings and the batched step are refused") {
  using A = cuda::WorkspaceArena;
  const std::size_t counters = A::align(sizeof(cuda::StepCounters));
  // 2048 x 1024 bf16, right side, rank 512, one group per row: the 512 x 1024
  // INT4 factor is 2^18 bytes of codes and 512 groups (a float scale and a byte
  // zero each), beside float32 moments, or 8-bit ones with an absmax per 256.
  QOpt<4> f32(ProjectorOptions{512, ProjectionType::Std, 0.25f});
  CHECK(f32.predict_layer_bytes({2048, 1024}, cuda::DType::BFloat16, f32.projection_options()) ==
        2 * A::align(4 * 2048 * 512) + A::align(512 * 1024 / 2) + A::align(4 * 512) + A::align(512) + counters);
  cuda::QGaLoreAdamW8bit q(ProjectorOptions{512, ProjectionType::Std, 0.25f}, AdamConfig{}, schedule::Lazy{}, svd::Exact{},
                           WeightRounding{}, state::Blockwise8bit{}, quant::MinMaxSettings{256});
  // Groups of 256 over the factor: 2048 of them.
  CHECK(q.predict_layer_bytes({2048, 1024}, cuda::DType::Float32, q.projection_options()) ==
        2 * A::align(2048 * 512) + 2 * A::align(4 * 4096) + A::align(512 * 1024 / 2) + A::align(4 * 2048) +
            A::align(2048) + counters);
  // INT8, left side (1000 x 3000, rank 64): the 1000 x 64 factor, a group per row.
  QOpt<8> i8(ProjectorOptions{64, ProjectionType::Std, 0.25f});
  CHECK(i8.predict_layer_bytes({1000, 3000}, cuda::DType::Float32, i8.projection_options()) ==
        2 * A::align(4 * 64 * 3000) + A::align(1000 * 64) + A::align(4 * 1000) + A::align(1000) + counters);

  // NF4, right side (4096 x 1024, rank 256): the 256 x 1024 factor in blocks of 64.
  QOptOf<quant::NF4> nf4(ProjectorOptions{256, ProjectionType::Std, 0.25f});
  CHECK(nf4.predict_layer_bytes({4096, 1024}, cuda::DType::BFloat16, nf4.projection_options()) ==
        2 * A::align(4 * 4096 * 256) + A::align(256 * 1024 / 2) + A::align(4 * 256 * 1024 / 64) + counters);
  const auto with_block = [](Index b) {
    return QOptOf<quant::NF4>(ProjectorOptions{4}, AdamConfig{}, schedule::FixedGap{}, svd::Exact{}, WeightRounding{},
                              {}, quant::NF4Settings{b});
  };
  CHECK_THROWS_AS(with_block(0), invalid_argument);
  CHECK_NOTHROW(with_block(1));

  std::size_t predicted = cuda::DynamicMaps::kBytes;
  for (int i = 0; i < 3; ++i) {
    (void)q.add_layer({2048, 1024}, cuda::DType::Float32);
    predicted += q.predict_layer_bytes({2048, 1024}, cuda::DType::Float32, q.projection_options());
  }
  CHECK(q.state_bytes() == predicted);
  const cuda::DeviceQuantizedBasis b = q.quantized_basis(LayerId{0});
  CHECK(b.side == Side::Right);
  CHECK(b.left.codes == nullptr);
  CHECK(b.right.shape == Shape{512, 1024});
  CHECK(b.right.groups() == 2048);
  CHECK(b.right.code_bytes() == 512 * 1024 / 2);

  const auto with_group = [](Index g) {
    return QOpt<4>(ProjectorOptions{4}, AdamConfig{}, schedule::FixedGap{}, svd::Exact{}, WeightRounding{}, {},
                   quant::MinMaxSettings{g});
  };
  CHECK_THROWS_AS(with_group(0), invalid_argument);
  CHECK_THROWS_AS(with_group(-2), invalid_argument);
  CHECK_NOTHROW(with_group(-1));
  CHECK_NOTHROW(with_group(1));

  cuda::Context ctx;
  QOpt<4> opt(ProjectorOptions{4, ProjectionType::Std, 0.25f});
  const LayerId id = opt.add_layer({32, 16}, cuda::DType::Float32);
  Device<float> W(std::vector<float>(32 * 16, 0.5f)), G(galore_test::gaussian(32 * 16, 4u));
  const cuda::StepParam params[] = {cuda::step_param(id, DeviceView<float>(W.data(), 32, 16),
                                                      DeviceView<const float>(G.data(), 32, 16))};
  CHECK_THROWS_AS(opt.plan_step_all(Span<const cuda::StepParam>(params, 1), ctx), invalid_argument);
}

namespace galore_test {
// An SVD policy that hands out the identity's first rows (right factor) or
// columns (left factor) at its first call and NaN at every later one (what an
// SVD of a finite but ill-conditioned G might give).
struct NaNAfterFirst {
  int* calls = nullptr;
};
template <class T>
std::size_t compute_basis_bytes(cuda::Context&, const NaNAfterFirst&, Index, Index, Index, Side) {
  return 0;
}
template <class T>
void compute_basis(cuda::Context& ctx, cuda::WorkspaceArena&, const NaNAfterFirst& p, DeviceView<const T>, Index r,
                   const cuda::DeviceBasis<T>& out, const cuda::DeviceBasis<T>*) {
  static_assert(std::is_same_v<T, float>, "float layers");
  const bool first = (*p.calls)++ == 0;
  auto fill = [&](float* to, Index rows, Index cols, bool right) {
    std::vector<float> P(static_cast<std::size_t>(rows * cols),
                         first ? 0.0f : std::numeric_limits<float>::quiet_NaN());
    for (Index i = 0; i < r && first; ++i) P[static_cast<std::size_t>(right ? i * cols + i : i * cols + i)] = 1.0f;
    cuda::check(cudaMemcpyAsync(to, P.data(), sizeof(float) * P.size(), cudaMemcpyHostToDevice, ctx.stream()),
                "cudaMemcpyAsync");
    ctx.synchronize();
  };
  if (out.left) fill(out.left, out.rows, r, false);
  if (out.right) fill(out.right, r, out.cols, true);
}
}  // namespace galore_test

namespace {
template <class Quant, class Settings>
void check_nan_candidate(ProjectionType type, Settings settings) {
  int calls = 0;
  cuda::Context ctx;
  QOptOf<Quant, state::Float32, schedule::FixedGap, galore_test::NaNAfterFirst> opt(
      ProjectorOptions{4, type, 0.25f}, AdamConfig{}, schedule::FixedGap{2}, galore_test::NaNAfterFirst{&calls},
      WeightRounding{}, {}, settings);
  const LayerId id = opt.add_layer({32, 16}, cuda::DType::Float32);
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  Device<float> W(galore_test::gaussian(32 * 16, 1u)), G(galore_test::gaussian(32 * 16, 2u));
  for (int t = 0; t < 2; ++t) {
    opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);
    REQUIRE(opt.status(id, ctx) == StepStatus::Applied);
  }
  const cuda::DeviceQuantizedBasis b = opt.quantized_basis(id);
  const HostCodes left = b.left.codes ? download(b.left) : HostCodes{};
  const HostCodes right = b.right.codes ? download(b.right) : HostCodes{};
  const auto w_before = W.download();
  opt.step(id, W.data(), static_cast<const float*>(G.data()), ctx);  // step 2 refreshes: NaN
  CHECK(calls == 2);
  CHECK(opt.status(id, ctx) == StepStatus::SkippedNonFinite);
  if (b.left.codes) CHECK(download(b.left) == left);
  if (b.right.codes) CHECK(download(b.right) == right);
  CHECK(mismatches(W.download(), w_before) == 0);
  CHECK(opt.svd_count(id) == 1);
}
}  // namespace

TEST_CASE("a candidate basis holding NaN does not become the layer's quantized basis: the step is skipped") {
  // Quantized, NaN has defined but meaningless codes; without a check the step
  // would project with them and apply. Unquantized, R would be NaN and the step
  // skipped: a quantized basis must behave the same, on every side.
  const ProjectionType types[] = {ProjectionType::Right, ProjectionType::Left, ProjectionType::Full};
  for (ProjectionType type : types) {
    INFO(to_string(type));
    check_nan_candidate<quant::MinMax<4>>(type, quant::MinMaxSettings{-1});
    check_nan_candidate<quant::MinMax<8>>(type, quant::MinMaxSettings{7});
    check_nan_candidate<quant::NF4>(type, quant::NF4Settings{16});
  }
}

namespace {

// A layer's quantized basis: its factors' codes, and their values (left then right).
struct BasisCodes {
  HostCodes left, right;
  bool operator==(const BasisCodes& o) const { return left == o.left && right == o.right; }
  std::vector<float> dequantized() const {
    std::vector<float> out = left.dequantized(), r = right.dequantized();
    out.insert(out.end(), r.begin(), r.end());
    return out;
  }
};
template <class Opt>
BasisCodes codes_of(galore_test::GpuRun<Opt>& g, std::size_t i) {
  const cuda::DeviceQuantizedBasis b = g.opt.quantized_basis(g.ids[i]);
  return {b.left.codes ? download(b.left) : HostCodes{}, b.right.codes ? download(b.right) : HostCodes{}};
}

// Saves on the GPU after 3 steps and checks: the CPU's file has the same size;
// the CPU's basis after loading the GPU's file is the GPU's codes dequantized,
// bit for bit; a fresh GPU optimizer loaded from it resumes exactly as the
// saved one goes on; the GPU's codes after loading the CPU's file are the
// CPU's; an unquantized optimizer's file is refused.
template <class Opt, class Make>
void check_checkpoints(const galore_test::CkptSpec& spec, Make make) {
  const int before = 3, after = 3;
  std::vector<std::vector<std::vector<float>>> grads(before + after);
  std::vector<std::vector<float>> W0;
  for (std::size_t i = 0; i < spec.layers.size(); ++i) {
    const auto& l = spec.layers[i];
    W0.push_back(galore_test::gaussian(static_cast<std::size_t>(l.rows * l.cols), 40u + static_cast<unsigned>(i)));
    const auto seq =
        galore_test::separated_gradients(l.rows, l.cols, 3, before + after, 50u + static_cast<unsigned>(i), 0.5f);
    for (int t = 0; t < before + after; ++t) grads[static_cast<std::size_t>(t)].push_back(seq[static_cast<std::size_t>(t)]);
  }
  const auto first = std::vector<std::vector<std::vector<float>>>(grads.begin(), grads.begin() + before);
  const auto rest = std::vector<std::vector<std::vector<float>>>(grads.begin() + before, grads.end());
  const auto cpu_basis = [](const galore_test::CpuLayerState& st) {
    std::vector<float> out = st.left;
    out.insert(out.end(), st.right.begin(), st.right.end());
    return out;
  };

  galore_test::GpuRun<Opt> gpu(spec, W0, make);
  gpu.run(first);
  const std::string from_gpu = gpu.save();
  const auto cpu_first = galore_test::cpu_checkpoint_run(spec, "", W0, first);
  CHECK(from_gpu.size() == cpu_first.checkpoint.size());  // the same fields and sizes
  std::vector<std::vector<float>> W_saved;
  for (auto& w : gpu.W) W_saved.push_back(w.download());

  const auto cpu_loaded = galore_test::cpu_checkpoint_run(spec, from_gpu, W_saved, {});
  for (std::size_t i = 0; i < spec.layers.size(); ++i) {
    INFO("GPU -> CPU, layer ", spec.layers[i].name);
    REQUIRE(cpu_loaded.layers[i].has_basis);
    CHECK(mismatches(codes_of(gpu, i).dequantized(), cpu_basis(cpu_loaded.layers[i])) == 0);
    CHECK(cpu_loaded.layers[i].svd_count == gpu.opt.svd_count(gpu.ids[i]));
    CHECK(cpu_loaded.layers[i].steps == before);
  }

  galore_test::GpuRun<Opt> resumed(spec, W_saved, make);
  resumed.load(from_gpu);
  for (std::size_t i = 0; i < spec.layers.size(); ++i) CHECK(codes_of(resumed, i) == codes_of(gpu, i));
  const auto gpu_rest = gpu.run(rest);
  const auto resumed_rest = resumed.run(rest);
  for (std::size_t t = 0; t < rest.size(); ++t)
    for (std::size_t i = 0; i < spec.layers.size(); ++i) {
      INFO("GPU -> GPU, step ", t, " layer ", spec.layers[i].name);
      CHECK(mismatches(resumed_rest[t][i], gpu_rest[t][i]) == 0);
    }

  galore_test::GpuRun<Opt> from_cpu(spec, W0, make);
  from_cpu.load(cpu_first.checkpoint);
  for (std::size_t i = 0; i < spec.layers.size(); ++i) {
    INFO("CPU -> GPU, layer ", spec.layers[i].name);
    CHECK(mismatches(codes_of(from_cpu, i).dequantized(), cpu_basis(cpu_first.layers[i])) == 0);
  }
  CHECK(from_cpu.save() == cpu_first.checkpoint);  // saved right away: the CPU's bytes

  galore_test::CkptSpec plain = spec;
  plain.basis_bits = 0;
  plain.basis_nf4 = false;
  const auto cpu_plain = galore_test::cpu_checkpoint_run(plain, "", W0, first);
  galore_test::GpuRun<Opt> other(spec, W0, make);
  std::istringstream is(cpu_plain.checkpoint, std::ios::binary);
  CHECK_THROWS_AS(cuda::load_checkpoint(other.opt, is, other.ctx), checkpoint_error);
}

}  // namespace

TEST_CASE("QGaLoreAdamW8bit checkpoints move between the GPU and the CPU: INT4 codes bit for bit") {
  galore_test::CkptSpec spec;
  spec.blockwise8bit = true;
  spec.basis_bits = 4;
  spec.lazy_queue = 2;
  spec.gap = 2;
  spec.layers = {{"right", 48, 32}, {"left", 24, 64}};
  check_checkpoints<cuda::QGaLoreAdamW8bit>(spec, [](const galore_test::CkptSpec& s) {
    return cuda::QGaLoreAdamW8bit(ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale},
                                  galore_test::adam_of(s),
                                  schedule::Lazy{s.gap, s.lazy_threshold, s.lazy_gamma, s.lazy_queue});
  });
}

TEST_CASE("NF4 bases' checkpoints move between the GPU and the CPU, codes bit for bit") {
  galore_test::CkptSpec spec;
  spec.basis_nf4 = true;
  spec.basis_block = 32;
  spec.gap = 2;
  spec.layers = {{"right", 48, 32}, {"left", 24, 64}};
  using Opt = QOptOf<quant::NF4>;
  check_checkpoints<Opt>(spec, [](const galore_test::CkptSpec& s) {
    return Opt(ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale}, galore_test::adam_of(s),
               schedule::FixedGap{s.gap}, svd::Exact{}, WeightRounding{}, {}, quant::NF4Settings{s.basis_block});
  });
}

TEST_CASE("INT8 bases' checkpoints of two-sided and staged layers move between the GPU and the CPU") {
  galore_test::CkptSpec spec;
  spec.basis_bits = 8;
  spec.basis_group = 7;
  spec.gap = 2;
  spec.layers = {{"both", 40, 40, false, false, 6, static_cast<int>(ProjectionType::Full)},
                 {"staged", 37, 29, false, false, 6, static_cast<int>(ProjectionType::Left)}};
  using Opt = QOpt<8>;
  check_checkpoints<Opt>(spec, [](const galore_test::CkptSpec& s) {
    return Opt(ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale}, galore_test::adam_of(s),
               schedule::FixedGap{s.gap}, svd::Exact{}, WeightRounding{}, {}, quant::MinMaxSettings{s.basis_group});
  });
}

namespace {
// An INT8 weight's values (the CPU's dequantization of its codes).
std::vector<float> dequantized(const cuda::QuantizedWeight<8>& W, cuda::Context& ctx) {
  std::vector<std::uint8_t> codes, zeros;
  std::vector<float> scales;
  W.download(codes, scales, zeros, ctx);
  std::vector<float> out(codes.size());
  for (std::size_t i = 0; i < codes.size(); ++i) {
    const std::size_t g = i / static_cast<std::size_t>(W.group_size());
    out[i] = math::minmax_value(codes[i], scales[g], static_cast<float>(zeros[g]));
  }
  return out;
}
}  // namespace

TEST_CASE("INT8 weights travel in QGaLoreAdamW8bit checkpoints between the GPU and the CPU") {
  galore_test::CkptSpec spec;
  spec.blockwise8bit = true;
  spec.basis_bits = 4;
  spec.lazy_queue = 2;
  spec.gap = 2;
  spec.layers = {{"int8", 64, 48, false, false, 0, 0, true}, {"float", 48, 32}};
  const int steps = 3;
  std::vector<std::vector<std::vector<float>>> grads(steps);
  std::vector<std::vector<float>> W0;
  for (std::size_t i = 0; i < 2; ++i) {
    const auto& l = spec.layers[i];
    W0.push_back(galore_test::gaussian(static_cast<std::size_t>(l.rows * l.cols), 80u + static_cast<unsigned>(i)));
    const auto seq = galore_test::separated_gradients(l.rows, l.cols, 3, steps, 90u + static_cast<unsigned>(i), 0.5f);
    for (int t = 0; t < steps; ++t) grads[static_cast<std::size_t>(t)].push_back(seq[static_cast<std::size_t>(t)]);
  }
  struct Gpu {
    cuda::Context ctx;
    cuda::QGaLoreAdamW8bit opt;
    LayerId q, f;
    cuda::QuantizedWeight<8> Wq;
    Device<float> Wf, G0, G1;
    cuda::DeviceWeightSet weights;
    Gpu(const galore_test::CkptSpec& s, const std::vector<std::vector<float>>& W0)
        : opt(ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale}, galore_test::adam_of(s),
              schedule::Lazy{s.gap, s.lazy_threshold, s.lazy_gamma, s.lazy_queue}),
          Wq({64, 48}),
          Wf(W0[1]),
          G0(W0[0]),
          G1(W0[1]) {
      q = opt.add_layer({64, 48}, cuda::DType::Float32, "int8");
      f = opt.add_layer({48, 32}, cuda::DType::Float32, "float");
      ctx.reserve_workspace(opt.workspace_bytes(ctx));
      Device<float> w(W0[0]);
      Wq.quantize(DeviceView<const float>(w.data(), 64, 48), ctx);
      weights.add(q, Wq).add(f, DeviceView<float>(Wf.data(), 48, 32));
    }
    void step(const std::vector<std::vector<float>>& g) {
      G0.upload(g[0]);
      G1.upload(g[1]);
      opt.step(q, Wq, DeviceView<const float>(G0.data(), 64, 48), ctx);
      opt.step(f, Wf.data(), static_cast<const float*>(G1.data()), ctx);
    }
    std::string save() {
      std::ostringstream os(std::ios::binary);
      cuda::save_checkpoint(opt, os, ctx, &weights);
      return os.str();
    }
    void load(const std::string& file) {
      std::istringstream is(file, std::ios::binary);
      cuda::load_checkpoint(opt, is, ctx, &weights);
    }
  };

  Gpu gpu(spec, W0);
  for (const auto& g : grads) gpu.step(g);
  const std::string from_gpu = gpu.save();
  const auto cpu_first = galore_test::cpu_checkpoint_run(spec, "", W0, grads, 0.0, true);
  CHECK(from_gpu.size() == cpu_first.checkpoint.size());

  // GPU -> CPU: the CPU's weights after loading are the GPU's, bit for bit.
  const auto cpu_loaded = galore_test::cpu_checkpoint_run(spec, from_gpu, W0, {}, 0.0, true);
  CHECK(mismatches(cpu_loaded.W_end[0], dequantized(gpu.Wq, gpu.ctx)) == 0);
  CHECK(mismatches(cpu_loaded.W_end[1], gpu.Wf.download()) == 0);

  // CPU -> GPU: the GPU's weights after loading are the CPU's, and saved right
  // away the GPU writes the CPU's bytes.
  Gpu from_cpu(spec, std::vector<std::vector<float>>{std::vector<float>(64 * 48, 0.0f), std::vector<float>(48 * 32, 0.0f)});
  from_cpu.load(cpu_first.checkpoint);
  CHECK(mismatches(dequantized(from_cpu.Wq, from_cpu.ctx), cpu_first.W_end[0]) == 0);
  CHECK(mismatches(from_cpu.Wf.download(), cpu_first.W_end[1]) == 0);
  CHECK(from_cpu.save() == cpu_first.checkpoint);

  // GPU -> GPU: a fresh optimizer and weights resume as the saved ones go on.
  Gpu resumed(spec, W0);
  resumed.load(from_gpu);
  gpu.step(grads[0]);
  resumed.step(grads[0]);
  CHECK(mismatches(dequantized(resumed.Wq, resumed.ctx), dequantized(gpu.Wq, gpu.ctx)) == 0);
  CHECK(mismatches(resumed.Wf.download(), gpu.Wf.download()) == 0);

  // An INT8 weight of another group size does not load; nor does one on a dense layer save.
  cuda::QuantizedWeight<8> other_group({64, 48}, 128);
  cuda::DeviceWeightSet wrong;
  wrong.add(resumed.q, other_group).add(resumed.f, DeviceView<float>(resumed.Wf.data(), 48, 32));
  std::istringstream is(from_gpu, std::ios::binary);
  CHECK_THROWS_AS(cuda::load_checkpoint(resumed.opt, is, resumed.ctx, &wrong), checkpoint_error);
  cuda::QGaLoreAdamW8bit dense_opt(ProjectorOptions{4});
  const LayerId d = dense_opt.add_dense({64, 48}, cuda::DType::Float32);
  cuda::DeviceWeightSet on_dense;
  on_dense.add(d, other_group);
  std::ostringstream os(std::ios::binary);
  CHECK_THROWS_AS(cuda::save_checkpoint(dense_opt, os, resumed.ctx, &on_dense), invalid_argument);
  cuda::QuantizedWeight<8> unbuilt;
  CHECK_THROWS_AS(cuda::DeviceWeightSet{}.add(resumed.q, unbuilt), invalid_argument);
}
