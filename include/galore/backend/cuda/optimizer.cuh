// galore (CUDA backend): GaLoreOptimizer, the per-layer optimizer facade on the GPU.
//
// The same contract as the CPU facade (galore::GaLoreOptimizer): register every
// parameter once, then call step(layer, W, G, ctx) as soon as a layer's
// gradient exists. W and G are device views (float or bf16, the element type
// chosen at registration); the step runs on ctx's stream and returns without
// waiting for the device.
//
// What synchronizes the host, and nothing else does:
//   - a step that may refresh the basis (its schedule says a refresh is due
//     within the steps whose outcome the host does not know yet): it reads the
//     layer's counters once before deciding, and once after projecting, so that
//     a skipped refresh step leaves the basis and the schedule untouched;
//   - with a drift-watching schedule (schedule::Drift), a step that may measure
//     (every check_every steps): it reads the counters, the sums |G|^2 and
//     |R|^2, and after projecting the counters again;
//   - status(), stats() and the checkpoint functions, which read device state.
// A step that is skipped on the device (NaN or Inf in the gradient, or an update
// that would not be finite) leaves W, the moments and the basis untouched, and
// its counters say so; the host learns of it at the next synchronizing call.
//
// Memory: everything a layer holds (basis factors in the layer's element type,
// both moments, the step counters) is one device allocation made at
// registration, so addresses never change. Temporaries live in the context's
// workspace, sized by workspace_bytes().
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../core/matrix_view.hpp"
#include "../../optim/adam_config.hpp"
#include "../../optim/blockwise8bit_state.hpp"
#include "../../policies.hpp"
#include "../../quant/group_quantized.hpp"
#include "../../quant/nf4_codes.hpp"
#include "../../optim/step_result.hpp"
#include "../../projection_type.hpp"
#include "../../projector_options.hpp"
#include "../../rounding/rounding_mode.hpp"
#include "../../schedule/drift.hpp"
#include "../../schedule/fixed_gap.hpp"
#include "../../schedule/lazy.hpp"
#include "../../schedule/traits.hpp"
#include "adam.cuh"
#include "adam8bit.cuh"
#include "batched_step.cuh"
#include "dtype.cuh"
#include "context.cuh"
#include "device_buffer.cuh"
#include "drift.cuh"
#include "gemm.cuh"
#include "nf4.cuh"
#include "quantized_weight.cuh"
#include "refresh.cuh"
#include "staging.cuh"

namespace galore::cuda {

// What a GPU step knows when it returns. Unless the step synchronized (a
// refresh step), the outcome is decided on the device later: status_known is
// false and status() tells it.
struct DeviceStepResult {
  bool refreshed = false;
  bool status_known = false;
  StepStatus status = StepStatus::Applied;
};

// The element type in which the GPU keeps the moments of a state policy
// (policies.hpp): float or bf16 for the dense states, 8-bit codes (with a
// float32 absmax per block, adam8bit.cuh) for bitsandbytes' blockwise state.
template <class StatePolicy>
struct DeviceMoments {
  static_assert(detail::dependent_false<StatePolicy>,
                "galore: the CUDA backend keeps the moments of state::Float32, state::BFloat16 or "
                "state::Blockwise8bit");
};
template <>
struct DeviceMoments<state::Dense<float>> {
  using type = float;
  static constexpr bool blockwise8bit = false;
};
template <>
struct DeviceMoments<state::Dense<bfloat16>> {
  using type = bf16;
  static constexpr bool blockwise8bit = false;
};
template <>
struct DeviceMoments<state::Blockwise8bit> {
  using type = std::uint8_t;
  static constexpr bool blockwise8bit = true;
};

// A layer's 8-bit moments in device memory (cuda::GaLoreOptimizer::moments_8bit):
// codes and one absmax per block when `quantized`, else float32 moments (a
// tensor under the policy's min_8bit_size, as on the CPU).
struct DeviceMoments8bit {
  Shape shape;
  Index block_size = 0;
  bool quantized = false;
  const std::uint8_t* m_code = nullptr;
  const std::uint8_t* v_code = nullptr;
  const float* m_absmax = nullptr;
  const float* v_absmax = nullptr;
  const float* m32 = nullptr;
  const float* v32 = nullptr;
  Index blocks() const { return (shape.size() + block_size - 1) / block_size; }
};

// How the GPU keeps the basis of a projector's quantization policy: in the
// layer's element type (quant::None); as Q-GaLore's group-wise min-max codes
// (quant::MinMax<4>, two a byte, or quant::MinMax<8>) with a float32 scale and
// a one-byte zero point per group, as the CPU's GroupQuantized; or as NF4 codes
// (quant::NF4, two a byte) with a float32 absmax per block, as the CPU's NF4Codes.
enum class BasisFormat { Float, MinMax, NF4 };
template <class QuantPolicy>
struct DeviceBasisCodes {
  static_assert(detail::dependent_false<QuantPolicy>,
                "galore: the CUDA backend keeps the basis unquantized (quant::None), as min-max codes "
                "(quant::MinMax<4> or quant::MinMax<8>) or as NF4 codes (quant::NF4)");
};
template <>
struct DeviceBasisCodes<quant::None> {
  static constexpr BasisFormat format = BasisFormat::Float;
  static constexpr int bits = 0;
  struct Settings {};
};
template <int Bits>
struct DeviceBasisCodes<quant::MinMax<Bits>> {
  static_assert(Bits == 4 || Bits == 8, "galore: min-max bases on the GPU hold 4-bit or 8-bit codes");
  static constexpr BasisFormat format = BasisFormat::MinMax;
  static constexpr int bits = Bits;
  using Settings = quant::MinMaxSettings;
};
template <>
struct DeviceBasisCodes<quant::NF4> {
  static constexpr BasisFormat format = BasisFormat::NF4;
  static constexpr int bits = 4;
  using Settings = quant::NF4Settings;
};

// One factor of a quantized basis in device memory: its codes (two a byte with
// 4 bits, element 2j in the low half of byte j), and per group of `group_size`
// consecutive elements of the row-major factor a float32 scale and a one-byte
// zero point (min-max), or a float32 absmax in `scales` and no zeros (NF4).
struct DeviceQuantizedFactor {
  Shape shape;
  Index group_size = 0;
  int bits = 0;
  bool nf4 = false;
  std::uint8_t* codes = nullptr;
  float* scales = nullptr;
  std::uint8_t* zeros = nullptr;
  Index groups() const { return group_size > 0 ? (shape.size() + group_size - 1) / group_size : 0; }
  std::size_t code_bytes() const { return (static_cast<std::size_t>(shape.size()) * bits + 7) / 8; }
  std::size_t scale_bytes() const { return sizeof(float) * static_cast<std::size_t>(groups()); }
  std::size_t zero_bytes() const { return nf4 ? 0 : static_cast<std::size_t>(groups()); }
};
// A layer's quantized basis (GaLoreOptimizer::quantized_basis): left m x r,
// right r x n; a side without a factor has null pointers.
struct DeviceQuantizedBasis {
  Side side = Side::Right;
  DeviceQuantizedFactor left, right;
};

// The GPU facade takes the policy names the CPU facade takes (policies.hpp):
//   cuda::GaLoreOptimizer<Projector<SVDPolicy, quant::None, SchedulePolicy>, LowRankAdam<StatePolicy>>
// and builds their state in device memory: the moments of StatePolicy in
// DeviceMoments<StatePolicy>::type, the basis unquantized (quant::None) in the
// layer's element type (bf16 for bf16 layers, as galore_torch keeps P in the
// gradient's dtype) or as min-max codes (quant::MinMax<4 or 8>, Q-GaLore's INT4
// bases: DeviceBasisCodes), the schedule's state on the host as on the CPU. With
// state::Blockwise8bit (GaLoreAdamW8bit) the moments are bitsandbytes' 8-bit
// blockwise codes, stepped as the CPU steps them, bit for bit (adam8bit.cuh);
// its blocks must hold at most 4096 elements on the GPU.
template <class ProjectorT = Projector<>, class AdamT = LowRankAdam<>>
class GaLoreOptimizer {
  static_assert(is_projector_v<ProjectorT>,
                "galore: cuda::GaLoreOptimizer's first parameter names the policies as "
                "Projector<SVDPolicy, QuantPolicy, SchedulePolicy> (galore/policies.hpp)");
  static_assert(is_low_rank_adam_v<AdamT>,
                "galore: cuda::GaLoreOptimizer's second parameter names the moments as LowRankAdam<StatePolicy> "
                "(galore/policies.hpp)");
  using SVDPolicy = typename ProjectorPolicies<ProjectorT>::svd;
  using QuantPolicy = typename ProjectorPolicies<ProjectorT>::quant;
  using SchedulePolicy = typename ProjectorPolicies<ProjectorT>::schedule;
  using StatePolicy = typename AdamPolicies<AdamT>::state;
  using MomentT = typename DeviceMoments<StatePolicy>::type;
  static constexpr bool blockwise8bit = DeviceMoments<StatePolicy>::blockwise8bit;
  // The state policy's settings the GPU needs: state::Blockwise8bit's (the
  // dense policies have none, and their definitions need Eigen).
  struct NoStateSettings {};
  using StateSettings = std::conditional_t<blockwise8bit, state::Blockwise8bit, NoStateSettings>;
  // A quantized basis is kept as codes and dequantized into the workspace at
  // every step, in the layer's element type, as the CPU dequantizes it into
  // float32 before projecting.
  static constexpr BasisFormat basis_format = DeviceBasisCodes<QuantPolicy>::format;
  static constexpr int basis_bits = DeviceBasisCodes<QuantPolicy>::bits;
  static constexpr bool basis_codes = basis_format != BasisFormat::Float;
  using QuantSettings = typename DeviceBasisCodes<QuantPolicy>::Settings;
  static_assert(detail::is_schedule_policy<SchedulePolicy>::value,
                "galore: SchedulePolicy needs a nested State, init() and due(state, step) (schedule/*.hpp)");
  static constexpr bool watches_drift = detail::watches_drift<SchedulePolicy>::value;

