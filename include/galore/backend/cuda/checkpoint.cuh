// galore (CUDA backend): checkpoints of cuda::GaLoreOptimizer in the CPU
// facade's format (docs/checkpoint.md), written and read by the same code
// (checkpoint/file.hpp): a checkpoint saved on one backend resumes on the other.
//
//   cuda::save_checkpoint(opt, "run.ckpt", ctx);   // atomic and durable, as the CPU's
//   cuda::load_checkpoint(opt, "run.ckpt", ctx);   // all or nothing
//   cuda::save_checkpoint(opt, "run.ckpt", ctx, &weights);   // with a DeviceWeightSet
//
// Both synchronize ctx's stream: they read or write the layers' device memory
// (and the weights') on it, after the work queued there (work on other streams
// that touches them must have finished). A save copies one layer at a time to
// host memory (counters, moments, basis) and writes it; the file is assembled
// in host memory, as the CPU's is. A load reads and validates the whole file
// into host memory first and, on any error, throws checkpoint_error with the
// optimizer, its device memory and the weights untouched; then it copies each
// layer (and weight) into the device memory it already has. Neither allocates
// device memory. A CUDA failure while copying throws cuda_error, and the
// layers' device state and the weights are then undefined, as after a failing
// step.
//
// What a file holds of a GPU optimizer, and which CPU facade reads it:
//  - the configuration: cuda::GaLoreOptimizer<P, A> saves what the CPU's
//    GaLoreOptimizer<P, A> (the same policy names) saves with the rounder
//    StochasticRounder<8>(rounding().seed, rounding().mode) (the default one
//    for the default WeightRounding);
//  - each basis as quant::None stores it, in float32. A bf16 layer's basis widens
//    exactly; loading into a bf16 layer rounds the float32 basis to nearest even
//    bf16 (the GPU keeps P in the layer's element type, as galore_torch does);
//    a quantized basis as the CPU holds it (quant::MinMax: GroupQuantized codes,
//    scales and zeros; quant::NF4: NF4Codes, codes and absmax);
//  - the moments as the state policy stores them (state::Dense<float or
//    bfloat16>, or state::Blockwise8bit: codes and absmax, or the float32
//    moments of a tensor under min_8bit_size);
//  - the trainer's weights if a DeviceWeightSet is passed, as the CPU's
//    WeightSet saves them (float32 or bf16 matrices, or an INT8
//    QuantizedWeight<8>'s codes, scales and zeros): a file with weights loads
//    only with a set of the same layers and kinds, on either backend.
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

// The trainer's device weights, saved and restored with the optimizer: the
// GPU's WeightSet. Each is a device view of the layer's registered shape, float
// or bf16, row-major with any leading dimension >= cols, or an INT8 weight
// (QuantizedWeight<8>, Q-GaLore's) of that shape. The file holds them as the
// CPU's WeightSet does (float32 or bf16 matrices, INT8 codes with scales and
// zeros), so weights move between the backends with the rest of the state. An
// INT8 weight loads only into one of the group size it was saved with.
class DeviceWeightSet {
 public:
  DeviceWeightSet& add(LayerId id, DeviceView<float> w) { return push(id, checkpoint::WeightKind::Float32, w); }
  DeviceWeightSet& add(LayerId id, DeviceView<bf16> w) { return push(id, checkpoint::WeightKind::BFloat16, w); }
  DeviceWeightSet& add(LayerId id, QuantizedWeight<8>& w) {
    check_new(id);
    detail::require(w.group_size() > 0, "DeviceWeightSet: the INT8 weight of layer ", id.index,
                    " must be constructed first (it gives the shape and group size)");
    entries_.push_back({id.index, checkpoint::WeightKind::Int8, nullptr, w.rows(), w.cols(), w.cols(), &w});
    return *this;
  }
  std::size_t size() const { return entries_.size(); }

