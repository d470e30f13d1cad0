// cuda::QuantizedWeight<8> (Q-GaLore's INT8 weight on the GPU) against the
// CPU's QuantizedWeight<8> on identical inputs, bit for bit: round-to-nearest
// quantization (float and bf16 weights, strided views, groups inside rows,
// across rows, one per row, a short last group), stochastic re-quantization of
// row panels (contiguous or strided; groups of a multiple of 64 elements and
// others), both by the kernel for groups of 64 to 512 elements in rows and by
// the general one; re-quantization after a step (its counters: the step
// number, a skipped step); exact zeros and tiny values; dequantization; the
// unbiasedness of the GPU's stochastic rounding; memory equal to the formula;
// the errors. And the GPU optimizer's step on an INT8 weight against the CPU's
// Q-GaLore weight update (same rounding bits; codes equal up to the GEMMs'
// float rounding), a skipped step included.
#include <doctest/doctest.h>

#include <galore/cuda.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_reference.hpp"
#include "cuda_support.cuh"

using namespace galore;
using galore_test::Device;
using Opt = galore_test::GpuOptimizer<svd::Exact, float>;

namespace {

struct Downloaded {
  std::vector<std::uint8_t> codes, zeros;
  std::vector<float> scales;
};
template <int Bits>
Downloaded download(const cuda::QuantizedWeight<Bits>& q, cuda::Context& ctx) {
  Downloaded d;
  q.download(d.codes, d.scales, d.zeros, ctx);
  return d;
}

void check_equal(const Downloaded& gpu, const galore_test::CpuCodes& cpu) {
  CHECK(gpu.scales == cpu.scales);
  CHECK(gpu.zeros == cpu.zeros);
  std::size_t differ = 0;
  for (std::size_t i = 0; i < gpu.codes.size() && i < cpu.codes.size(); ++i) differ += gpu.codes[i] != cpu.codes[i];
  CHECK(gpu.codes.size() == cpu.codes.size());
  CHECK(differ == 0);
}

struct Case {
  long rows, cols, group;
};
// Groups of 64, 128, 256 and 512 inside rows (impl::quantize_contiguous_groups,
// also from strided views), across rows with a short last group (that kernel
// and impl::quantize_groups for the last group; the general kernel alone from
// strided views), one group per row, a multiple of 64 that the fast kernel
// does not take (192), and group sizes that are not multiples of 64 (the
// per-element Philox path).
const Case kCases[] = {{64, 512, 256}, {48, 512, 64}, {40, 256, 128}, {20, 1024, 512}, {150, 300, 256},
                       {33, 200, 64},  {30, 384, 192}, {16, 100, -1}, {90, 50, 100}};

// values (rows x cols) laid out with leading dimension cols + pad, the padding
// a huge value that must never be read.
std::vector<float> padded(const std::vector<float>& values, long rows, long cols, long pad) {
  const long ld = cols + pad;
  std::vector<float> p(static_cast<std::size_t>(rows * ld), 1e30f);
  for (long r = 0; r < rows; ++r)
    for (long k = 0; k < cols; ++k) p[static_cast<std::size_t>(r * ld + k)] = values[static_cast<std::size_t>(r * cols + k)];
  return p;
}

// q.quantize() from w (q's shape, row-major) laid out with `pad` more columns,
// as float or bf16 (w holds bf16 values then).
template <int Bits>
void quantize_padded(cuda::QuantizedWeight<Bits>& q, const std::vector<float>& w, long pad, bool bf16,
                     cuda::Context& ctx) {
  const long rows = q.rows(), cols = q.cols(), ld = cols + pad;
  if (bf16) {
    Device<cuda::bf16> W(padded(w, rows, cols, pad));
    q.quantize(DeviceView<const cuda::bf16>(W.data(), rows, cols, ld), ctx);
  } else {
    Device<float> W(padded(w, rows, cols, pad));
    q.quantize(DeviceView<const float>(W.data(), rows, cols, ld), ctx);
  }
}

}  // namespace

