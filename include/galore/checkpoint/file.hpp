// galore: the layout of a checkpoint file, written and read by one
// implementation for every optimizer facade (the CPU's in galore/checkpoint.hpp,
// the CUDA one's in backend/cuda/checkpoint.cuh), so that a file saved by one
// loads into the other. docs/checkpoint.md describes the format:
//
//   header | CONF | LAYR per layer | WGHT (if weights were saved) | END
//
// A facade takes part through an adapter `f` that knows where its state lives.
//
// write_file(os, f) calls:
//   Items config_items();  double lr();  std::size_t num_layers();
//   std::size_t num_weights();                  // 0: no weights section
//   LayerFields stage_layer(i);                 // first for each layer, in order:
//                                               // a device facade copies layer i to the host here
//   schedule_policy();  schedule_state(i);      // projected layers
//   void save_basis(i, Side factor, Writer&);   // projected layers with a basis: Left, then Right
//   void save_moments(i, Writer&);
//   void save_weights(Writer&);                 // the entries, after their count
//
// read_file(is, f) reads and validates the whole file into f (which keeps what
// it reads aside) and calls:
//   Items config_items();  void stage_lr(double);  std::size_t num_layers();
//   void begin_layers();                        // after the configuration matched
//   LayerFields registered(i);                  // name, shape, projected, rank, type, scale, side
//   schedule_policy();
//   void load_basis(i, Side factor, Reader&, Shape);
//   void load_moments(i, Reader&, Shape);
//   void end_layer(i, const LayerFields& saved, State&& schedule_state);
//   std::size_t weights_bound();                // weights the caller passed to load into
//   void load_weights(Reader&, std::uint64_t n);   // n == weights_bound()
// It throws checkpoint_error for bad input; f's hooks may throw anything, which
// reporting_errors() turns into a checkpoint_error. The caller then commits
// what f holds.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <istream>
#include <new>
#include <ostream>
#include <string>
#include <type_traits>
#include <utility>

#include "../config.hpp"
#include "../core/shape.hpp"
#include "../projection_type.hpp"
#include "describe.hpp"
#include "fields.hpp"
#include "format.hpp"

