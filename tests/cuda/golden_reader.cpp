#include "golden_reader.hpp"

#include <stdexcept>

#include "support/golden.hpp"

namespace galore_test {

namespace {
std::vector<std::vector<float>> steps_of(const NpyArray& a, const std::string& what) {
  if (a.shape.size() != 3 || a.dtype != "<f4") throw std::runtime_error(what + ": expected a 3-D float32 array");
  const std::size_t per = static_cast<std::size_t>(a.shape[1] * a.shape[2]);
  std::vector<std::vector<float>> out;
  for (long t = 0; t < a.shape[0]; ++t)
    out.emplace_back(a.f32.begin() + static_cast<long>(per) * t, a.f32.begin() + static_cast<long>(per) * (t + 1));
  return out;
}
std::vector<float> series_of(const NpyArray& a, long steps, const std::string& what) {
  if (a.dtype != "<f4" || static_cast<long>(a.f32.size()) != steps)
    throw std::runtime_error(what + ": expected " + std::to_string(steps) + " float32 values");
  return a.f32;
}
}  // namespace

std::string golden_folder() { return golden_dir(); }

std::vector<GoldenAdamW> golden_adamw_cases() {
  std::vector<GoldenAdamW> out;
  for (const GoldenCase& c : golden_cases("galore_adamw")) {
    GoldenAdamW g;
    g.name = c.name;
    g.m = c.integer("m");
    g.n = c.integer("n");
    g.rank = c.integer("rank");
    g.gap = c.integer("update_proj_gap");
    g.steps = c.integer("steps");
    g.proj_type = c.str("proj_type");
    g.scale = c.num("scale");
    g.lr = c.num("lr");
    g.beta1 = c.num("beta1");
    g.beta2 = c.num("beta2");
    g.eps = c.num("eps");
    g.weight_decay = c.num("weight_decay");
    g.correct_bias = c.integer("correct_bias") != 0;
    const NpyArray w0 = c.array("W0.npy");
    if (w0.shape.size() != 2 || w0.shape[0] != g.m || w0.shape[1] != g.n || w0.dtype != "<f4")
      throw std::runtime_error(c.name + "/W0.npy: expected a " + std::to_string(g.m) + "x" + std::to_string(g.n) +
                               " float32 matrix");
    g.W0 = w0.f32;
    g.G = steps_of(c.array("G.npy"), c.name + "/G.npy");
    g.W = steps_of(c.array("W.npy"), c.name + "/W.npy");
    g.ortho = steps_of(c.array("ortho.npy"), c.name + "/ortho.npy");
    if (c.has("ortho_right.npy")) g.ortho_right = steps_of(c.array("ortho_right.npy"), c.name + "/ortho_right.npy");
    if (static_cast<long>(g.G.size()) != g.steps || g.W.size() != g.G.size() || g.ortho.size() != g.G.size())
      throw std::runtime_error(c.name + ": the arrays do not hold `steps` steps");
    out.push_back(std::move(g));
  }
  return out;
}

std::vector<GoldenQGaLore> golden_qgalore_cases() {
  std::vector<GoldenQGaLore> out;
  for (const GoldenCase& c : golden_cases("qgalore_projector")) {
    GoldenQGaLore g;
    g.name = c.name;
    g.m = c.integer("m");
    g.n = c.integer("n");
    g.rank = c.integer("rank");
    g.gap = c.integer("update_proj_gap");
    g.steps = c.integer("steps");
    g.bits = c.integer("n_bit");
    g.group_size = c.integer("group_size");
    g.queue_size = c.integer("queue_size");
    g.cos_threshold = c.num("cos_threshold");
    g.gamma = c.num("gamma_proj");
    g.scale = c.num("scale");
    g.G = steps_of(c.array("G.npy"), c.name + "/G.npy");
    g.ortho_float = steps_of(c.array("ortho_float.npy"), c.name + "/ortho_float.npy");
    g.ortho_dequant = steps_of(c.array("ortho_dequant.npy"), c.name + "/ortho_dequant.npy");
    g.low_rank = steps_of(c.array("low_rank_grad.npy"), c.name + "/low_rank_grad.npy");
    g.gaps = series_of(c.array("update_proj_gap.npy"), g.steps, c.name + "/update_proj_gap.npy");
    g.svd_counts = series_of(c.array("svd_count.npy"), g.steps, c.name + "/svd_count.npy");
    g.cosines = series_of(c.array("cosine.npy"), g.steps, c.name + "/cosine.npy");
    if (static_cast<long>(g.G.size()) != g.steps || g.ortho_float.size() != g.G.size() ||
        g.ortho_dequant.size() != g.G.size() || g.low_rank.size() != g.G.size())
      throw std::runtime_error(c.name + ": the arrays do not hold `steps` steps");
    out.push_back(std::move(g));
  }
  return out;
}

}  // namespace galore_test
