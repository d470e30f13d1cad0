// The CPU backend as a reference for the CUDA tests. Compiled by the host
// compiler (Eigen stays out of nvcc's translation units); plain vectors cross.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <galore/optim/adam_config.hpp>

namespace galore_test {

struct RunSpec {
  long rows = 0, cols = 0, rank = 1;
  int type = 0;  // galore::ProjectionType
  float scale = 0.25f;
  double lr = 1e-2, weight_decay = 0.0, eps = 1e-6;
  bool correct_bias = true;
  long gap = 200;
  bool bf16_moments = false;
  // state::Blockwise8bit{block_size, min_8bit_size} (GaLoreAdamW8bit) instead of dense moments.
  bool blockwise8bit = false;
  long block_size = 256, min_8bit_size = 4096;
  bool dense = false;           // plain AdamW instead of GaLore
  std::vector<double> lrs;      // learning rate per step (set_lr before it), if not empty
  int lazy_queue = 0;           // > 0: schedule::Lazy{gap, lazy_threshold, lazy_gamma, lazy_queue}
  double lazy_threshold = 0.4, lazy_gamma = 2.0;
  long drift_check_every = 0;   // > 0: schedule::Drift{drift_check_every, drift_tolerance, drift_min_gap, gap}
  double drift_tolerance = 0.1;
  long drift_min_gap = 2;
  // Q-GaLore's quantized bases: quant::MinMax<basis_bits>{basis_group} (0: quant::None),
  // or with basis_nf4 quant::NF4{basis_block}.
  int basis_bits = 0;
  long basis_group = -1;
  bool basis_nf4 = false;
  long basis_block = 64;
};

// What the CPU's projector reports after a run.
struct RunInfo {
  long svd_count = 0;
  long gap = 0;  // the refresh gap in force
  long skipped = 0;
  // schedule::Drift's state (when the run used it).
  long drift_last_refresh = -1;
  double drift_baseline = 0.0, drift_last_captured = 0.0;
};

// W after every step of the CPU GaLoreAdamW (exact SVD, fixed gap; 8-bit or
// bf16 moments as the spec says) over `grads`
// (row-major). bf16: weights and gradients held as bfloat16 (inputs rounded).
std::vector<std::vector<float>> cpu_run(const RunSpec& spec, std::vector<float> W,
                                        const std::vector<std::vector<float>>& grads, bool bf16 = false,
                                        RunInfo* info = nullptr);

// The CPU's exact basis of G for a projection type: left (m x r) and right
// (r x n) row-major, empty where the side has none.
void cpu_exact_basis(long rows, long cols, long rank, int type, const std::vector<float>& G,
                     std::vector<float>& left, std::vector<float>& right);

// The exact singular values of G, largest first.
std::vector<float> cpu_singular_values(long rows, long cols, const std::vector<float>& G);

// Rounds float values to bfloat16 and back (round to nearest even).
std::vector<float> round_to_bf16(const std::vector<float>& x);

// The CPU's production element-wise paths, for bit-for-bit comparisons:
// One step of state::Float32 (galore_torch's AdamW) from moments (m, v) with the
// gradient g (every element in Adam's range) at step t: m, v and d replaced.
void cpu_adam_dense(std::vector<float>& m, std::vector<float>& v, const std::vector<float>& g,
                    std::vector<float>& d, std::int64_t t, double lr, double beta1, double beta2, double eps);
// One step of state::Blockwise8bit's float32 moments (bitsandbytes' formula; d clamped).
void cpu_adam_8bit_formula(std::vector<float>& m, std::vector<float>& v, const std::vector<float>& g,
                           std::vector<float>& d, std::int64_t t, double lr, double beta1, double beta2,
                           double eps);
// Min-max codes of x (8 bits, groups of `group` elements): round to nearest
// (quant::quantize_minmax), or stochastic (StochasticRounder<8> with seed,
// layer, step, its AVX2 path where the CPU has it). One code per byte.
struct CpuCodes {
  std::vector<std::uint8_t> codes;
  std::vector<float> scales;
  std::vector<std::uint8_t> zeros;
};
CpuCodes cpu_minmax_codes(const std::vector<float>& x, long group);
// The CPU's 4-bit min-max codes of a rows x cols matrix (quant::quantize_minmax<4>,
// the INT4 basis' store; group -1: one per row), packed two per byte.
CpuCodes cpu_minmax_codes4(const std::vector<float>& x, long rows, long cols, long group);
// The CPU's NF4 codes of a rows x cols matrix (quant::NF4{block}.store): codes
// two per byte, the absmax per block in `scales`, no zeros.
CpuCodes cpu_nf4_codes(const std::vector<float>& x, long rows, long cols, long block);
CpuCodes cpu_stochastic_codes(const std::vector<float>& x, long group, std::uint64_t seed, std::uint32_t layer,
                              std::uint32_t step);
// The CPU's QuantizedWeight<8>: W0 (rows x cols, row-major) quantized to
// nearest in groups of `group` (-1: per row), then, if `values` is not empty,
// rows [row0, row0 + values.size() / cols) re-quantized from `values` with
// StochasticRounder<8>(seed).bind(layer, step); its codes, scales and zeros.
CpuCodes cpu_int8_weight(long rows, long cols, long group, const std::vector<float>& W0, long row0,
                         const std::vector<float>& values, std::uint64_t seed, std::uint32_t layer,
                         std::uint32_t step);
// The CPU's GaLoreOptimizer of `spec` (exact SVD; fixed gap or lazy; float32
// or 8-bit moments; unquantized or min-max bases: QGaLoreAdamW8bit with all
// three) with StochasticRounder<8>(seed), stepping the INT8 weight
// QuantizedWeight<8>(W0, group) through grads (rounded to bf16 first with
// bf16_grads: a bf16 G); the layer is registered after `layer_index` dense 1x1
// layers. Per step, the weight's codes, scales and zeros.
std::vector<CpuCodes> cpu_int8_run(const RunSpec& spec, long group, std::uint64_t seed, long layer_index,
                                   const std::vector<float>& W0, const std::vector<std::vector<float>>& grads,
                                   bool bf16_grads, RunInfo* info = nullptr);
// Steps t = 1, 2, ... of state::Blockwise8bit's 8-bit path (blocks of
// block_size, from the zero state) over grads[t - 1]: after each step the
// codes and absmax of both moments, and the update d.
struct Cpu8bitStep {
  std::vector<std::uint8_t> m_code, v_code;
  std::vector<float> m_absmax, v_absmax, d;
};
std::vector<Cpu8bitStep> cpu_adam_8bit_blockwise(const std::vector<std::vector<float>>& grads, long block_size,
                                                 double lr, double beta1, double beta2, double eps);
// bitsandbytes' signed and unsigned dynamic maps (256 values each).
std::vector<float> cpu_dynamic_map(bool is_signed);

// ---- checkpoints ----

struct CkptLayer {
  std::string name;
  long rows = 0, cols = 0;
  bool dense = false;  // plain AdamW instead of GaLore
  bool bf16 = false;   // weights and gradients held as bfloat16
  long rank = 0;       // > 0: projection options of its own (rank, type)
  int type = 0;        // galore::ProjectionType
  bool int8 = false;   // the weight an INT8 QuantizedWeight<8> (groups of 256) of W0, float gradients
};

// The optimizer of a checkpoint test: GaLoreOptimizer<Projector<svd::Exact,
// quant::None, FixedGap or Lazy>, LowRankAdam<state::Float32 or BFloat16>>.
struct CkptSpec {
  std::vector<CkptLayer> layers;
  long rank = 6;
  int type = 0;
  float scale = 0.25f;
  double lr = 1e-2, weight_decay = 0.05, eps = 1e-3;
  bool correct_bias = true;
  long gap = 3;
  int lazy_queue = 0;  // > 0: schedule::Lazy{gap, lazy_threshold, lazy_gamma, lazy_queue}
  double lazy_threshold = 0.5, lazy_gamma = 2.0;
  bool bf16_moments = false;
  bool blockwise8bit = false;  // state::Blockwise8bit{} (its moments are not reported in CpuLayerState)
  int basis_bits = 0;          // 4 or 8: quant::MinMax<basis_bits>{basis_group} bases; 0: quant::None
  long basis_group = -1;
  bool basis_nf4 = false;      // quant::NF4{basis_block} bases instead
  long basis_block = 64;
};

// A layer's optimizer state, in float.
// The AdamConfig of a RunSpec or CkptSpec (the other fields at their defaults).
template <class Spec>
galore::AdamConfig adam_of(const Spec& s) {
  galore::AdamConfig c;
  c.lr = s.lr;
  c.weight_decay = s.weight_decay;
  c.eps = s.eps;
  c.correct_bias = s.correct_bias;
  return c;
}

struct CpuLayerState {
  std::vector<float> m, v, left, right;  // basis factors (dequantized): empty where the side has none
  long steps = 0, skipped = 0, svd_count = 0;
  bool has_basis = false;
};

struct CpuCheckpointRun {
  std::string checkpoint;                          // saved after the steps
  std::vector<std::vector<std::vector<float>>> W;  // W[t][layer] after step t (INT8: dequantized)
  std::vector<std::vector<float>> W_end;           // W[layer] at the end (after loading, with no step)
  std::vector<CpuLayerState> layers;               // after the last step
  double lr = 0;
};

// The CPU optimizer of `spec`, with `checkpoint` loaded unless it is empty,
// steps every layer through grads[t][layer] from the weights W0 (an empty
// gradient: the layer does not step at t), then sets the learning rate to
// lr_after if it is > 0 and saves; with_weights loads the weights from
// `checkpoint` and saves them (a WeightSet). Throws what load_checkpoint throws.
CpuCheckpointRun cpu_checkpoint_run(const CkptSpec& spec, const std::string& checkpoint,
                                    const std::vector<std::vector<float>>& W0,
                                    const std::vector<std::vector<std::vector<float>>>& grads, double lr_after = 0.0,
                                    bool with_weights = false);

}  // namespace galore_test