 public:
  using projector_type = ProjectorT;
  using adam_type = AdamT;
  using svd_policy = SVDPolicy;
  using schedule_policy = SchedulePolicy;
  using state_policy = StatePolicy;
  using moment_type = MomentT;  // float, bf16 (__nv_bfloat16), or uint8_t (8-bit codes)
  using quant_policy = QuantPolicy;

  // rounding: how INT8 weights (cuda::QuantizedWeight<8>) are re-quantized
  // after their update, StochasticRounder<8>(rounding.seed, rounding.mode) on
  // the CPU; unused for float and bf16 weights. state: the state policy's
  // settings (state::Blockwise8bit{block_size, min_8bit_size}; the CPU facade
  // takes them inside its LowRankAdam). quant: a quantized basis's settings
  // (quant::MinMaxSettings{group_size}, which quant::MinMax<Bits> holds; -1, the
  // default, is one group per row of each stored factor; or
  // quant::NF4Settings{block_size}, which quant::NF4 holds).
  explicit GaLoreOptimizer(ProjectorOptions projection = {}, AdamConfig adam = {}, SchedulePolicy schedule = {},
                           SVDPolicy svd = {}, WeightRounding rounding = {}, StateSettings state = {},
                           QuantSettings quant = {})
      : projection_(projection),
        adam_(adam),
        state_(state),
        quant_(quant),
        schedule_(schedule),
        svd_(svd),
        rounding_(rounding) {
    adam_.validate();
    if constexpr (basis_codes) quant_.validate();
    if constexpr (blockwise8bit) {
      state_.validate();
      detail::require(state_.block_size <= Blockwise8bitMoments::kMaxBlock, "8-bit block size on the GPU must be at "
                      "most ", Blockwise8bitMoments::kMaxBlock, " (got ", state_.block_size, ")");
    }
    validate_options(projection_);
    (void)schedule_.init();
    detail::validate_policy(svd_);
    detail::require(rounding_.mode == RoundingMode::Nearest || rounding_.mode == RoundingMode::Stochastic,
                    "unknown rounding mode ", static_cast<int>(rounding_.mode),
                    " (expected RoundingMode::Nearest or RoundingMode::Stochastic)");
  }

  // A GaLore-projected matrix whose weight and gradient hold `dtype` elements.
  LayerId add_layer(Shape shape, DType dtype, std::string name = {}) {
    return add_layer(shape, dtype, projection_, std::move(name));
  }
  LayerId add_layer(Shape shape, DType dtype, const ProjectorOptions& options, std::string name = {}) {
    check_shape(shape, name);
    validate_options(options);
    detail::require(options.rank <= std::min(shape.rows, shape.cols), "layer '", name, "': rank ", options.rank,
                    " is out of range for a ", shape.rows, "x", shape.cols, " matrix");
    Layer l;
    l.name = std::move(name);
    l.shape = shape;
    l.dtype = dtype;
    l.projected = true;
    l.options = options;
    l.side = resolve_side(options.type, shape.rows, shape.cols);
    l.low_rank = low_rank_shape(l.side, shape, options.rank);
    l.state = schedule_.init();
    allocate(l);
    return push(std::move(l));
  }
  // A parameter trained by plain AdamW.
  LayerId add_dense(Shape shape, DType dtype, std::string name = {}) {
    check_shape(shape, name);
    Layer l;
    l.name = std::move(name);
    l.shape = shape;
    l.dtype = dtype;
    l.low_rank = shape;
    allocate(l);
    return push(std::move(l));
  }

  // One step of one layer on ctx's stream. W and G are device views of the
  // registered shape and element type (G may be strided; W must be row-major
  // with any leading dimension >= cols).
  template <class T>
  DeviceStepResult step(LayerId id, DeviceView<T> W, DeviceView<const T> G, Context& ctx) {
    static_assert(!std::is_const_v<T>, "galore: W must be a view of mutable elements");
    Layer& l = layer(id);
    detail::require(l.dtype == dtype_of<T>(), "layer ", describe(l), " was registered with ", to_string(l.dtype),
                    " elements but step() got ", to_string(dtype_of<T>()));
    detail::require(W.shape() == l.shape && G.shape() == l.shape, "layer ", describe(l), " was registered as ",
                    l.shape.rows, "x", l.shape.cols, " but got W ", W.rows, "x", W.cols, " and G ", G.rows, "x",
                    G.cols);
    detail::require(W.data != nullptr && G.data != nullptr, "step() got a null device pointer");
    return l.projected ? galore_step(l, W, G, ctx) : dense_step(l, W, G, ctx);
  }
  template <class T>
  DeviceStepResult step(LayerId id, DeviceView<T> W, DeviceView<T> G, Context& ctx) {
    return step(id, W, DeviceView<const T>(G), ctx);
  }
  // A weight held as 8-bit codes (Q-GaLore's INT8 weights, quantized_weight.cuh)
  // with its gradient G in the registered element type: the update is made on
  // the dequantized weight a row panel at a time in float32, which is then
  // re-quantized with fresh scales and zeros, by stochastic rounding with the
  // bits of (rounding().seed, the layer's index, its count of applied steps):
  // the CPU's step(id, QuantizedWeight<8>&, G) with StochasticRounder<8>(seed,
  // mode). A skipped step leaves the codes, scales and zeros untouched. The
  // float panel lives in ctx's workspace (workspace_bytes() covers panels for
  // groups of 256 elements). Projected layers only.
  template <class T>
  DeviceStepResult step(LayerId id, QuantizedWeight<8>& W, DeviceView<const T> G, Context& ctx) {
    Layer& l = layer(id);
    detail::require(l.projected, "layer ", describe(l),
                    " is dense; quantized weights are supported on projected layers only");
    detail::require(l.dtype == dtype_of<T>(), "layer ", describe(l), " was registered with ", to_string(l.dtype),
                    " elements but step() got a ", to_string(dtype_of<T>()), " gradient");
    detail::require(W.shape() == l.shape && G.shape() == l.shape, "layer ", describe(l), " was registered as ",
                    l.shape.rows, "x", l.shape.cols, " but got W ", W.rows(), "x", W.cols(), " and G ", G.rows, "x",
                    G.cols);
    detail::require(G.data != nullptr, "step() got a null device pointer");
    return quantized_step(l, W, G, ctx);
  }
  template <class T>
  DeviceStepResult step(LayerId id, QuantizedWeight<8>& W, DeviceView<T> G, Context& ctx) {
    return step(id, W, DeviceView<const T>(G), ctx);
  }

