// Value-level fuzzing of the checkpoint loader: start from a valid checkpoint,
// change values inside its sections (numbers, counts, floats, strings, whole
// sections), recompute every checksum so the change reaches the loader's value
// checks, and load the result.
//
// The input bytes are the program of changes: byte 0 picks the facade kind,
// byte 1 the checkpoint (after 0, 2 or 7 steps), then each change reads what it
// needs; an exhausted input reads zeros. The properties checked:
//   - loading either succeeds or throws galore::checkpoint_error, nothing else;
//   - an accepted checkpoint saves back byte for byte (nothing was dropped or
//     reinterpreted), and one more training step runs on the loaded state (under
//     the sanitizers, this catches counters or gaps that overflow).
// fuzz_checkpoint_values.cpp drives it from libFuzzer; test_checkpoint drives it
// from a fixed-seed generator on every ctest run.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "../support/checkpoint_fixtures.hpp"

namespace galore_fuzz {

using galore_test::FacadeKind;
using galore_test::Field;
using galore_test::Image;

// Reads the program; past its end every read is zero.
class Program {
 public:
  Program(const std::uint8_t* data, std::size_t size) : p_(data), n_(size) {}
  std::uint8_t u8() { return i_ < n_ ? p_[i_++] : 0; }
  std::uint16_t u16() {
    const std::uint16_t lo = u8();
    return static_cast<std::uint16_t>(lo | u8() << 8);
  }
  std::uint32_t u32() {
    const std::uint32_t lo = u16();
    return lo | static_cast<std::uint32_t>(u16()) << 16;
  }
  std::uint64_t u64() {
    const std::uint64_t lo = u32();
    return lo | static_cast<std::uint64_t>(u32()) << 32;
  }
  std::size_t below(std::size_t n) { return n == 0 ? 0 : static_cast<std::size_t>(u32() % n); }
  bool done() const { return i_ >= n_; }

