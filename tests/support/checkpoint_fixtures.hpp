// Test support: small optimizers of every facade kind with a fixed set of
// layers and weights, shared by the checkpoint tests (which write the fuzzer's
// seed corpus) and the checkpoint fuzzers (which load into them); and a
// checkpoint taken apart into its sections and fields, to forge files whose
// checksums are valid (Image, fields).
#pragma once

#include <cstdint>
#include <cstring>
#include <galore/galore.hpp>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace galore_test {

using namespace galore;

enum class FacadeKind : std::uint8_t { GaLore, GaLore8bit, QGaLore, AdamW, Count };

inline const char* name(FacadeKind k) {
  switch (k) {
    case FacadeKind::GaLore: return "galore";
    case FacadeKind::GaLore8bit: return "galore8bit";
    case FacadeKind::QGaLore: return "qgalore";
    case FacadeKind::AdamW: return "adamw";
    default: return "?";
  }
}

inline MatrixF fixture_matrix(Shape s, unsigned seed, float sigma) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  MatrixF A(s.rows, s.cols);
  for (Index i = 0; i < A.size(); ++i) A.data()[i] = d(gen);
  return A;
}

// One optimizer of a kind with its layers registered and the trainer's weights.
// Layer 0 (96 x 64) and 1 (48 x 80) are projected (INT8 weights for Q-GaLore),
// layer 2 (1 x 64) is dense. The 8-bit kinds quantize moments from 1024
// elements, so the projected layers' moments (96 x 16, 16 x 80) take the 8-bit
// path and the dense layer's the float32 one.
struct Fixture {
  FacadeKind kind;
  std::unique_ptr<GaLoreAdamW> galore;
  std::unique_ptr<GaLoreAdamW8bit> galore8;
  std::unique_ptr<QGaLoreAdamW8bit> qgalore;
  std::vector<LayerId> ids;
  std::vector<MatrixF> W;       // float weights (all but Q-GaLore's projected ones)
  std::vector<QuantizedWeight<8>> Q;  // Q-GaLore's projected weights
  WeightSet weights;

  template <class F>
  auto visit(F&& f) {
    if (galore) return f(*galore);
    if (galore8) return f(*galore8);
    return f(*qgalore);
  }

  static constexpr Shape kShapes[3] = {{96, 64}, {48, 80}, {1, 64}};

  explicit Fixture(FacadeKind k) : kind(k) {
    AdamConfig adam;
    adam.lr = 0.01;
    adam.weight_decay = 0.01;
    const ProjectorOptions proj{16, ProjectionType::Std, 0.25f};
    const state::Blockwise8bit eight_bit{256, 1024};
    switch (k) {
      case FacadeKind::GaLore:
      case FacadeKind::AdamW: galore = std::make_unique<GaLoreAdamW>(proj, LowRankAdam<>(adam), schedule::FixedGap{3}); break;
      case FacadeKind::GaLore8bit:
        galore8 = std::make_unique<GaLoreAdamW8bit>(proj, LowRankAdam<state::Blockwise8bit>(adam, eight_bit), schedule::FixedGap{3});
        break;
      default:
        qgalore = std::make_unique<QGaLoreAdamW8bit>(proj, LowRankAdam<state::Blockwise8bit>(adam, eight_bit),
                                                     schedule::Lazy{2, 0.2, 2, 2}, svd::Exact{}, quant::Int4{64},
                                                     StochasticRounder<8>(7));
    }
    for (int i = 0; i < 3; ++i) {
      const Shape s = kShapes[i];
      const bool projected = i < 2 && k != FacadeKind::AdamW;
      ids.push_back(visit([&](auto& o) { return projected ? o.add_layer(s, "p" + std::to_string(i)) : o.add_dense(s, "d" + std::to_string(i)); }));
      if (k == FacadeKind::QGaLore && projected) Q.emplace_back(fixture_matrix(s, 10 + i, 1.0f), 256);
      else W.push_back(fixture_matrix(s, 10 + i, 1.0f));
    }
    std::size_t w = 0, q = 0;
    for (int i = 0; i < 3; ++i) {
      if (k == FacadeKind::QGaLore && i < 2) weights.add(ids[i], Q[q++]);
      else weights.add(ids[i], W[w++]);
    }
  }

  // One training step of every layer with the gradients of step t.
  void step(int t) {
    std::size_t w = 0, q = 0;
    for (int i = 0; i < 3; ++i) {
      const MatrixF G = fixture_matrix(kShapes[i], 1000 * t + i, 0.1f);
      if (kind == FacadeKind::QGaLore && i < 2) qgalore->step(ids[i], Q[q++], G);
      else visit([&](auto& o) { return o.step(ids[i], W[w++], G); });
    }
  }