TEST_CASE("quantize() writes the CPU's nearest codes, scales and zeros, from float and bf16, strided or not") {
  cuda::Context ctx;
  for (const Case& c : kCases) {
    for (const bool bf16 : {false, true}) {
      for (const long pad : {0L, 3L}) {
        INFO(c.rows, "x", c.cols, " group ", c.group, bf16 ? " bf16" : " float", " ld pad ", pad);
        std::vector<float> w = galore_test::gaussian(static_cast<std::size_t>(c.rows * c.cols), 7u + unsigned(c.cols));
        if (bf16) w = galore_test::round_to_bf16(w);
        cuda::QuantizedWeight<8> q({c.rows, c.cols}, c.group);
        quantize_padded(q, w, pad, bf16, ctx);
        check_equal(download(q, ctx), galore_test::cpu_int8_weight(c.rows, c.cols, c.group, w, 0, {}, 0, 0, 0));
      }
    }
  }
}

TEST_CASE("requantize_rows() writes the CPU's stochastic codes, panel by panel, from contiguous or strided rows") {
  cuda::Context ctx;
  const std::uint64_t seed = 0x9e3779b97f4a7c15ULL;
  const std::uint32_t layer = 5, step = 77;
  for (const Case& c : kCases) {
    for (const long pad : {0L, 3L}) {
      INFO(c.rows, "x", c.cols, " group ", c.group, " ld pad ", pad);
      const auto w0 = galore_test::gaussian(static_cast<std::size_t>(c.rows * c.cols), 11u);
      auto values = galore_test::gaussian(static_cast<std::size_t>(c.rows * c.cols), 12u, 0.05f);
      for (std::size_t i = 0; i < values.size(); ++i) values[i] += w0[i];
      const long ld = c.cols + pad;
      Device<float> W(w0), V(padded(values, c.rows, c.cols, pad));
      cuda::QuantizedWeight<8> q({c.rows, c.cols}, c.group);
      q.quantize(DeviceView<const float>(W.data(), c.rows, c.cols), ctx);
      // Panels of row_alignment() rows (the last one shorter), each re-quantized
      // on its own: together they must equal the whole weight re-quantized.
      const long panel = q.row_alignment();
      CHECK(panel >= 1);
      for (long r0 = 0; r0 < c.rows; r0 += panel) {
        const long k = std::min(panel, c.rows - r0);
        q.requantize_rows(r0, DeviceView<const float>(V.data() + r0 * ld, k, c.cols, ld), seed, layer, step, ctx);
      }
      check_equal(download(q, ctx), galore_test::cpu_int8_weight(c.rows, c.cols, c.group, w0, 0, values, seed,
                                                                 layer, step));
      // One panel in the middle of a fresh weight: only its groups change.
      if (c.rows >= 3 * panel) {
        cuda::QuantizedWeight<8> p({c.rows, c.cols}, c.group);
        p.quantize(DeviceView<const float>(W.data(), c.rows, c.cols), ctx);
        const std::vector<float> middle(values.begin() + panel * c.cols, values.begin() + 2 * panel * c.cols);
        p.requantize_rows(panel, DeviceView<const float>(V.data() + panel * ld, panel, c.cols, ld), seed, layer,
                          step, ctx);
        check_equal(download(p, ctx),
                    galore_test::cpu_int8_weight(c.rows, c.cols, c.group, w0, panel, middle, seed, layer, step));
      }
    }
  }
}