  // Contiguous row-major device buffers of the registered shape.
  template <class T>
  DeviceStepResult step(LayerId id, T* W, const T* G, Context& ctx) {
    const Shape s = layer(id).shape;
    return step(id, DeviceView<T>(W, s.rows, s.cols), DeviceView<const T>(G, s.rows, s.cols), ctx);
  }

  // The whole-model step (batched_step.cuh): plan once for a fixed set of
  // layers and their device buffers, then step them all with one call. The plan
  // checks every parameter first (invalid_argument, nothing allocated), makes
  // the GEMMs' plans and copies its tables to the device (synchronizes). Steps
  // use the plan's own workspace. A step at which some layer refreshes runs
  // eagerly and synchronizes (once, then once per chunk that refreshes); the
  // other steps, on a stream other than the legacy default one, replay a CUDA
  // graph captured at the first of them. With schedule::Drift a step that may
  // refresh or measure runs layer by layer through step() and uses ctx's
  // workspace, sized by workspace_bytes(ctx).
  // The batched step keeps float32 or bf16 moments: with state::Blockwise8bit
  // plan_step_all throws galore::invalid_argument (step the layers with step()).
  // So does a quantized basis (quant::MinMax, quant::NF4): the batched step
  // keeps the basis unquantized.
  StepPlan plan_step_all(Span<const StepParam> params, Context& ctx, const StepPlanOptions& options = {}) {
    if constexpr (blockwise8bit) {
      (void)params, (void)ctx, (void)options;
      throw invalid_argument("galore: plan_step_all: the batched step keeps float32 or bf16 moments; 8-bit moments "
                             "(state::Blockwise8bit) are stepped layer by layer with step()");
    } else if constexpr (basis_codes) {
      (void)params, (void)ctx, (void)options;
      throw invalid_argument("galore: plan_step_all: the batched step keeps the basis unquantized; a quantized basis "
                             "(quant::MinMax, quant::NF4) is stepped layer by layer with step()");
    } else {
      return BatchedStepAccess::plan(*this, params, ctx, options);
    }
  }
  StepAllResult step_all(StepPlan& plan, Context& ctx) {
    if constexpr (blockwise8bit || basis_codes) {
      (void)plan, (void)ctx;
      throw invalid_argument(blockwise8bit
                                 ? "galore: step_all needs a plan, which 8-bit moments do not have (use step())"
                                 : "galore: step_all needs a plan, which a quantized basis does not have (use step())");
    } else {
      return BatchedStepAccess::step(*this, plan, ctx);
    }
  }

  // The outcome of the layer's latest step. Synchronizes ctx's stream.
  StepStatus status(LayerId id, Context& ctx) {
    const StepCounters c = read_counters(layer(id), ctx);
    return c.last_skipped ? StepStatus::SkippedNonFinite : StepStatus::Applied;
  }

  // Synchronizes ctx's stream (the counters live on the device).
  LayerStats stats(LayerId id, Context& ctx) {
    Layer& l = layer(id);
    const StepCounters c = read_counters(l, ctx);
    LayerStats s;
    s.name = l.name;
    s.shape = l.shape;
    s.projected = l.projected;
    s.steps = c.applied;
    s.skipped_steps = c.skipped;
    if (l.projected) {
      s.svd_count = l.svd_count;
      s.update_gap = schedule_.current_gap(l.state);
    }
    s.state_bytes = l.storage.bytes();
    return s;
  }

  // The layer's schedule state (host memory), e.g. the lazy schedule's gap and queue.
  const typename SchedulePolicy::State& schedule_state(LayerId id) const { return layer(id).state; }

  void set_lr(double lr) {
    AdamConfig c = adam_;
    c.lr = lr;
    c.validate();
    adam_ = c;
  }
  const AdamConfig& adam_config() const { return adam_; }
  const WeightRounding& rounding() const { return rounding_; }
  const ProjectorOptions& projection_options() const { return projection_; }
  std::size_t num_layers() const { return layers_.size(); }
  bool is_projected(LayerId id) const { return layer(id).projected; }
  std::int64_t svd_count(LayerId id) const { return layer(id).svd_count; }
  Side side(LayerId id) const { return layer(id).side; }

  // The layer's basis in device memory (left m x r, right r x n, row-major, in the
  // layer's element type; null where the side has none). Valid once a step applied.
  template <class T>
  DeviceBasis<T> basis(LayerId id) const {
    static_assert(!basis_codes, "galore: a quantized basis is read through quantized_basis()");
    const Layer& l = layer(id);
    detail::require(l.projected && l.dtype == dtype_of<T>(), "layer ", describe(l),
                    " has no basis of that element type");
    return basis_of<T>(l, const_cast<unsigned char*>(l.storage.data()));
  }
  // A quantized basis's codes, scales and zeros (or NF4 absmax) in device
  // memory (quant::MinMax, quant::NF4). Valid once a step applied.
  DeviceQuantizedBasis quantized_basis(LayerId id) const {
    static_assert(basis_codes, "galore: quantized_basis() needs a quantized basis (quant::MinMax or quant::NF4)");
    const Layer& l = layer(id);
    detail::require(l.projected, "layer ", describe(l), " is dense and has no basis");
    return stored_codes(l);
  }
  const QuantSettings& quant_settings() const { return quant_; }

  // The dense moments (low-rank shape, MomentT), for inspection and checkpoints.
  const MomentT* first_moment(LayerId id) const {
    static_assert(!blockwise8bit, "galore: 8-bit moments are read through moments_8bit()");
    return reinterpret_cast<const MomentT*>(layer(id).storage.data());
  }
  const MomentT* second_moment(LayerId id) const {
    static_assert(!blockwise8bit, "galore: 8-bit moments are read through moments_8bit()");
    const Layer& l = layer(id);
    return reinterpret_cast<const MomentT*>(l.storage.data() + layout(l).v);
  }
  // The 8-bit moments of a layer (state::Blockwise8bit), in device memory.
  DeviceMoments8bit moments_8bit(LayerId id) const {
    static_assert(blockwise8bit, "galore: moments_8bit() needs state::Blockwise8bit");
    const Layer& l = layer(id);
    const Layout& o = layout(l);
    const unsigned char* base = l.storage.data();
    DeviceMoments8bit mo;
    mo.shape = l.low_rank;
    mo.block_size = state_.block_size;
    mo.quantized = o.codes;
    if (o.codes) {
      mo.m_code = base + o.m;
      mo.v_code = base + o.v;
      mo.m_absmax = reinterpret_cast<const float*>(base + o.m_absmax);
      mo.v_absmax = reinterpret_cast<const float*>(base + o.v_absmax);
    } else {
      mo.m32 = reinterpret_cast<const float*>(base + o.m);
      mo.v32 = reinterpret_cast<const float*>(base + o.v);
    }
    return mo;
  }

  // Device bytes of optimizer state: for every layer its one allocation (both
  // moments, with the 8-bit state their codes and absmax, the basis, the
  // counters, each piece aligned to 256 bytes); with the 8-bit state also the
  // code maps and tables all layers share (DynamicMaps::kBytes).
  std::size_t state_bytes() const {
    std::size_t b = blockwise8bit ? DynamicMaps::kBytes : 0;  // the 8-bit code maps
    for (const Layer& l : layers_) b += l.storage.bytes();
    return b;
  }
  // Bytes of host memory the layers' schedule states hold (the lazy schedule's
  // previous first singular vector and cosine queue; 0 for a fixed gap).
  std::size_t host_state_bytes() const {
    std::size_t b = 0;
    if constexpr (!std::is_same_v<SchedulePolicy, schedule::FixedGap>)
      for (const Layer& l : layers_)
        if (l.projected) b += schedule_.state_bytes(l.state);
    return b;
  }
  // The same, predicted for a layer before registering it.
  std::size_t predict_layer_bytes(Shape shape, DType dtype, const ProjectorOptions& o) const {
    const Side side = resolve_side(o.type, shape.rows, shape.cols);
    return layout(shape, low_rank_shape(side, shape, o.rank), dtype, true, side, o.rank).total;
  }
  std::size_t predict_dense_bytes(Shape shape, DType dtype) const {
    return layout(shape, shape, dtype, false, Side::Right, 0).total;
  }

