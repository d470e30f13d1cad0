// The char_lm example's hand-written backward pass against central finite
// differences, in double precision, for every parameter tensor.
#include <doctest/doctest.h>

#include <random>

#include "char_lm/transformer.hpp"

using char_lm::Config;
using char_lm::Index;
using Model = char_lm::Transformer<double>;

TEST_CASE("char_lm backward matches finite differences for every parameter") {
  const Config c{16, 6, 8, 2, 2, 4};  // vocab, context, width, heads, layers, mlp ratio
  Model model(c, 3);
  // Non-trivial norm gains and biases, so their gradients are exercised too.
  std::mt19937_64 gen(5);
  std::normal_distribution<double> noise(0.0, 0.3);
  for (auto& p : model.params())
    if (p.name.find("ln") != std::string::npos || p.name == "head")
      for (Index i = 0; i < p.value.size(); ++i) p.value.data()[i] += noise(gen);

  const Index batch = 2, T = 5;  // T < context: the unused position rows get zero gradient
  std::vector<std::uint8_t> tokens(batch * T), targets(batch * T);
  for (auto& t : tokens) t = static_cast<std::uint8_t>(gen() % 16);
  for (auto& t : targets) t = static_cast<std::uint8_t>(gen() % 16);

  model.forward(tokens, targets, batch);
  std::vector<Model::M> grads(model.params().size());
  std::vector<int> seen(model.params().size(), 0);
  model.backward([&](std::size_t i, Model::M& g) {
    grads[i] = g;
    ++seen[i];
  });
  for (std::size_t i = 0; i < seen.size(); ++i) CHECK_MESSAGE(seen[i] == 1, model.params()[i].name);

  const double h = 1e-6;
  for (std::size_t i = 0; i < model.params().size(); ++i) {
    auto& p = model.params()[i];
    CAPTURE(p.name);
    REQUIRE(grads[i].rows() == p.value.rows());
    REQUIRE(grads[i].cols() == p.value.cols());
    double worst = 0;
    for (int trial = 0; trial < 6; ++trial) {
      const Index e = static_cast<Index>(gen() % static_cast<std::uint64_t>(p.value.size()));
      const double saved = p.value.data()[e];
      p.value.data()[e] = saved + h;
      const double up = model.forward(tokens, targets, batch);
      p.value.data()[e] = saved - h;
      const double down = model.forward(tokens, targets, batch);
      p.value.data()[e] = saved;
      const double numeric = (up - down) / (2 * h);
      const double analytic = grads[i].data()[e];
      worst = std::max(worst, std::abs(numeric - analytic) / std::max(1e-4, std::abs(numeric) + std::abs(analytic)));
    }
    CHECK(worst < 1e-5);
  }
}
