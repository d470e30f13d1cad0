// bitsandbytes' 8-bit blockwise Adam moments on the GPU (cuda::Blockwise8bitMoments,
// cuda::adam8bit_step) against the CPU's state::Blockwise8bit on identical
// inputs, bit for bit: codes, absmax and the update, step after step, for
// blocks stepped per warp (32, 100, 256 and 512 elements) and per thread
// block (2048) with a short last block, with gradients out of Adam's range
// (their elements keep their state); the nearest-code search against the
// CPU's at every bucket edge and midpoint; memory against the formula; the errors.
// Then GaLoreAdamW8bit (cuda::GaLoreOptimizer over state::Blockwise8bit) against
// the CPU's: dense layers bit for bit, projected layers within the GEMMs'
// rounding, skipped steps, its device memory.
#include <doctest/doctest.h>

#include <galore/cuda.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_reference.hpp"
#include "cuda_support.cuh"

using namespace galore;
using galore_test::Device;
using galore_test::adam_of;

namespace {

// The GPU's code search for each x, with both maps.
__global__ void codes_of(const unsigned char* maps, const float* x, int n, std::uint8_t* m_code,
                         std::uint8_t* v_code) {
  __shared__ __align__(16) cuda::impl::Adam8bitTables t;
  cuda::impl::load_tables(t, maps);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    m_code[i] = static_cast<std::uint8_t>(cuda::impl::code_of(t.table_m, t.mid_m, x[i]));
    v_code[i] = static_cast<std::uint8_t>(cuda::impl::code_of(t.table_v, t.mid_v, x[i]));
  }
}

template <class T>
std::size_t mismatches(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return std::max(a.size(), b.size());
  std::size_t k = 0;
  for (std::size_t i = 0; i < a.size(); ++i) k += !(a[i] == b[i]);
  return k;
}

}  // namespace

TEST_CASE("8-bit blockwise Adam on the GPU is the CPU's state::Blockwise8bit, bit for bit") {
  cuda::Context ctx;
  const cuda::DynamicMaps maps;
  const double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  for (const long block : {32L, 100L, 256L, 512L, 2048L}) {
    // Several blocks and a short last one; gradients of several magnitudes.
    const std::size_t n = static_cast<std::size_t>(5 * block + 77);
    INFO("block ", block);
    const int steps = 5;
    std::vector<std::vector<float>> grads;
    for (int t = 0; t < steps; ++t) {
      auto g = galore_test::gaussian(n, 90u + unsigned(t), t == 2 ? 1e-6f : 1.0f);
      g[3] = std::numeric_limits<float>::quiet_NaN();  // kept state, d = 0
      g[n - 1] = std::numeric_limits<float>::infinity();
      g[static_cast<std::size_t>(block)] = 1e30f;  // beyond Adam's range (2^60)
      for (std::size_t i = static_cast<std::size_t>(2 * block); i < static_cast<std::size_t>(3 * block); ++i)
        g[i] = 0.0f;  // an all-zero block at every step: absmax 0, zero codes
      grads.push_back(std::move(g));
    }
    const auto cpu = galore_test::cpu_adam_8bit_blockwise(grads, block, lr, beta1, beta2, eps);
    cuda::Blockwise8bitMoments mo(static_cast<std::int64_t>(n), static_cast<int>(block));
    CHECK(mo.bytes() == 2 * n + 8 * static_cast<std::size_t>((n + block - 1) / block));
    CHECK(mo.bytes() == cuda::Blockwise8bitMoments::bytes_for(static_cast<std::int64_t>(n), static_cast<int>(block)));
    Device<float> d(std::vector<float>(n, -1.0f));
    for (int t = 0; t < steps; ++t) {
      INFO("step ", t + 1);
      Device<float> g(grads[static_cast<std::size_t>(t)]);
      cuda::adam8bit_step(ctx, mo, maps, g.data(), d.data(),
                          math::adam8bit_coefficients(lr, beta1, beta2, eps, t + 1, true));
      std::vector<std::uint8_t> mc, vc;
      std::vector<float> ma, va;
      mo.download(mc, vc, ma, va, ctx);
      const auto& c = cpu[static_cast<std::size_t>(t)];
      CHECK(mismatches(mc, c.m_code) == 0);
      CHECK(mismatches(vc, c.v_code) == 0);
      CHECK(mismatches(ma, c.m_absmax) == 0);
      CHECK(mismatches(va, c.v_absmax) == 0);
      const auto dg = d.download();
      CHECK(mismatches(dg, c.d) == 0);
      CHECK(dg[3] == 0.0f);
      CHECK(dg[n - 1] == 0.0f);
    }
  }
}