TEST_CASE("requantize_rows_after() writes nothing after a skipped step, else rounds with the counters' step") {
  cuda::Context ctx;
  const std::uint64_t seed = 0x5eedULL;
  const std::uint32_t layer = 3;
  // Groups in rows (the fast kernel), a short last group, the general kernel.
  const Case cases[] = {{64, 512, 256}, {150, 300, 256}, {90, 50, 100}};
  for (const Case& c : cases) {
    for (const long pad : {0L, 5L}) {
      INFO(c.rows, "x", c.cols, " group ", c.group, " ld pad ", pad);
      const auto w0 = galore_test::gaussian(static_cast<std::size_t>(c.rows * c.cols), 51u);
      auto values = galore_test::gaussian(static_cast<std::size_t>(c.rows * c.cols), 52u, 0.05f);
      for (std::size_t i = 0; i < values.size(); ++i) values[i] += w0[i];
      const long ld = c.cols + pad;
      Device<float> W(w0), V(padded(values, c.rows, c.cols, pad));
      const DeviceView<const float> Vv(V.data(), c.rows, c.cols, ld);
      cuda::DeviceBuffer<cuda::StepCounters> counters(1);
      auto set_counters = [&](long long applied, int last_skipped) {
        cuda::StepCounters h;
        h.applied = applied;
        h.skipped = last_skipped;
        h.last_skipped = last_skipped;
        cuda::check(cudaMemcpy(counters.data(), &h, sizeof h, cudaMemcpyHostToDevice), "cudaMemcpy");
      };
      for (const RoundingMode mode : {RoundingMode::Stochastic, RoundingMode::Nearest}) {
        INFO(to_string(mode));
        cuda::QuantizedWeight<8> q({c.rows, c.cols}, c.group);
        q.quantize(DeviceView<const float>(W.data(), c.rows, c.cols), ctx);
        const Downloaded before = download(q, ctx);
        set_counters(9, 1);
        q.requantize_rows_after(0, Vv, WeightRounding{seed, mode}, layer, counters.data(), ctx);
        const Downloaded skipped = download(q, ctx);
        CHECK(skipped.codes == before.codes);
        CHECK(skipped.scales == before.scales);
        CHECK(skipped.zeros == before.zeros);
        set_counters(9, 0);
        q.requantize_rows_after(0, Vv, WeightRounding{seed, mode}, layer, counters.data(), ctx);
        if (mode == RoundingMode::Stochastic)
          check_equal(download(q, ctx), galore_test::cpu_int8_weight(c.rows, c.cols, c.group, w0, 0, values, seed,
                                                                     layer, 9));
        else
          check_equal(download(q, ctx), galore_test::cpu_int8_weight(c.rows, c.cols, c.group, values, 0, {}, 0, 0, 0));
      }
    }
  }
}

TEST_CASE("exact zeros, tiny values and groups of zeros get the CPU's codes, by either rounding") {
  // A value whose quotient by its group's scale is zero or subnormal makes the
  // fast kernel divide (impl::exact_quotients); the general kernel always
  // divides.
  cuda::Context ctx;
  const std::uint64_t seed = 0x1234ULL;
  const Case cases[] = {{32, 512, 256}, {32, 512, 64}, {16, 300, 100}};
  for (const Case& c : cases) {
    INFO(c.rows, "x", c.cols, " group ", c.group);
    const auto n = static_cast<std::size_t>(c.rows * c.cols);
    auto w = galore_test::gaussian(n, 71u);
    for (std::size_t i = 0; i < n; i += 7) w[i] = 0.0f;
    for (std::size_t i = 3; i < n; i += 11) w[i] = -0.0f;
    for (std::size_t i = 5; i < n; i += 13) w[i] = 1e-40f * static_cast<float>(i % 5);  // subnormal
    for (std::size_t i = 0; i < 512; ++i) w[i] = 0.0f;                                 // groups of zeros
    // Groups of tiny values with +-1000 among them (scales of 4 to 8):
    // quotients subnormal, or below the least subnormal.
    for (std::size_t i = 512; i < 1024; ++i)
      w[i] = i % 64 == 0 ? (i % 128 == 0 ? 1000.0f : -1000.0f)
                         : (i % 2 == 0 ? 2e-38f * static_cast<float>(i % 5) : std::numeric_limits<float>::denorm_min());
    Device<float> W(w);
    cuda::QuantizedWeight<8> q({c.rows, c.cols}, c.group);
    q.quantize(DeviceView<const float>(W.data(), c.rows, c.cols), ctx);
    check_equal(download(q, ctx), galore_test::cpu_int8_weight(c.rows, c.cols, c.group, w, 0, {}, 0, 0, 0));
    q.requantize_rows(0, DeviceView<const float>(W.data(), c.rows, c.cols), seed, 2, 19, ctx);
    check_equal(download(q, ctx), galore_test::cpu_int8_weight(c.rows, c.cols, c.group, w, 0, w, seed, 2, 19));
  }
}

