// Test support: a strict reader for the .npy files of the golden cases
// (float32 '<f4' or uint8 '|u1', C order). Anything else is an error, never a guess.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace galore_test {

struct NpyArray {
  std::vector<std::int64_t> shape;
  std::string dtype;                 // "<f4" or "|u1"
  std::vector<float> f32;            // filled for <f4
  std::vector<std::uint8_t> u8;      // filled for |u1
  std::int64_t size() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

inline std::string npy_field(const std::string& header, const std::string& key) {
  const auto k = header.find("'" + key + "'");
  if (k == std::string::npos) throw std::runtime_error("npy header lacks '" + key + "'");
  auto p = header.find(':', k);
  if (p == std::string::npos) throw std::runtime_error("npy header malformed near '" + key + "'");
  ++p;
  while (p < header.size() && header[p] == ' ') ++p;
  if (header[p] == '\'') {
    const auto e = header.find('\'', p + 1);
    return header.substr(p + 1, e - p - 1);
  }
  if (header[p] == '(') {
    const auto e = header.find(')', p);
    return header.substr(p + 1, e - p - 1);
  }
  const auto e = header.find_first_of(",}", p);
  return header.substr(p, e - p);
}

inline NpyArray load_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[6];
  in.read(magic, 6);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not an .npy file");
  unsigned char ver[2];
  in.read(reinterpret_cast<char*>(ver), 2);
  std::uint32_t hlen = 0;
  if (ver[0] == 1) {
    unsigned char b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    hlen = b[0] | (b[1] << 8);
  } else if (ver[0] == 2 || ver[0] == 3) {
    unsigned char b[4];
    in.read(reinterpret_cast<char*>(b), 4);
    hlen = b[0] | (b[1] << 8) | (b[2] << 16) | (std::uint32_t(b[3]) << 24);
  } else {
    throw std::runtime_error(path + ": unsupported .npy version " + std::to_string(ver[0]));
  }
  if (!in || hlen > (1u << 20)) throw std::runtime_error(path + ": bad .npy header length");
  std::string header(hlen, '\0');
  in.read(header.data(), hlen);
  if (!in) throw std::runtime_error(path + ": truncated .npy header");

  NpyArray a;
  a.dtype = npy_field(header, "descr");
  if (npy_field(header, "fortran_order") != "False")
    throw std::runtime_error(path + ": Fortran-ordered arrays are not supported");
  const std::string shape = npy_field(header, "shape");
  std::size_t p = 0;
  while (p < shape.size()) {
    while (p < shape.size() && (shape[p] == ' ' || shape[p] == ',')) ++p;
    if (p >= shape.size()) break;
    std::size_t used = 0;
    a.shape.push_back(std::stoll(shape.substr(p), &used));
    p += used;
  }
  const auto n = static_cast<std::size_t>(a.size());
  if (a.dtype == "<f4") {
    a.f32.resize(n);
    in.read(reinterpret_cast<char*>(a.f32.data()), static_cast<std::streamsize>(n * 4));
  } else if (a.dtype == "|u1") {
    a.u8.resize(n);
    in.read(reinterpret_cast<char*>(a.u8.data()), static_cast<std::streamsize>(n));
  } else {
    throw std::runtime_error(path + ": unsupported dtype " + a.dtype);
  }
  if (!in) throw std::runtime_error(path + ": truncated .npy data");
  return a;
}

}  // namespace galore_test
