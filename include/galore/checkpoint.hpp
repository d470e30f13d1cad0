// galore: saving and loading the complete state of an optimizer facade.
//
//   save_checkpoint(opt, "run.ckpt");          // atomic: a crash leaves the old file
//   load_checkpoint(opt, "run.ckpt");          // into an optimizer with the same layers
//
// A checkpoint holds, per layer, the step counters, the projector (stored basis
// as stored, SVD count, schedule state) and Adam's moments in their own format,
// plus the hyperparameters, which must match on load (the learning rate is state
// and is restored). A WeightSet adds the trainer's weights (float, bf16 or INT8
// codes with their scales and zeros). Stochastic rounding needs no generator
// state: its random numbers are a function of (seed, layer, step, element), and
// the seed is a hyperparameter, the steps are saved.
//
// Loading validates everything before it changes anything: on any error the
// optimizer and the weights are as they were, and the error is a
// checkpoint_error. Saving checks the WeightSet before it writes anything.
// docs/checkpoint.md has the format and every rule a file must satisfy.
#pragma once

#include <cstdint>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint/atomic_write.hpp"
#include "checkpoint/file.hpp"
#include "checkpoint/format.hpp"
#include "checkpoint/serialize.hpp"
#include "optim/galore_optimizer.hpp"

namespace galore {

// Weights a trainer holds, saved and restored together with the optimizer.
class WeightSet {
 public:
  WeightSet& add(LayerId id, MatrixF& w) { return push(id, Kind::Float32, &w); }
  WeightSet& add(LayerId id, Matrix<bfloat16>& w) { return push(id, Kind::BFloat16, &w); }
  WeightSet& add(LayerId id, QuantizedWeight<8>& w) { return push(id, Kind::Int8, &w); }
  std::size_t size() const { return entries_.size(); }

 private:
  friend struct checkpoint::Access;
  using Kind = checkpoint::WeightKind;
  struct Entry {
    std::size_t layer;
    Kind kind;
    void* ptr;
  };
  WeightSet& push(LayerId id, Kind k, void* p) {
    for (const Entry& e : entries_)
      detail::require(e.layer != id.index, "WeightSet: layer ", id.index, " was added twice");
    entries_.push_back({id.index, k, p});
    return *this;
  }
  std::vector<Entry> entries_;
};

namespace checkpoint {

// The CPU facade's adapters for checkpoint/file.hpp (which says what each hook
// does); a friend of GaLoreOptimizer and WeightSet.
struct Access {
  template <class Opt>
  static Items config_items(const Opt& opt) {
    return checkpoint::config_items(opt.svd_policy(), opt.quant_policy(), opt.schedule_policy(),
                                    opt.adam().state_policy_object(), opt.adam().config(), opt.rounder(),
                                    opt.projection_options());
  }

  template <class Opt>
  static LayerFields registered(const typename Opt::Layer& l) {
    LayerFields f;
    f.name = l.name;
    f.shape = l.shape;
    f.projected = l.projector.has_value();
    if (l.projector) {
      f.rank = l.projector->rank();
      f.type = l.projector->options().type;
      f.scale = l.projector->scale();
      f.side = l.projector->side();
    }
    return f;
  }

  // Every weight must belong to a registered layer and have its shape; throws
  // galore::invalid_argument otherwise (a file with such a weight could not be
  // loaded back).
  template <class Opt>
  static void check_weights(const Opt& opt, const WeightSet& weights) {
    const std::size_t L = opt.layers_.size();
    for (const WeightSet::Entry& e : weights.entries_) {
      detail::require(e.layer < L, "WeightSet: layer id ", e.layer, " is not registered with this optimizer (", L,
                      " layers)");
      const auto& l = opt.layers_[e.layer];
      Shape got{};
      switch (e.kind) {
        case WeightSet::Kind::Float32: got = shape_of(*static_cast<const MatrixF*>(e.ptr)); break;
        case WeightSet::Kind::BFloat16: got = shape_of(*static_cast<const Matrix<bfloat16>*>(e.ptr)); break;
        case WeightSet::Kind::Int8: got = static_cast<const QuantizedWeight<8>*>(e.ptr)->shape(); break;
      }
      detail::require(got == l.shape, "WeightSet: the weight of layer ", e.layer, " ('", l.name, "') is ", got.rows,
                      "x", got.cols, " but the layer was registered as ", l.shape.rows, "x", l.shape.cols);
    }
  }