TEST_CASE("dequantize() is scale * (code - zero), into float or bf16, whole or by rows") {
  cuda::Context ctx;
  const long rows = 150, cols = 300;
  const auto w = galore_test::gaussian(static_cast<std::size_t>(rows * cols), 21u);
  Device<float> W(w);
  cuda::QuantizedWeight<8> q({rows, cols});
  q.quantize(DeviceView<const float>(W.data(), rows, cols), ctx);
  const Downloaded d = download(q, ctx);
  std::vector<float> expect(w.size());
  for (std::size_t i = 0; i < w.size(); ++i)
    expect[i] = d.scales[i / 256] * (static_cast<float>(d.codes[i]) - static_cast<float>(d.zeros[i / 256]));
  Device<float> out(std::vector<float>(w.size(), 0.0f));
  q.dequantize(DeviceView<float>(out.data(), rows, cols), ctx);
  CHECK(out.download() == expect);
  Device<cuda::bf16> outb(std::vector<float>(w.size(), 0.0f));
  q.dequantize(DeviceView<cuda::bf16>(outb.data(), rows, cols), ctx);
  CHECK(outb.download() == galore_test::round_to_bf16(expect));
  // Rows 1..3 contiguous (four elements per thread, from element 300 on).
  Device<float> two(std::vector<float>(static_cast<std::size_t>(2 * cols), 0.0f));
  q.dequantize_rows(1, DeviceView<float>(two.data(), 2, cols), ctx);
  CHECK(two.download() == std::vector<float>(expect.begin() + cols, expect.begin() + 3 * cols));
  // Rows 64..127 into a strided buffer.
  const long ld = cols + 5;
  Device<float> part(std::vector<float>(static_cast<std::size_t>(64 * ld), -1.0f));
  q.dequantize_rows(64, DeviceView<float>(part.data(), 64, cols, ld), ctx);
  const auto got = part.download();
  std::size_t differ = 0;
  for (long r = 0; r < 64; ++r) {
    for (long k = 0; k < cols; ++k)
      differ += got[static_cast<std::size_t>(r * ld + k)] != expect[static_cast<std::size_t>((64 + r) * cols + k)];
    for (long k = cols; k < ld; ++k) differ += got[static_cast<std::size_t>(r * ld + k)] != -1.0f;
  }
  CHECK(differ == 0);
}