TEST_CASE("the GPU's nearest 8-bit code is the CPU's at every bucket edge and every midpoint") {
  // The CPU checks that its compact search is the exact count (and equals its
  // full table's) for finite values; here the GPU's equals it for every float.
  // The first and last float of every bucket (sign, exponent, 8 mantissa bits)
  // of all floats (Inf and NaN included), every midpoint of both maps and its
  // two neighbours.
  std::vector<float> x;
  for (std::uint32_t key = 0; key < (1u << 17); ++key)
    for (const std::uint32_t bits : {key << 15, key << 15 | 0x7fffu}) {
      float f;
      std::memcpy(&f, &bits, sizeof f);
      x.push_back(f);
    }
  for (const auto* index : {&quant::signed_code_index(), &quant::unsigned_code_index()})
    for (int k = 0; k < 255; ++k) {
      const float m = index->midpoints()[static_cast<std::size_t>(k)];
      x.insert(x.end(), {m, std::nextafter(m, -INFINITY), std::nextafter(m, INFINITY)});
    }
  const int n = static_cast<int>(x.size());
  const cuda::DynamicMaps maps;
  Device<float> xd(x);
  Device<std::uint8_t> md(std::vector<float>(x.size())), vd(std::vector<float>(x.size()));
  codes_of<<<264, 256>>>(maps.data(), xd.data(), n, md.data(), vd.data());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const auto mg = md.download(), vg = vd.download();
  std::size_t bad_m = 0, bad_v = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    bad_m += mg[i] != static_cast<float>(quant::signed_code_index().nearest_compact(x[i]));
    bad_v += vg[i] != static_cast<float>(quant::unsigned_code_index().nearest_compact(x[i]));
  }
  CHECK(bad_m == 0);
  CHECK(bad_v == 0);
}

TEST_CASE("Blockwise8bitMoments refuses empty tensors and blocks beyond 4096") {
  CHECK_THROWS_AS(cuda::Blockwise8bitMoments(0), invalid_argument);
  CHECK_THROWS_AS(cuda::Blockwise8bitMoments(100, 0), invalid_argument);
  CHECK_THROWS_AS(cuda::Blockwise8bitMoments(100, 4097), invalid_argument);
  CHECK_NOTHROW(cuda::Blockwise8bitMoments(100, 4096));
}

// ---- GaLoreAdamW8bit: the 8-bit moments inside cuda::GaLoreOptimizer ----

namespace {

using Opt8 = cuda::GaLoreOptimizer<Projector<svd::Exact, quant::None, schedule::FixedGap>,
                                   LowRankAdam<state::Blockwise8bit>>;
static_assert(std::is_same_v<Opt8::moment_type, std::uint8_t>);
static_assert(std::is_same_v<Opt8, cuda::GaLoreAdamW8bit>);

Opt8 make_opt8(const galore_test::RunSpec& s) {
  return Opt8(ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale}, adam_of(s),
              schedule::FixedGap{s.gap}, svd::Exact{}, WeightRounding{},
              state::Blockwise8bit{s.block_size, s.min_8bit_size});
}

// W after every step on the GPU (T: the weights' element type).
template <class T>
std::vector<std::vector<float>> gpu_run_8bit(const galore_test::RunSpec& s, const std::vector<float>& W0,
                                             const std::vector<std::vector<float>>& grads) {
  cuda::Context ctx;
  Opt8 opt = make_opt8(s);
  const Shape shape{s.rows, s.cols};
  const LayerId id = s.dense ? opt.add_dense(shape, cuda::dtype_of<T>()) : opt.add_layer(shape, cuda::dtype_of<T>());
  ctx.reserve_workspace(opt.workspace_bytes(ctx));
  return galore_test::step_through<T>(opt, id, ctx, W0, grads);
}

