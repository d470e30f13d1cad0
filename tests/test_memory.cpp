// The memory planner: its predictions equal what the facades hold after a step,
// for every optimizer combination, and the LLaMA parameter lists are right.
#include <doctest/doctest.h>

#include <galore/galore.hpp>

#include "support/random.hpp"

using namespace galore;
using namespace galore::memory;
using galore_test::gaussian;

namespace {

const LlamaConfig kTiny{"tiny", 64, 172, 2, 100, 16};

// Registers every parameter, takes one step each, and returns state_bytes().
template <class Opt>
std::size_t held_after_one_step(Opt& opt, const std::vector<Parameter>& params, bool all_dense,
                                std::size_t* weight_bytes = nullptr) {
  std::size_t weights = 0;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const Shape s = params[i].shape;
    const MatrixF G = gaussian(s.rows, s.cols, 100 + i);
    if (params[i].projected && !all_dense) {
      const LayerId id = opt.add_layer(s, params[i].name);
      if constexpr (std::is_same_v<Opt, QGaLoreAdamW8bit>) {
        QuantizedWeight<8> W(gaussian(s.rows, s.cols, i));
        REQUIRE(opt.step(id, W, G).applied());
        weights += W.bytes();
      } else {
        Matrix<bfloat16> W = gaussian(s.rows, s.cols, i).cast<bfloat16>();
        REQUIRE(opt.step(id, W, G.cast<bfloat16>()).applied());
        weights += 2 * s.size();
      }
    } else {
      const LayerId id = opt.add_dense(s, params[i].name);
      Matrix<bfloat16> W = gaussian(s.rows, s.cols, i).cast<bfloat16>();
      REQUIRE(opt.step(id, W, G.cast<bfloat16>()).applied());
      weights += 2 * s.size();
    }
  }
  if (weight_bytes) *weight_bytes = weights;
  return opt.state_bytes();
}

template <class Opt>
void check_plan(Opt prototype, Opt live, bool all_dense, WeightFormat projected_weights = WeightFormat::BFloat16) {
  const auto params = llama_parameters(kTiny);
  PlanOptions po;
  po.projected_weights = projected_weights;
  const Footprint f = plan(prototype, params, po, all_dense);
  std::size_t weights = 0;
  CHECK(held_after_one_step(live, params, all_dense, &weights) == f.optimizer_state + f.projections);
  CHECK(f.weights == weights);
  std::size_t grads = 0, largest = 0;
  for (const auto& p : params) grads += 2 * p.shape.size(), largest = std::max<std::size_t>(largest, 2 * p.shape.size());
  CHECK(f.gradients == grads);
  po.per_layer_updates = true;
  CHECK(plan(prototype, params, po, all_dense).gradients == largest);
}

}  // namespace

TEST_CASE("LLaMA parameter lists have the papers' sizes") {
  auto count = [](const std::string& name) {
    Index n = 0;
    for (const auto& p : llama_parameters(llama_preset(name))) n += p.shape.size();
    return n;
  };
  CHECK(count("llama60m") == 58073600);
  // 2 x 32000 x 2048 embeddings + 24 x (4 x 2048^2 + 3 x 2048 x 5461) + 49 norms of 2048
  CHECK(count("llama1b") == 1339082752);
  CHECK(count("llama7b") == 6738415616);  // LLaMA-7B's published count
  CHECK(llama_linear_layers(llama_preset("llama1b")).size() == 168);  // 24 blocks x 7 matrices
  CHECK_THROWS_AS(llama_preset("llama13b"), galore::invalid_argument);
}

TEST_CASE("the plan equals what every facade holds after its first step") {
  const ProjectorOptions proj{16, ProjectionType::Std, 0.25f};
  SUBCASE("GaLore-AdamW") { check_plan(GaLoreAdamW(proj), GaLoreAdamW(proj), false); }
  SUBCASE("full-rank AdamW") { check_plan(GaLoreAdamW(proj), GaLoreAdamW(proj), true); }
  SUBCASE("GaLore-AdamW8bit") { check_plan(GaLoreAdamW8bit(proj), GaLoreAdamW8bit(proj), false); }
  SUBCASE("8-bit AdamW") { check_plan(GaLoreAdamW8bit(proj), GaLoreAdamW8bit(proj), true); }
  SUBCASE("bf16 states and basis") {
    using Bf16 = GaLoreOptimizer<Projector<svd::Exact, quant::BFloat16>, LowRankAdam<state::BFloat16>>;
    check_plan(Bf16(proj), Bf16(proj), false);
  }
  SUBCASE("Q-GaLore-AdamW8bit") {
    auto make = [&] {
      return QGaLoreAdamW8bit(proj, LowRankAdam<state::Blockwise8bit>(), schedule::Lazy{}, svd::Exact{},
                              quant::Int4{64});
    };
    check_plan(make(), make(), false, WeightFormat::Int8);
  }
}

TEST_CASE("planning INT8 for parameters that are not projected is an error") {
  PlanOptions po;
  po.weights = WeightFormat::Int8;
  CHECK_THROWS_WITH_AS(plan(GaLoreAdamW(), llama_parameters(kTiny), po), doctest::Contains("only projected"),
                       galore::invalid_argument);
}