namespace galore::checkpoint {

inline constexpr std::uint32_t kConfig = tag("CONF");
inline constexpr std::uint32_t kLayer = tag("LAYR");
inline constexpr std::uint32_t kWeights = tag("WGHT");
inline constexpr std::uint32_t kEnd = tag("END ");
inline constexpr std::uint32_t kByteOrder = 0x01020304u;

// A layer's section up to its schedule state, basis and moments, in file order.
struct LayerFields {
  std::string name;
  Shape shape;
  bool projected = false;
  std::int64_t step = 0;     // applied steps
  std::int64_t skipped = 0;  // steps skipped for non-finite input
  // Projected layers only.
  Index rank = 0;
  ProjectionType type = ProjectionType::Std;
  float scale = 0.0f;
  Side side = Side::Right;  // not in the file: it follows from type and shape
  bool has_basis = false;
  std::int64_t svd_count = 0;
};

template <class Facade>
void write_file(std::ostream& os, Facade& f) {
  const std::size_t L = f.num_layers();
  const std::size_t n_weights = f.num_weights();
  Writer header;
  header.raw(kMagic, sizeof kMagic);
  header.u32(kFormatVersion);
  header.u32(GALORE_VERSION_MAJOR);
  header.u32(GALORE_VERSION_MINOR);
  header.u32(GALORE_VERSION_PATCH);
  header.u32(kByteOrder);
  header.u32(static_cast<std::uint32_t>(2 + L + (n_weights > 0 ? 1 : 0)));
  header.u32(crc32(header.bytes().data(), header.bytes().size()));
  os.write(reinterpret_cast<const char*>(header.bytes().data()), static_cast<std::streamsize>(header.bytes().size()));

  Writer conf;
  const Items items = f.config_items();
  conf.u64(items.size());
  for (const auto& [k, v] : items) {
    conf.str(k);
    conf.str(v);
  }
  conf.f64(f.lr());
  conf.u64(L);
  write_section(os, kConfig, conf.bytes());

  for (std::size_t i = 0; i < L; ++i) {
    const LayerFields l = f.stage_layer(i);
    Writer w;
    w.str(l.name);
    save(w, l.shape);
    w.boolean(l.projected);
    w.i64(l.step);
    w.i64(l.skipped);
    if (l.projected) {
      w.i64(l.rank);
      w.u32(static_cast<std::uint32_t>(l.type));
      w.f32(l.scale);
      w.boolean(l.has_basis);
      w.i64(l.svd_count);
      save(w, f.schedule_policy(), f.schedule_state(i));
      if (l.has_basis) {
        if (l.side != Side::Right) f.save_basis(i, Side::Left, w);
        if (l.side != Side::Left) f.save_basis(i, Side::Right, w);
      }
    }
    f.save_moments(i, w);
    write_section(os, kLayer, w.bytes());
  }

  if (n_weights > 0) {
    Writer w;
    w.u64(n_weights);
    f.save_weights(w);
    write_section(os, kWeights, w.bytes());
  }
  Writer end;
  end.u64(L);
  write_section(os, kEnd, end.bytes());
  os.flush();
  if (!os) throw checkpoint_error("galore checkpoint: writing failed");
}

// Runs fn; whatever it throws but a checkpoint_error (a stream with exceptions
// enabled, a failed allocation, a caller error) becomes a checkpoint_error with
// its message.
template <class Fn>
void reporting_errors(Fn&& fn) {
  try {
    fn();
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

template <class Facade>
void read_layer(Facade& f, std::size_t i, Reader& r) {
  const LayerFields mine = f.registered(i);
  LayerFields saved;
  saved.name = r.str();
  saved.shape = load_shape(r);
  saved.projected = r.boolean();
  if (saved.name != mine.name || saved.shape != mine.shape || saved.projected != mine.projected)
    r.fail("the checkpoint has '" + saved.name + "' " + std::to_string(saved.shape.rows) + "x" +
           std::to_string(saved.shape.cols) + (saved.projected ? " projected" : " dense") +
           " where this optimizer has '" + mine.name + "' " + std::to_string(mine.shape.rows) + "x" +
           std::to_string(mine.shape.cols) + (mine.projected ? " projected" : " dense"));
  saved.step = counter(r, "step counter");
  saved.skipped = counter(r, "skipped-step counter");
  using ScheduleState = typename std::decay_t<decltype(f.schedule_policy())>::State;
  ScheduleState schedule_state{};
  Shape moments_shape = saved.shape;
  if (saved.projected) {
    const std::int64_t rank = r.i64();
    const std::uint32_t type = r.u32();
    const float scale = r.f32();
    if (rank != mine.rank || type != static_cast<std::uint32_t>(mine.type) || scale != mine.scale)
      r.fail("projection options differ from this layer's (rank " + std::to_string(rank) + ", type " +
             std::to_string(type) + ", scale " + text(scale) + ")");
    saved.rank = mine.rank;
    saved.type = mine.type;
    saved.scale = mine.scale;
    saved.side = mine.side;
    saved.has_basis = r.boolean();
    saved.svd_count = counter(r, "SVD count");
    // Every refresh counts one SVD and installs a basis.
    if (saved.has_basis != (saved.svd_count > 0)) r.fail("the SVD count disagrees with whether a basis exists");
    const auto& policy = f.schedule_policy();
    schedule_state = policy.init();
    load(r, policy, schedule_state, saved.side == Side::Right ? saved.shape.cols : saved.shape.rows);
    check_schedule_state(r, policy, schedule_state, saved.svd_count);
    if (saved.has_basis) {
      if (saved.side != Side::Right) f.load_basis(i, Side::Left, r, Shape{saved.shape.rows, saved.rank});
      if (saved.side != Side::Left) f.load_basis(i, Side::Right, r, Shape{saved.rank, saved.shape.cols});
    }
    moments_shape = low_rank_shape(saved.side, saved.shape, saved.rank);
  }
  f.load_moments(i, r, moments_shape);
  f.end_layer(i, saved, std::move(schedule_state));
}

template <class Facade>
void read_file(std::istream& is, Facade& f) {
  const std::size_t L = f.num_layers();
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
  const Items mine = f.config_items();
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
  // The learning rate goes in through the facade's own checks (set_lr's), aside.
  try {
    f.stage_lr(lr);
  } catch (const std::exception& e) {
    c.fail(std::string("the saved learning rate is refused: ") + e.what());
  }
  if (c.u64() != L) c.fail("the checkpoint holds another number of layers than this optimizer (" + std::to_string(L) + ")");
  c.expect_done();

  // Layers.
  f.begin_layers();
  for (std::size_t i = 0; i < L; ++i) {
    s = read_section(is, index++);
    Reader r(s.payload.data(), s.payload.size(), "layer " + std::to_string(i));
    if (s.tag != kLayer) r.fail("expected a layer section, found " + tag_name(s.tag));
    read_layer(f, i, r);
    r.expect_done();
  }

  // The trainer's weights, if the checkpoint holds them.
  s = read_section(is, index++);
  const std::size_t bound = f.weights_bound();
  if (sections == 3 + L && s.tag != kWeights)
    throw checkpoint_error("galore checkpoint: the header announces a weights section, found " + tag_name(s.tag));
  if (s.tag == kWeights) {
    Reader r(s.payload.data(), s.payload.size(), "weights");
    if (sections != 3 + L) r.fail("a weights section the header did not announce");
    const std::uint64_t n = r.count(9, "the weights");
    if (n != bound)
      r.fail("the checkpoint holds " + std::to_string(n) + " weights but " + std::to_string(bound) +
             " were passed to load them into");
    f.load_weights(r, n);
    r.expect_done();
    s = read_section(is, index++);
  } else if (bound > 0) {
    throw checkpoint_error("galore checkpoint: it holds no weights, but weights were passed to load them into");
  }
  Reader e(s.payload.data(), s.payload.size(), "end");
  if (s.tag != kEnd) e.fail("expected the end section, found " + tag_name(s.tag));
  if (e.u64() != L) e.fail("the end section disagrees on the layer count");
  e.expect_done();
  expect_end_of_input(is);
}

}  // namespace galore::checkpoint