  // The same with every weight held in float32 (Q-GaLore's INT8 weights as
  // dequantized copies, which are not kept): the optimizer's state advances as in
  // step(), without re-quantizing any weight.
  void step_float(int t) {
    std::size_t w = 0, q = 0;
    for (int i = 0; i < 3; ++i) {
      const MatrixF G = fixture_matrix(kShapes[i], 1000 * t + i, 0.1f);
      if (kind == FacadeKind::QGaLore && i < 2) {
        MatrixF copy = Q[q++].dequantize();
        qgalore->step(ids[i], copy, G);
      } else {
        visit([&](auto& o) { return o.step(ids[i], W[w++], G); });
      }
    }
  }

  std::string save() {
    std::ostringstream os(std::ios::binary);
    visit([&](auto& o) { save_checkpoint(o, os, &weights); return 0; });
    return os.str();
  }
  void load(const std::string& bytes) {
    std::istringstream is(bytes, std::ios::binary);
    visit([&](auto& o) { load_checkpoint(o, is, &weights); return 0; });
  }
};

// ---- checkpoints taken apart ----

// A checkpoint as its 36-byte header, its sections and whatever follows the
// last section. bytes() puts it back together with every checksum recomputed,
// so that an edit reaches the loader's value checks instead of its checksums.
struct Image {
  struct Section {
    std::uint32_t tag = 0;
    std::string payload;
  };
  std::string header;
  std::vector<Section> sections;
  std::string trailing;

  // Splits a file with a complete header; a section that does not fit ends the
  // list and goes to `trailing` with everything after it.
  static Image parse(const std::string& bytes) {
    if (bytes.size() < 36) throw std::runtime_error("Image::parse: no header");
    Image im;
    im.header = bytes.substr(0, 36);
    std::size_t at = 36;
    while (bytes.size() - at >= 16) {
      std::uint32_t tag;
      std::uint64_t length;
      std::memcpy(&tag, bytes.data() + at, 4);
      std::memcpy(&length, bytes.data() + at + 4, 8);
      if (length > bytes.size() - at - 16) break;
      im.sections.push_back({tag, bytes.substr(at + 16, static_cast<std::size_t>(length))});
      at += 16 + static_cast<std::size_t>(length);
    }
    im.trailing = bytes.substr(at);
    return im;
  }

  std::uint32_t header_u32(std::size_t offset) const {
    std::uint32_t v;
    std::memcpy(&v, header.data() + offset, 4);
    return v;
  }
  void set_header_u32(std::size_t offset, std::uint32_t v) { std::memcpy(&header[offset], &v, 4); }
  // The header's section count (offset 28).
  void set_section_count(std::uint32_t n) { set_header_u32(28, n); }

  // One section as the file holds it: tag, length, checksum, payload.
  static std::string section_bytes(const Section& s) {
    char head[16];
    const std::uint64_t length = s.payload.size();
    const std::uint32_t crc = checkpoint::crc32(reinterpret_cast<const std::uint8_t*>(s.payload.data()), s.payload.size());
    std::memcpy(head, &s.tag, 4);
    std::memcpy(head + 4, &length, 8);
    std::memcpy(head + 12, &crc, 4);
    return std::string(head, 16) + s.payload;
  }

  std::string bytes() const {
    std::string out = header;
    const std::uint32_t head_crc = checkpoint::crc32(reinterpret_cast<const std::uint8_t*>(out.data()), 32);
    std::memcpy(&out[32], &head_crc, 4);
    for (const Section& s : sections) out += section_bytes(s);
    return out + trailing;
  }
};

// How a facade lays out its layers (which schedule state, basis storage and
// moments format follow the fixed fields).
struct Layout {
  enum class Schedule { Fixed, Lazy, Drift } schedule = Schedule::Fixed;
  enum class Storage { Float32, BFloat16, MinMax, NF4 } storage = Storage::Float32;
  enum class Moments { Float32, BFloat16, Blockwise8bit } moments = Moments::Float32;
};

inline Layout layout_of(FacadeKind k) {
  Layout l;
  if (k == FacadeKind::GaLore8bit || k == FacadeKind::QGaLore) l.moments = Layout::Moments::Blockwise8bit;
  if (k == FacadeKind::QGaLore) {
    l.schedule = Layout::Schedule::Lazy;
    l.storage = Layout::Storage::MinMax;
  }
  return l;
}

// One field of a section's payload. Scalars: `offset` is the value's. Strings
// and arrays: `offset` is their u64 count's, the elements follow it.
struct Field {
  enum class Type { U8, Bool, U32, U64, I64, F32, F64, Str, ArrayU8, ArrayU16, ArrayF32 };
  std::size_t section = 0;
  std::size_t offset = 0;
  Type type = Type::U8;
  std::string name;
  std::uint64_t count = 0;  // strings and arrays: the stored count
  bool is_array() const { return type == Type::ArrayU8 || type == Type::ArrayU16 || type == Type::ArrayF32; }
  std::size_t element_size() const {
    return type == Type::ArrayU8 ? 1 : type == Type::ArrayU16 ? 2 : type == Type::ArrayF32 ? 4 : 1;
  }
  std::size_t element_offset(std::uint64_t i) const { return offset + 8 + static_cast<std::size_t>(i) * element_size(); }
};