 private:
  friend struct CheckpointAccess;
  struct Entry {
    std::size_t layer;
    checkpoint::WeightKind kind;
    unsigned char* data;   // float32 or bf16 elements
    Index rows, cols, ld;  // in elements
    QuantizedWeight<8>* int8 = nullptr;
  };
  void check_new(LayerId id) const {
    for (const Entry& e : entries_)
      detail::require(e.layer != id.index, "DeviceWeightSet: layer ", id.index, " was added twice");
  }
  template <class T>
  DeviceWeightSet& push(LayerId id, checkpoint::WeightKind kind, DeviceView<T> w) {
    check_new(id);
    detail::require(w.data != nullptr, "DeviceWeightSet: the weight of layer ", id.index, " is a null pointer");
    detail::require(w.rows > 0 && w.cols > 0 && w.ld >= w.cols, "DeviceWeightSet: the weight of layer ", id.index,
                    " is ", w.rows, "x", w.cols, " with leading dimension ", w.ld);
    entries_.push_back({id.index, kind, reinterpret_cast<unsigned char*>(w.data), w.rows, w.cols, w.ld});
    return *this;
  }
  std::vector<Entry> entries_;
};

// The CUDA facade's adapters for checkpoint/file.hpp (which says what each hook
// does); a friend of GaLoreOptimizer and DeviceWeightSet.
struct CheckpointAccess {
  // A device element on the host: float32, or bf16 as its bits.
  template <class T>
  using Host = std::conditional_t<std::is_same_v<T, float>, float, std::uint16_t>;

  template <class Opt>
  static checkpoint::Items config_items(const Opt& opt) {
    namespace d = checkpoint::described;
    // The GPU facade's rounding settings are the CPU facade's
    // StochasticRounder<8>(seed, mode), so that files move between the two.
    const d::Rounder rounder{8, opt.rounding_.seed, opt.rounding_.mode};
    auto with_quant = [&](const auto& quant) {
      if constexpr (Opt::blockwise8bit)
        return checkpoint::config_items(opt.svd_, quant, opt.schedule_, opt.state_, opt.adam_, rounder,
                                        opt.projection_);
      else
        return checkpoint::config_items(opt.svd_, quant, opt.schedule_,
                                        d::DenseState{!std::is_same_v<typename Opt::moment_type, float>}, opt.adam_,
                                        rounder, opt.projection_);
    };
    if constexpr (Opt::basis_format == BasisFormat::NF4) return with_quant(d::NF4{opt.quant_.block_size});
    else if constexpr (Opt::basis_codes) return with_quant(d::MinMax{Opt::basis_bits, opt.quant_.group_size});
    else return with_quant(d::QuantNone{});
  }

  // A quantized basis factor on the host, in the CPU's form.
  template <class Opt>
  using HostCodes = std::conditional_t<Opt::basis_format == BasisFormat::NF4, quant::NF4Codes,
                                       quant::GroupQuantized<(Opt::basis_codes ? Opt::basis_bits : 8)>>;
  // copy(device pointer, host pointer, element count) for each piece of a
  // factor (Codes: HostCodes, const to upload).
  template <class Codes, class Copy>
  static void for_each_code_piece(const DeviceQuantizedFactor& f, Codes& host, Copy copy) {
    copy(f.codes, host.codes.data(), host.codes.size());
    if constexpr (std::is_same_v<std::remove_const_t<Codes>, quant::NF4Codes>) {
      copy(reinterpret_cast<unsigned char*>(f.scales), host.absmax.data(), host.absmax.size());
    } else {
      copy(reinterpret_cast<unsigned char*>(f.scales), host.scales.data(), host.scales.size());
      copy(f.zeros, host.zeros.data(), host.zeros.size());
    }
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

  using WeightEntry = DeviceWeightSet::Entry;
  static std::size_t element_bytes(const WeightEntry& e) {
    return e.kind == checkpoint::WeightKind::Float32 ? sizeof(float) : sizeof(bf16);
  }
  // A weight's rows, packed on the host: one copy when the view is contiguous,
  // a pitched copy otherwise (whose pitch cudaMemcpy2D limits, so not always).
  static void copy_weight(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch,
                          const WeightEntry& e, cudaMemcpyKind kind, Context& ctx) {
    const std::size_t row = element_bytes(e) * static_cast<std::size_t>(e.cols);
    const auto rows = static_cast<std::size_t>(e.rows);
    if (e.ld == e.cols || e.rows == 1)
      check(cudaMemcpyAsync(dst, src, row * rows, kind, ctx.stream()), "cudaMemcpyAsync");
    else
      check(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row, rows, kind, ctx.stream()), "cudaMemcpy2DAsync");
  }
  static void download(std::vector<unsigned char>& host, const WeightEntry& e, Context& ctx) {
    const std::size_t row = element_bytes(e) * static_cast<std::size_t>(e.cols);
    host.resize(row * static_cast<std::size_t>(e.rows));
    copy_weight(host.data(), row, e.data, element_bytes(e) * static_cast<std::size_t>(e.ld), e,
                cudaMemcpyDeviceToHost, ctx);
  }
  static void upload(const WeightEntry& e, const std::vector<unsigned char>& host, Context& ctx) {
    const std::size_t row = element_bytes(e) * static_cast<std::size_t>(e.cols);
    copy_weight(e.data, element_bytes(e) * static_cast<std::size_t>(e.ld), host.data(), row, e,
                cudaMemcpyHostToDevice, ctx);
  }