TEST_CASE("stochastic rounding on the GPU is unbiased: the mean over many steps is the value") {
  cuda::Context ctx;
  // One row of 4 groups; every step re-quantizes the same values (same
  // extremes, so the same scale and zero) with other random bits.
  const long cols = 1024;
  auto values = galore_test::gaussian(static_cast<std::size_t>(cols), 31u);
  Device<float> V(values);
  cuda::QuantizedWeight<8> q({1, cols});
  Device<float> out(std::vector<float>(static_cast<std::size_t>(cols), 0.0f));
  const int steps = 2000;
  std::vector<double> sum(static_cast<std::size_t>(cols), 0.0);
  Downloaded first;
  for (int t = 0; t < steps; ++t) {
    q.requantize_rows(0, DeviceView<const float>(V.data(), 1, cols), 42, 0, static_cast<std::uint32_t>(t), ctx);
    q.dequantize(DeviceView<float>(out.data(), 1, cols), ctx);
    const auto x = out.download();
    for (std::size_t i = 0; i < x.size(); ++i) sum[i] += x[i];
    if (t == 0) first = download(q, ctx);
  }
  // Per element one draw's rounding error has a standard deviation of at most
  // half a step (scale / 2), so the mean of 2000 draws has one below
  // scale / (2 sqrt(2000)) (the largest of the four groups' scales). Elements
  // within a step of a group's extremes are left out: the clamp to [0, 255]
  // biases them, on the CPU as here (math::to_code). Nearest rounding would
  // leave errors up to scale / 2 that do not average out.
  float scale = 0.0f;
  for (const float s : first.scales) scale = std::max(scale, s);
  double worst = 0.0, total = 0.0;
  int counted = 0;
  for (std::size_t i = 0; i < sum.size(); ++i) {
    const std::size_t g = i / 256;
    const double code = values[i] / first.scales[g] + first.zeros[g];
    if (code < 1.0 || code > 254.0) continue;
    const double err = sum[i] / steps - values[i];
    worst = std::max(worst, std::fabs(err));
    total += err;
    ++counted;
  }
  CHECK(counted > cols * 9 / 10);
  const double sd = scale / (2.0 * std::sqrt(static_cast<double>(steps)));
  CHECK(worst < 5.0 * sd);
  CHECK(std::fabs(total / counted) < 5.0 * sd / std::sqrt(static_cast<double>(counted)));
}

TEST_CASE("a QuantizedWeight holds one byte per weight and five per group, and says so") {
  CHECK(cuda::QuantizedWeight<8>::bytes_for({150, 300}) == 45000 + 176 * 5);
  CHECK(cuda::QuantizedWeight<8>::bytes_for({16, 100}, -1) == 1600 + 16 * 5);
  cuda::QuantizedWeight<8> small({150, 300});
  CHECK(small.num_groups() == 176);
  CHECK(small.bytes() == cuda::QuantizedWeight<8>::bytes_for({150, 300}));
  // Large enough that cudaMalloc's 2 MiB pages do not hide it.
  cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  std::size_t free_before = 0, free_after = 0, total = 0;
  cuda::check(cudaMemGetInfo(&free_before, &total), "cudaMemGetInfo");
  {
    cuda::QuantizedWeight<8> big({8192, 4096});
    CHECK(big.bytes() == std::size_t{8192} * 4096 + std::size_t{8192} * 4096 / 256 * 5);
    cuda::check(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");
    // cudaMalloc hands out 2 MiB pages, and may place an allocation smaller
    // than a page (the group scales and zeros, 640 KiB here) in a page an
    // earlier allocation left part-used (seen on an H100: the codes' 32 MiB
    // alone): each of the three allocations is within a page of its size.
    const std::size_t measured = free_before - free_after, page = std::size_t{2} << 20;
    INFO("measured ", measured, " bytes() ", big.bytes());
    CHECK(measured + 2 * page >= big.bytes());
    CHECK(measured >= std::size_t{8192} * 4096);  // the codes' own pages
    CHECK(measured <= big.bytes() + 3 * page);
  }
}

TEST_CASE("QuantizedWeight refuses bad shapes, bad groups, panels off group boundaries and non-finite values") {
  cuda::Context ctx;
  CHECK_THROWS_AS(cuda::QuantizedWeight<8>({0, 4}), invalid_argument);
  CHECK_THROWS_AS(cuda::QuantizedWeight<8>({4, 4}, 0), invalid_argument);
  CHECK_THROWS_AS(cuda::QuantizedWeight<8>({4, 4}, -2), invalid_argument);
  const long rows = 150, cols = 300;
  auto w = galore_test::gaussian(static_cast<std::size_t>(rows * cols), 41u);
  Device<float> W(w);
  cuda::QuantizedWeight<8> q({rows, cols});
  q.quantize(DeviceView<const float>(W.data(), rows, cols), ctx);
  const Downloaded before = download(q, ctx);
  CHECK_THROWS_AS(q.quantize(DeviceView<const float>(W.data(), rows, cols - 1), ctx), invalid_argument);
  // row_alignment() is 64 rows for groups of 256 in rows of 300.
  CHECK(q.row_alignment() == 64);
  CHECK_THROWS_AS(q.requantize_rows(1, DeviceView<const float>(W.data(), 64, cols), 0, 0, 1, ctx), invalid_argument);
  CHECK_THROWS_AS(q.requantize_rows(0, DeviceView<const float>(W.data(), 10, cols), 0, 0, 1, ctx), invalid_argument);
  CHECK_THROWS_AS(q.requantize_rows(128, DeviceView<const float>(W.data(), 64, cols), 0, 0, 1, ctx),
                  invalid_argument);  // past the last row
  Device<float> out(std::vector<float>(w.size(), 0.0f));
  CHECK_THROWS_AS(q.dequantize(DeviceView<float>(out.data(), rows - 1, cols), ctx), invalid_argument);
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto v = w;
    v[12345] = bad;
    Device<float> V(v);
    CHECK_THROWS_AS(q.quantize(DeviceView<const float>(V.data(), rows, cols), ctx), invalid_argument);
    CHECK_THROWS_AS(q.requantize_rows(0, DeviceView<const float>(V.data(), 64, cols), 0, 0, 1, ctx),
                    invalid_argument);
  }
  const Downloaded after = download(q, ctx);
  CHECK(after.codes == before.codes);
  CHECK(after.scales == before.scales);
  CHECK(after.zeros == before.zeros);
  std::vector<std::uint8_t> short_codes(10);
  CHECK_THROWS_AS(q.upload(short_codes, before.scales, before.zeros, ctx), invalid_argument);
}