  template <class Opt>
  struct Saver {
    const Opt& opt;
    const WeightSet* weights;

    Items config_items() const { return Access::config_items(opt); }
    double lr() const { return opt.adam().config().lr; }
    std::size_t num_layers() const { return opt.layers_.size(); }
    std::size_t num_weights() const { return weights ? weights->size() : 0; }
    LayerFields stage_layer(std::size_t i) const {
      const auto& l = opt.layers_[i];
      LayerFields f = registered<Opt>(l);
      f.step = l.step;
      f.skipped = l.skipped;
      if (l.projector) {
        f.has_basis = l.projector->has_basis();
        f.svd_count = l.projector->svd_count();
      }
      return f;
    }
    const auto& schedule_policy() const { return opt.schedule_policy(); }
    const auto& schedule_state(std::size_t i) const { return opt.layers_[i].projector->schedule_state(); }
    void save_basis(std::size_t i, Side factor, Writer& w) const {
      const auto& p = *opt.layers_[i].projector;
      checkpoint::save(w, opt.quant_policy(), factor == Side::Left ? p.left_storage() : p.right_storage());
    }
    void save_moments(std::size_t i, Writer& w) const {
      checkpoint::save(w, opt.adam().state_policy_object(), opt.layers_[i].moments);
    }
    void save_weights(Writer& w) const {
      for (const auto& e : weights->entries_) {
        save_weight_entry(w, e.layer, e.kind);
        switch (e.kind) {
          case WeightSet::Kind::Float32: checkpoint::save(w, *static_cast<const MatrixF*>(e.ptr)); break;
          case WeightSet::Kind::BFloat16: checkpoint::save(w, *static_cast<const Matrix<bfloat16>*>(e.ptr)); break;
          case WeightSet::Kind::Int8: checkpoint::save(w, *static_cast<const QuantizedWeight<8>*>(e.ptr)); break;
        }
      }
    }
  };

  // Reads into copies of the registered layers, the Adam policy and the weights;
  // commit() swaps them in with moves that cannot fail.
  template <class Opt>
  class Loader {
   public:
    Loader(Opt& opt, WeightSet* weights) : opt_(opt), weights_(weights) {}

    // The WeightSet's ids must be registered layers (checked before reading).
    void check_weight_ids() const {
      const std::size_t L = opt_.layers_.size();
      if (weights_)
        for (const WeightSet::Entry& e : weights_->entries_)
          if (e.layer >= L)
            throw checkpoint_error("galore checkpoint: the WeightSet names layer " + std::to_string(e.layer) +
                                   ", which this optimizer does not have (" + std::to_string(L) + " layers)");
    }