  // Workspace a context needs to step every registered layer (the largest
  // single layer's need). Asks cuSOLVER for its buffer sizes through ctx.
  std::size_t workspace_bytes(Context& ctx) const {
    std::size_t b = 0;
    for (const Layer& l : layers_) b = std::max(b, layer_workspace(l, ctx));
    return b;
  }

 private:
  friend struct CheckpointAccess;   // checkpoint.cuh: saves and restores the layers
  friend struct BatchedStepAccess;  // batched_step.cuh: steps many layers at once
  using A = WorkspaceArena;

  struct Layout {
    std::size_t m = 0, v = 0, m_absmax = 0, v_absmax = 0, left = 0, right = 0, counters = 0, total = 0;
    bool codes = false;  // 8-bit codes at m and v, their absmax after them
    // A quantized basis: each factor's codes at left / right, then its scales and zeros.
    std::size_t left_scales = 0, left_zeros = 0, right_scales = 0, right_zeros = 0;
  };

  // Codes, scales and zeros of a refresh's candidate, in the workspace until
  // the step is known to apply; `bad` flags a candidate holding NaN or Inf.
  struct PendingCodes {
    DeviceQuantizedFactor left, right;
    unsigned* bad = nullptr;
  };

  struct Layer {
    std::string name;
    Shape shape;
    DType dtype = DType::Float32;
    bool projected = false;
    ProjectorOptions options;
    Side side = Side::Right;
    Shape low_rank;
    typename SchedulePolicy::State state{};
    DeviceBuffer<unsigned char> storage;
    Layout at;  // where each piece of `storage` lies
    bool has_basis = false;
    std::int64_t svd_count = 0;
    // The host's knowledge of the device counters: `known_applied` was read at
    // the last synchronization; `pending` steps were queued since.
    std::int64_t known_applied = 0;
    std::int64_t pending = 0;
  };

  Layout layout(Shape shape, Shape low_rank, DType dtype, bool projected, Side side, Index rank) const {
    Layout o;
    const auto n = static_cast<std::size_t>(low_rank.size());
    std::size_t at = 0;
    if constexpr (blockwise8bit) {
      // The CPU's choice: tensors under min_8bit_size keep float32 moments.
      o.codes = low_rank.size() >= state_.min_8bit_size;
      const std::size_t moment = A::align(o.codes ? n : sizeof(float) * n);
      o.v = moment;
      at = 2 * moment;
      if (o.codes) {
        const std::size_t absmax = A::align(sizeof(float) * static_cast<std::size_t>(
                                                                 (low_rank.size() + state_.block_size - 1) / state_.block_size));
        o.m_absmax = at;
        o.v_absmax = at + absmax;
        at += 2 * absmax;
      }
    } else {
      o.v = A::align(sizeof(MomentT) * n);
      at = 2 * o.v;
    }
    // A factor: in the layer's element type, or codes, scales and zeros.
    auto factor = [&](Shape f, std::size_t& codes, std::size_t& scales, std::size_t& zeros) {
      codes = at;
      if constexpr (basis_codes) {
        const DeviceQuantizedFactor q = factor_codes(f);
        at += A::align(q.code_bytes());
        scales = at;
        at += A::align(q.scale_bytes());
        zeros = at;
        at += A::align(q.zero_bytes());
      } else {
        (void)scales, (void)zeros;
        at += A::align(size_of(dtype) * static_cast<std::size_t>(f.size()));
      }
    };
    if (projected && side != Side::Right) factor(Shape{shape.rows, rank}, o.left, o.left_scales, o.left_zeros);
    if (projected && side != Side::Left) factor(Shape{rank, shape.cols}, o.right, o.right_scales, o.right_zeros);
    o.counters = at;
    o.total = at + A::align(sizeof(StepCounters));
    return o;
  }
  static const Layout& layout(const Layer& l) { return l.at; }

  // A factor's quantization (no pointers yet): the min-max group size (-1
  // resolved to one group per row of the factor), or NF4's block size.
  DeviceQuantizedFactor factor_codes(Shape f) const {
    DeviceQuantizedFactor q;
    q.shape = f;
    q.bits = basis_bits;
    q.nf4 = basis_format == BasisFormat::NF4;
    if constexpr (basis_format == BasisFormat::MinMax) q.group_size = quant::resolve_group_size(quant_.group_size, f);
    if constexpr (basis_format == BasisFormat::NF4) q.group_size = quant_.block_size;
    return q;
  }
  // The layer's stored codes, scales and zeros.
  DeviceQuantizedBasis stored_codes(const Layer& l) const {
    const Layout& o = layout(l);
    unsigned char* base = const_cast<unsigned char*>(l.storage.data());
    DeviceQuantizedBasis b;
    b.side = l.side;
    auto at = [&](Shape f, std::size_t codes, std::size_t scales, std::size_t zeros) {
      DeviceQuantizedFactor q = factor_codes(f);
      q.codes = base + codes;
      q.scales = reinterpret_cast<float*>(base + scales);
      q.zeros = q.nf4 ? nullptr : base + zeros;
      return q;
    };
    const Index r = l.options.rank;
    if (l.side != Side::Right) b.left = at(Shape{l.shape.rows, r}, o.left, o.left_scales, o.left_zeros);
    if (l.side != Side::Left) b.right = at(Shape{r, l.shape.cols}, o.right, o.right_scales, o.right_zeros);
    return b;
  }

  static void validate_options(const ProjectorOptions& o) {
    detail::require(o.rank >= 1, "rank must be at least 1 (got ", o.rank, ")");
    detail::require(std::isfinite(o.scale), "scale must be finite (got ", o.scale, ")");
    (void)resolve_side(o.type, 1, 1);  // throws on an invalid enum value
  }
  static void check_shape(Shape shape, const std::string& name) {
    detail::require(shape.rows > 0 && shape.cols > 0, "layer '", name, "' needs a positive shape (got ", shape.rows,
                    "x", shape.cols, ")");
    detail::require(shape.rows <= INT32_MAX && shape.cols <= INT32_MAX, "layer '", name,
                    "': cuBLAS takes dimensions below 2^31");
  }

  void allocate(Layer& l) {
    l.at = layout(l.shape, l.low_rank, l.dtype, l.projected, l.side, l.options.rank);
    const Layout& o = l.at;
    // Zero moments and counters (the basis is written by the first refresh).
    l.storage = DeviceBuffer<unsigned char>::zeroed(o.total);
    const StepCounters init{};
    check(cudaMemcpy(l.storage.data() + o.counters, &init, sizeof init, cudaMemcpyHostToDevice), "cudaMemcpy");
    // A pageable copy may return before its DMA lands, and a non-blocking
    // stream does not wait for the legacy one.
    check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
  }

  LayerId push(Layer&& l) {
    layers_.push_back(std::move(l));
    return LayerId{layers_.size() - 1};
  }

  static std::string describe(const Layer& l) { return l.name.empty() ? std::string("(unnamed)") : "'" + l.name + "'"; }

  const Layer& layer(LayerId id) const {
    detail::require(id.index < layers_.size(), "unknown layer id ", id.index, " (", layers_.size(),
                    " layers registered)");
    return layers_[id.index];
  }
  Layer& layer(LayerId id) { return const_cast<Layer&>(std::as_const(*this).layer(id)); }

  static StepCounters* counters_of(Layer& l) {
    return reinterpret_cast<StepCounters*>(l.storage.data() + layout(l).counters);
  }
  template <class T>
  static DeviceBasis<T> basis_of(const Layer& l, unsigned char* base) {
    const Layout o = layout(l);
    DeviceBasis<T> b;
    b.side = l.side;
    b.rows = l.shape.rows;
    b.cols = l.shape.cols;
    b.rank = l.options.rank;
    if (l.side != Side::Right) b.left = reinterpret_cast<T*>(base + o.left);
    if (l.side != Side::Left) b.right = reinterpret_cast<T*>(base + o.right);
    return b;
  }

  StepCounters read_counters(Layer& l, Context& ctx) {
    StepCounters c;
    check(cudaMemcpyAsync(&c, counters_of(l), sizeof c, cudaMemcpyDeviceToHost, ctx.stream()), "cudaMemcpyAsync");
    ctx.synchronize();
    l.known_applied = c.applied;
    l.pending = 0;
    return c;
  }