TEST_CASE("a GaLore step on an INT8 weight is the CPU's Q-GaLore weight update: left, right, staged, two-sided, "
          "float and bf16 gradients, a skipped step") {
  struct StepCase {
    long m, n;
    ProjectionType type;
    bool bf16;
  };
  const StepCase cases[] = {{48, 512, ProjectionType::Std, false},   // left
                            {512, 48, ProjectionType::Std, false},   // right
                            {40, 300, ProjectionType::Left, false},  // left, 300 columns: staged
                            {64, 64, ProjectionType::Full, false},   // both sides
                            {512, 48, ProjectionType::Std, true}};   // bf16 gradient
  const std::uint64_t seed = 0x5eedULL;
  const int steps = 6;  // gap 3: refreshes at steps 0 and 3; step 4 is skipped (NaN)
  for (const StepCase& c : cases) {
    INFO(c.m, "x", c.n, " ", to_string(c.type), c.bf16 ? " bf16" : " float");
    galore_test::RunSpec spec;
    spec.rows = c.m;
    spec.cols = c.n;
    spec.rank = 6;
    spec.type = static_cast<int>(c.type);
    spec.lr = 1e-2;
    spec.weight_decay = 0.05;
    spec.eps = 1e-3;
    spec.gap = 3;
    auto w0 = galore_test::gaussian(static_cast<std::size_t>(c.m * c.n), 61u, 0.1f);
    auto grads = galore_test::separated_gradients(c.m, c.n, 10, steps, 62u);
    if (c.bf16)
      for (auto& g : grads) g = galore_test::round_to_bf16(g);
    grads[4][17] = std::numeric_limits<float>::quiet_NaN();
    const auto cpu = galore_test::cpu_int8_run(spec, 256, seed, 1, w0, grads, c.bf16);

    cuda::Context ctx;
    Opt opt(ProjectorOptions{6, c.type, spec.scale}, galore_test::adam_of(spec), schedule::FixedGap{3}, svd::Exact{},
            WeightRounding{seed, RoundingMode::Stochastic});
    const cuda::DType t = c.bf16 ? cuda::DType::BFloat16 : cuda::DType::Float32;
    (void)opt.add_dense({1, 1}, t);  // so that the layer's index (a rounding key) is 1, as on the CPU
    const LayerId id = opt.add_layer({c.m, c.n}, t);
    ctx.reserve_workspace(opt.workspace_bytes(ctx));
    Device<float> W0(w0);
    cuda::QuantizedWeight<8> W({c.m, c.n});
    W.quantize(DeviceView<const float>(W0.data(), c.m, c.n), ctx);
    Downloaded before = download(W, ctx);
    for (int s = 0; s < steps; ++s) {
      INFO("step ", s);
      if (c.bf16) {
        Device<cuda::bf16> G(grads[static_cast<std::size_t>(s)]);
        opt.step(id, W, DeviceView<const cuda::bf16>(G.data(), c.m, c.n), ctx);
      } else {
        Device<float> G(grads[static_cast<std::size_t>(s)]);
        opt.step(id, W, DeviceView<const float>(G.data(), c.m, c.n), ctx);
      }
      const Downloaded now = download(W, ctx);
      if (s == 4) {  // skipped: nothing of the weight changed, on either backend
        CHECK(opt.status(id, ctx) == StepStatus::SkippedNonFinite);
        CHECK(now.codes == before.codes);
        CHECK(now.scales == before.scales);
        CHECK(now.zeros == before.zeros);
        CHECK(cpu[4].codes == cpu[3].codes);
      } else {
        CHECK(opt.status(id, ctx) == StepStatus::Applied);
        CHECK(now.codes != before.codes);
      }
      const galore_test::CodeAgreement a =
          galore_test::code_agreement(now.codes, now.scales, now.zeros, cpu[static_cast<std::size_t>(s)], 256);
      CHECK(a.same >= (c.bf16 ? 0.9 : 0.995));
      CHECK(a.mean <= (c.bf16 ? 0.1 : 0.01));
      CHECK(a.worst <= 3.0);
      before = now;
    }
    CHECK(opt.stats(id, ctx).skipped_steps == 1);
  }
}