    Items config_items() const { return Access::config_items(opt_); }
    void stage_lr(double lr) {
      adam_.emplace(opt_.adam_);
      adam_->set_lr(lr);
    }
    std::size_t num_layers() const { return opt_.layers_.size(); }
    void begin_layers() { layers_ = opt_.layers_; }
    LayerFields registered(std::size_t i) const { return Access::registered<Opt>(opt_.layers_[i]); }
    const auto& schedule_policy() const { return opt_.schedule_policy(); }
    void load_basis(std::size_t, Side factor, Reader& r, Shape want) {
      checkpoint::load(r, opt_.quant_policy(), factor == Side::Left ? left_ : right_, want);
    }
    void load_moments(std::size_t i, Reader& r, Shape want) {
      checkpoint::load(r, opt_.adam().state_policy_object(), layers_[i].moments, want);
    }
    void end_layer(std::size_t i, const LayerFields& saved, typename Opt::projector_type::ScheduleState&& schedule) {
      auto& l = layers_[i];
      l.step = saved.step;
      l.skipped = saved.skipped;
      if (l.projector)
        l.projector->restore(saved.has_basis, saved.svd_count, std::move(schedule), std::move(left_), std::move(right_));
      left_ = {};
      right_ = {};
    }
    std::size_t weights_bound() const { return weights_ ? weights_->entries_.size() : 0; }
    void load_weights(Reader& r, std::uint64_t n) {
      for (std::uint64_t k = 0; k < n; ++k) {
        const auto& e = weights_->entries_[static_cast<std::size_t>(k)];
        expect_weight_entry(r, k, e.layer, e.kind);
        const Shape want = opt_.layers_[e.layer].shape;
        if (e.kind == WeightSet::Kind::Float32) {
          auto tmp = std::make_shared<MatrixF>();
          load_matrix(r, *tmp, want, "float32 weight");
          commit_weights_.push_back([tmp, p = e.ptr] { *static_cast<MatrixF*>(p) = std::move(*tmp); });
        } else if (e.kind == WeightSet::Kind::BFloat16) {
          auto tmp = std::make_shared<Matrix<bfloat16>>();
          load_matrix(r, *tmp, want, "bf16 weight");
          commit_weights_.push_back([tmp, p = e.ptr] { *static_cast<Matrix<bfloat16>*>(p) = std::move(*tmp); });
        } else {
          auto* target = static_cast<QuantizedWeight<8>*>(e.ptr);
          if (target->group_size() <= 0)
            r.fail("an INT8 weight to load into must be constructed first (it gives the group size)");
          auto tmp = std::make_shared<QuantizedWeight<8>>();
          checkpoint::load(r, *tmp, want, target->group_size());
          commit_weights_.push_back([tmp, target] { *target = std::move(*tmp); });
        }
      }
    }

    // Everything read and checked: moves only, nothing here throws.
    void commit() {
      opt_.layers_ = std::move(layers_);
      opt_.adam_ = std::move(*adam_);
      for (auto& f : commit_weights_) f();
    }

   private:
    Opt& opt_;
    WeightSet* weights_;
    std::optional<typename Opt::adam_type> adam_;
    std::vector<typename Opt::Layer> layers_;
    typename Opt::projector_type::Storage left_, right_;
    std::vector<std::function<void()>> commit_weights_;
  };

  template <class Opt>
  static void save(const Opt& opt, std::ostream& os, const WeightSet* weights) {
    if (weights) check_weights(opt, *weights);
    Saver<Opt> saver{opt, weights};
    write_file(os, saver);
  }

  // Loads, or throws checkpoint_error and changes nothing. Whatever else is
  // thrown on the way (a stream with exceptions enabled, a failed allocation, a
  // caller error) becomes a checkpoint_error with its message.
  template <class Opt>
  static void load(Opt& opt, std::istream& is, WeightSet* weights) {
    Loader<Opt> loader(opt, weights);
    reporting_errors([&] {
      loader.check_weight_ids();
      read_file(is, loader);
    });
    loader.commit();
  }
};

}  // namespace checkpoint

template <class P, class A, class R>
void save_checkpoint(const GaLoreOptimizer<P, A, R>& opt, std::ostream& os, const WeightSet* weights = nullptr) {
  checkpoint::Access::save(opt, os, weights);
}

template <class P, class A, class R>
void save_checkpoint(const GaLoreOptimizer<P, A, R>& opt, const std::string& path, const WeightSet* weights = nullptr) {
  std::ostringstream os(std::ios::binary);
  checkpoint::Access::save(opt, os, weights);
  checkpoint::write_atomically(path, os.str());
}

template <class P, class A, class R>
void load_checkpoint(GaLoreOptimizer<P, A, R>& opt, std::istream& is, WeightSet* weights = nullptr) {
  checkpoint::Access::load(opt, is, weights);
}

template <class P, class A, class R>
void load_checkpoint(GaLoreOptimizer<P, A, R>& opt, const std::string& path, WeightSet* weights = nullptr) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw checkpoint_error("galore checkpoint: cannot open " + path);
  checkpoint::Access::load(opt, in, weights);
}

}  // namespace galore
