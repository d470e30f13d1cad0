// Test support: small optimizers of every facade kind with a fixed set of
// layers and weights, shared by the checkpoint tests (which write the fuzzer's
// seed corpus) and the checkpoint fuzzer (which loads into them).
#pragma once

#include <galore/galore.hpp>
#include <memory>
#include <random>
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
// layer 2 (1 x 64) is dense; the 8-bit kinds' 96 x 16 moments take the 8-bit path.
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
    switch (k) {
      case FacadeKind::GaLore:
      case FacadeKind::AdamW: galore = std::make_unique<GaLoreAdamW>(proj, LowRankAdam<>(adam), schedule::FixedGap{3}); break;
      case FacadeKind::GaLore8bit:
        galore8 = std::make_unique<GaLoreAdamW8bit>(proj, LowRankAdam<state::Blockwise8bit>(adam), schedule::FixedGap{3});
        break;
      default:
        qgalore = std::make_unique<QGaLoreAdamW8bit>(proj, LowRankAdam<state::Blockwise8bit>(adam),
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

}  // namespace galore_test