  AdamLaunch launch(float scale) const {
    AdamLaunch p;
    p.lr = adam_.lr;
    p.beta1 = adam_.beta1;
    p.beta2 = adam_.beta2;
    p.correct_bias = adam_.correct_bias;
    p.coeffs = {static_cast<float>(adam_.beta1), static_cast<float>(1.0 - adam_.beta1), static_cast<float>(adam_.beta2),
                static_cast<float>(1.0 - adam_.beta2), static_cast<float>(adam_.eps)};
    p.decay = adam_.decay_factor();
    p.scale = scale;
    return p;
  }

  // Could a refresh be due at any step count the layer may have reached?
  bool refresh_may_be_due(const Layer& l) const {
    if (!l.has_basis) return true;
    const std::int64_t first = l.known_applied, last = l.known_applied + l.pending;
    if constexpr (std::is_same_v<SchedulePolicy, schedule::FixedGap>) {
      const std::int64_t next = (first + schedule_.gap - 1) / schedule_.gap * schedule_.gap;  // first multiple >= first
      return next <= last;
    } else {
      for (std::int64_t s = first; s <= last; ++s)
        if (schedule_.due(l.state, s)) return true;
      return false;
    }
  }

  // Could a drift measurement be wanted at any step count the layer may have reached?
  bool measurement_may_be_wanted(const Layer& l, bool just_refreshed) const {
    if constexpr (watches_drift) {
      if (!l.has_basis && !just_refreshed) return false;
      for (std::int64_t s = l.known_applied; s <= l.known_applied + l.pending; ++s)
        if (schedule_.wants_measurement(l.state, s, just_refreshed)) return true;
    }
    (void)l, (void)just_refreshed;
    return false;
  }

  // A left-projected layer whose column count is not a multiple of 8 steps on
  // padded copies of G and W (staging.cuh says why); its R and D are padded too.
  static bool staged(const Layer& l) {
    return l.projected && l.side == Side::Left && padded_cols(l.shape.cols) != l.shape.cols;
  }
  // Columns of the step's G, W, R and D (padded when staged).
  static Index step_cols(const Layer& l) { return staged(l) ? padded_cols(l.shape.cols) : l.shape.cols; }

  // Workspace of one step: R (float), D (T), the padded copies of a staged
  // layer, the both-sided intermediates, and for a refresh the candidate basis
  // plus the policy's own needs.
  std::size_t layer_workspace(const Layer& l, Context& ctx) const {
    const std::size_t t = size_of(l.dtype);
    if (!l.projected) return 0;
    const std::size_t lr = static_cast<std::size_t>(l.low_rank.rows * (staged(l) ? step_cols(l) : l.low_rank.cols));
    std::size_t b = A::align(sizeof(float) * lr) + A::align(t * lr);
    // A staged layer's padded G; the weight's update scratch (a staged layer's
    // padded W, or an INT8 weight's float panel).
    const std::size_t copy = staged(l) ? A::align(t * static_cast<std::size_t>(l.shape.rows * step_cols(l))) : 0;
    b += copy + std::max(copy, quantized_panel_bytes(l));
    if constexpr (watches_drift) b += captured_energy_bytes();
    const std::size_t mr = static_cast<std::size_t>(l.shape.rows * l.options.rank);
    const std::size_t rn = static_cast<std::size_t>(l.options.rank * l.shape.cols);
    if (l.side == Side::Both) b += 2 * A::align(sizeof(float) * mr) + A::align(t * mr);
    // A refresh's candidate; with a quantized basis also the dequantized basis,
    // the candidate's codes, and with a drift-watching schedule a second
    // candidate (a refresh step that measures and refreshes again).
    const std::size_t candidate =
        (l.side != Side::Right ? A::align(t * mr) : 0) + (l.side != Side::Left ? A::align(t * rn) : 0);
    b += candidate;
    if constexpr (basis_codes) b += candidate + pending_bytes(l) + (watches_drift ? candidate : 0);
    return b + refresh_bytes(l, ctx, 1);
  }
  // The SVD policy's workspace for refreshing `count` layers of l's shape together.
  std::size_t refresh_bytes(const Layer& l, Context& ctx, Index count) const {
    const Shape s = l.shape;
    return l.dtype == DType::Float32
               ? compute_bases_bytes<float>(ctx, svd_, s.rows, s.cols, l.options.rank, l.side, count)
               : compute_bases_bytes<bf16>(ctx, svd_, s.rows, s.cols, l.options.rank, l.side, count);
  }

  template <class T>
  DeviceStepResult dense_step(Layer& l, DeviceView<T> W, DeviceView<const T> G, Context& ctx) {
    detail::require(W.contiguous() && G.contiguous(), "dense layer ", describe(l),
                    ": W and G must be contiguous row-major (leading dimension = cols)");
    const std::int64_t n = l.shape.size();
    const AdamLaunch p = launch(1.0f);
    if constexpr (blockwise8bit) {
      step_8bit(l, ctx, impl::DenseIO<T>{W.data, G.data, n, impl::vector_aligned(W.data, G.data), p.decay}, p);
    } else {
      MomentT* m = reinterpret_cast<MomentT*>(l.storage.data());
      MomentT* v = reinterpret_cast<MomentT*>(l.storage.data() + layout(l).v);
      adamw_dense_step(ctx, W.data, G.data, n, m, v, p, counters_of(l));
    }
    ++l.pending;
    return {};
  }

  // Adam over 8-bit moments (state::Blockwise8bit): the codes, or float32
  // moments for a tensor under min_8bit_size, with bitsandbytes' formula.
  template <class IO>
  void step_8bit(Layer& l, Context& ctx, const IO& io, const AdamLaunch& p) {
    const Layout& o = layout(l);
    unsigned char* base = l.storage.data();
    const impl::Adam8bitHyper h{adam_.lr, adam_.beta1, adam_.beta2, adam_.eps, adam_.correct_bias};
    if (o.codes) {
      const impl::Adam8bitState s{l.low_rank.size(),
                                  static_cast<int>(state_.block_size),
                                  base + o.m,
                                  base + o.v,
                                  reinterpret_cast<float*>(base + o.m_absmax),
                                  reinterpret_cast<float*>(base + o.v_absmax)};
      adam8bit_layer_step(ctx, s, maps_, h, io, p, counters_of(l));
    } else {
      adam8bit_float_layer_step(ctx, reinterpret_cast<float*>(base + o.m), reinterpret_cast<float*>(base + o.v),
                                l.low_rank.size(), h, io, p, counters_of(l));
    }
  }

