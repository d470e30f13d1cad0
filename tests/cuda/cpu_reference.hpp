// The CPU backend as a reference for the CUDA tests. Compiled by the host
// compiler (Eigen stays out of nvcc's translation units); plain vectors cross.
#pragma once

#include <cstdint>
#include <vector>

namespace galore_test {

struct RunSpec {
  long rows = 0, cols = 0, rank = 1;
  int type = 0;  // galore::ProjectionType
  float scale = 0.25f;
  double lr = 1e-2, weight_decay = 0.0, eps = 1e-6;
  bool correct_bias = true;
  long gap = 200;
  bool bf16_moments = false;
  bool dense = false;           // plain AdamW instead of GaLore
  std::vector<double> lrs;      // learning rate per step (set_lr before it), if not empty
};

// W after every step of the CPU GaLoreAdamW (exact SVD, fixed gap) over `grads`
// (row-major). bf16: weights and gradients held as bfloat16 (inputs rounded).
std::vector<std::vector<float>> cpu_run(const RunSpec& spec, std::vector<float> W,
                                        const std::vector<std::vector<float>>& grads, bool bf16 = false);

// The CPU's exact basis of G for a projection type: left (m x r) and right
// (r x n) row-major, empty where the side has none.
void cpu_exact_basis(long rows, long cols, long rank, int type, const std::vector<float>& G,
                     std::vector<float>& left, std::vector<float>& right);

// The exact singular values of G, largest first.
std::vector<float> cpu_singular_values(long rows, long cols, const std::vector<float>& G);

// Rounds float values to bfloat16 and back (round to nearest even).
std::vector<float> round_to_bf16(const std::vector<float>& x);

}  // namespace galore_test
