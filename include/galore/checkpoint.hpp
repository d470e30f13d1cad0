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

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "checkpoint/format.hpp"
#include "checkpoint/serialize.hpp"
#include "optim/galore_optimizer.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
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
  static void save(const Opt& opt, std::ostream& os, const WeightSet* weights) {
    if (weights) check_weights(opt, *weights);
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

  // Loads, or throws checkpoint_error and changes nothing. Whatever else is
  // thrown on the way (a stream with exceptions enabled, a failed allocation, a
  // caller error) becomes a checkpoint_error with its message.
  template <class Opt>
  static void load(Opt& opt, std::istream& is, WeightSet* weights) {
    try {
      load_unchecked(opt, is, weights);
    } catch (const checkpoint_error&) {
      throw;
    } catch (const std::bad_alloc&) {
      throw checkpoint_error("galore checkpoint: out of memory while loading");
    } catch (const std::exception& e) {
      throw checkpoint_error(std::string("galore checkpoint: loading failed: ") + e.what());
    } catch (...) {
      throw checkpoint_error("galore checkpoint: loading failed with an unknown exception");
    }
  }

 private:
  template <class Opt>
  static void load_unchecked(Opt& opt, std::istream& is, WeightSet* weights) {
    const std::size_t L = opt.layers_.size();
    if (weights)
      for (const WeightSet::Entry& e : weights->entries_)
        if (e.layer >= L)
          throw checkpoint_error("galore checkpoint: the WeightSet names layer " + std::to_string(e.layer) +
                                 ", which this optimizer does not have (" + std::to_string(L) + " layers)");
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
    for (std::size_t i = 0; i < std::min(mine.size(), theirs.size()); ++i) {
      const std::string& mk = mine[i].first;
      const std::string& tk = theirs[i].first;
      if (mk != tk) c.fail("the configuration lists '" + tk + "' where this optimizer has '" + mk + "'");
      if (mine[i].second != theirs[i].second)
        c.fail("the checkpoint was saved with " + tk + " = " + theirs[i].second + ", this optimizer has " +
               mine[i].second);
    }
    if (theirs.size() > mine.size())
      c.fail("the configuration lists '" + theirs[mine.size()].first + "' after this optimizer's last item '" +
             (mine.empty() ? std::string() : mine.back().first) + "'");
    if (theirs.size() < mine.size())
      c.fail("the configuration ends where this optimizer has '" + mine[theirs.size()].first + "'");
    const double lr = c.f64();
    if (!(std::isfinite(lr) && lr >= 0.0)) c.fail("the saved learning rate is invalid");
    // The learning rate goes in through set_lr, on a copy: its checks run now.
    auto adam = opt.adam_;
    try {
      adam.set_lr(lr);
    } catch (const std::exception& e) {
      c.fail(std::string("the saved learning rate is refused: ") + e.what());
    }
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
    if (sections == 3 + L && s.tag != kWeights)
      throw checkpoint_error("galore checkpoint: the header announces a weights section, found " + tag_name(s.tag));
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
    expect_end_of_input(is);

    // Everything read and checked: commit (moves only, nothing here throws).
    opt.layers_ = std::move(layers);
    opt.adam_ = std::move(adam);
    for (auto& f : commit_weights) f();
  }

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
    l.step = counter(r, "step counter");
    l.skipped = counter(r, "skipped-step counter");
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
      const std::int64_t svd_count = counter(r, "SVD count");
      // Every refresh counts one SVD and installs a basis.
      if (has_basis != (svd_count > 0)) r.fail("the SVD count disagrees with whether a basis exists");
      typename Opt::projector_type::ScheduleState sched = opt.schedule_policy().init();
      checkpoint::load(r, opt.schedule_policy(), sched, p.side() == Side::Right ? shape.cols : shape.rows);
      check_schedule_state(r, opt.schedule_policy(), sched, svd_count);
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

// ---- saving to a path ----
//
// A save to `path` writes a temporary file in the directory of the file it
// replaces, flushes it to disk, renames it over that file and flushes the
// directory, so that readers see the old checkpoint or the new one, never a mix,
// and the new one survives a power loss once save_checkpoint returns.
//  - A symbolic link is written through: the file replaced is the one at the end
//    of its chain of links (created if the link dangles); the links stay.
//  - Anything but a regular file there (a directory, a device, a FIFO, a socket)
//    is refused with checkpoint_error and left alone.
//  - Temporaries are named <name>.galore-tmp-<pid>-<16 hex digits> beside the
//    target. A save removes those of the same target whose process no longer
//    runs on this machine (left by a killed save), and nothing else.
//  - A replaced file's permission bits carry over to the new one.

// The temporaries of target file `name`: "<name>.galore-tmp-<pid>-<16 hex>".
inline constexpr const char* kTempInfix = ".galore-tmp-";

// If `file` is a temporary of `name`, its process id; otherwise -1.
inline long temp_owner(const std::string& file, const std::string& name) {
  const std::string prefix = name + kTempInfix;
  if (file.size() <= prefix.size() || file.compare(0, prefix.size(), prefix) != 0) return -1;
  const std::string rest = file.substr(prefix.size());
  const std::size_t dash = rest.find('-');
  if (dash == 0 || dash == std::string::npos || dash > 10 || rest.size() - dash - 1 != 16) return -1;
  long pid = 0;
  for (std::size_t i = 0; i < dash; ++i) {
    if (rest[i] < '0' || rest[i] > '9') return -1;
    pid = pid * 10 + (rest[i] - '0');
  }
  for (std::size_t i = dash + 1; i < rest.size(); ++i) {
    const char c = rest[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return -1;
  }
  return pid;
}

#if defined(__unix__) || defined(__APPLE__)

inline std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

// The file a save to `path` replaces: `path`, or the end of its chain of
// symbolic links. Refuses anything that exists there and is not a regular file.
inline std::string save_target(const std::string& path, struct ::stat& st, bool& exists) {
  namespace fs = std::filesystem;
  fs::path p(path);
  for (int hops = 0;; ++hops) {
    if (::lstat(p.c_str(), &st) != 0) {
      const int err = errno;
      if (err != ENOENT)
        throw checkpoint_error("galore checkpoint: cannot examine " + p.string() + ": " + errno_text(err));
      exists = false;
      return p.string();
    }
    if (!S_ISLNK(st.st_mode)) {
      if (!S_ISREG(st.st_mode))
        throw checkpoint_error("galore checkpoint: " + p.string() +
                               " is not a regular file (a directory, device, FIFO or socket); refusing to replace it");
      exists = true;
      return p.string();
    }
    if (hops == 40) throw checkpoint_error("galore checkpoint: too many levels of symbolic links at " + path);
    std::error_code ec;
    const fs::path link = fs::read_symlink(p, ec);
    if (ec) throw checkpoint_error("galore checkpoint: cannot read the link " + p.string() + ": " + ec.message());
    p = link.is_absolute() ? link : p.parent_path() / link;
  }
}

// Removes the temporaries of `name` in `dir` whose process no longer runs.
inline void remove_stale_temporaries(const std::filesystem::path& dir, const std::string& name) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::directory_iterator it(dir.empty() ? fs::path(".") : dir, ec), end;
  for (; !ec && it != end; it.increment(ec)) {
    const std::string file = it->path().filename().string();
    const long pid = temp_owner(file, name);
    if (pid <= 0 || pid == static_cast<long>(::getpid())) continue;
    if (pid <= static_cast<long>(std::numeric_limits<::pid_t>::max()) &&
        !(::kill(static_cast<::pid_t>(pid), 0) != 0 && errno == ESRCH))
      continue;  // the process exists (or may: not ours to signal)
    struct ::stat st;
    if (::lstat(it->path().c_str(), &st) == 0 && S_ISREG(st.st_mode)) ::unlink(it->path().c_str());
  }
}

inline std::string random_hex16() {
  static std::atomic<std::uint64_t> counter{0};
  std::uint64_t x = counter++ * 0x9E3779B97F4A7C15ull;
  try {
    std::random_device rd;
    x ^= (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  } catch (const std::exception&) {
  }
  x ^= static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  static const char digits[] = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, x >>= 4) s[static_cast<std::size_t>(i)] = digits[x & 0xF];
  return s;
}

inline void write_atomically(const std::string& path, const std::string& bytes) {
  namespace fs = std::filesystem;
  struct ::stat st {};
  bool exists = false;
  const std::string target = save_target(path, st, exists);
  const fs::path target_path(target);
  const fs::path dir = target_path.parent_path();
  const std::string name = target_path.filename().string();
  if (name.empty() || name == "." || name == "..")
    throw checkpoint_error("galore checkpoint: " + path + " does not name a file");
  remove_stale_temporaries(dir, name);

  std::string tmp;
  int fd = -1;
  for (int attempt = 0; fd < 0; ++attempt) {
    tmp = (dir / (name + kTempInfix + std::to_string(static_cast<long>(::getpid())) + "-" + random_hex16())).string();
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0 && (errno != EEXIST || attempt == 16))
      throw checkpoint_error("galore checkpoint: cannot create " + tmp + ": " + errno_text(errno));
  }
  auto fail = [&](const std::string& what, int err) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw checkpoint_error("galore checkpoint: " + what + " " + tmp + " failed: " + errno_text(err));
  };
  if (exists) (void)::fchmod(fd, st.st_mode & 07777);  // best effort: keep the replaced file's mode
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ::ssize_t k = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) fail("writing", k < 0 ? errno : EIO);
    done += static_cast<std::size_t>(k);
  }
  if (::fsync(fd) != 0) fail("flushing", errno);
  const int fd_closed = fd;
  fd = -1;
  if (::close(fd_closed) != 0) fail("closing", errno);
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw checkpoint_error("galore checkpoint: renaming " + tmp + " to " + target + " failed: " + errno_text(err));
  }
  // The rename is durable once the directory is flushed.
  const std::string d = dir.empty() ? std::string(".") : dir.string();
  const int dfd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int err = dfd < 0 ? errno : 0;
  if (dfd >= 0) {
    if (::fsync(dfd) != 0) err = errno;
    ::close(dfd);
  }
  if (err != 0 && err != EINVAL && err != ENOTSUP)  // a file system that cannot sync directories
    throw checkpoint_error("galore checkpoint: " + target + " was written, but flushing its directory " + d +
                           " failed: " + errno_text(err));
}

#else

inline void write_atomically(const std::string& path, const std::string& bytes) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (fs::exists(status) && !fs::is_regular_file(status))
    throw checkpoint_error("galore checkpoint: " + path + " is not a regular file; refusing to replace it");
  static std::atomic<unsigned long long> counter{0};
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", counter++);
  const std::string tmp = path + kTempInfix + "0-" + hex;
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) {
      out.close();
      std::remove(tmp.c_str());
      throw checkpoint_error("galore checkpoint: writing " + tmp + " failed");
    }
  }
  fs::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw checkpoint_error("galore checkpoint: renaming " + tmp + " to " + path + " failed: " + ec.message());
  }
}

#endif

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