  // Every weight must belong to a registered layer and have its registered
  // shape and element type. Returns the first problem, or an empty string.
  template <class Opt>
  static std::string weights_problem(const Opt& opt, const DeviceWeightSet& weights) {
    const std::size_t L = opt.layers_.size();
    for (const WeightEntry& e : weights.entries_) {
      if (e.layer >= L)
        return "DeviceWeightSet: layer id " + std::to_string(e.layer) + " is not registered with this optimizer (" +
               std::to_string(L) + " layers)";
      const auto& l = opt.layers_[e.layer];
      if (l.shape != Shape{e.rows, e.cols})
        return "DeviceWeightSet: the weight of layer " + std::to_string(e.layer) + " ('" + l.name + "') is " +
               std::to_string(e.rows) + "x" + std::to_string(e.cols) + " but the layer was registered as " +
               std::to_string(l.shape.rows) + "x" + std::to_string(l.shape.cols);
      if (e.kind == checkpoint::WeightKind::Int8) {  // any gradient type; projected layers only
        if (!l.projected)
          return "DeviceWeightSet: the INT8 weight of layer " + std::to_string(e.layer) + " ('" + l.name +
                 "') belongs to a dense layer; INT8 weights step on projected layers only";
        continue;
      }
      const DType dtype = e.kind == checkpoint::WeightKind::Float32 ? DType::Float32 : DType::BFloat16;
      if (dtype != l.dtype)
        return "DeviceWeightSet: the weight of layer " + std::to_string(e.layer) + " ('" + l.name + "') holds " +
               to_string(dtype) + " elements but the layer was registered with " + to_string(l.dtype);
    }
    return {};
  }

  // One basis factor on the host, in the layer's element type.
  struct HostFactor {
    std::vector<float> f32;
    std::vector<std::uint16_t> bf16;
  };

  // A layer's 8-bit moments in host memory (the CPU's form), and their device pieces.
  using Moments8bit = state::Blockwise8bit::Moments;
  // copy(offset in the layer's storage, host pointer, element count) for each
  // piece (M: Moments8bit, const to upload).
  template <class Opt, class M, class Copy>
  static void for_each_8bit_piece(const typename Opt::Layer& l, M& host, Copy copy) {
    const auto& o = Opt::layout(l);
    if (o.codes) {
      copy(o.m, host.m_code.data(), host.m_code.size());
      copy(o.v, host.v_code.data(), host.v_code.size());
      copy(o.m_absmax, host.m_absmax.data(), host.m_absmax.size());
      copy(o.v_absmax, host.v_absmax.data(), host.v_absmax.size());
    } else {
      copy(o.m, host.m32.data(), host.m32.size());
      copy(o.v, host.v32.data(), host.v32.size());
    }
  }

  template <class Opt>
  class Saver {
    using MH = Host<std::conditional_t<Opt::blockwise8bit, float, typename Opt::moment_type>>;

   public:
    Saver(const Opt& opt, const DeviceWeightSet* weights, Context& ctx) : opt_(opt), weights_(weights), ctx_(ctx) {}