TEST_CASE("an INT8 weight steps only on projected layers of its shape and element type") {
  cuda::Context ctx;
  Opt opt(ProjectorOptions{4, ProjectionType::Std, 0.25f});
  const LayerId dense = opt.add_dense({16, 32}, cuda::DType::Float32);
  const LayerId proj = opt.add_layer({16, 32}, cuda::DType::Float32);
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  cuda::QuantizedWeight<8> W({16, 32}), other({32, 16});
  Device<float> G(std::vector<float>(16 * 32, 0.5f));
  Device<cuda::bf16> Gb(std::vector<float>(16 * 32, 0.5f));
  CHECK_THROWS_AS(opt.step(dense, W, DeviceView<const float>(G.data(), 16, 32), ctx), invalid_argument);
  CHECK_THROWS_AS(opt.step(proj, other, DeviceView<const float>(G.data(), 16, 32), ctx), invalid_argument);
  CHECK_THROWS_AS(opt.step(proj, W, DeviceView<const cuda::bf16>(Gb.data(), 16, 32), ctx), invalid_argument);
  auto with_mode = [](RoundingMode mode) {
    return Opt(ProjectorOptions{}, AdamConfig{}, schedule::FixedGap{}, svd::Exact{}, WeightRounding{0, mode});
  };
  CHECK_THROWS_AS(with_mode(static_cast<RoundingMode>(7)), invalid_argument);
  CHECK_NOTHROW(with_mode(RoundingMode::Nearest));
}