namespace detail {

// Walks one payload as the format describes it and records every field; it
// stops quietly where the payload no longer fits the format.
class Walker {
 public:
  Walker(const std::string& payload, std::size_t section, std::vector<Field>& out)
      : p_(payload), section_(section), out_(out) {}

  struct Stop {};

  template <class T>
  T scalar(Field::Type type, const char* name) {
    if (p_.size() - at_ < sizeof(T)) throw Stop{};
    T v;
    std::memcpy(&v, p_.data() + at_, sizeof(T));
    out_.push_back({section_, at_, type, name, 0});
    at_ += sizeof(T);
    return v;
  }
  std::uint8_t u8(const char* n) { return scalar<std::uint8_t>(Field::Type::U8, n); }
  bool boolean(const char* n) { return scalar<std::uint8_t>(Field::Type::Bool, n) == 1; }
  std::uint32_t u32(const char* n) { return scalar<std::uint32_t>(Field::Type::U32, n); }
  std::uint64_t u64(const char* n) { return scalar<std::uint64_t>(Field::Type::U64, n); }
  std::int64_t i64(const char* n) { return scalar<std::int64_t>(Field::Type::I64, n); }
  float f32(const char* n) { return scalar<float>(Field::Type::F32, n); }
  double f64(const char* n) { return scalar<double>(Field::Type::F64, n); }
  std::string str(const char* n) {
    const std::uint64_t count = counted(Field::Type::Str, 1, n);
    std::string s = p_.substr(at_, static_cast<std::size_t>(count));
    at_ += static_cast<std::size_t>(count);
    return s;
  }
  std::uint64_t array(Field::Type type, std::size_t element, const char* n) {
    const std::uint64_t count = counted(type, element, n);
    at_ += static_cast<std::size_t>(count) * element;
    return count;
  }
  void shape(const char* rows, const char* cols, std::int64_t& r, std::int64_t& c) {
    r = i64(rows);
    c = i64(cols);
  }

 private:
  std::uint64_t counted(Field::Type type, std::size_t element, const char* n) {
    if (p_.size() - at_ < 8) throw Stop{};
    std::uint64_t count;
    std::memcpy(&count, p_.data() + at_, 8);
    if (count > (p_.size() - at_ - 8) / element) throw Stop{};
    out_.push_back({section_, at_, type, n, count});
    at_ += 8;
    return count;
  }
  const std::string& p_;
  std::size_t section_;
  std::vector<Field>& out_;
  std::size_t at_ = 0;
};

inline void walk_storage(Walker& w, Layout::Storage storage) {
  std::int64_t r, c;
  w.shape("basis.rows", "basis.cols", r, c);
  switch (storage) {
    case Layout::Storage::Float32: w.array(Field::Type::ArrayF32, 4, "basis.values"); break;
    case Layout::Storage::BFloat16: w.array(Field::Type::ArrayU16, 2, "basis.values"); break;
    case Layout::Storage::MinMax:
      w.i64("basis.group");
      w.array(Field::Type::ArrayU8, 1, "basis.codes");
      w.array(Field::Type::ArrayF32, 4, "basis.scales");
      w.array(Field::Type::ArrayU8, 1, "basis.zeros");
      break;
    case Layout::Storage::NF4:
      w.i64("basis.block");
      w.array(Field::Type::ArrayU8, 1, "basis.codes");
      w.array(Field::Type::ArrayF32, 4, "basis.absmax");
      break;
  }
}

inline void walk_layer(Walker& w, const Layout& layout) {
  w.str("layer.name");
  std::int64_t rows, cols;
  w.shape("layer.rows", "layer.cols", rows, cols);
  const bool projected = w.boolean("layer.projected");
  w.i64("layer.step");
  w.i64("layer.skipped");
  if (projected) {
    w.i64("proj.rank");
    const std::uint32_t type = w.u32("proj.type");
    w.f32("proj.scale");
    const bool has_basis = w.boolean("proj.has_basis");
    w.i64("proj.svd_count");
    switch (layout.schedule) {
      case Layout::Schedule::Fixed: break;
      case Layout::Schedule::Lazy:
        w.i64("lazy.gap");
        w.array(Field::Type::ArrayF32, 4, "lazy.queue");
        w.array(Field::Type::ArrayF32, 4, "lazy.past");
        w.f32("lazy.last_cosine");
        break;
      case Layout::Schedule::Drift:
        w.i64("drift.last_refresh");
        w.f64("drift.baseline");
        w.f64("drift.last_captured");
        break;
    }
    if (has_basis) {
      if (type > static_cast<std::uint32_t>(ProjectionType::Full) || rows <= 0 || cols <= 0) throw Walker::Stop{};
      const Side side = resolve_side(static_cast<ProjectionType>(type), rows, cols);
      if (side != Side::Right) walk_storage(w, layout.storage);
      if (side != Side::Left) walk_storage(w, layout.storage);
    }
  }
  std::int64_t r, c;
  w.shape("moments.rows", "moments.cols", r, c);
  if (layout.moments == Layout::Moments::Blockwise8bit) {
    w.i64("moments.block");
    if (w.boolean("moments.quantized")) {
      w.array(Field::Type::ArrayU8, 1, "moments.m_code");
      w.array(Field::Type::ArrayU8, 1, "moments.v_code");
      w.array(Field::Type::ArrayF32, 4, "moments.m_absmax");
      w.array(Field::Type::ArrayF32, 4, "moments.v_absmax");
      return;
    }
  }
  const bool bf16 = layout.moments == Layout::Moments::BFloat16;
  w.array(bf16 ? Field::Type::ArrayU16 : Field::Type::ArrayF32, bf16 ? 2 : 4, "moments.m");
  w.array(bf16 ? Field::Type::ArrayU16 : Field::Type::ArrayF32, bf16 ? 2 : 4, "moments.v");
}

inline void walk_weights(Walker& w) {
  const std::uint64_t n = w.u64("weights.count");
  for (std::uint64_t k = 0; k < n; ++k) {
    w.u64("weight.layer");
    const std::uint8_t kind = w.u8("weight.kind");
    std::int64_t r, c;
    w.shape("weight.rows", "weight.cols", r, c);
    if (kind == 1) {
      w.array(Field::Type::ArrayF32, 4, "weight.values");
    } else if (kind == 2) {
      w.array(Field::Type::ArrayU16, 2, "weight.values");
    } else if (kind == 3) {
      w.i64("weight.group");
      w.array(Field::Type::ArrayU8, 1, "weight.codes");
      w.array(Field::Type::ArrayF32, 4, "weight.scales");
      w.array(Field::Type::ArrayU8, 1, "weight.zeros");
    } else {
      throw Walker::Stop{};
    }
  }
}

}  // namespace detail