    checkpoint::Items config_items() const { return CheckpointAccess::config_items(opt_); }
    double lr() const { return opt_.adam_.lr; }
    std::size_t num_layers() const { return opt_.layers_.size(); }
    std::size_t num_weights() const { return weights_ ? weights_->size() : 0; }
    // One weight at a time through a host buffer.
    void save_weights(checkpoint::Writer& w) {
      std::vector<unsigned char> host;
      for (const WeightEntry& e : weights_->entries_) {
        checkpoint::save_weight_entry(w, e.layer, e.kind);
        const Shape shape{e.rows, e.cols};
        if (e.kind == checkpoint::WeightKind::Int8) {
          quant::GroupQuantized<8> q;
          q.resize(shape, e.int8->group_size());
          e.int8->download(q.codes, q.scales, q.zeros, ctx_);
          checkpoint::save_codes(w, q);
          continue;
        }
        download(host, e, ctx_);
        ctx_.synchronize();
        if (e.kind == checkpoint::WeightKind::Float32)
          checkpoint::save_matrix(w, shape, reinterpret_cast<const float*>(host.data()));
        else checkpoint::save_matrix(w, shape, reinterpret_cast<const std::uint16_t*>(host.data()));
      }
    }
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
      if constexpr (Opt::blockwise8bit) {
        m8_ = opt_.state_.init(l.low_rank);
        for_each_8bit_piece<Opt>(l, m8_, [&](std::size_t at, auto* host, std::size_t count) {
          download(host, base + at, count, ctx_);
        });
      } else {
        m_.resize(n);
        v_.resize(n);
        download(m_.data(), base + o.m, n, ctx_);
        download(v_.data(), base + o.v, n, ctx_);
      }
      const bool basis = l.projected && l.has_basis;
      if constexpr (Opt::basis_codes) {
        if (basis) {
          const DeviceQuantizedBasis q = opt_.stored_codes(l);
          if (l.side != Side::Right) stage_codes(q.left, left_codes_);
          if (l.side != Side::Left) stage_codes(q.right, right_codes_);
        }
      } else {
        if (basis && l.side != Side::Right) stage_factor(l, Side::Left, base + o.left, left_);
        if (basis && l.side != Side::Left) stage_factor(l, Side::Right, base + o.right, right_);
      }
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
      if constexpr (Opt::basis_format == BasisFormat::NF4)
        checkpoint::save_nf4(w, factor == Side::Left ? left_codes_ : right_codes_);
      else if constexpr (Opt::basis_codes)
        checkpoint::save_codes(w, factor == Side::Left ? left_codes_ : right_codes_);
      else
        checkpoint::save_matrix(w, factor_shape(l.shape, l.options.rank, factor),
                                (factor == Side::Left ? left_ : right_).f32.data());
    }
    void save_moments(std::size_t i, checkpoint::Writer& w) const {
      if constexpr (Opt::blockwise8bit) checkpoint::save(w, opt_.state_, m8_);
      else checkpoint::save_dense_moments(w, opt_.layers_[i].low_rank, m_.data(), v_.data());
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
    void stage_codes(const DeviceQuantizedFactor& f, HostCodes<Opt>& out) {
      out.resize(f.shape, f.group_size);
      for_each_code_piece(f, out, [&](const unsigned char* device, auto* host, std::size_t count) {
        download(host, device, count, ctx_);
      });
    }
    static void widen(HostFactor& f) {
      for (std::size_t k = 0; k < f.bf16.size(); ++k) f.f32[k] = checkpoint::element_value(f.bf16[k]);
    }

    const Opt& opt_;
    const DeviceWeightSet* weights_;
    Context& ctx_;
    std::vector<MH> m_, v_;
    Moments8bit m8_;
    HostFactor left_, right_;
    HostCodes<Opt> left_codes_, right_codes_;
  };

  // Reads every layer into host memory; commit() then copies it to the device.
  template <class Opt>
  class Loader {
    using MH = Host<std::conditional_t<Opt::blockwise8bit, float, typename Opt::moment_type>>;
    using State = typename Opt::schedule_policy::State;

