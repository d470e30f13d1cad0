// galore: the checkpoint file's framing: header, sections with lengths and CRC32
// checksums, and bounds-checked little-endian readers and writers.
//
//   header  : "GALORECK" | u32 format version | u32 x3 library version | u32 byte-order mark
//             | u32 section count | u32 CRC32 of the header's first 28 bytes
//   section : u32 tag | u64 payload length | u32 CRC32 of the payload | payload
//
// docs/checkpoint.md describes the sections. A reader never trusts a length: a
// section's payload is read from the stream in bounded chunks (so a forged
// length cannot make it allocate more than the input holds), every field read
// from a payload is checked against the bytes left, and element counts are
// checked before anything is sized by them.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <istream>
#include <limits>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "../config.hpp"

namespace galore {

// A checkpoint that cannot be written or read back: I/O failure, truncation, a
// checksum mismatch, an unknown format, or a configuration or layout that does
// not match the optimizer loading it. The message says which.
class checkpoint_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace checkpoint {

inline constexpr char kMagic[8] = {'G', 'A', 'L', 'O', 'R', 'E', 'C', 'K'};
inline constexpr std::uint32_t kFormatVersion = 1;
// Upper bound on any single section payload (1 TiB): beyond it a length is corrupt.
inline constexpr std::uint64_t kMaxSection = std::uint64_t{1} << 40;
// Upper bound on every saved counter (steps, skipped steps, SVD count, schedule
// steps and gaps): 2^62 leaves 2^62 increments of headroom, so no counter loaded
// from a file can overflow a signed 64-bit integer while training continues.
inline constexpr std::int64_t kMaxCounter = std::int64_t{1} << 62;

constexpr std::uint32_t tag(const char (&s)[5]) {
  return static_cast<std::uint32_t>(static_cast<unsigned char>(s[0])) |
         static_cast<std::uint32_t>(static_cast<unsigned char>(s[1])) << 8 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(s[2])) << 16 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(s[3])) << 24;
}

inline std::string tag_name(std::uint32_t t) {
  std::string s(4, ' ');
  for (int i = 0; i < 4; ++i) {
    const char c = static_cast<char>((t >> (8 * i)) & 0xFF);
    s[static_cast<std::size_t>(i)] = (c >= 32 && c < 127) ? c : '?';
  }
  return s;
}

// CRC-32 (IEEE 802.3, reflected, as zlib's crc32).
inline std::uint32_t crc32(const std::uint8_t* data, std::size_t n, std::uint32_t crc = 0) {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

// Appends little-endian values to a payload.
class Writer {
 public:
  template <class T>
  void pod(T v) {
    static_assert(std::is_arithmetic_v<T>, "pod() writes numbers");
    std::uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));  // the library targets little-endian machines (checked at load)
    bytes_.insert(bytes_.end(), b, b + sizeof(T));
  }
  void u8(std::uint8_t v) { pod(v); }
  void u32(std::uint32_t v) { pod(v); }
  void u64(std::uint64_t v) { pod(v); }
  void i64(std::int64_t v) { pod(v); }
  void f32(float v) { pod(v); }
  void f64(double v) { pod(v); }
  void boolean(bool v) { u8(v ? 1 : 0); }
  void str(const std::string& s) {
    u64(s.size());
    raw(s.data(), s.size());
  }
  void raw(const void* p, std::size_t n) {
    const auto* b = static_cast<const std::uint8_t*>(p);
    bytes_.insert(bytes_.end(), b, b + n);
  }
  template <class T>
  void array(const T* p, std::size_t n) {
    u64(n);
    raw(p, n * sizeof(T));
  }
  const std::vector<std::uint8_t>& bytes() const { return bytes_; }
  std::vector<std::uint8_t>& bytes() { return bytes_; }

 private:
  std::vector<std::uint8_t> bytes_;
};

// Reads a payload; every read is checked against the bytes left.
class Reader {
 public:
  Reader(const std::uint8_t* data, std::size_t n, std::string where)
      : p_(data), n_(n), where_(std::move(where)) {}