// Every field of every section, in order, as far as each payload follows the
// format of a facade with this layout.
inline std::vector<Field> fields(const Image& im, const Layout& layout) {
  std::vector<Field> out;
  for (std::size_t i = 0; i < im.sections.size(); ++i) {
    detail::Walker w(im.sections[i].payload, i, out);
    try {
      const std::uint32_t t = im.sections[i].tag;
      if (t == checkpoint::kConfig) {
        const std::uint64_t n = w.u64("conf.count");
        for (std::uint64_t k = 0; k < n; ++k) {
          w.str("conf.key");
          w.str("conf.value");
        }
        w.f64("conf.lr");
        w.u64("conf.layers");
      } else if (t == checkpoint::kLayer) {
        detail::walk_layer(w, layout);
      } else if (t == checkpoint::kWeights) {
        detail::walk_weights(w);
      } else if (t == checkpoint::kEnd) {
        w.u64("end.layers");
      }
    } catch (const detail::Walker::Stop&) {
    }
  }
  return out;
}

// The first field called `name` in section `section`; throws if there is none.
inline Field field(const Image& im, const Layout& layout, std::size_t section, const std::string& name) {
  for (const Field& f : fields(im, layout))
    if (f.section == section && f.name == name) return f;
  throw std::runtime_error("no field " + name + " in section " + std::to_string(section));
}

// Overwrites a scalar field, or element i of an array field, with v.
template <class T>
void poke(Image& im, const Field& f, T v, std::uint64_t i = 0) {
  const std::size_t at = f.is_array() ? f.element_offset(i) : f.offset;
  std::string& p = im.sections[f.section].payload;
  if (at + sizeof(T) > p.size()) throw std::runtime_error("poke past the end of " + f.name);
  std::memcpy(&p[at], &v, sizeof(T));
}

// Replaces an array's elements (elements of `T`), count included.
template <class T>
void replace_array(Image& im, const Field& f, const std::vector<T>& values) {
  std::string& p = im.sections[f.section].payload;
  std::string bytes(8 + values.size() * sizeof(T), '\0');
  const std::uint64_t n = values.size();
  std::memcpy(&bytes[0], &n, 8);
  if (!values.empty()) std::memcpy(&bytes[8], values.data(), values.size() * sizeof(T));
  p.replace(f.offset, 8 + static_cast<std::size_t>(f.count) * f.element_size(), bytes);
}

}  // namespace galore_test