 private:
  const std::uint8_t* p_;
  std::size_t n_, i_ = 0;
};

struct Outcome {
  bool accepted = false;
  bool bad = false;         // a property failed: `message` says which
  std::string message;
  std::string changes;      // what the program changed, one line each
  std::string input;        // the checkpoint that was loaded
};

namespace detail {

// old * mul + add in two's complement (no signed overflow).
inline std::int64_t wrap(std::int64_t old, std::uint64_t mul, std::uint64_t add) {
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(old) * mul + add);
}

inline std::int64_t interesting_i64(Program& p, std::int64_t old) {
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  const std::int64_t table[] = {0,
                                1,
                                -1,
                                2,
                                3,
                                7,
                                16,
                                64,
                                256,
                                std::int64_t{1} << 31,
                                std::int64_t{1} << 32,
                                std::int64_t{1} << 40,
                                (std::int64_t{1} << 61) + 1,
                                (std::int64_t{1} << 62) - 1,
                                std::int64_t{1} << 62,
                                (std::int64_t{1} << 62) + 1,
                                kMax,
                                kMax - 1,
                                std::numeric_limits<std::int64_t>::min(),
                                wrap(old, 1, 1),
                                wrap(old, 1, ~std::uint64_t{0}),
                                wrap(old, 2, 0),
                                wrap(old, ~std::uint64_t{0}, 0)};
  const std::size_t n = sizeof table / sizeof table[0];
  const std::size_t k = p.below(n + 1);
  return k < n ? table[k] : static_cast<std::int64_t>(p.u64());
}

inline float interesting_f32(Program& p, float old) {
  const float table[] = {0.0f,
                         -0.0f,
                         1.0f,
                         -1.0f,
                         std::nextafter(1.0f, 2.0f),
                         std::nextafter(-1.0f, -2.0f),
                         2.0f,
                         0.5f,
                         1e-30f,
                         1e30f,
                         std::numeric_limits<float>::max(),
                         -std::numeric_limits<float>::max(),
                         std::numeric_limits<float>::max() / 15.0f,
                         std::numeric_limits<float>::max() / 255.0f,
                         std::numeric_limits<float>::min(),
                         std::numeric_limits<float>::denorm_min(),
                         std::numeric_limits<float>::infinity(),
                         -std::numeric_limits<float>::infinity(),
                         std::numeric_limits<float>::quiet_NaN(),
                         -std::numeric_limits<float>::quiet_NaN(),
                         -old,
                         old * 1e20f,
                         old * 1e-20f};
  const std::size_t n = sizeof table / sizeof table[0];
  const std::size_t k = p.below(n + 1);
  if (k < n) return table[k];
  const std::uint32_t bits = p.u32();
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline double interesting_f64(Program& p, double old) {
  const double table[] = {0.0,
                          -0.0,
                          1.0,
                          -1.0,
                          1e300,
                          std::numeric_limits<double>::max(),
                          std::numeric_limits<double>::denorm_min(),
                          std::numeric_limits<double>::infinity(),
                          -std::numeric_limits<double>::infinity(),
                          std::numeric_limits<double>::quiet_NaN(),
                          -old,
                          old * 2.0};
  const std::size_t n = sizeof table / sizeof table[0];
  const std::size_t k = p.below(n + 1);
  if (k < n) return table[k];
  const std::uint64_t bits = p.u64();
  double d;
  std::memcpy(&d, &bits, 8);
  return d;
}

inline std::uint16_t interesting_bf16(Program& p) {
  const std::uint16_t table[] = {0x0000, 0x8000, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x0001};
  const std::size_t n = sizeof table / sizeof table[0];
  const std::size_t k = p.below(n + 1);
  return k < n ? table[k] : p.u16();
}

inline std::uint64_t interesting_count(Program& p, std::uint64_t old) {
  const std::uint64_t table[] = {0, 1, old + 1, old - 1, old * 2, old / 2, std::uint64_t{1} << 32,
                                 std::uint64_t{1} << 62, ~std::uint64_t{0}};
  const std::size_t n = sizeof table / sizeof table[0];
  const std::size_t k = p.below(n + 1);
  return k < n ? table[k] : p.u64();
}

template <class T>
T read(const std::string& s, std::size_t at) {
  T v{};
  if (at + sizeof(T) <= s.size()) std::memcpy(&v, s.data() + at, sizeof(T));
  return v;
}
template <class T>
void write(std::string& s, std::size_t at, T v) {
  if (at + sizeof(T) <= s.size()) std::memcpy(&s[at], &v, sizeof(T));
}

// Sets one field (or one element of an array field) to a value chosen by the program.
inline void mutate_field(Program& p, Image& im, const Field& f, std::string& log) {
  std::string& s = im.sections[f.section].payload;
  using T = Field::Type;
  log += "field " + f.name + " of section " + std::to_string(f.section) + " at " + std::to_string(f.offset);
  const std::string before = s;
  struct Describe {  // appends the bytes that changed when the change is done
    const std::string& a;
    const std::string& b;
    std::string& log;
    ~Describe() {
      std::size_t i = 0;
      while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
      log += a == b ? ": unchanged\n" : ": bytes from " + std::to_string(i) + " changed (size " + std::to_string(a.size()) + " -> " + std::to_string(b.size()) + ")\n";
    }
  } describe{before, s, log};
  if (f.type == T::Str || f.is_array()) {
    const std::size_t what = p.below(4);
    if (what == 0 || f.count == 0) {  // the count alone: the payload no longer lines up
      write<std::uint64_t>(s, f.offset, interesting_count(p, f.count));
      return;
    }
    if (f.type == T::Str) {  // a string replaced, its length kept consistent
      static const char* const strings[] = {"", "(nothing)", "p0", "p1", "d2", "facade", "GaLoreOptimizer", "x"};
      const std::string v = strings[p.below(sizeof strings / sizeof strings[0])];
      std::string bytes(8, '\0');
      const std::uint64_t n = v.size();
      std::memcpy(&bytes[0], &n, 8);
      s.replace(f.offset, 8 + static_cast<std::size_t>(f.count), bytes + v);
      return;
    }
    if (what == 1) {  // elements added or removed, the count kept consistent
      const std::size_t k = 1 + p.below(4);
      const std::size_t size = f.element_size();
      const std::size_t end = f.element_offset(f.count);
      std::uint64_t n = f.count;
      if (p.u8() & 1) {
        s.insert(end, std::string(k * size, static_cast<char>(p.u8())));
        n += k;
      } else {
        const std::size_t drop = std::min<std::size_t>(k, static_cast<std::size_t>(f.count));
        s.erase(end - drop * size, drop * size);
        n -= drop;
      }
      write<std::uint64_t>(s, f.offset, n);
      return;
    }
    const std::size_t at = f.element_offset(p.below(static_cast<std::size_t>(f.count)));
    switch (f.type) {
      case T::ArrayU8: write<std::uint8_t>(s, at, p.u8()); break;
      case T::ArrayU16: write<std::uint16_t>(s, at, interesting_bf16(p)); break;
      default: write<float>(s, at, interesting_f32(p, read<float>(s, at))); break;
    }
    return;
  }
  switch (f.type) {
    case T::U8: write<std::uint8_t>(s, f.offset, p.u8()); break;
    case T::Bool: write<std::uint8_t>(s, f.offset, static_cast<std::uint8_t>(p.below(3))); break;
    case T::U32: write<std::uint32_t>(s, f.offset, p.below(3) == 0 ? p.u32() : static_cast<std::uint32_t>(p.below(8))); break;
    case T::U64: write<std::uint64_t>(s, f.offset, interesting_count(p, read<std::uint64_t>(s, f.offset))); break;
    case T::I64: write<std::int64_t>(s, f.offset, interesting_i64(p, read<std::int64_t>(s, f.offset))); break;
    case T::F32: write<float>(s, f.offset, interesting_f32(p, read<float>(s, f.offset))); break;
    case T::F64: write<double>(s, f.offset, interesting_f64(p, read<double>(s, f.offset))); break;
    default: break;
  }
}

// One change chosen by the program.
inline void mutate(Program& p, Image& im, const galore_test::Layout& layout, std::string& log) {
  const std::uint8_t op = static_cast<std::uint8_t>(p.u8() % 16);
  if (op < 10) {  // a field of the format: the common case
    const std::vector<Field> fs = galore_test::fields(im, layout);
    if (!fs.empty()) mutate_field(p, im, fs[p.below(fs.size())], log);
    return;
  }
  log += "structural change " + std::to_string(op) + "\n";
  const std::size_t n = im.sections.size();
  switch (op) {
    case 10: {  // raw bytes of a payload overwritten
      if (n == 0) return;
      std::string& s = im.sections[p.below(n)].payload;
      if (s.empty()) return;
      const std::size_t at = p.below(s.size());
      s[at] = static_cast<char>(p.u8());
      return;
    }
    case 11: {  // bytes inserted into or erased from a payload
      if (n == 0) return;
      std::string& s = im.sections[p.below(n)].payload;
      const std::size_t at = p.below(s.size() + 1);
      const std::size_t k = 1 + p.below(16);
      if (p.u8() & 1) s.insert(at, std::string(k, static_cast<char>(p.u8())));
      else s.erase(at, k);
      return;
    }
    case 12: {  // a section dropped, duplicated or swapped with another
      if (n == 0) return;
      const std::size_t i = p.below(n), j = p.below(n);
      switch (p.below(3)) {
        case 0: im.sections.erase(im.sections.begin() + static_cast<std::ptrdiff_t>(i)); break;
        case 1: im.sections.insert(im.sections.begin() + static_cast<std::ptrdiff_t>(j), im.sections[i]); break;
        default: std::swap(im.sections[i], im.sections[j]); break;
      }
      return;
    }
    case 13: {  // a section's tag changed
      if (n == 0) return;
      const std::uint32_t tags[] = {galore::checkpoint::kConfig, galore::checkpoint::kLayer,
                                    galore::checkpoint::kWeights, galore::checkpoint::kEnd, p.u32()};
      im.sections[p.below(n)].tag = tags[p.below(5)];
      return;
    }
    case 14: {  // the header's section count (its checksum is recomputed)
      const std::uint32_t old = im.header_u32(28);
      const std::uint32_t values[] = {0, old - 1, old + 1, old + 2, 0xFFFFFFFFu, p.u32()};
      im.set_section_count(values[p.below(6)]);
      return;
    }
    default: {  // bytes or a whole section after the end section
      if ((p.u8() & 1) && n > 0) {
        im.trailing += Image::section_bytes(im.sections[p.below(n)]);
      } else {
        im.trailing += std::string(1 + p.below(16), static_cast<char>(p.u8()));
      }
      return;
    }
  }
}

}  // namespace detail

// A valid checkpoint of a facade kind after `steps` steps, computed once.
inline const std::string& base_checkpoint(FacadeKind kind, int steps) {
  static std::map<std::pair<int, int>, std::string> cache;
  std::string& s = cache[{static_cast<int>(kind), steps}];
  if (s.empty()) {
    galore_test::Fixture f(kind);
    for (int t = 0; t < steps; ++t) f.step(t);
    s = f.save();
  }
  return s;
}

// Runs one program: builds the changed checkpoint, loads it into a fixture of
// its kind (one per kind, reused across calls) and checks the properties.
inline Outcome run_value_mutation(const std::uint8_t* data, std::size_t size) {
  Program p(data, size);
  const auto kind = static_cast<FacadeKind>(p.u8() % static_cast<std::uint8_t>(FacadeKind::Count));
  static const int kSteps[] = {0, 2, 7};
  const int steps = kSteps[p.u8() % 3];
  Image im = Image::parse(base_checkpoint(kind, steps));
  const galore_test::Layout layout = galore_test::layout_of(kind);
  const int changes = 1 + p.u8() % 4;
  Outcome out;
  out.changes = std::string(galore_test::name(kind)) + " after " + std::to_string(steps) + " steps\n";
  for (int c = 0; c < changes; ++c) detail::mutate(p, im, layout, out.changes);
  if (std::getenv("GALORE_FUZZ_VERBOSE")) std::fprintf(stderr, "%s", out.changes.c_str());

  static galore_test::Fixture* fixtures[static_cast<int>(FacadeKind::Count)] = {};
  galore_test::Fixture*& f = fixtures[static_cast<int>(kind)];
  if (!f) f = new galore_test::Fixture(kind);  // registered layers and weights, reused across inputs

  out.input = im.bytes();
  try {
    f->load(out.input);
    out.accepted = true;
  } catch (const galore::checkpoint_error&) {
    return out;
  } catch (const std::exception& e) {
    out.bad = true;
    out.message = std::string("loading threw something other than checkpoint_error: ") + e.what();
    return out;
  } catch (...) {
    out.bad = true;
    out.message = "loading threw something other than an exception";
    return out;
  }
  try {
    if (f->save() != out.input) {
      out.bad = true;
      out.message = "an accepted checkpoint does not save back to the same bytes";
      return out;
    }
    f->step_float(0);  // the loaded state must carry on training
  } catch (const std::exception& e) {
    out.bad = true;
    out.message = std::string("after an accepted load: ") + e.what();
  }
  return out;
}

}  // namespace galore_fuzz