    struct Staged {
      StepCounters counters;
      bool has_basis = false;
      std::int64_t svd_count = 0;
      State schedule{};
      HostFactor left, right;
      HostCodes<Opt> left_codes, right_codes;
      std::vector<MH> m, v;
      Moments8bit m8;
    };

   public:
    Loader(Opt& opt, DeviceWeightSet* weights) : opt_(opt), weights_(weights), adam_(opt.adam_) {}

    // The weights must be the registered layers' (checked before reading).
    void check_weights() const {
      if (!weights_) return;
      const std::string problem = weights_problem(opt_, *weights_);
      if (!problem.empty()) throw checkpoint_error("galore checkpoint: " + problem);
    }

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
      if constexpr (Opt::basis_codes) {
        const Index group = opt_.factor_codes(want).group_size;
        auto& to = factor == Side::Left ? staged_[i].left_codes : staged_[i].right_codes;
        if constexpr (Opt::basis_format == BasisFormat::NF4) checkpoint::load_nf4(r, to, want, group);
        else checkpoint::load_group_quantized(r, to, want, group, "quantized basis");
        return;
      }
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
      if constexpr (Opt::blockwise8bit) {
        checkpoint::load(r, opt_.state_, s.m8, want);
        return;
      }
      const std::uint64_t n = checkpoint::expect_dense_moments<MH>(r, want);
      s.m.resize(static_cast<std::size_t>(n));
      s.v.resize(static_cast<std::size_t>(n));
      checkpoint::read_dense_moments(r, s.m.data(), s.v.data(), n);
    }
    void end_layer(std::size_t i, const checkpoint::LayerFields& saved, State&& schedule) {
      Staged& s = staged_[i];
      s.counters = StepCounters{};  // a fresh layer's: no step pending, the step kernel's scratch clear
      s.counters.applied = saved.step;
      s.counters.skipped = saved.skipped;
      s.has_basis = saved.has_basis;
      s.svd_count = saved.svd_count;
      s.schedule = std::move(schedule);
    }
    std::size_t weights_bound() const { return weights_ ? weights_->size() : 0; }
    // Into host memory; commit() copies them to the device.
    void load_weights(checkpoint::Reader& r, std::uint64_t n) {
      weights_staged_.resize(static_cast<std::size_t>(n));
      for (std::uint64_t k = 0; k < n; ++k) {
        const WeightEntry& e = weights_->entries_[static_cast<std::size_t>(k)];
        checkpoint::expect_weight_entry(r, k, e.layer, e.kind);
        std::vector<unsigned char>& host = weights_staged_[static_cast<std::size_t>(k)];
        if (e.kind == checkpoint::WeightKind::Int8) {
          int8_staged_.emplace_back();
          checkpoint::load_group_quantized(r, int8_staged_.back(), Shape{e.rows, e.cols}, e.int8->group_size(),
                                           "quantized weight");
        } else if (e.kind == checkpoint::WeightKind::Float32) {
          read_weight<float>(r, e, "float32 weight", host);
        } else {
          read_weight<std::uint16_t>(r, e, "bf16 weight", host);
        }
      }
    }