  // The GaLore step of a projected layer up to the update of its weight, which
  // apply(update, basis, D, PN, low-rank shape of D, counters) makes (D's
  // columns padded when the layer is staged), with `update_bytes` of workspace
  // at `update`; before(update) runs first, before any other launch (it may
  // fork work onto the context's side stream, joined when this returns). What
  // every step needs (R, D, the padded G, the update's scratch) and a refresh's
  // candidates are taken before the first launch, so a workspace too small for
  // them throws with nothing changed; a drift measurement takes its sums after
  // projecting (the layer's state is still untouched then).
  template <class T, class Before, class Apply>
  DeviceStepResult step_projected(Layer& l, DeviceView<const T> G, Context& ctx, std::size_t update_bytes,
                                  Before&& before, Apply&& apply) {
    DeviceStepResult result;
    WorkspaceArena ws = ctx.arena();
    const Index r = l.options.rank;
    const Shape lr = l.low_rank;
    const bool stage_this = staged(l);
    // R and D: lr.rows x ld (a staged layer's padded columns hold zeros).
    const Index ld = stage_this ? step_cols(l) : lr.cols;
    float* R = ws.take<float>(static_cast<std::size_t>(lr.rows * ld));
    T* D = ws.take<T>(static_cast<std::size_t>(lr.rows * ld));
    T* G_copy = stage_this ? ws.take<T>(static_cast<std::size_t>(l.shape.rows * ld)) : nullptr;
    void* update = update_bytes > 0 ? ws.take<unsigned char>(update_bytes) : nullptr;
    // Both sides: G Q^T and P in float, so that the small off-diagonal entries of
    // R are not lost to bf16 rounding of the m x r intermediate.
    const bool both = l.side == Side::Both;
    float* X = both ? ws.take<float>(static_cast<std::size_t>(l.shape.rows * r)) : nullptr;
    float* Pf = both ? ws.take<float>(static_cast<std::size_t>(l.shape.rows * r)) : nullptr;
    T* PN = both ? ws.take<T>(static_cast<std::size_t>(l.shape.rows * r)) : nullptr;
    // The basis in force: the layer's own, or a quantized one dequantized into
    // the workspace. `use` is what this step projects with; `fresh` is a
    // refresh's basis before quantization (the schedule reads its first vector).
    DeviceBasis<T> stored = basis_of<T>(l, l.storage.data());
    PendingCodes pending;
    if constexpr (basis_codes) {
      stored = take_basis<T>(l, ws);
      if (refresh_may_be_due(l) || watches_drift) pending = take_pending(l, ws);
    }
    DeviceBasis<T> use = stored, fresh = stored;
    const SideStreamJoin join(ctx);
    before(update);
    if constexpr (basis_codes) {
      if (l.has_basis) dequantize_basis(ctx, stored_codes(l), stored);
    }

    bool refresh = false;
    if (refresh_may_be_due(l)) {
      if (l.has_basis) (void)read_counters(l, ctx);  // learn the exact step count (synchronizes)
      refresh = !l.has_basis || schedule_.due(l.state, l.known_applied);
    }
    if (refresh) {
      DeviceBasis<T> candidate = stored;
      if (l.side != Side::Right) candidate.left = ws.take<T>(static_cast<std::size_t>(l.shape.rows * r));
      if (l.side != Side::Left) candidate.right = ws.take<T>(static_cast<std::size_t>(r * l.shape.cols));
      WorkspaceArena scratch = ws;  // the policy's scratch is dead once it returns
      compute_basis(ctx, scratch, svd_, G, r, candidate, l.has_basis ? &stored : nullptr);
      fresh = candidate;
      use = settle(ctx, candidate, pending, stored);
    }

    if (stage_this) {
      const DeviceView<T> copy(G_copy, l.shape.rows, ld);
      stage(ctx, G, copy);
      project(ctx, use, DeviceView<const T>(copy), R, X, Pf, Shape{lr.rows, ld});
    } else {
      project(ctx, use, G, R, X, Pf, lr);
    }

    // A drift-watching schedule measures the fraction of G's energy the basis
    // captured (synchronizes: the step count, then the sums) and may refresh now;
    // its new state is adopted only if the step applies.
    typename SchedulePolicy::State measured_state{};
    bool measured = false, measure_tried = false;
    if constexpr (watches_drift) {
      if (measurement_may_be_wanted(l, refresh)) {
        if (l.pending > 0) (void)read_counters(l, ctx);
        const std::int64_t step = l.known_applied;
        // Measured only when R is in range: otherwise the step is skipped (as on
        // the CPU, before measuring) by adam_step below.
        measure_tried = schedule_.wants_measurement(l.state, step, refresh);
        const CapturedEnergy e =
            measure_tried ? captured_energy(ctx, ws, G, R, lr.rows * ld) : CapturedEnergy{false, 1.0};
        if (e.in_range) {
          measured_state = l.state;
          measured = true;
          if (schedule_.on_measurement(measured_state, step, e.captured, refresh)) {
            DeviceBasis<T> candidate = use;
            // A quantized basis keeps its candidate apart from the dequantized
            // one it projects with (settle() writes the latter).
            if (!refresh || basis_codes) {
              if (l.side != Side::Right) candidate.left = ws.take<T>(static_cast<std::size_t>(l.shape.rows * r));
              if (l.side != Side::Left) candidate.right = ws.take<T>(static_cast<std::size_t>(r * l.shape.cols));
            }
            WorkspaceArena scratch = ws;
            compute_basis(ctx, scratch, svd_, G, r, candidate, &use);  // `use` may alias `candidate`
            fresh = candidate;
            use = settle(ctx, candidate, pending, stored);
            refresh = true;
            if (stage_this)
              project(ctx, use, DeviceView<const T>(DeviceView<T>(G_copy, l.shape.rows, ld)), R, X, Pf,
                      Shape{lr.rows, ld});
            else
              project(ctx, use, G, R, X, Pf, lr);
          }
        }
      }
    }

    StepCounters* counters = counters_of(l);
    const AdamLaunch p = launch(l.options.scale);
    // Decides the step and applies Adam, or leaves the moments untouched and D
    // zero on a skipped step (padded columns of R are 0). The basis is not read.
    if constexpr (blockwise8bit) {
      step_8bit(l, ctx, impl::LowRankIO<T>{R, D, lr.rows, lr.cols, ld}, p);
    } else {
      MomentT* m = reinterpret_cast<MomentT*>(l.storage.data());
      MomentT* v = reinterpret_cast<MomentT*>(l.storage.data() + layout(l).v);
      adam_step(ctx, R, lr.rows, lr.cols, ld, m, v, D, p, counters);
    }

    if (measure_tried && !refresh) {
      // The measurement synchronized already: one more read makes the outcome
      // known (a gradient out of range was not measured and is skipped here).
      const StepCounters c = read_counters(l, ctx);
      result.status_known = true;
      if (c.last_skipped) {
        result.status = StepStatus::SkippedNonFinite;
        return result;
      }
      if (measured) l.state = std::move(measured_state);
    } else if (refresh) {
      // Adopt the candidate only if the step is applied: a skipped refresh step
      // leaves the basis, the SVD count and the schedule untouched.
      const StepCounters c = read_counters(l, ctx);
      result.status_known = true;
      if (c.last_skipped) {
        result.status = StepStatus::SkippedNonFinite;
        return result;
      }
      if (measured) l.state = std::move(measured_state);
      adopt_basis(l, use, fresh, pending, c, ctx);
      result.refreshed = true;
    } else {
      ++l.pending;
    }

    apply(update, use, static_cast<const T*>(D), PN, Shape{lr.rows, ld}, static_cast<const StepCounters*>(counters));
    return result;
  }

  // The update of a float or bf16 weight: W = beta W + alpha back(D), on a
  // padded copy when the layer is staged. The copy is made on the side stream
  // while the projection and Adam run (W is not written before the
  // back-projection, which waits for it).
  template <class T>
  DeviceStepResult galore_step(Layer& l, DeviceView<T> W, DeviceView<const T> G, Context& ctx) {
    const std::size_t copy_bytes = staged(l) ? sizeof(T) * static_cast<std::size_t>(l.shape.rows * step_cols(l)) : 0;
    auto copy_of = [&](void* update) { return DeviceView<T>(static_cast<T*>(update), l.shape.rows, step_cols(l)); };
    auto before = [&](void* update) {
      if (!staged(l)) return;
      ctx.fork();
      stage(ctx.side_stream(), DeviceView<const T>(W), copy_of(update));
    };
    return step_projected(l, G, ctx, copy_bytes, before, [&](void* update, const DeviceBasis<T>& b, const T* D, T* PN,
                                                             Shape lr, const StepCounters* counters) {
      if (staged(l)) {
        ctx.join();
        back_project(ctx, b, D, PN, copy_of(update), lr, counters);
        unstage(ctx, DeviceView<const T>(copy_of(update)), W);
      } else {
        back_project(ctx, b, D, PN, W, lr, counters);
      }
    });
  }

  // The update of an INT8 weight, a row panel at a time: dequantize into a
  // float panel, W = beta W + alpha back(D) on it, re-quantize (nothing is
  // written when the step was skipped: the kernel reads the counters).
  template <class T>
  DeviceStepResult quantized_step(Layer& l, QuantizedWeight<8>& W, DeviceView<const T> G, Context& ctx) {
    const auto layer_index = static_cast<std::uint32_t>(&l - layers_.data());
    const Index rows = l.shape.rows, ld = step_cols(l);
    const Index panel_rows = quantized_panel_rows(l, W.row_alignment());
    const std::size_t panel_floats = static_cast<std::size_t>(std::min(panel_rows, rows) * ld);
    return step_projected(l, G, ctx, sizeof(float) * panel_floats, [](void*) {}, [&](void* update, const DeviceBasis<T>& b,
                                                                       const T* D, T* PN, Shape lr,
                                                                       const StepCounters* counters) {
      float* panel = static_cast<float*>(update);
      // A staged layer's panel is as wide as its padded D: the GEMM writes the
      // padding too (zeros in, so nothing undefined is read), which the
      // re-quantization skips.
      if (ld != l.shape.cols)
        check(cudaMemsetAsync(panel, 0, sizeof(float) * panel_floats, ctx.stream()), "cudaMemsetAsync");
      if (b.side == Side::Both)  // P D (m x r) once; the panels take its rows
        gemm(ctx, Op::N, Op::N, 1.0f, DeviceView<const T>(b.left, rows, b.rank), DeviceView<const T>(D, lr.rows, lr.cols),
             0.0f, DeviceView<T>(PN, rows, b.rank));
      for (Index r0 = 0; r0 < rows; r0 += panel_rows) {
        const Index k = std::min(panel_rows, rows - r0);
        W.dequantize_rows(r0, DeviceView<float>(panel, k, l.shape.cols, ld), ctx);
        back_project_rows(ctx, b, D, PN, lr, r0, DeviceView<float>(panel, k, ld, ld), counters);
        W.requantize_rows_after(r0, DeviceView<const float>(panel, k, l.shape.cols, ld), rounding_, layer_index,
                                counters, ctx);
      }
    });
  }

