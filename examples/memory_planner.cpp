// Prints the memory of training the LLaMA configurations of the GaLore papers
// under AdamW, 8-bit Adam, GaLore, 8-bit GaLore and Q-GaLore, with and without
// per-layer updates, from galore's own formulas (no allocation), and compares
// weights + optimizer state with the figures the papers publish.
//
//   memory_planner [--model llama60m|...|llama7b|all] [--rank R] [--states bf16|fp32]
//
// Ranks default to the papers' (128, 256, 256, 512, 1024). bf16 states and
// projections match the papers' accounting ("BF16 format"); fp32 is what
// galore_torch holds when it trains in float32.
#include <galore/galore.hpp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

using namespace galore;
using namespace galore::memory;

namespace {

// The papers' published estimates of weights + optimizer states, in "G":
// GaLore (arXiv 2403.03507) Table 2 / Table 3, Q-GaLore (arXiv 2407.08296) Table 1 / Table 2.
const std::map<std::string, std::map<std::string, double>> kPaper = {
    {"llama60m", {{"adamw", 0.36}, {"galore", 0.24}, {"qgalore", 0.18}}},
    {"llama130m", {{"adamw", 0.76}, {"galore", 0.52}, {"qgalore", 0.39}}},
    {"llama350m", {{"adamw", 2.06}, {"galore", 1.22}, {"qgalore", 0.88}}},
    {"llama1b", {{"adamw", 7.80}, {"galore", 4.38}, {"qgalore", 3.08}}},
    {"llama7b", {{"adamw8bit", 26.0}, {"galore8bit", 18.0}, {"qgalore", 15.0}}},
};

double gb(std::size_t b) { return static_cast<double>(b) / 1e9; }

template <class State, class Quant>
using Galore = GaLoreOptimizer<Projector<svd::Exact, Quant, schedule::FixedGap>, LowRankAdam<State>>;

struct Row {
  std::string method;
  Footprint f;
};

template <class Opt>
Footprint run(const Opt& opt, const std::vector<Parameter>& params, PlanOptions po, bool all_dense, bool per_layer) {
  po.per_layer_updates = per_layer;
  return plan(opt, params, po, all_dense);
}

template <class State, class Quant>
std::vector<Row> rows_for(const LlamaConfig& c, Index rank, bool per_layer) {
  const auto params = llama_parameters(c);
  const ProjectorOptions proj{rank, ProjectionType::Std, 0.25f};
  PlanOptions bf16;
  PlanOptions int8 = bf16;
  int8.projected_weights = WeightFormat::Int8;
  std::vector<Row> rows;
  rows.push_back({"adamw", run(Galore<State, Quant>(proj), params, bf16, true, per_layer)});
  rows.push_back({"adamw8bit", run(Galore<state::Blockwise8bit, Quant>(proj), params, bf16, true, per_layer)});
  rows.push_back({"galore", run(Galore<State, Quant>(proj), params, bf16, false, per_layer)});
  rows.push_back({"galore8bit", run(Galore<state::Blockwise8bit, Quant>(proj), params, bf16, false, per_layer)});
  rows.push_back({"qgalore", run(QGaLoreAdamW8bit(proj, LowRankAdam<state::Blockwise8bit>(), schedule::Lazy{},
                                                  svd::Exact{}, quant::Int4{256}),
                                 params, int8, false, per_layer)});
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model = "all", states = "bf16";
  Index rank = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--model" && i + 1 < argc) model = argv[++i];
    else if (a == "--rank" && i + 1 < argc) rank = std::atol(argv[++i]);
    else if (a == "--states" && i + 1 < argc) states = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--model llama60m|llama130m|llama350m|llama1b|llama7b|all] [--rank R] "
                           "[--states bf16|fp32]\n", argv[0]);
      return 2;
    }
  }
  if (states != "bf16" && states != "fp32") {
    std::fprintf(stderr, "--states must be bf16 or fp32\n");
    return 2;
  }
  try {
    for (const LlamaConfig& c : llama_presets()) {
      if (model != "all" && model != c.name) continue;
      const Index r = rank > 0 ? rank : c.rank;
      Index n_params = 0;
      for (const Parameter& p : llama_parameters(c)) n_params += p.shape.size();
      std::printf("\n%s: %.3f B parameters, rank %ld, %s Adam states and projections, bf16 weights and gradients "
                  "(INT8 projected weights for Q-GaLore), GB = 1e9 bytes\n",
                  c.name.c_str(), n_params / 1e9, static_cast<long>(r), states.c_str());
      std::printf("%-11s %-9s %8s %9s %9s %11s %8s | %9s %9s %7s\n", "method", "per-layer", "weights", "gradients",
                  "opt.state", "projections", "total", "W+state", "paper", "diff");
      for (bool per_layer : {false, true}) {
        const auto rows = states == "bf16" ? rows_for<state::BFloat16, quant::BFloat16>(c, r, per_layer)
                                           : rows_for<state::Float32, quant::None>(c, r, per_layer);
        for (const Row& row : rows) {
          const Footprint& f = row.f;
          const double ws = gb(f.weights + f.optimizer_state + f.projections);
          std::printf("%-11s %-9s %8.3f %9.3f %9.3f %11.3f %8.3f | %9.3f", row.method.c_str(), per_layer ? "yes" : "no",
                      gb(f.weights), gb(f.gradients), gb(f.optimizer_state), gb(f.projections), gb(f.total()), ws);
          const auto m = kPaper.find(c.name);
          const auto p = m == kPaper.end() ? m->second.end() : m->second.find(row.method);
          if (!per_layer && m != kPaper.end() && p != m->second.end())
            std::printf(" %9.2f %+6.1f%%\n", p->second, 100.0 * (ws - p->second) / p->second);
          else
            std::printf(" %9s %7s\n", "", "");
        }
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
