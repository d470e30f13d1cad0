// galore: the parameter lists of the LLaMA configurations the papers train
// (the architectures of GaLore's pre-training runs, arXiv 2403.03507: 60M to 7B), for the memory planner and the benchmarks.
#pragma once

#include <string>
#include <vector>

#include "../types.hpp"

namespace galore::memory {

struct Parameter {
  std::string name;
  Shape shape;
  bool projected = false;  // a linear layer GaLore projects (attention and MLP matrices)
};

struct LlamaConfig {
  std::string name;
  Index hidden = 0, intermediate = 0, layers = 0;
  Index vocab = 32000;
  Index rank = 0;  // the GaLore papers' rank for this size
};

// LLaMA 60M, 130M, 350M, 1B, 7B with the ranks of the GaLore paper (7B: 1024).
inline const std::vector<LlamaConfig>& llama_presets() {
  static const std::vector<LlamaConfig> presets = {
      {"llama60m", 512, 1376, 8, 32000, 128},    {"llama130m", 768, 2048, 12, 32000, 256},
      {"llama350m", 1024, 2736, 24, 32000, 256}, {"llama1b", 2048, 5461, 24, 32000, 512},
      {"llama7b", 4096, 11008, 32, 32000, 1024}};
  return presets;
}

inline const LlamaConfig& llama_preset(const std::string& name) {
  for (const LlamaConfig& c : llama_presets())
    if (c.name == name) return c;
  throw invalid_argument("galore: unknown LLaMA preset '" + name +
                         "'; expected llama60m, llama130m, llama350m, llama1b or llama7b");
}

// The linear layers of the decoder blocks: per block four h x h attention
// matrices, two (inter x h) MLP matrices and one (h x inter), stored as
// PyTorch's nn.Linear weights (out_features x in_features).
inline std::vector<Parameter> llama_linear_layers(const LlamaConfig& c) {
  std::vector<Parameter> p;
  for (Index l = 0; l < c.layers; ++l) {
    const std::string b = "layers." + std::to_string(l) + ".";
    for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"})
      p.push_back({b + "self_attn." + n, {c.hidden, c.hidden}, true});
    p.push_back({b + "mlp.gate_proj", {c.intermediate, c.hidden}, true});
    p.push_back({b + "mlp.up_proj", {c.intermediate, c.hidden}, true});
    p.push_back({b + "mlp.down_proj", {c.hidden, c.intermediate}, true});
  }
  return p;
}

// Every parameter: token embeddings, the linear layers, two RMSNorm weights per
// block, the final norm and the (untied) output head.
inline std::vector<Parameter> llama_parameters(const LlamaConfig& c) {
  std::vector<Parameter> p;
  p.push_back({"embed_tokens", {c.vocab, c.hidden}, false});
  for (Parameter& q : llama_linear_layers(c)) p.push_back(std::move(q));
  for (Index l = 0; l < c.layers; ++l) {
    p.push_back({"layers." + std::to_string(l) + ".input_layernorm", {1, c.hidden}, false});
    p.push_back({"layers." + std::to_string(l) + ".post_attention_layernorm", {1, c.hidden}, false});
  }
  p.push_back({"norm", {1, c.hidden}, false});
  p.push_back({"lm_head", {c.vocab, c.hidden}, false});
  return p;
}

}  // namespace galore::memory
