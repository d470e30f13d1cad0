// galore (CUDA backend): checkpoints of cuda::GaLoreOptimizer in the CPU
// facade's format (docs/checkpoint.md), written and read by the same code
// (checkpoint/file.hpp): a checkpoint saved on one backend resumes on the other.
//
//   cuda::save_checkpoint(opt, "run.ckpt", ctx);   // atomic and durable, as the CPU's
//   cuda::load_checkpoint(opt, "run.ckpt", ctx);   // all or nothing
//
// Both synchronize ctx's stream: they read or write the layers' device memory on
// it, after the steps queued there (steps queued on other streams must have
// finished). A save copies one layer at a time to host memory (counters,
// moments, basis) and writes it. A load reads and validates the whole file into
// host memory first and, on any error, throws checkpoint_error with the
// optimizer and its device memory untouched; then it copies each layer into the
// device memory the layer already holds. Neither allocates device memory. A CUDA
// failure while copying throws cuda_error, and the layers' device state is then
// undefined, as after a failing step.
//
// What a file holds of a GPU optimizer, and which CPU facade reads it:
//  - the configuration: cuda::GaLoreOptimizer<P, A> saves what the CPU's
//    GaLoreOptimizer<P, A> (the same policy names) saves with its default
//    rounder;
//  - each basis as quant::None stores it, in float32. A bf16 layer's basis widens
//    exactly; loading into a bf16 layer rounds the float32 basis to nearest even
//    bf16 (the GPU keeps P in the layer's element type, as galore_torch does);
//  - the moments as the state policy (state::Dense<float or bfloat16>) stores them;
//  - no weights (they are the trainer's device memory): a file saved with a
//    WeightSet has a weights section, and loading it is refused.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <istream>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../checkpoint/atomic_write.hpp"
#include "../../checkpoint/describe.hpp"
#include "../../checkpoint/fields.hpp"
#include "../../checkpoint/file.hpp"
#include "../../checkpoint/format.hpp"
#include "context.cuh"
#include "error.cuh"
#include "gemm.cuh"
#include "optimizer.cuh"

namespace galore::cuda {

// The CUDA facade's adapters for checkpoint/file.hpp (which says what each hook
// does); a friend of GaLoreOptimizer.
struct CheckpointAccess {
  // A device element on the host: float32, or bf16 as its bits.
  template <class T>
  using Host = std::conditional_t<std::is_same_v<T, float>, float, std::uint16_t>;

  template <class Opt>
  static checkpoint::Items config_items(const Opt& opt) {
    namespace d = checkpoint::described;
    // The GPU facade has no rounder (it steps float and bf16 weights); it
    // describes the CPU facade's default, StochasticRounder<8>{} (seed 0,
    // stochastic), so that files move between the two.
    return checkpoint::config_items(opt.svd_, d::QuantNone{},
                                    opt.schedule_, d::DenseState{!std::is_same_v<typename Opt::moment_type, float>},
                                    opt.adam_, d::Rounder{8, 0, RoundingMode::Stochastic}, opt.projection_);
  }

  template <class Opt>
  static checkpoint::LayerFields registered(const typename Opt::Layer& l) {
    checkpoint::LayerFields f;
    f.name = l.name;
    f.shape = l.shape;
    f.projected = l.projected;
    if (l.projected) {
      f.rank = l.options.rank;
      f.type = l.options.type;
      f.scale = l.options.scale;
      f.side = l.side;
    }
    return f;
  }

  static Shape factor_shape(Shape shape, Index rank, Side factor) {
    return factor == Side::Left ? Shape{shape.rows, rank} : Shape{rank, shape.cols};
  }

  template <class T>
  static void download(T* host, const unsigned char* device, std::size_t count, Context& ctx) {
    check(cudaMemcpyAsync(host, device, sizeof(T) * count, cudaMemcpyDeviceToHost, ctx.stream()), "cudaMemcpyAsync");
  }
  template <class T>
  static void upload(unsigned char* device, const T* host, std::size_t count, Context& ctx) {
    check(cudaMemcpyAsync(device, host, sizeof(T) * count, cudaMemcpyHostToDevice, ctx.stream()), "cudaMemcpyAsync");
  }

  // One basis factor on the host, in the layer's element type.
  struct HostFactor {
    std::vector<float> f32;
    std::vector<std::uint16_t> bf16;
  };

  template <class Opt>
  class Saver {
    using MH = Host<typename Opt::moment_type>;

   public:
    Saver(const Opt& opt, Context& ctx) : opt_(opt), ctx_(ctx) {}