  template <class T>
  T pod() {
    need(sizeof(T), "a number");
    T v;
    std::memcpy(&v, p_ + off_, sizeof(T));
    off_ += sizeof(T);
    return v;
  }
  std::uint8_t u8() { return pod<std::uint8_t>(); }
  std::uint32_t u32() { return pod<std::uint32_t>(); }
  std::uint64_t u64() { return pod<std::uint64_t>(); }
  std::int64_t i64() { return pod<std::int64_t>(); }
  float f32() { return pod<float>(); }
  double f64() { return pod<double>(); }
  bool boolean() {
    const std::uint8_t b = u8();
    if (b > 1) fail("a boolean holds " + std::to_string(b));
    return b == 1;
  }
  std::string str() {
    const std::uint64_t n = count(1, "a string");
    std::string s(reinterpret_cast<const char*>(p_ + off_), static_cast<std::size_t>(n));
    off_ += static_cast<std::size_t>(n);
    return s;
  }
  // An element count whose elements (each `size` bytes) must fit in what is left.
  std::uint64_t count(std::size_t size, const char* what) {
    const std::uint64_t n = u64();
    if (size != 0 && n > (n_ - off_) / size)
      fail(std::string(what) + " claims " + std::to_string(n) + " elements but only " +
           std::to_string(n_ - off_) + " bytes are left");
    return n;
  }
  template <class T>
  std::vector<T> array(const char* what) {
    const std::uint64_t n = count(sizeof(T), what);
    std::vector<T> v(static_cast<std::size_t>(n));
    if (n > 0) std::memcpy(v.data(), p_ + off_, static_cast<std::size_t>(n) * sizeof(T));
    off_ += static_cast<std::size_t>(n) * sizeof(T);
    return v;
  }
  // Reads exactly n elements into out (n known from elsewhere, e.g. a shape).
  template <class T>
  void exactly(T* out, std::uint64_t n, const char* what) {
    const std::uint64_t stored = count(sizeof(T), what);
    if (stored != n) fail(std::string(what) + " holds " + std::to_string(stored) + " elements, expected " + std::to_string(n));
    if (n > 0) std::memcpy(out, p_ + off_, static_cast<std::size_t>(n) * sizeof(T));
    off_ += static_cast<std::size_t>(n) * sizeof(T);
  }
  // Checks, without consuming anything, that the next array holds exactly n
  // elements of `size` bytes and that all of them are in the payload. Called
  // before allocating for the array, so that a size taken from elsewhere (a
  // shape) never allocates more than the input holds.
  void expect_array(std::uint64_t n, std::size_t size, const char* what) const {
    if (n_ - off_ < sizeof(std::uint64_t)) fail(std::string("truncated while reading ") + what);
    std::uint64_t stored;
    std::memcpy(&stored, p_ + off_, sizeof stored);
    if (stored != n) fail(std::string(what) + " holds " + std::to_string(stored) + " elements, expected " + std::to_string(n));
    const std::size_t rest = n_ - off_ - sizeof(std::uint64_t);
    if (size != 0 && n > rest / size)
      fail(std::string(what) + " claims " + std::to_string(n) + " elements but only " + std::to_string(rest) +
           " bytes are left");
  }
  // Fails unless at least `bytes` bytes are left (checked before allocating
  // several arrays at once).
  void expect_left(std::uint64_t bytes, const char* what) const {
    if (bytes > n_ - off_)
      fail(std::string(what) + " needs " + std::to_string(bytes) + " bytes but only " + std::to_string(n_ - off_) +
           " are left");
  }
  std::size_t left() const { return n_ - off_; }
  bool done() const { return off_ == n_; }
  void expect_done() {
    if (!done()) fail(std::to_string(n_ - off_) + " unexpected bytes at the end");
  }
  [[noreturn]] void fail(const std::string& msg) const {
    throw checkpoint_error("galore checkpoint: " + where_ + ": " + msg);
  }

 private:
  void need(std::size_t k, const char* what) {
    if (n_ - off_ < k) fail(std::string("truncated while reading ") + what);
  }
  const std::uint8_t* p_;
  std::size_t n_, off_ = 0;
  std::string where_;
};

// Section framing on a stream.
inline void write_section(std::ostream& os, std::uint32_t t, const std::vector<std::uint8_t>& payload) {
  Writer h;
  h.u32(t);
  h.u64(payload.size());
  h.u32(crc32(payload.data(), payload.size()));
  os.write(reinterpret_cast<const char*>(h.bytes().data()), static_cast<std::streamsize>(h.bytes().size()));
  os.write(reinterpret_cast<const char*>(payload.data()), static_cast<std::streamsize>(payload.size()));
  if (!os) throw checkpoint_error("galore checkpoint: writing section " + tag_name(t) + " failed");
}

inline void read_exact(std::istream& is, std::uint8_t* out, std::size_t n, const std::string& what) {
  is.read(reinterpret_cast<char*>(out), static_cast<std::streamsize>(n));
  if (static_cast<std::size_t>(is.gcount()) != n)
    throw checkpoint_error("galore checkpoint: the input ends inside " + what + " (truncated file?)");
}

// A checkpoint ends with its end section: anything after it is an error.
inline void expect_end_of_input(std::istream& is) {
  if (is.peek() != std::istream::traits_type::eof())
    throw checkpoint_error("galore checkpoint: bytes follow the end section (a concatenated or damaged file?)");
}

struct Section {
  std::uint32_t tag = 0;
  std::vector<std::uint8_t> payload;
};

// Reads one section and checks its CRC. The payload grows with what the stream
// actually delivers, 1 MiB at a time, so a corrupt length fails on truncation
// instead of allocating it.
inline Section read_section(std::istream& is, std::size_t index) {
  const std::string where = "section " + std::to_string(index);
  std::uint8_t head[16];
  read_exact(is, head, sizeof head, where + " header");
  Reader h(head, sizeof head, where);
  Section s;
  s.tag = h.u32();
  const std::uint64_t length = h.u64();
  const std::uint32_t crc = h.u32();
  if (length > kMaxSection)
    throw checkpoint_error("galore checkpoint: " + where + " (" + tag_name(s.tag) + ") claims an impossible length " +
                           std::to_string(length));
  constexpr std::size_t kChunk = std::size_t{1} << 20;
  std::uint64_t got = 0;
  while (got < length) {
    const std::size_t k = static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, length - got));
    s.payload.resize(static_cast<std::size_t>(got) + k);
    read_exact(is, s.payload.data() + got, k, where + " (" + tag_name(s.tag) + ")");
    got += k;
  }
  if (crc32(s.payload.data(), s.payload.size()) != crc)
    throw checkpoint_error("galore checkpoint: " + where + " (" + tag_name(s.tag) +
                           ") fails its checksum: the file is corrupt");
  return s;
}

}  // namespace checkpoint
}  // namespace galore