  // Rows of a quantized weight's float panel: as many as fit kQuantizedPanel
  // floats, in multiples of the weight's row alignment (panels start on
  // quantization groups), at least one alignment.
  static constexpr Index kQuantizedPanel = Index{1} << 22;
  static Index quantized_panel_rows(const Layer& l, Index alignment) {
    const Index fit = kQuantizedPanel / step_cols(l);
    return std::max(alignment, fit / alignment * alignment);
  }
  // The panel's bytes that workspace_bytes() covers: the most rows any weight
  // whose row alignment fits kQuantizedPanel floats takes (groups of 256 do for
  // rows up to 2^14 elements wide); a weight with a larger alignment needs more
  // and throws "workspace too small" before its step changes anything.
  static std::size_t quantized_panel_bytes(const Layer& l) {
    if (!l.projected) return 0;
    const Index fit = std::max<Index>(kQuantizedPanel / step_cols(l), 1);
    return A::align(sizeof(float) * static_cast<std::size_t>(std::min(fit, l.shape.rows) * step_cols(l)));
  }

  // A refresh step applied (c: the layer's counters read after it): the
  // candidate basis becomes the layer's (`use`, or the codes it was dequantized
  // from), and the schedule learns of it (from `fresh`, the unquantized one).
  template <class T>
  void adopt_basis(Layer& l, const DeviceBasis<T>& use, const DeviceBasis<T>& fresh, const PendingCodes& pending,
                   const StepCounters& c, Context& ctx) {
    auto copy = [&](void* to, const void* from, std::size_t bytes) {
      if (to != from)
        check(cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, ctx.stream()), "cudaMemcpyAsync");
    };
    if constexpr (basis_codes) {
      const DeviceQuantizedBasis to = stored_codes(l);
      auto codes = [&](const DeviceQuantizedFactor& t, const DeviceQuantizedFactor& f) {
        copy(t.codes, f.codes, t.code_bytes());
        copy(t.scales, f.scales, t.scale_bytes());
        if (!t.nf4) copy(t.zeros, f.zeros, t.zero_bytes());
      };
      if (l.side != Side::Right) codes(to.left, pending.left);
      if (l.side != Side::Left) codes(to.right, pending.right);
    } else {
      const DeviceBasis<T> stored = basis_of<T>(l, l.storage.data());
      const std::size_t t = sizeof(T);
      const Index r = l.options.rank;
      if (l.side != Side::Right) copy(stored.left, use.left, t * l.shape.rows * r);
      if (l.side != Side::Left) copy(stored.right, use.right, t * r * l.shape.cols);
    }
    record_refresh(l, fresh, c, ctx);
  }

  // ---- a quantized basis (quant::MinMax, quant::NF4) ----

  PendingCodes take_pending(const Layer& l, WorkspaceArena& ws) const {
    PendingCodes p;
    auto take = [&](Shape f) {
      DeviceQuantizedFactor q = factor_codes(f);
      q.codes = ws.take<std::uint8_t>(q.code_bytes());
      q.scales = ws.take<float>(static_cast<std::size_t>(q.groups()));
      if (!q.nf4) q.zeros = ws.take<std::uint8_t>(q.zero_bytes());
      return q;
    };
    const Index r = l.options.rank;
    if (l.side != Side::Right) p.left = take(Shape{l.shape.rows, r});
    if (l.side != Side::Left) p.right = take(Shape{r, l.shape.cols});
    p.bad = ws.take<unsigned>(1);
    return p;
  }
  std::size_t pending_bytes(const Layer& l) const {
    std::size_t b = A::align(sizeof(unsigned));
    auto add = [&](Shape f) {
      const DeviceQuantizedFactor q = factor_codes(f);
      b += A::align(q.code_bytes()) + A::align(q.scale_bytes()) + A::align(q.zero_bytes());
    };
    if (l.side != Side::Right) add(Shape{l.shape.rows, l.options.rank});
    if (l.side != Side::Left) add(Shape{l.options.rank, l.shape.cols});
    return b;
  }
  // Room for the layer's basis in its element type, in the workspace.
  template <class T>
  static DeviceBasis<T> take_basis(const Layer& l, WorkspaceArena& ws) {
    DeviceBasis<T> b;
    b.side = l.side;
    b.rows = l.shape.rows;
    b.cols = l.shape.cols;
    b.rank = l.options.rank;
    const Index r = l.options.rank;
    if (l.side != Side::Right) b.left = ws.take<T>(static_cast<std::size_t>(l.shape.rows * r));
    if (l.side != Side::Left) b.right = ws.take<T>(static_cast<std::size_t>(r * l.shape.cols));
    return b;
  }
  template <class T>
  static void dequantize_basis(Context& ctx, const DeviceQuantizedBasis& codes, const DeviceBasis<T>& out) {
    auto run = [&](const DeviceQuantizedFactor& q, T* to) {
      const std::int64_t n = q.shape.size();
      if constexpr (basis_format == BasisFormat::NF4)
        impl::launch_dequantize_nf4<T>(q.codes, q.scales, n, q.group_size, to, ctx.stream());
      else
        impl::launch_dequantize<basis_bits, T>(q.codes, q.scales, q.zeros, q.group_size, 0, n, to, q.shape.cols,
                                               q.shape.cols, ctx.stream());
    };
    if (codes.side != Side::Right) run(codes.left, out.left);
    if (codes.side != Side::Left) run(codes.right, out.right);
  }
  // The basis a refresh step projects with: the candidate itself, or (quantized)
  // the candidate quantized into `pending` and dequantized into `out`, as the
  // CPU's projector stores a fresh basis and projects with what it stored. A
  // candidate holding NaN or Inf gives a basis with a NaN, so that the step is
  // skipped as it would be unquantized.
  template <class T>
  DeviceBasis<T> settle(Context& ctx, const DeviceBasis<T>& candidate, const PendingCodes& pending,
                        const DeviceBasis<T>& out) const {
    if constexpr (!basis_codes) {
      (void)ctx, (void)pending, (void)out;
      return candidate;
    } else {
      check(cudaMemsetAsync(pending.bad, 0, sizeof(unsigned), ctx.stream()), "cudaMemsetAsync");
      auto run = [&](const DeviceQuantizedFactor& q, const T* from) {
        const std::int64_t n = q.shape.size(), cols = q.shape.cols;
        impl::find_non_finite<T><<<impl::blocks_for(n), impl::kThreads, 0, ctx.stream()>>>(from, cols, cols, n,
                                                                                           pending.bad);
        check_launch("galore::cuda::find_non_finite");
        if constexpr (basis_format == BasisFormat::NF4)
          impl::launch_quantize_nf4<T>(from, n, q.group_size, q.codes, q.scales, ctx.stream());
        else
          impl::launch_quantize_nearest<basis_bits, T>(from, cols, n, q.group_size, q.codes, q.scales, q.zeros,
                                                       ctx.stream());
      };
      if (candidate.side != Side::Right) run(pending.left, candidate.left);
      if (candidate.side != Side::Left) run(pending.right, candidate.right);
      DeviceQuantizedBasis codes;
      codes.side = candidate.side;
      codes.left = pending.left;
      codes.right = pending.right;
      dequantize_basis(ctx, codes, out);
      T* const factors[2] = {out.left, out.right};
      for (T* f : factors) {
        if (f == nullptr) continue;
        impl::poison_if_flagged<T><<<1, 1, 0, ctx.stream()>>>(pending.bad, f);
        check_launch("galore::cuda::poison_if_flagged");
      }
      return out;
    }
  }