// The layer's 8-bit moments as bytes on the host (codes and absmax, or the float32 moments).
std::vector<unsigned char> moment_bytes(const cuda::DeviceMoments8bit& mo) {
  const auto n = static_cast<std::size_t>(mo.shape.size());
  std::vector<unsigned char> out;
  auto append = [&](const void* p, std::size_t bytes) {
    const std::size_t at = out.size();
    out.resize(at + bytes);
    REQUIRE(cudaMemcpy(out.data() + at, p, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
  };
  if (mo.quantized) {
    append(mo.m_code, n);
    append(mo.v_code, n);
    append(mo.m_absmax, sizeof(float) * static_cast<std::size_t>(mo.blocks()));
    append(mo.v_absmax, sizeof(float) * static_cast<std::size_t>(mo.blocks()));
  } else {
    append(mo.m32, sizeof(float) * n);
    append(mo.v32, sizeof(float) * n);
  }
  return out;
}

}  // namespace

TEST_CASE("8-bit dense AdamW layers on the GPU are the CPU's, bit for bit, with a skipped step") {
  // No GEMM on this path: the skip decision, the step count and coefficients
  // computed on the device, the codes and W = (W - d) * decay must all agree.
  // 7 x 33 stays under min_8bit_size (float32 moments); 7 x 700 is quantized,
  // in blocks stepped per warp (256) or per thread block (2048).
  for (const long cols : {33L, 700L})
    for (const long block : {256L, 2048L}) {
      INFO("7 x ", cols, ", blocks of ", block);
      galore_test::RunSpec s;
      s.rows = 7;
      s.cols = cols;
      s.dense = true;
      s.blockwise8bit = true;
      s.block_size = block;
      s.lr = 1e-2;
      s.weight_decay = 0.1;
      auto grads = galore_test::separated_gradients(7, cols, 3, 6, 4u + static_cast<unsigned>(cols), 0.5f);
      grads[2][5] = std::numeric_limits<float>::quiet_NaN();  // step 3 is skipped on both backends
      const auto W0 = galore_test::gaussian(static_cast<std::size_t>(7 * cols), 8u);
      const auto gpu = gpu_run_8bit<float>(s, W0, grads);
      const auto cpu = galore_test::cpu_run(s, W0, grads);
      REQUIRE(gpu.size() == cpu.size());
      for (std::size_t t = 0; t < gpu.size(); ++t) {
        INFO("step ", t);
        CHECK(mismatches(gpu[t], cpu[t]) == 0);
      }
      CHECK(mismatches(gpu[2], gpu[1]) == 0);  // the skipped step wrote nothing
      std::vector<std::vector<float>> g16;
      for (const auto& g : grads) g16.push_back(galore_test::round_to_bf16(g));
      const auto W16 = galore_test::round_to_bf16(W0);
      const auto gpu16 = gpu_run_8bit<cuda::bf16>(s, W16, g16);
      const auto cpu16 = galore_test::cpu_run(s, W16, g16, true);
      for (std::size_t t = 0; t < gpu16.size(); ++t) CHECK(mismatches(gpu16[t], cpu16[t]) == 0);
    }
}

TEST_CASE("GaLoreAdamW8bit on the GPU follows the CPU for every projection type over several refreshes") {
  // min_8bit_size 64: the 48 x 6 (or 6 x 32, 6 x 6) low-rank moments are
  // quantized in blocks of 64 (a short last block where the size is not a
  // multiple); the default threshold keeps them float32. The GEMMs round
  // differently on the two backends, so a code may land one step apart.
  const ProjectionType types[] = {ProjectionType::Std, ProjectionType::ReverseStd, ProjectionType::Left,
                                  ProjectionType::Right, ProjectionType::Full};
  for (const long min_8bit : {64L, 4096L})
    for (const auto& mn : {std::pair<long, long>{48, 32}, std::pair<long, long>{37, 29}})
      for (ProjectionType type : types) {
        galore_test::RunSpec s;
        s.rows = mn.first;
        s.cols = mn.second;
        s.rank = 6;
        s.type = static_cast<int>(type);
        s.lr = 1e-2;
        s.weight_decay = 0.05;
        s.eps = 1e-3;
        s.gap = 3;
        s.blockwise8bit = true;
        s.block_size = 64;
        s.min_8bit_size = min_8bit;
        INFO(to_string(type), " ", s.rows, "x", s.cols, " min_8bit_size ", min_8bit);
        const auto grads = galore_test::separated_gradients(s.rows, s.cols, 10, 8, 11u + static_cast<unsigned>(type));
        const auto W0 = galore_test::gaussian(static_cast<std::size_t>(s.rows * s.cols), 5u);
        const auto gpu = gpu_run_8bit<float>(s, W0, grads);
        const auto cpu = galore_test::cpu_run(s, W0, grads);
        REQUIRE(gpu.size() == cpu.size());
        for (std::size_t t = 0; t < gpu.size(); ++t) {
          INFO("step ", t);
          CHECK(galore_test::relative_change_error(gpu[t], cpu[t], W0) < 1e-2);
        }
      }
}

TEST_CASE("a non-finite gradient leaves a GaLoreAdamW8bit layer's codes, W and basis untouched") {
  galore_test::RunSpec s;
  s.rows = 96;
  s.cols = 64;
  s.rank = 8;
  s.gap = 10;
  s.blockwise8bit = true;
  cuda::Context ctx;
  Opt8 opt = make_opt8(s);
  const LayerId id = opt.add_layer({96, 64}, cuda::DType::Float32);
  REQUIRE(opt.moments_8bit(id).quantized == false);  // 8 x 64 = 512 < 4096
  Opt8 big = make_opt8(s);
  const LayerId big_id = big.add_layer({4096, 64}, cuda::DType::Float32);  // 8 x 4096 moments: codes
  REQUIRE(big.moments_8bit(big_id).quantized);
  for (Opt8* o : {&opt, &big}) {
    const LayerId l = o == &opt ? id : big_id;
    const long m = o == &opt ? 96 : 4096;
    ctx.reserve_workspace(o->workspace_bytes(ctx));
    auto grads = galore_test::separated_gradients(m, 64, 10, 3, 7u);
    grads[2][static_cast<std::size_t>(m)] = std::numeric_limits<float>::infinity();
    Device<float> W(galore_test::gaussian(static_cast<std::size_t>(m * 64), 3u)), G(grads[0]);
    for (int t = 0; t < 2; ++t) {
      G.upload(grads[static_cast<std::size_t>(t)]);
      o->step(l, W.data(), static_cast<const float*>(G.data()), ctx);
      REQUIRE(o->status(l, ctx) == StepStatus::Applied);
    }
    const auto w_before = W.download();
    const auto mo_before = moment_bytes(o->moments_8bit(l));
    G.upload(grads[2]);
    o->step(l, W.data(), static_cast<const float*>(G.data()), ctx);
    CHECK(o->status(l, ctx) == StepStatus::SkippedNonFinite);
    CHECK(mismatches(W.download(), w_before) == 0);
    CHECK(moment_bytes(o->moments_8bit(l)) == mo_before);
    CHECK(o->stats(l, ctx).steps == 2);
  }
}

TEST_CASE("GaLoreAdamW8bit's device memory is the formula") {
  using A = cuda::WorkspaceArena;
  const std::size_t counters = A::align(sizeof(cuda::StepCounters));
  Opt8 probe(ProjectorOptions{512, ProjectionType::Std, 0.25f});
  // 2048 x 1024 bf16, right side: 2048 x 512 moments as codes (1 byte each) and
  // 4096 blocks of 256 (a float absmax each), the 512 x 1024 basis, the counters.
  CHECK(probe.predict_layer_bytes({2048, 1024}, cuda::DType::BFloat16, probe.projection_options()) ==
        2 * A::align(2048 * 512) + 2 * A::align(4 * 4096) + A::align(2 * 512 * 1024) + counters);
  // Under min_8bit_size: float32 moments, as on the CPU.
  CHECK(probe.predict_dense_bytes({3, 5}, cuda::DType::Float32) == 2 * A::align(4 * 15) + counters);
  CHECK(probe.state_bytes() == cuda::DynamicMaps::kBytes);  // the shared code maps and tables

  std::size_t free_before = 0, free_after = 0, total = 0;
  cuda::check(cudaDeviceSynchronize(), "sync");
  cuda::check(cudaMemGetInfo(&free_before, &total), "cudaMemGetInfo");
  {
    Opt8 opt(ProjectorOptions{1024, ProjectionType::Std, 0.25f});
    std::size_t predicted = cuda::DynamicMaps::kBytes;
    for (int i = 0; i < 4; ++i) {
      opt.add_layer({8192, 4096}, cuda::DType::BFloat16);
      predicted += opt.predict_layer_bytes({8192, 4096}, cuda::DType::BFloat16, opt.projection_options());
    }
    CHECK(opt.state_bytes() == predicted);
    cuda::check(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");
    const std::size_t measured = free_before - free_after;
    INFO("measured ", measured, " state_bytes ", opt.state_bytes());
    // cudaMalloc hands out whole 2 MiB pages: each of the five allocations may
    // be a page off either way.
    CHECK(measured + 5 * (std::size_t{2} << 20) >= opt.state_bytes());
    CHECK(measured <= opt.state_bytes() + 5 * (std::size_t{2} << 20));
  }
  const auto with_state = [](state::Blockwise8bit st) {
    return Opt8(ProjectorOptions{4}, AdamConfig{}, schedule::FixedGap{}, svd::Exact{}, WeightRounding{}, st);
  };
  CHECK_THROWS_AS(with_state({8192, 4096}), invalid_argument);  // the GPU's blocks hold at most 4096
  CHECK_THROWS_AS(with_state({0, 4096}), invalid_argument);
  CHECK_THROWS_AS(with_state({256, -1}), invalid_argument);
  CHECK_NOTHROW(with_state({4096, 4096}));
}

TEST_CASE("GaLoreAdamW8bit checkpoints move between the GPU and the CPU, bit for bit") {
  // Dense layers (no GEMM, so both backends step them bit for bit): one with
  // 8-bit codes (7 x 700), one under min_8bit_size (float32 moments); and a
  // projected layer, whose state must survive the round trip unchanged.
  galore_test::CkptSpec spec;
  spec.blockwise8bit = true;
  spec.layers = {{"codes", 7, 700, true}, {"small", 3, 33, true}, {"proj", 48, 32}};
  const int before = 3, after = 3;
  std::vector<std::vector<std::vector<float>>> grads(before + after);
  std::vector<std::vector<float>> W0;
  for (std::size_t i = 0; i < spec.layers.size(); ++i) {
    const auto& l = spec.layers[i];
    W0.push_back(galore_test::gaussian(static_cast<std::size_t>(l.rows * l.cols), 60u + static_cast<unsigned>(i)));
    const auto seq = galore_test::separated_gradients(l.rows, l.cols, 3, before + after, 70u + static_cast<unsigned>(i), 0.5f);
    for (int t = 0; t < before + after; ++t) grads[static_cast<std::size_t>(t)].push_back(seq[static_cast<std::size_t>(t)]);
  }
  const auto first = std::vector<std::vector<std::vector<float>>>(grads.begin(), grads.begin() + before);
  const auto rest = std::vector<std::vector<std::vector<float>>>(grads.begin() + before, grads.end());

  // The GPU optimizer of the spec.
  using Gpu = galore_test::GpuRun<Opt8>;
  const auto make = [](const galore_test::CkptSpec& s) {
    return Opt8(ProjectorOptions{s.rank, static_cast<ProjectionType>(s.type), s.scale}, adam_of(s),
                schedule::FixedGap{s.gap});
  };

  Gpu gpu(spec, W0, make);
  gpu.run(first);
  const std::string from_gpu = gpu.save();
  const auto cpu_first = galore_test::cpu_checkpoint_run(spec, "", W0, first);
  CHECK(from_gpu.size() == cpu_first.checkpoint.size());  // the same fields and sizes
  std::vector<std::vector<float>> W_saved;
  for (auto& w : gpu.W) W_saved.push_back(w.download());

  // GPU -> CPU: the CPU resumes from the GPU's file and continues as the GPU does.
  const auto gpu_rest = gpu.run(rest);
  const auto cpu_rest = galore_test::cpu_checkpoint_run(spec, from_gpu, W_saved, rest);
  for (std::size_t t = 0; t < rest.size(); ++t)
    for (std::size_t i = 0; i < 2; ++i) {  // the dense layers, bit for bit
      INFO("step ", t, " layer ", spec.layers[i].name);
      CHECK(mismatches(gpu_rest[t][i], cpu_rest.W[t][i]) == 0);
    }
  for (std::size_t t = 0; t < rest.size(); ++t)
    CHECK(galore_test::relative_change_error(gpu_rest[t][2], cpu_rest.W[t][2], W_saved[2]) < 1e-2);

  // CPU -> GPU: a fresh GPU optimizer loads the CPU's file and continues as the CPU does.
  Gpu resumed(spec, cpu_first.W.back(), make);
  std::istringstream is(cpu_first.checkpoint, std::ios::binary);
  cuda::load_checkpoint(resumed.opt, is, resumed.ctx);
  const auto resumed_rest = resumed.run(rest);
  const auto cpu_cont = galore_test::cpu_checkpoint_run(spec, cpu_first.checkpoint, cpu_first.W.back(), rest);
  for (std::size_t t = 0; t < rest.size(); ++t)
    for (std::size_t i = 0; i < 2; ++i) CHECK(mismatches(resumed_rest[t][i], cpu_cont.W[t][i]) == 0);
  // Saved again right away, the GPU writes back what it loaded, byte for byte.
  Gpu again(spec, cpu_first.W.back(), make);
  std::istringstream is2(cpu_first.checkpoint, std::ios::binary);
  cuda::load_checkpoint(again.opt, is2, again.ctx);
  CHECK(again.save() == cpu_first.checkpoint);
}