TEST_CASE("4-bit codes (INT4 bases) are the CPU's, packed two per byte, for any group size, and dequantize exactly") {
  // Groups inside rows, across rows with a short last group, one per row of an
  // odd width (bytes shared by two groups), and an odd group size; float and
  // bf16, contiguous and strided.
  const Case cases[] = {{32, 64, 256}, {6, 37, -1}, {9, 10, 7}, {3, 5461, -1}, {512, 96, 128}};
  cuda::Context ctx;
  for (const Case& c : cases)
    for (const bool bf16 : {false, true})
      for (const long pad : {0L, 5L}) {
        INFO(c.rows, "x", c.cols, " group ", c.group, bf16 ? " bf16" : " float", " ld pad ", pad);
        std::vector<float> w = galore_test::gaussian(static_cast<std::size_t>(c.rows * c.cols), 17u + unsigned(c.cols));
        w[3] = 0.0f;  // an exact zero: its code is the zero point
        if (bf16) w = galore_test::round_to_bf16(w);
        const long ld = c.cols + pad;
        cuda::QuantizedWeight<4> q({c.rows, c.cols}, c.group);
        quantize_padded(q, w, pad, bf16, ctx);
        const galore_test::CpuCodes cpu = galore_test::cpu_minmax_codes4(w, c.rows, c.cols, c.group);
        const Downloaded gpu = download(q, ctx);
        check_equal(gpu, cpu);
        CHECK(gpu.codes.size() == static_cast<std::size_t>((c.rows * c.cols + 1) / 2));
        // Dequantized on the GPU: scale * (code - zero) of the CPU's codes, bit
        // for bit, into a strided float view and, by rows, a bf16 one.
        const long group = c.group == -1 ? c.cols : c.group;
        std::vector<float> want(w.size());
        for (std::size_t i = 0; i < w.size(); ++i) {
          const std::size_t g = i / static_cast<std::size_t>(group);
          const auto code = static_cast<std::uint8_t>((cpu.codes[i / 2] >> (4 * (i % 2))) & 15u);
          want[i] = math::minmax_value(code, cpu.scales[g], static_cast<float>(cpu.zeros[g]));
        }
        Device<float> out(std::vector<float>(static_cast<std::size_t>(c.rows * ld), -7.0f));
        q.dequantize(DeviceView<float>(out.data(), c.rows, c.cols, ld), ctx);
        ctx.synchronize();
        const std::vector<float> got = out.download();
        std::size_t differ = 0, padding = 0;
        for (long r = 0; r < c.rows; ++r)
          for (long k = 0; k < ld; ++k) {
            const float x = got[static_cast<std::size_t>(r * ld + k)];
            if (k >= c.cols) padding += x != -7.0f;
            else differ += x != want[static_cast<std::size_t>(r * c.cols + k)];
          }
        CHECK(differ == 0);
        CHECK(padding == 0);
        const long r0 = c.rows / 2;
        Device<cuda::bf16> half(std::vector<float>(static_cast<std::size_t>((c.rows - r0) * c.cols), 0.0f));
        q.dequantize_rows(r0, DeviceView<cuda::bf16>(half.data(), c.rows - r0, c.cols), ctx);
        ctx.synchronize();
        const std::vector<float> h = half.download();
        const std::vector<float> want_half =
            galore_test::round_to_bf16(std::vector<float>(want.begin() + r0 * c.cols, want.end()));
        CHECK(h == want_half);
      }
}

TEST_CASE("a 4-bit QuantizedWeight holds half a byte per element and five per group; it refuses NaN") {
  // 37 x 11 = 407 elements: 204 bytes of codes; one group per row: 37 groups.
  CHECK(cuda::QuantizedWeight<4>::bytes_for({37, 11}, -1) == 204 + 37 * 5);
  CHECK(cuda::QuantizedWeight<4>::bytes_for({512, 2048}, 256) == 512 * 1024 + 4096 * 5);
  cuda::QuantizedWeight<4> q({37, 11}, -1);
  CHECK(q.bytes() == cuda::QuantizedWeight<4>::bytes_for({37, 11}, -1));
  CHECK(q.num_groups() == 37);
  cuda::Context ctx;
  std::vector<float> w = galore_test::gaussian(37 * 11, 3u);
  q.quantize(DeviceView<const float>(Device<float>(w).data(), 37, 11), ctx);
  const Downloaded before = download(q, ctx);
  w[100] = std::numeric_limits<float>::quiet_NaN();
  Device<float> bad(w);
  CHECK_THROWS_AS(q.quantize(DeviceView<const float>(bad.data(), 37, 11), ctx), invalid_argument);
  const Downloaded after = download(q, ctx);
  CHECK(after.codes == before.codes);  // nothing written
  CHECK(after.scales == before.scales);
}
