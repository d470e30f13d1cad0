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
// optimizer and the weights are as they were. docs/checkpoint.md has the format.
#pragma once

#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint/format.hpp"
#include "checkpoint/serialize.hpp"
#include "optim/galore_optimizer.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#endif

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
  enum class Kind : std::uint8_t { Float32 = 1, BFloat16 = 2, Int8 = 3 };
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

inline constexpr std::uint32_t kConfig = tag("CONF");
inline constexpr std::uint32_t kLayer = tag("LAYR");
inline constexpr std::uint32_t kWeights = tag("WGHT");
inline constexpr std::uint32_t kEnd = tag("END ");
inline constexpr std::uint32_t kByteOrder = 0x01020304u;

struct Access {
  template <class Opt>
  static Items config_items(const Opt& opt) {
    Items items;
    items.push_back({"facade", "GaLoreOptimizer"});
    describe(opt.svd_policy(), items, "svd");
    describe(opt.quant_policy(), items, "quant");
    describe(opt.schedule_policy(), items, "schedule");
    describe(opt.adam().state_policy_object(), items, "state");
    describe(opt.adam().config(), items, "adam");
    describe(opt.rounder(), items, "rounder");
    const ProjectorOptions& p = opt.projection_options();
    items.push_back({"projection.rank", text(p.rank)});
    items.push_back({"projection.type", to_string(p.type)});
    items.push_back({"projection.scale", text(p.scale)});
    return items;
  }

  template <class Opt>
  static void save(const Opt& opt, std::ostream& os, const WeightSet* weights) {
    Writer header;
    header.raw(kMagic, sizeof kMagic);
    header.u32(kFormatVersion);
    header.u32(GALORE_VERSION_MAJOR);
    header.u32(GALORE_VERSION_MINOR);
    header.u32(GALORE_VERSION_PATCH);
    header.u32(kByteOrder);
    const bool with_weights = weights && weights->size() > 0;
    header.u32(static_cast<std::uint32_t>(2 + opt.layers_.size() + (with_weights ? 1 : 0)));
    header.u32(crc32(header.bytes().data(), header.bytes().size()));
    os.write(reinterpret_cast<const char*>(header.bytes().data()), static_cast<std::streamsize>(header.bytes().size()));

    Writer conf;
    const Items items = config_items(opt);
    conf.u64(items.size());
    for (const auto& [k, v] : items) {
      conf.str(k);
      conf.str(v);
    }
    conf.f64(opt.adam().config().lr);
    conf.u64(opt.layers_.size());
    write_section(os, kConfig, conf.bytes());

    for (const auto& l : opt.layers_) {
      Writer w;
      w.str(l.name);
      checkpoint::save(w, l.shape);
      w.boolean(l.projector.has_value());
      w.i64(l.step);
      w.i64(l.skipped);
      if (l.projector) {
        const auto& p = *l.projector;
        w.i64(p.rank());
        w.u32(static_cast<std::uint32_t>(p.options().type));
        w.f32(p.scale());
        w.boolean(p.has_basis());
        w.i64(p.svd_count());
        checkpoint::save(w, opt.schedule_policy(), p.schedule_state());
        if (p.has_basis()) {
          if (p.side() != Side::Right) checkpoint::save(w, opt.quant_policy(), p.left_storage());
          if (p.side() != Side::Left) checkpoint::save(w, opt.quant_policy(), p.right_storage());
        }
      }
      checkpoint::save(w, opt.adam().state_policy_object(), l.moments);
      write_section(os, kLayer, w.bytes());
    }

    if (with_weights) {
      Writer w;
      w.u64(weights->entries_.size());
      for (const auto& e : weights->entries_) {
        w.u64(e.layer);
        w.u8(static_cast<std::uint8_t>(e.kind));
        switch (e.kind) {
          case WeightSet::Kind::Float32: checkpoint::save(w, *static_cast<const MatrixF*>(e.ptr)); break;
          case WeightSet::Kind::BFloat16: checkpoint::save(w, *static_cast<const Matrix<bfloat16>*>(e.ptr)); break;
          case WeightSet::Kind::Int8: checkpoint::save(w, *static_cast<const QuantizedWeight<8>*>(e.ptr)); break;
        }
      }
      write_section(os, kWeights, w.bytes());
    }
    Writer end;
    end.u64(opt.layers_.size());
    write_section(os, kEnd, end.bytes());
    os.flush();
    if (!os) throw checkpoint_error("galore checkpoint: writing failed");
  }

