// Test support: finding and reading the golden cases produced by the reference
// implementations (../shared/golden/README.md describes the layout).
//
// The folder comes from GALORE_GOLDEN_DIR, else from the folders compiled in as
// GALORE_DEFAULT_GOLDEN_DIRS (../shared/golden beside the checkout, then the
// snapshot in tests/data/golden). A case folder that is present but unreadable
// is an error, never a skip.
#pragma once

#include <Eigen/Core>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "npy.hpp"

namespace galore_test {

namespace fs = std::filesystem;
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

inline std::string golden_dir() {
  if (const char* env = std::getenv("GALORE_GOLDEN_DIR"); env && *env) {
    if (!fs::is_directory(env))
      throw std::runtime_error(std::string("GALORE_GOLDEN_DIR=") + env + " is not a folder");
    return env;
  }
#ifdef GALORE_DEFAULT_GOLDEN_DIRS
  std::stringstream dirs(GALORE_DEFAULT_GOLDEN_DIRS);
  std::string d;
  while (std::getline(dirs, d, '|'))
    if (!d.empty() && fs::is_directory(d)) return d;
#endif
  throw std::runtime_error(
      "no golden folder: set GALORE_GOLDEN_DIR or provide ../shared/golden beside the checkout");
}

struct GoldenCase {
  std::string name;
  fs::path dir;
  std::map<std::string, std::string> meta;

  const std::string& str(const std::string& key) const {
    const auto it = meta.find(key);
    if (it == meta.end()) throw std::runtime_error(name + ": meta.txt lacks '" + key + "'");
    return it->second;
  }
  double num(const std::string& key) const { return std::stod(str(key)); }
  long integer(const std::string& key) const { return std::stol(str(key)); }
  bool has(const std::string& file) const { return fs::exists(dir / file); }

  NpyArray array(const std::string& file) const { return load_npy((dir / file).string()); }

  // A 2-D array as a row-major matrix.
  RowMatrix matrix(const std::string& file) const {
    const NpyArray a = array(file);
    if (a.shape.size() != 2 || a.dtype != "<f4")
      throw std::runtime_error(name + "/" + file + ": expected a 2-D float32 array");
    return Eigen::Map<const RowMatrix>(a.f32.data(), a.shape[0], a.shape[1]);
  }
};

// Slice t of a 3-D float32 array (steps x rows x cols).
inline RowMatrix slice(const NpyArray& a, long t) {
  if (a.shape.size() != 3 || a.dtype != "<f4") throw std::runtime_error("expected a 3-D float32 array");
  if (t < 0 || t >= a.shape[0]) throw std::runtime_error("slice index out of range");
  const auto per = a.shape[1] * a.shape[2];
  return Eigen::Map<const RowMatrix>(a.f32.data() + t * per, a.shape[1], a.shape[2]);
}

inline std::map<std::string, std::string> read_meta(const fs::path& file) {
  std::ifstream in(file);
  if (!in) throw std::runtime_error("cannot read " + file.string());
  std::map<std::string, std::string> meta;
  std::string line;
  while (std::getline(in, line)) {
    const auto sp = line.find(' ');
    if (sp == std::string::npos) continue;
    meta[line.substr(0, sp)] = line.substr(sp + 1);
  }
  return meta;
}

// Every case of `kind` in the golden folder, sorted by name.
inline std::vector<GoldenCase> golden_cases(const std::string& kind) {
  const fs::path root = golden_dir();
  std::vector<GoldenCase> cases;
  for (const auto& entry : fs::directory_iterator(root)) {
    if (!entry.is_directory()) continue;
    const fs::path meta = entry.path() / "meta.txt";
    if (!fs::exists(meta))
      throw std::runtime_error("golden case folder " + entry.path().string() + " has no meta.txt");
    GoldenCase c{entry.path().filename().string(), entry.path(), read_meta(meta)};
    if (c.str("kind") == kind) cases.push_back(std::move(c));
  }
  std::sort(cases.begin(), cases.end(), [](auto& a, auto& b) { return a.name < b.name; });
  return cases;
}

}  // namespace galore_test