    // Copies every layer into its device memory on ctx's stream, waits, then
    // puts the host-side state in force.
    void commit(Context& ctx) {
      for (std::size_t i = 0; i < staged_.size(); ++i) {
        auto& l = opt_.layers_[i];
        const Staged& s = staged_[i];
        const auto o = Opt::layout(l);
        unsigned char* base = l.storage.data();
        if constexpr (Opt::blockwise8bit) {
          for_each_8bit_piece<Opt>(l, s.m8, [&](std::size_t at, auto* host, std::size_t count) {
            upload(base + at, host, count, ctx);
          });
        } else {
          upload(base + o.m, s.m.data(), s.m.size(), ctx);
          upload(base + o.v, s.v.data(), s.v.size(), ctx);
        }
        if constexpr (Opt::basis_codes) {
          const DeviceQuantizedBasis q = opt_.stored_codes(l);
          auto up = [&](const DeviceQuantizedFactor& f, const HostCodes<Opt>& host) {
            for_each_code_piece(f, host, [&](unsigned char* device, const auto* from, std::size_t count) {
              upload(device, from, count, ctx);
            });
          };
          if (s.has_basis && l.side != Side::Right) up(q.left, s.left_codes);
          if (s.has_basis && l.side != Side::Left) up(q.right, s.right_codes);
        } else {
          if (s.has_basis && l.side != Side::Right) upload_factor(base + o.left, s.left, ctx);
          if (s.has_basis && l.side != Side::Left) upload_factor(base + o.right, s.right, ctx);
        }
        upload(base + o.counters, &s.counters, 1, ctx);
      }
      std::size_t next_int8 = 0;
      for (std::size_t k = 0; k < weights_staged_.size(); ++k) {
        const WeightEntry& e = weights_->entries_[k];
        if (e.kind != checkpoint::WeightKind::Int8) {
          upload(e, weights_staged_[k], ctx);
          continue;
        }
        const quant::GroupQuantized<8>& q = int8_staged_[next_int8++];
        e.int8->upload(q.codes, q.scales, q.zeros, ctx);
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
    template <class T>
    static void read_weight(checkpoint::Reader& r, const WeightEntry& e, const char* what,
                            std::vector<unsigned char>& host) {
      const std::uint64_t count = checkpoint::expect_matrix<T>(r, Shape{e.rows, e.cols}, what);
      host.resize(sizeof(T) * static_cast<std::size_t>(count));
      r.exactly(reinterpret_cast<T*>(host.data()), count, what);
    }
    static void upload_factor(unsigned char* device, const HostFactor& f, Context& ctx) {
      if (!f.bf16.empty()) upload(device, f.bf16.data(), f.bf16.size(), ctx);
      else upload(device, f.f32.data(), f.f32.size(), ctx);
    }

    Opt& opt_;
    DeviceWeightSet* weights_;
    AdamConfig adam_;
    std::vector<Staged> staged_;
    std::vector<std::vector<unsigned char>> weights_staged_;
    std::vector<quant::GroupQuantized<8>> int8_staged_;  // the INT8 weights', in file order
  };
};

// Writes opt's state to os, with the trainer's weights if `weights` is given;
// synchronizes ctx's stream. A weight that is not a registered layer's, or not
// of its shape, throws galore::invalid_argument before anything is written.
template <class P, class A>
void save_checkpoint(const GaLoreOptimizer<P, A>& opt, std::ostream& os, Context& ctx,
                     const DeviceWeightSet* weights = nullptr) {
  if (weights) {
    const std::string problem = CheckpointAccess::weights_problem(opt, *weights);
    detail::require(problem.empty(), problem);
  }
  CheckpointAccess::Saver<GaLoreOptimizer<P, A>> saver(opt, weights, ctx);
  checkpoint::write_file(os, saver);
}

// The same to a file, replaced atomically (checkpoint/atomic_write.hpp).
template <class P, class A>
void save_checkpoint(const GaLoreOptimizer<P, A>& opt, const std::string& path, Context& ctx,
                     const DeviceWeightSet* weights = nullptr) {
  std::ostringstream os(std::ios::binary);
  save_checkpoint(opt, os, ctx, weights);
  checkpoint::write_atomically(path, os.str());
}

// Loads into an optimizer built and registered as the saved one (and into the
// weights, which the file must hold, if `weights` is given), or throws
// checkpoint_error and changes nothing; synchronizes ctx's stream.
template <class P, class A>
void load_checkpoint(GaLoreOptimizer<P, A>& opt, std::istream& is, Context& ctx,
                     DeviceWeightSet* weights = nullptr) {
  CheckpointAccess::Loader<GaLoreOptimizer<P, A>> loader(opt, weights);
  checkpoint::reporting_errors([&] {
    loader.check_weights();
    checkpoint::read_file(is, loader);
  });
  loader.commit(ctx);
}

template <class P, class A>
void load_checkpoint(GaLoreOptimizer<P, A>& opt, const std::string& path, Context& ctx,
                     DeviceWeightSet* weights = nullptr) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw checkpoint_error("galore checkpoint: cannot open " + path);
  load_checkpoint(opt, in, ctx, weights);
}

}  // namespace galore::cuda