    checkpoint::Items config_items() const { return CheckpointAccess::config_items(opt_); }
    double lr() const { return opt_.adam_.lr; }
    std::size_t num_layers() const { return opt_.layers_.size(); }
    std::size_t num_weights() const { return 0; }
    void save_weights(checkpoint::Writer&) const {}
    const auto& schedule_policy() const { return opt_.schedule_; }
    const auto& schedule_state(std::size_t i) const { return opt_.layers_[i].state; }

    // Copies layer i's counters, moments and basis (float32, widened from bf16)
    // into host buffers that the previous layer's copies used, and waits.
    checkpoint::LayerFields stage_layer(std::size_t i) {
      const auto& l = opt_.layers_[i];
      const auto o = Opt::layout(l);
      const unsigned char* base = l.storage.data();
      const auto n = static_cast<std::size_t>(l.low_rank.size());
      StepCounters c;
      download(&c, base + o.counters, 1, ctx_);
      m_.resize(n);
      v_.resize(n);
      download(m_.data(), base + o.m, n, ctx_);
      download(v_.data(), base + o.v, n, ctx_);
      const bool basis = l.projected && l.has_basis;
      if (basis && l.side != Side::Right) stage_factor(l, Side::Left, base + o.left, left_);
      if (basis && l.side != Side::Left) stage_factor(l, Side::Right, base + o.right, right_);
      ctx_.synchronize();
      if (basis && l.dtype == DType::BFloat16) {
        if (l.side != Side::Right) widen(left_);
        if (l.side != Side::Left) widen(right_);
      }
      checkpoint::LayerFields f = registered<Opt>(l);
      f.step = c.applied;
      f.skipped = c.skipped;
      f.has_basis = l.has_basis;
      f.svd_count = l.svd_count;
      return f;
    }
    void save_basis(std::size_t i, Side factor, checkpoint::Writer& w) const {
      const auto& l = opt_.layers_[i];
      checkpoint::save_matrix(w, factor_shape(l.shape, l.options.rank, factor),
                              (factor == Side::Left ? left_ : right_).f32.data());
    }
    void save_moments(std::size_t i, checkpoint::Writer& w) const {
      checkpoint::save_dense_moments(w, opt_.layers_[i].low_rank, m_.data(), v_.data());
    }

   private:
    void stage_factor(const typename Opt::Layer& l, Side factor, const unsigned char* device, HostFactor& out) {
      const auto n = static_cast<std::size_t>(factor_shape(l.shape, l.options.rank, factor).size());
      out.f32.resize(n);
      if (l.dtype == DType::Float32) {
        download(out.f32.data(), device, n, ctx_);
      } else {
        out.bf16.resize(n);
        download(out.bf16.data(), device, n, ctx_);
      }
    }
    static void widen(HostFactor& f) {
      for (std::size_t k = 0; k < f.bf16.size(); ++k) f.f32[k] = checkpoint::element_value(f.bf16[k]);
    }

    const Opt& opt_;
    Context& ctx_;
    std::vector<MH> m_, v_;
    HostFactor left_, right_;
  };

  // Reads every layer into host memory; commit() then copies it to the device.
  template <class Opt>
  class Loader {
    using MH = Host<typename Opt::moment_type>;
    using State = typename Opt::schedule_policy::State;

    struct Staged {
      StepCounters counters;
      bool has_basis = false;
      std::int64_t svd_count = 0;
      State schedule{};
      HostFactor left, right;
      std::vector<MH> m, v;
    };

   public:
    explicit Loader(Opt& opt) : opt_(opt), adam_(opt.adam_) {}

    checkpoint::Items config_items() const { return CheckpointAccess::config_items(opt_); }
    // set_lr's checks, aside.
    void stage_lr(double lr) {
      AdamConfig c = opt_.adam_;
      c.lr = lr;
      c.validate();
      adam_ = c;
    }
    std::size_t num_layers() const { return opt_.layers_.size(); }
    void begin_layers() { staged_.resize(opt_.layers_.size()); }
    checkpoint::LayerFields registered(std::size_t i) const { return CheckpointAccess::registered<Opt>(opt_.layers_[i]); }
    const auto& schedule_policy() const { return opt_.schedule_; }

