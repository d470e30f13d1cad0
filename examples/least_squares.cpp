// The smallest real use of galore: a multi-output least-squares problem
// min_W |X W - Y|^2 trained by GaLore-AdamW, next to full-rank AdamW.
//
//   ./least_squares [steps]
#include <galore/galore.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

using namespace galore;

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 300;
  const Index samples = 512, in = 256, out = 128;

  // A target whose weight matrix has a decaying spectrum, as trained layers do.
  std::mt19937 gen(42);
  std::normal_distribution<float> normal;
  auto randn = [&](Index r, Index c) {
    MatrixF A(r, c);
    for (Index i = 0; i < A.size(); ++i) A.data()[i] = normal(gen);
    return A;
  };
  const MatrixF X = randn(samples, in) / std::sqrt(float(in));
  const MatrixF Wstar = randn(in, 16) * randn(16, out) / 4.0f + 0.05f * randn(in, out);
  const MatrixF Y = X * Wstar;

  AdamConfig adam;
  adam.lr = 0.2;
  GaLoreAdamW galore(ProjectorOptions{32, ProjectionType::Std, 0.25f}, LowRankAdam<>(adam),
                     schedule::FixedGap{50});
  const LayerId g = galore.add_layer({in, out}, "W");
  adam.lr = 0.02;  // full-rank AdamW takes a smaller learning rate than GaLore
  GaLoreAdamW adamw(ProjectorOptions{}, LowRankAdam<>(adam));
  const LayerId a = adamw.add_dense({in, out}, "W");

  MatrixF Wg = MatrixF::Zero(in, out), Wa = Wg;
  auto loss = [&](const MatrixF& W) { return (X * W - Y).squaredNorm() / (samples * out); };
  std::printf("%6s %14s %14s\n", "step", "GaLore r=32", "AdamW");
  for (int step = 0; step <= steps; ++step) {
    if (step % (steps / 10 > 0 ? steps / 10 : 1) == 0)
      std::printf("%6d %14.6f %14.6f\n", step, loss(Wg), loss(Wa));
    if (step == steps) break;
    const MatrixF Gg = 2.0f / (samples * out) * X.transpose() * (X * Wg - Y);
    const MatrixF Ga = 2.0f / (samples * out) * X.transpose() * (X * Wa - Y);
    galore.step(g, Wg, Gg);
    adamw.step(a, Wa, Ga);
  }
  std::printf("optimizer state: GaLore %zu bytes, AdamW %zu bytes (%.0f%%)\n", galore.state_bytes(),
              adamw.state_bytes(), 100.0 * galore.state_bytes() / adamw.state_bytes());
  return 0;
}