  template <class Opt>
  static void load(Opt& opt, std::istream& is, WeightSet* weights) {
    std::uint8_t head[8 + 7 * 4];
    read_exact(is, head, sizeof head, "the header");
    Reader h(head, sizeof head, "header");
    std::uint32_t head_crc;
    std::memcpy(&head_crc, head + sizeof head - 4, 4);
    const bool head_intact = crc32(head, sizeof head - 4) == head_crc;
    char magic[8];
    for (char& c : magic) c = static_cast<char>(h.u8());
    if (std::memcmp(magic, kMagic, sizeof kMagic) != 0) h.fail("not a galore checkpoint (wrong magic)");
    if (!head_intact) h.fail("the header fails its checksum: the file is corrupt");
    const std::uint32_t version = h.u32();
    if (version != kFormatVersion)
      h.fail("format version " + std::to_string(version) + " is not supported (this library reads version " +
             std::to_string(kFormatVersion) + ")");
    const std::uint32_t major = h.u32(), minor = h.u32(), patch = h.u32();
    (void)minor;
    (void)patch;
    if (major != GALORE_VERSION_MAJOR)
      h.fail("written by galore " + std::to_string(major) + ".x, which this library (" GALORE_VERSION_STRING
             ") does not read");
    if (h.u32() != kByteOrder) h.fail("written on a machine of another byte order");
    const std::uint32_t sections = h.u32();
    const std::size_t L = opt.layers_.size();
    if (sections != 2 + L && sections != 3 + L)
      h.fail(std::to_string(sections) + " sections, but an optimizer of " + std::to_string(L) + " layers needs " +
             std::to_string(2 + L) + " (or one more with weights)");
    std::size_t index = 0;

    // Configuration: every hyperparameter must match.
    Section s = read_section(is, index++);
    Reader c(s.payload.data(), s.payload.size(), "configuration");
    if (s.tag != kConfig) c.fail("expected the configuration section, found " + tag_name(s.tag));
    const Items mine = config_items(opt);
    const std::uint64_t n_items = c.count(16, "the configuration");
    Items theirs;
    for (std::uint64_t i = 0; i < n_items; ++i) {
      std::string k = c.str();
      std::string v = c.str();
      theirs.emplace_back(std::move(k), std::move(v));
    }
    for (std::size_t i = 0; i < std::max(mine.size(), theirs.size()); ++i) {
      const std::string mk = i < mine.size() ? mine[i].first : "(nothing)";
      const std::string tk = i < theirs.size() ? theirs[i].first : "(nothing)";
      if (mk != tk) c.fail("the configuration lists '" + tk + "' where this optimizer has '" + mk + "'");
      if (mine[i].second != theirs[i].second)
        c.fail("the checkpoint was saved with " + tk + " = " + theirs[i].second + ", this optimizer has " +
               mine[i].second);
    }
    const double lr = c.f64();
    if (!(std::isfinite(lr) && lr >= 0.0)) c.fail("the saved learning rate is invalid");
    if (c.u64() != L) c.fail("the checkpoint holds another number of layers than this optimizer (" + std::to_string(L) + ")");
    c.expect_done();

    // Layers: built aside from copies of the registered ones, then swapped in.
    auto layers = opt.layers_;
    for (std::size_t i = 0; i < L; ++i) {
      s = read_section(is, index++);
      Reader r(s.payload.data(), s.payload.size(), "layer " + std::to_string(i));
      if (s.tag != kLayer) r.fail("expected a layer section, found " + tag_name(s.tag));
      load_layer(opt, r, layers[i]);
      r.expect_done();
    }

    // The trainer's weights, if the checkpoint holds them.
    s = read_section(is, index++);
    std::vector<std::function<void()>> commit_weights;
    const std::size_t bound = weights ? weights->entries_.size() : 0;
    if (s.tag == kWeights) {
      Reader r(s.payload.data(), s.payload.size(), "weights");
      if (sections != 3 + L) r.fail("a weights section the header did not announce");
      const std::uint64_t n = r.count(9, "the weights");
      if (n != bound)
        r.fail("the checkpoint holds " + std::to_string(n) + " weights but " + std::to_string(bound) +
               " were passed to load them into");
      for (std::uint64_t k = 0; k < n; ++k) {
        const auto& e = weights->entries_[static_cast<std::size_t>(k)];
        const std::uint64_t layer = r.u64();
        const auto kind = static_cast<WeightSet::Kind>(r.u8());
        if (layer != e.layer || kind != e.kind)
          r.fail("weight " + std::to_string(k) + " is layer " + std::to_string(layer) + " of kind " +
                 std::to_string(static_cast<int>(kind)) + ", but layer " + std::to_string(e.layer) + " of kind " +
                 std::to_string(static_cast<int>(e.kind)) + " was passed");
        const Shape want = opt.layers_[e.layer].shape;
        if (kind == WeightSet::Kind::Float32) {
          auto tmp = std::make_shared<MatrixF>();
          load_matrix(r, *tmp, want, "float32 weight");
          commit_weights.push_back([tmp, p = e.ptr] { *static_cast<MatrixF*>(p) = std::move(*tmp); });
        } else if (kind == WeightSet::Kind::BFloat16) {
          auto tmp = std::make_shared<Matrix<bfloat16>>();
          load_matrix(r, *tmp, want, "bf16 weight");
          commit_weights.push_back([tmp, p = e.ptr] { *static_cast<Matrix<bfloat16>*>(p) = std::move(*tmp); });
        } else {
          auto* target = static_cast<QuantizedWeight<8>*>(e.ptr);
          if (target->group_size() <= 0)
            r.fail("an INT8 weight to load into must be constructed first (it gives the group size)");
          auto tmp = std::make_shared<QuantizedWeight<8>>();
          checkpoint::load(r, *tmp, want, target->group_size());
          commit_weights.push_back([tmp, target] { *target = std::move(*tmp); });
        }
      }
      r.expect_done();
      s = read_section(is, index++);
    } else if (bound > 0) {
      throw checkpoint_error("galore checkpoint: it holds no weights, but a WeightSet was passed to load them into");
    }
    Reader e(s.payload.data(), s.payload.size(), "end");
    if (s.tag != kEnd) e.fail("expected the end section, found " + tag_name(s.tag));
    if (e.u64() != L) e.fail("the end section disagrees on the layer count");
    e.expect_done();

    // Everything read and checked: commit.
    opt.layers_ = std::move(layers);
    opt.set_lr(lr);
    for (auto& f : commit_weights) f();
  }