    // The float32 basis of the file, checked as the CPU checks it; a bf16 layer
    // keeps it rounded to nearest even bf16, which must be finite too.
    void load_basis(std::size_t i, Side factor, checkpoint::Reader& r, Shape want) {
      const char* what = "float32 basis";
      const std::uint64_t n = checkpoint::expect_matrix<float>(r, want, what);
      HostFactor& out = factor == Side::Left ? staged_[i].left : staged_[i].right;
      out.f32.resize(static_cast<std::size_t>(n));
      r.exactly(out.f32.data(), n, what);
      checkpoint::expect_finite(r, out.f32.data(), out.f32.size(), what);
      if (opt_.layers_[i].dtype == DType::BFloat16) {
        out.bf16.resize(out.f32.size());
        for (std::size_t k = 0; k < out.f32.size(); ++k) {
          const bf16 b = __float2bfloat16_rn(out.f32[k]);
          std::memcpy(&out.bf16[k], &b, sizeof b);
        }
        checkpoint::expect_finite(r, out.bf16.data(), out.bf16.size(), "float32 basis rounded to bf16");
        out.f32 = {};
      }
    }
    void load_moments(std::size_t i, checkpoint::Reader& r, Shape want) {
      Staged& s = staged_[i];
      const std::uint64_t n = checkpoint::expect_dense_moments<MH>(r, want);
      s.m.resize(static_cast<std::size_t>(n));
      s.v.resize(static_cast<std::size_t>(n));
      checkpoint::read_dense_moments(r, s.m.data(), s.v.data(), n);
    }
    void end_layer(std::size_t i, const checkpoint::LayerFields& saved, State&& schedule) {
      Staged& s = staged_[i];
      s.counters = StepCounters{};  // a fresh layer's: no step pending, check_step's scratch clear
      s.counters.applied = saved.step;
      s.counters.skipped = saved.skipped;
      s.has_basis = saved.has_basis;
      s.svd_count = saved.svd_count;
      s.schedule = std::move(schedule);
    }
    std::size_t weights_bound() const { return 0; }
    void load_weights(checkpoint::Reader&, std::uint64_t) {}

    // Copies every layer into its device memory on ctx's stream, waits, then
    // puts the host-side state in force.
    void commit(Context& ctx) {
      for (std::size_t i = 0; i < staged_.size(); ++i) {
        auto& l = opt_.layers_[i];
        const Staged& s = staged_[i];
        const auto o = Opt::layout(l);
        unsigned char* base = l.storage.data();
        upload(base + o.m, s.m.data(), s.m.size(), ctx);
        upload(base + o.v, s.v.data(), s.v.size(), ctx);
        if (s.has_basis && l.side != Side::Right) upload_factor(base + o.left, s.left, ctx);
        if (s.has_basis && l.side != Side::Left) upload_factor(base + o.right, s.right, ctx);
        upload(base + o.counters, &s.counters, 1, ctx);
      }
      ctx.synchronize();
      for (std::size_t i = 0; i < staged_.size(); ++i) {
        auto& l = opt_.layers_[i];
        Staged& s = staged_[i];
        l.has_basis = s.has_basis;
        l.svd_count = s.svd_count;
        l.state = std::move(s.schedule);
        l.known_applied = s.counters.applied;
        l.pending = 0;
      }
      opt_.adam_ = adam_;
    }

   private:
    static void upload_factor(unsigned char* device, const HostFactor& f, Context& ctx) {
      if (!f.bf16.empty()) upload(device, f.bf16.data(), f.bf16.size(), ctx);
      else upload(device, f.f32.data(), f.f32.size(), ctx);
    }

    Opt& opt_;
    AdamConfig adam_;
    std::vector<Staged> staged_;
  };
};

// Writes opt's state to os; synchronizes ctx's stream.
template <class P, class A>
void save_checkpoint(const GaLoreOptimizer<P, A>& opt, std::ostream& os, Context& ctx) {
  CheckpointAccess::Saver<GaLoreOptimizer<P, A>> saver(opt, ctx);
  checkpoint::write_file(os, saver);
}

// The same to a file, replaced atomically (checkpoint/atomic_write.hpp).
template <class P, class A>
void save_checkpoint(const GaLoreOptimizer<P, A>& opt, const std::string& path, Context& ctx) {
  std::ostringstream os(std::ios::binary);
  save_checkpoint(opt, os, ctx);
  checkpoint::write_atomically(path, os.str());
}

// Loads into an optimizer built and registered as the saved one, or throws
// checkpoint_error and changes nothing; synchronizes ctx's stream.
template <class P, class A>
void load_checkpoint(GaLoreOptimizer<P, A>& opt, std::istream& is, Context& ctx) {
  CheckpointAccess::Loader<GaLoreOptimizer<P, A>> loader(opt);
  checkpoint::reporting_errors([&] { checkpoint::read_file(is, loader); });
  loader.commit(ctx);
}

template <class P, class A>
void load_checkpoint(GaLoreOptimizer<P, A>& opt, const std::string& path, Context& ctx) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw checkpoint_error("galore checkpoint: cannot open " + path);
  load_checkpoint(opt, in, ctx);
}

}  // namespace galore::cuda
