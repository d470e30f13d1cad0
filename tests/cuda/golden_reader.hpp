// The golden galore_adamw cases (../shared/golden/README.md) as plain host
// vectors, for the CUDA tests: read by g++ (golden_reader.cpp) through the CPU
// tests' reader, so that the nvcc-compiled tests include no Eigen.
#pragma once

#include <string>
#include <vector>

namespace galore_test {

struct GoldenAdamW {
  std::string name;
  long m = 0, n = 0, rank = 0, gap = 0, steps = 0;
  std::string proj_type;
  double scale = 0, lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  bool correct_bias = true;
  std::vector<float> W0;                       // m x n, row-major
  std::vector<std::vector<float>> G, W;        // per step, m x n
  std::vector<std::vector<float>> ortho;       // per step: right r x n, or left m x r (full: left)
  std::vector<std::vector<float>> ortho_right; // per step, full cases only: r x n
};

// A qgalore_projector case (q_galore_torch's projector: quantized P, lazy refresh).
struct GoldenQGaLore {
  std::string name;
  long m = 0, n = 0, rank = 0, gap = 0, steps = 0, bits = 0, group_size = 0, queue_size = 0;
  double cos_threshold = 0, gamma = 0, scale = 0;
  std::vector<std::vector<float>> G;              // per step, m x n
  std::vector<std::vector<float>> ortho_float;    // per step: the unquantized P in use (right r x n, or left m x r)
  std::vector<std::vector<float>> ortho_dequant;  // per step: the dequantized P in use
  std::vector<std::vector<float>> low_rank;       // per step: the projected gradient
  std::vector<float> gaps, svd_counts, cosines;   // per step, read after it (cosine NaN where none)
};

// The folder in use (GALORE_GOLDEN_DIR, else the compiled-in defaults).
std::string golden_folder();
// Every galore_adamw case of that folder, sorted by name.
std::vector<GoldenAdamW> golden_adamw_cases();
// Every qgalore_projector case of that folder, sorted by name.
std::vector<GoldenQGaLore> golden_qgalore_cases();

}  // namespace galore_test