  // The host's side of an applied refresh step; `fresh` is the new basis before
  // any quantization.
  template <class T>
  void record_refresh(Layer& l, const DeviceBasis<T>& fresh, const StepCounters& c, Context& ctx) {
    // The first singular vector for schedules that may compare it (the lazy
    // one; a custom one): Drift ignores it.
    if constexpr (std::is_same_v<SchedulePolicy, schedule::Drift>)
      schedule_.on_refresh(l.state, c.applied - 1, Span<const float>{});
    else if constexpr (!std::is_same_v<SchedulePolicy, schedule::FixedGap>)
      schedule_.on_refresh(l.state, c.applied - 1, first_singular_vector(l, fresh, ctx));
    l.has_basis = true;
    ++l.svd_count;
    l.known_applied = c.applied;
    l.pending = 0;
  }

  // The first singular vector of basis b on the host, in float (row 0 of the
  // right factor, or column 0 of the left one: what the lazy schedule compares).
  // Synchronizes ctx's stream (only refresh steps call it, and they already do).
  template <class T>
  std::vector<float> first_singular_vector(const Layer& l, const DeviceBasis<T>& b, Context& ctx) {
    const bool right = l.side == Side::Right;
    const Index len = right ? l.shape.cols : l.shape.rows;
    std::vector<T> raw(static_cast<std::size_t>(len));
    if (right)
      check(cudaMemcpyAsync(raw.data(), b.right, sizeof(T) * len, cudaMemcpyDeviceToHost, ctx.stream()),
            "cudaMemcpyAsync");
    else  // column 0 of the m x r row-major left factor
      check(cudaMemcpy2DAsync(raw.data(), sizeof(T), b.left, sizeof(T) * l.options.rank, sizeof(T), len,
                              cudaMemcpyDeviceToHost, ctx.stream()),
            "cudaMemcpy2DAsync");
    check(cudaStreamSynchronize(ctx.stream()), "cudaStreamSynchronize");
    std::vector<float> out(raw.size());
    for (std::size_t i = 0; i < raw.size(); ++i) out[i] = static_cast<float>(raw[i]);
    return out;
  }

  // R = projection of G: right G P^T, left P^T G, both P^T (G Q^T) with the
  // second product in float32.
  template <class T>
  static void project(Context& ctx, const DeviceBasis<T>& b, DeviceView<const T> G, float* R, float* X, float* Pf,
                      Shape lr) {
    const Index m = b.rows, n = b.cols, r = b.rank;
    switch (b.side) {
      case Side::Right:
        gemm(ctx, Op::N, Op::T, 1.0f, G, DeviceView<const T>(b.right, r, n), 0.0f, DeviceView<float>(R, lr.rows, lr.cols));
        break;
      case Side::Left:
        gemm(ctx, Op::T, Op::N, 1.0f, DeviceView<const T>(b.left, m, r), G, 0.0f, DeviceView<float>(R, lr.rows, lr.cols));
        break;
      case Side::Both: {
        gemm(ctx, Op::N, Op::T, 1.0f, G, DeviceView<const T>(b.right, r, n), 0.0f, DeviceView<float>(X, m, r));
        const float* P = Pf;
        if constexpr (std::is_same_v<T, float>) P = b.left;
        else impl::convert(ctx, b.left, Pf, m * r);
        gemm(ctx, Op::T, Op::N, 1.0f, DeviceView<const float>(P, m, r), DeviceView<const float>(X, m, r), 0.0f,
             DeviceView<float>(R, r, r));
        break;
      }
    }
  }

  // W = beta * W + alpha * back(D), alpha and beta from the layer's counters:
  // right D P, left P D, both (P D) Q.
  template <class T>
  static void back_project(Context& ctx, const DeviceBasis<T>& b, const T* D, T* PN, DeviceView<T> W, Shape lr,
                           const StepCounters* c) {
    const Index m = b.rows, n = b.cols, r = b.rank;
    const float* alpha = &c->alpha;
    const float* beta = &c->beta;
    const DeviceView<const T> Dv(D, lr.rows, lr.cols);
    switch (b.side) {
      case Side::Right:
        gemm_device_scalars(ctx, Op::N, Op::N, alpha, Dv, DeviceView<const T>(b.right, r, n), beta, W);
        break;
      case Side::Left:
        gemm_device_scalars(ctx, Op::N, Op::N, alpha, DeviceView<const T>(b.left, m, r), Dv, beta, W);
        break;
      case Side::Both:
        gemm(ctx, Op::N, Op::N, 1.0f, DeviceView<const T>(b.left, m, r), Dv, 0.0f, DeviceView<T>(PN, m, r));
        gemm_device_scalars(ctx, Op::N, Op::N, alpha, DeviceView<const T>(PN, m, r),
                            DeviceView<const T>(b.right, r, n), beta, W);
        break;
    }
  }

  // Rows [r0, r0 + out.rows) of W = beta W + alpha back(D) into the float panel
  // `out`, which holds those rows of W (out.cols: D's columns, padded when the
  // layer is staged); alpha and beta from the counters. Two-sided layers: PN =
  // P D was formed already.
  template <class T>
  static void back_project_rows(Context& ctx, const DeviceBasis<T>& b, const T* D, const T* PN, Shape lr, Index r0,
                                DeviceView<float> out, const StepCounters* c) {
    const Index r = b.rank, k = out.rows;
    const float* alpha = &c->alpha;
    const float* beta = &c->beta;
    switch (b.side) {
      case Side::Right:  // D is m x r: its rows times P (r x n)
        gemm_device_scalars(ctx, Op::N, Op::N, alpha, DeviceView<const T>(D + r0 * lr.cols, k, lr.cols),
                            DeviceView<const T>(b.right, r, b.cols), beta, out);
        break;
      case Side::Left:  // P's rows (k x r) times D (r x cols)
        gemm_device_scalars(ctx, Op::N, Op::N, alpha, DeviceView<const T>(b.left + r0 * r, k, r),
                            DeviceView<const T>(D, lr.rows, lr.cols), beta, out);
        break;
      case Side::Both:  // (P D)'s rows times Q (r x n)
        gemm_device_scalars(ctx, Op::N, Op::N, alpha, DeviceView<const T>(PN + r0 * r, k, r),
                            DeviceView<const T>(b.right, r, b.cols), beta, out);
        break;
    }
  }

  ProjectorOptions projection_;
  AdamConfig adam_;
  StateSettings state_;
  QuantSettings quant_;
  SchedulePolicy schedule_;
  SVDPolicy svd_;
  WeightRounding rounding_;
  // bitsandbytes' code maps on the device, for the 8-bit state only.
  struct NoMaps {};
  std::conditional_t<blockwise8bit, DynamicMaps, NoMaps> maps_;
  std::vector<Layer> layers_;
};

// galore_torch's GaLoreAdamW on the GPU: the policy names of galore::GaLoreAdamW
// (exact SVD, unquantized basis, fixed refresh gap, float32 moments).
using GaLoreAdamW = GaLoreOptimizer<Projector<svd::Exact, quant::None, schedule::FixedGap>, LowRankAdam<state::Float32>>;
// galore_torch's GaLoreAdamW8bit on the GPU: the same with bitsandbytes' 8-bit
// blockwise moments (per-layer steps; the whole-model step keeps dense moments).
using GaLoreAdamW8bit =
    GaLoreOptimizer<Projector<svd::Exact, quant::None, schedule::FixedGap>, LowRankAdam<state::Blockwise8bit>>;
// q_galore_torch's QGaLoreAdamW8bit on the GPU: INT4 bases (one group per row
// unless the quant settings say otherwise), the lazy layer-adaptive refresh,
// 8-bit moments, and INT8 weights (QuantizedWeight<8>) re-quantized by
// stochastic rounding (the default WeightRounding). Per-layer steps.
using QGaLoreAdamW8bit =
    GaLoreOptimizer<Projector<svd::Exact, quant::Int4, schedule::Lazy>, LowRankAdam<state::Blockwise8bit>>;

}  // namespace galore::cuda
