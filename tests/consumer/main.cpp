// Uses the public names of galore as a third-party trainer would; exits 0 only if
// GaLore reduced a least-squares loss.
#include <galore/galore.hpp>
#include <iostream>

int main() {
  using namespace galore;
  static_assert(version.major == GALORE_VERSION_MAJOR);
  const Index m = 64, n = 32, k = 128;
  const MatrixF X = MatrixF::Random(k, m), Wstar = MatrixF::Random(m, n);
  const MatrixF Y = X * Wstar;
  MatrixF W = MatrixF::Zero(m, n);

  AdamConfig adam;
  adam.lr = 0.05;
  GaLoreOptimizer<Projector<svd::Exact, quant::None>, LowRankAdam<state::Float32>> opt(
      ProjectorOptions{8, ProjectionType::Std, 0.25f}, LowRankAdam<state::Float32>(adam),
      schedule::FixedGap{20});
  const LayerId layer = opt.add_layer({m, n}, "W");
  auto loss = [&] { return (X * W - Y).squaredNorm() / k; };
  const float first = loss();
  for (int step = 0; step < 100; ++step) {
    const MatrixF G = 2.0f / k * X.transpose() * (X * W - Y);
    opt.step(layer, W, G);
  }
  const float last = loss();
  std::cout << "galore " << GALORE_VERSION_STRING << ": loss " << first << " -> " << last
            << ", optimizer state " << opt.state_bytes() << " bytes\n";
  return last < 0.5f * first ? 0 : 1;
}