 private:
  template <class Opt, class Layer>
  static void load_layer(const Opt& opt, Reader& r, Layer& l) {
    const std::string name = r.str();
    const Shape shape = load_shape(r);
    const bool projected = r.boolean();
    if (name != l.name || shape != l.shape || projected != l.projector.has_value())
      r.fail("the checkpoint has '" + name + "' " + std::to_string(shape.rows) + "x" + std::to_string(shape.cols) +
             (projected ? " projected" : " dense") + " where this optimizer has '" + l.name + "' " +
             std::to_string(l.shape.rows) + "x" + std::to_string(l.shape.cols) +
             (l.projector ? " projected" : " dense"));
    l.step = r.i64();
    l.skipped = r.i64();
    if (l.step < 0 || l.skipped < 0) r.fail("negative step counters");
    Shape moments_shape = shape;
    if (projected) {
      auto& p = *l.projector;
      const std::int64_t rank = r.i64();
      const std::uint32_t type = r.u32();
      const float scale = r.f32();
      if (rank != p.rank() || type != static_cast<std::uint32_t>(p.options().type) || scale != p.scale())
        r.fail("projection options differ from this layer's (rank " + std::to_string(rank) + ", type " +
               std::to_string(type) + ", scale " + text(scale) + ")");
      const bool has_basis = r.boolean();
      const std::int64_t svd_count = r.i64();
      if (svd_count < 0 || (has_basis && svd_count == 0)) r.fail("inconsistent SVD count");
      typename Opt::projector_type::ScheduleState sched = opt.schedule_policy().init();
      checkpoint::load(r, opt.schedule_policy(), sched, p.side() == Side::Right ? shape.cols : shape.rows);
      typename Opt::projector_type::Storage left, right;
      if (has_basis) {
        if (p.side() != Side::Right) checkpoint::load(r, opt.quant_policy(), left, Shape{shape.rows, rank});
        if (p.side() != Side::Left) checkpoint::load(r, opt.quant_policy(), right, Shape{rank, shape.cols});
      }
      p.restore(has_basis, svd_count, std::move(sched), std::move(left), std::move(right));
      moments_shape = p.low_rank_shape();
    }
    checkpoint::load(r, opt.adam().state_policy_object(), l.moments, moments_shape);
  }
};

// Writes to a temporary file beside `path`, flushes it to disk, then renames it
// over `path`: readers see the old checkpoint or the new one, never a mix.
inline void write_atomically(const std::string& path, const std::string& bytes) {
  namespace fs = std::filesystem;
  static std::atomic<unsigned> counter{0};
  const std::string tmp = path + ".tmp." + std::to_string(
#if defined(__unix__) || defined(__APPLE__)
                                               static_cast<long>(::getpid())
#else
                                               0L
#endif
                                               ) + "." + std::to_string(counter++);
#if defined(__unix__) || defined(__APPLE__)
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw checkpoint_error("galore checkpoint: cannot create " + tmp);
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ::ssize_t k = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (k <= 0) {
      ::close(fd);
      std::remove(tmp.c_str());
      throw checkpoint_error("galore checkpoint: writing " + tmp + " failed");
    }
    done += static_cast<std::size_t>(k);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    std::remove(tmp.c_str());
    throw checkpoint_error("galore checkpoint: flushing " + tmp + " to disk failed");
  }
#else
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) throw checkpoint_error("galore checkpoint: writing " + tmp + " failed");
  }
#endif
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw checkpoint_error("galore checkpoint: renaming " + tmp + " to " + path + " failed: " + ec.message());
  }
}

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
