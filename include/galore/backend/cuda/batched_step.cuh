// galore (CUDA backend): the whole-model step, batched across layers and
// replayed as a CUDA graph.
//
// For trainers that have every gradient at once: plan once, step every time.
//
//   std::vector<cuda::StepParam> params;
//   for (...) params.push_back(cuda::step_param(id, W_view, G_view));
//   cuda::StepPlan plan = opt.plan_step_all(params, ctx);   // synchronizes once
//   for (each step) opt.step_all(plan, ctx);                // no synchronization
//
// The plan groups the layers by what one batched GEMM can serve (projected or
// dense, element type, shape, side, rank, scale, leading dimensions) and cuts
// each group into chunks whose temporaries (R, D, and the padded copies of
// staging.cuh) fit the workspace limit. A steady step is, per chunk, one
// pointer-array batched GEMM for the projection, one cooperative Adam kernel
// over the chunk's layers (batched_adam.cuh: each layer keeps its own skip
// decision), one batched GEMM for the back-projection; all dense layers share
// one Adam kernel. The pointer arrays, the layers' state, the workspace and the
// hyperparameters live at fixed device addresses, so the steady step is
// captured in a CUDA graph on its first run and replayed after; the learning
// rate is read from device memory, so set_lr() needs no new capture.
//
// A plan steps on one stream at a time: its tables, workspace and barrier are
// shared by its launches, which must not overlap.
//
// A step at which some layer's schedule may refresh its basis is batched too,
// but runs eagerly: the host reads the step counts of the layers that may be
// due (one synchronization), then per chunk computes the due layers' candidate
// bases together (cuda::compute_bases: svd::WarmStart batches their
// orthonormalizations), projects with them, runs Adam, copies on the device
// the candidates of the layers whose step applied into their bases
// (batched_refresh.cuh), and back-projects with the layers' bases; at the end
// it reads the due layers' counters (a second synchronization) for the SVD
// counts and the schedules. A skipped refresh step thus leaves the basis, the
// SVD count and the schedule untouched, as in step(); the graph's addresses do
// not change. With a
// drift-watching schedule (schedule::Drift), a step that may refresh or measure
// runs layer by layer through step(). The layers' bases and moments stay in
// their per-layer allocations: the batched GEMMs read every matrix through
// pointer arrays, as they must for the caller's W and G anyway.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "../../core/matrix_view.hpp"
#include "../../core/span.hpp"
#include "../../optim/step_result.hpp"
#include "../../projection_type.hpp"
#include "batched_adam.cuh"
#include "batched_refresh.cuh"
#include "context.cuh"
#include "device_buffer.cuh"
#include "dtype.cuh"
#include "error.cuh"
#include "gemm.cuh"
#include "refresh.cuh"
#include "staging.cuh"

namespace galore::cuda {

// One layer of a batched step: its weight and gradient in device memory.
struct StepParam {
  LayerId id;
  DType dtype = DType::Float32;
  void* W = nullptr;
  const void* G = nullptr;
  Index ldw = 0, ldg = 0;  // leading dimensions in elements
};
template <class T>
StepParam step_param(LayerId id, DeviceView<T> W, DeviceView<const T> G) {
  static_assert(!std::is_const_v<T>, "galore: W must be a view of mutable elements");
  return StepParam{id, dtype_of<T>(), W.data, G.data, W.ld, G.ld};
}
template <class T>
StepParam step_param(LayerId id, DeviceView<T> W, DeviceView<T> G) {
  return step_param(id, W, DeviceView<const T>(G));
}

struct StepPlanOptions {
  // The most workspace a chunk's temporaries may take (a chunk holds at least
  // one layer, so a single larger layer raises it).
  std::size_t workspace_limit = std::size_t{256} << 20;
  // The most workspace a refresh step's batch of due layers may take for the
  // SVD policy's scratch (one layer at least). It shares room with the chunks'
  // temporaries: the plan's first part is the larger of the two. A larger batch
  // refreshes faster (svd::WarmStart orthonormalizes a batch at once).
  std::size_t refresh_workspace_limit = std::size_t{256} << 20;
  // Capture the steady step in a CUDA graph on its first run (not on the legacy
  // default stream, which cannot be captured: there it runs eagerly).
  bool use_graph = true;
};

struct StepAllResult {
  bool batched = false;  // false: the step ran layer by layer (drift-watching schedules only)
  bool graph = false;    // the step was a graph launch (not a step at which a refresh was due)
  int refreshed = 0;     // layers whose basis this step refreshed (a skipped refresh step does not count)
};

class StepPlan {
 public:
  StepPlan() = default;
  StepPlan(StepPlan&& o) noexcept { *this = std::move(o); }
  StepPlan& operator=(StepPlan&& o) noexcept {
    if (this != &o) {
      release_graph();
      owner_ = o.owner_;
      entries_ = std::move(o.entries_);
      chunks_ = std::move(o.chunks_);
      tables_ = std::move(o.tables_);
      workspace_ = std::move(o.workspace_);
      image_ = std::move(o.image_);
      region_bytes_ = o.region_bytes_;
      uploaded_lr_ = o.uploaded_lr_;
      params_offset_ = o.params_offset_;
      barrier_offset_ = o.barrier_offset_;
      scalars_offset_ = o.scalars_offset_;
      use_graph_ = o.use_graph_;
      graph_ = o.graph_;
      graph_context_ = o.graph_context_;
      o.graph_ = nullptr;
    }
    return *this;
  }
  StepPlan(const StepPlan&) = delete;
  StepPlan& operator=(const StepPlan&) = delete;
  ~StepPlan() { release_graph(); }

  std::size_t num_layers() const { return entries_.size(); }
  std::size_t num_chunks() const { return chunks_.size(); }
  // Device bytes of the temporaries, allocated by the plan: the largest chunk's
  // R, D and padded copies, or the SVD policy's scratch for refreshing a batch
  // of a chunk's layers (within refresh_workspace_limit) if that is more; then
  // the candidate bases of the largest chunk, or the scratch output of skipped
  // layers if that is more.
  std::size_t workspace_bytes() const { return workspace_.bytes(); }
  // Device bytes the plan holds: the workspace plus its tables (pointer arrays,
  // per-layer descriptors, work items, hyperparameters, barrier).
  std::size_t device_bytes() const { return workspace_.bytes() + tables_.bytes(); }
  bool graph_captured() const { return graph_ != nullptr; }

 private:
  friend struct BatchedStepAccess;

  // A layer's parameter and its temporaries in the workspace.
  struct Entry : StepParam {
    void* R = nullptr;  // low-rank layers
    void* D = nullptr;
    void* G_copy = nullptr;  // padded copies (staged layers)
    void* W_copy = nullptr;
  };
  struct Chunk {
    bool dense = false, staged = false;
    DType dtype = DType::Float32;
    Side side = Side::Right;
    Shape shape, low_rank;
    Index rank = 0, ld = 0;  // ld: columns of R and D (padded when staged)
    Index ldw = 0, ldg = 0;
    float scale = 1.0f;
    std::size_t first = 0, count = 0;  // entries_[first, first + count)
    // Offsets into tables_.
    std::size_t proj_a = 0, proj_b = 0, proj_c = 0, back_a = 0, back_b = 0, back_c = 0, layers = 0, items = 0;
    int num_items = 0;
    std::int64_t elements = 0;
    int scalars = 0;  // index of this chunk's alpha in the scalars (beta follows)
    std::size_t adopt = 0;  // offset of the refresh step's AdoptItems in tables_
    Index refresh_batch = 1;  // due layers refreshed together (their scratch fits the workspace's first part)
    std::uint32_t alignment = 256;  // of every matrix the chunk's GEMMs read or write
  };

  void release_graph() noexcept {
    if (graph_) cudaGraphExecDestroy(graph_);
    graph_ = nullptr;
  }
  unsigned char* table(std::size_t offset) { return tables_.data() + offset; }

  const void* owner_ = nullptr;
  std::vector<Entry> entries_;
  std::vector<Chunk> chunks_;
  DeviceBuffer<unsigned char> tables_;
  DeviceBuffer<unsigned char> workspace_;
  std::vector<unsigned char> image_;  // the host image of tables_ (a refresh step swaps pointers and restores them)
  std::size_t region_bytes_ = 0;      // the workspace's first part: chunk temporaries or refresh scratch
  std::optional<double> uploaded_lr_;  // the learning rate of the hyperparameters on the device
  std::size_t params_offset_ = 0, barrier_offset_ = 0, scalars_offset_ = 0;
  bool use_graph_ = true;
  cudaGraphExec_t graph_ = nullptr;
  std::uint64_t graph_context_ = 0;  // Context::id() of the context the graph was captured on
};

// The optimizer's side of plan_step_all() and step_all() (friend of
// cuda::GaLoreOptimizer).
struct BatchedStepAccess {
  template <class Opt>
  static StepPlan plan(Opt& opt, Span<const StepParam> params, Context& ctx, const StepPlanOptions& options) {
    using A = WorkspaceArena;
    using M = typename Opt::moment_type;
    StepPlan plan;
    plan.owner_ = &opt;
    plan.use_graph_ = options.use_graph;
    // Check everything before any allocation.
    std::vector<char> seen(opt.layers_.size(), 0);
    for (const StepParam& p : params) {
      const auto& l = opt.layer(p.id);
      detail::require(!seen[p.id.index], "plan_step_all: layer ", Opt::describe(l), " is listed twice");
      seen[p.id.index] = 1;
      detail::require(l.dtype == p.dtype, "plan_step_all: layer ", Opt::describe(l), " was registered with ",
                      to_string(l.dtype), " elements but its parameter holds ", to_string(p.dtype));
      detail::require(p.W != nullptr && p.G != nullptr, "plan_step_all: layer ", Opt::describe(l),
                      " has a null device pointer");
      detail::require(p.ldw >= l.shape.cols && p.ldg >= l.shape.cols, "plan_step_all: layer ", Opt::describe(l),
                      ": leading dimensions must be at least its ", l.shape.cols, " columns");
      detail::require(l.projected ? l.side != Side::Both : (p.ldw == l.shape.cols && p.ldg == l.shape.cols),
                      "plan_step_all: layer ", Opt::describe(l),
                      l.projected ? " is projected on both sides (ProjectionType::Full), which the batched step does "
                                    "not serve yet: step it with step()"
                                  : " is dense: W and G must be contiguous row-major");
    }
    // Groups: layers one batched GEMM can serve, in the order of first appearance.
    using Key = std::tuple<bool, int, Index, Index, int, Index, float, Index, Index>;
    std::vector<Key> keys;
    std::vector<std::vector<const StepParam*>> groups;
    for (const StepParam& p : params) {
      const auto& l = opt.layer(p.id);
      const Key k = l.projected ? Key{false, static_cast<int>(l.dtype), l.shape.rows, l.shape.cols,
                                      static_cast<int>(l.side), l.options.rank, l.options.scale, p.ldw, p.ldg}
                                : Key{true, 0, 0, 0, 0, 0, 1.0f, 0, 0};  // every dense layer in one kernel
      const auto at = std::find(keys.begin(), keys.end(), k);
      if (at == keys.end()) {
        keys.push_back(k);
        groups.emplace_back();
        groups.back().push_back(&p);
      } else {
        groups[static_cast<std::size_t>(at - keys.begin())].push_back(&p);
      }
    }
    // Chunks, and the workspace. Its first part holds the largest chunk's
    // temporaries, or the SVD policy's scratch for refreshing a batch of a
    // chunk's layers (a refresh step computes the candidates before the chunk's
    // temporaries are written) if that is more. Its second part holds the candidate bases of the largest chunk,
    // or one layer-sized scratch output for skipped layers when weight decay
    // may make beta differ from 1 (written by the back-projection, after the
    // candidates were adopted).
    const bool decays = opt.adam_.weight_decay != 0.0;
    std::size_t chunk_bytes = 0, scratch_bytes = 0, refresh_bytes = 0, candidate_bytes = 0;
    for (const auto& g : groups) {
      const auto& l = opt.layer(g.front()->id);
      StepPlan::Chunk c;
      c.dense = !l.projected;
      c.dtype = l.dtype;
      c.shape = l.shape;
      c.low_rank = l.low_rank;
      if (!c.dense) {
        c.side = l.side;
        c.rank = l.options.rank;
        c.scale = l.options.scale;
        c.staged = Opt::staged(l);
        c.ld = c.staged ? Opt::step_cols(l) : l.low_rank.cols;
        c.ldw = g.front()->ldw;
        c.ldg = g.front()->ldg;
      }
      const std::size_t per_layer = c.dense ? 0 : layer_bytes(c);
      const std::size_t fit = per_layer == 0 ? g.size() : std::max<std::size_t>(1, options.workspace_limit / per_layer);
      const std::size_t pieces = (g.size() + fit - 1) / fit;
      std::size_t done = 0;
      for (std::size_t piece = 0; piece < pieces; ++piece) {
        StepPlan::Chunk part = c;
        part.first = plan.entries_.size();
        part.count = (g.size() - done) / (pieces - piece);  // balanced pieces
        for (std::size_t i = 0; i < part.count; ++i) {
          StepPlan::Entry e;
          static_cast<StepParam&>(e) = *g[done + i];
          plan.entries_.push_back(e);
        }
        done += part.count;
        chunk_bytes = std::max(chunk_bytes, part.count * per_layer);
        if (!c.dense) {
          candidate_bytes = std::max(candidate_bytes, part.count * basis_bytes(c));
          const std::size_t whole = opt.refresh_bytes(l, ctx, static_cast<Index>(part.count));
          refresh_bytes = std::max(refresh_bytes, std::min(whole, std::max(options.refresh_workspace_limit,
                                                                           opt.refresh_bytes(l, ctx, 1))));
        }
        plan.chunks_.push_back(part);
      }
      if (!c.dense && decays)
        scratch_bytes = std::max(scratch_bytes, A::align(size_of(c.dtype) * static_cast<std::size_t>(
                                                              c.shape.rows * (c.staged ? c.ld : c.ldw))));
    }
    plan.region_bytes_ = std::max(chunk_bytes, refresh_bytes);
    plan.workspace_ = DeviceBuffer<unsigned char>(plan.region_bytes_ + std::max(candidate_bytes, scratch_bytes));
    unsigned char* scratch = scratch_bytes ? plan.workspace_.data() + plan.region_bytes_ : nullptr;

    // Tables: per chunk six pointer arrays, the Adam layers and items; then the
    // hyperparameters, the GEMM scalars and the barrier.
    std::size_t at = 0;
    auto reserve = [&](std::size_t bytes) {
      const std::size_t o = at;
      at += A::align(bytes);
      return o;
    };
    std::vector<std::vector<BatchedAdamItem>> items(plan.chunks_.size());
    for (std::size_t ci = 0; ci < plan.chunks_.size(); ++ci) {
      StepPlan::Chunk& c = plan.chunks_[ci];
      for (std::size_t i = 0; i < c.count; ++i) {
        const auto& l = opt.layers_[plan.entries_[c.first + i].id.index];
        const std::int64_t n = c.dense ? l.shape.size() : l.low_rank.rows * c.ld;
        for (std::int64_t b = 0; b < n; b += kItemElements)
          items[ci].push_back(BatchedAdamItem{static_cast<int>(i), b, std::min(n, b + kItemElements)});
        c.elements += n;
      }
      c.num_items = static_cast<int>(items[ci].size());
      if (!c.dense) {
        for (std::size_t* o : {&c.proj_a, &c.proj_b, &c.proj_c, &c.back_a, &c.back_b, &c.back_c})
          *o = reserve(sizeof(void*) * c.count);
        c.adopt = reserve(sizeof(AdoptItem) * c.count);
        // The largest batch of due layers whose refresh scratch fits (the
        // scratch grows with the batch; one layer always fits).
        const auto& l = opt.layers_[plan.entries_[c.first].id.index];
        Index fits = 1, exceeds = static_cast<Index>(c.count) + 1;
        while (exceeds - fits > 1) {
          const Index mid = (fits + exceeds) / 2;
          (opt.refresh_bytes(l, ctx, mid) <= plan.region_bytes_ ? fits : exceeds) = mid;
        }
        c.refresh_batch = fits;
      }
      c.layers = reserve(sizeof(BatchedAdamLayer<M>) * c.count);
      c.items = reserve(sizeof(BatchedAdamItem) * items[ci].size());
      c.scalars = 2 + 2 * static_cast<int>(ci);
    }
    plan.params_offset_ = reserve(sizeof(AdamLaunch));
    plan.scalars_offset_ = reserve(sizeof(float) * (2 + 2 * plan.chunks_.size()));
    plan.barrier_offset_ = reserve(sizeof(BatchBarrier));
    plan.tables_ = DeviceBuffer<unsigned char>(at);

    // The host image of the tables, with device addresses.
    std::vector<unsigned char> image(at, 0);
    auto put = [&](std::size_t offset, std::size_t index, const auto& value) {
      std::memcpy(image.data() + offset + index * sizeof(value), &value, sizeof(value));
    };
    for (std::size_t ci = 0; ci < plan.chunks_.size(); ++ci) {
      StepPlan::Chunk& c = plan.chunks_[ci];
      unsigned char* ws = plan.workspace_.data();
      const std::size_t t = size_of(c.dtype);
      const std::size_t lr_elems = c.dense ? 0 : static_cast<std::size_t>(c.low_rank.rows * c.ld);
      const std::size_t full_elems = static_cast<std::size_t>(c.shape.rows * c.ld);
      for (std::size_t i = 0; i < c.count; ++i) {
        StepPlan::Entry& e = plan.entries_[c.first + i];
        auto& l = opt.layers_[e.id.index];
        BatchedAdamLayer<M> L;
        L.rows = c.dense ? l.shape.rows : c.low_rank.rows;
        L.cols = c.dense ? l.shape.cols : c.low_rank.cols;
        L.ld = c.dense ? l.shape.cols : c.ld;
        L.m = reinterpret_cast<M*>(l.storage.data());
        L.v = reinterpret_cast<M*>(l.storage.data() + Opt::layout(l).v);
        L.counters = Opt::counters_of(l);
        L.bf16 = e.dtype == DType::BFloat16 ? 1 : 0;
        L.dense = c.dense ? 1 : 0;
        if (c.dense) {
          L.input = e.G;
          L.output = e.W;
          L.vec4 = impl::vector_aligned(e.W, e.G);
        } else {
          L.vec4 = c.ld == c.low_rank.cols;  // R, D and the moments start 256-byte aligned
          e.R = ws;
          ws += A::align(sizeof(float) * lr_elems);
          e.D = ws;
          ws += A::align(t * lr_elems);
          if (c.staged) {
            e.G_copy = ws;
            ws += A::align(t * full_elems);
            e.W_copy = ws;
            ws += A::align(t * full_elems);
          }
          L.input = e.R;
          L.output = e.D;
          L.scale = c.scale;
          void* P = c.side == Side::Right ? static_cast<void*>(Opt::template basis_of<float>(l, l.storage.data()).right)
                                          : static_cast<void*>(Opt::template basis_of<float>(l, l.storage.data()).left);
          const void* G_in = c.staged ? e.G_copy : e.G;
          void* W_out = c.staged ? e.W_copy : e.W;
          c.alignment = std::min({c.alignment, impl::alignment_of(P), impl::alignment_of(G_in), impl::alignment_of(W_out)});
          // Projection: right R = G P^T (A = G, B = P), left R = P^T G (A = P, B = G).
          put(c.proj_a, i, c.side == Side::Right ? G_in : static_cast<const void*>(P));
          put(c.proj_b, i, c.side == Side::Right ? static_cast<const void*>(P) : G_in);
          put(c.proj_c, i, e.R);
          // Back-projection: right W += D P (A = D, B = P), left W += P D (A = P, B = D).
          put(c.back_a, i, c.side == Side::Right ? e.D : P);
          put(c.back_b, i, c.side == Side::Right ? P : e.D);
          put(c.back_c, i, W_out);
          L.back_output_slot = reinterpret_cast<void**>(plan.table(c.back_c) + i * sizeof(void*));
          L.back_output = W_out;
          L.skipped_output = scratch;
        }
        put(c.layers, i, L);
      }
      for (std::size_t k = 0; k < items[ci].size(); ++k) put(c.items, k, items[ci][k]);
    }
    // On ctx's stream, and waited for: a pageable cudaMemcpy may return before
    // its DMA lands, and a non-blocking stream is not ordered after it.
    check(cudaMemcpyAsync(plan.tables_.data(), image.data(), image.size(), cudaMemcpyHostToDevice, ctx.stream()),
          "cudaMemcpyAsync");
    ctx.synchronize();
    plan.image_ = std::move(image);
    // Plans of the GEMMs now (host work), so that the first step can be captured.
    for (const StepPlan::Chunk& c : plan.chunks_)
      if (!c.dense) {
        for (const bool back : {false, true}) {
          if (c.dtype == DType::Float32) run_chunk_gemms<float, true>(plan, c, ctx, back);
          else run_chunk_gemms<bf16, true>(plan, c, ctx, back);
        }
      }
    (void)ctx.resident_blocks(reinterpret_cast<const void*>(impl::batched_adam_step<M>), impl::kThreads);
    return plan;
  }

  template <class Opt>
  static StepAllResult step(Opt& opt, StepPlan& plan, Context& ctx) {
    detail::require(plan.owner_ == &opt, "step_all: the plan was made by another optimizer (or is empty)");
    StepAllResult result;
    bool may_refresh = false, may_measure = false;
    for (const StepPlan::Entry& e : plan.entries_) {
      const auto& l = opt.layers_[e.id.index];
      if (!l.projected) continue;
      may_refresh = may_refresh || opt.refresh_may_be_due(l);
      may_measure = may_measure || opt.measurement_may_be_wanted(l, false);
    }
    if (may_measure || (Opt::watches_drift && may_refresh)) {
      // A drift measurement (and the refresh it may call for) runs in step().
      for (const StepPlan::Entry& e : plan.entries_) {
        const Shape s = opt.layers_[e.id.index].shape;
        if (e.dtype == DType::Float32)
          opt.step(e.id, DeviceView<float>(static_cast<float*>(e.W), s.rows, s.cols, e.ldw),
                   DeviceView<const float>(static_cast<const float*>(e.G), s.rows, s.cols, e.ldg), ctx);
        else
          opt.step(e.id, DeviceView<bf16>(static_cast<bf16*>(e.W), s.rows, s.cols, e.ldw),
                   DeviceView<const bf16>(static_cast<const bf16*>(e.G), s.rows, s.cols, e.ldg), ctx);
      }
      return result;
    }
    upload_params(opt, plan, ctx);
    if (may_refresh) {
      const std::vector<char> due = due_layers(opt, plan, ctx);
      if (std::find(due.begin(), due.end(), 1) != due.end()) {
        result.batched = true;
        result.refreshed = refresh_step(opt, plan, due, ctx);
        return result;
      }
    }
    result.batched = true;
    const bool graph = plan.use_graph_ && ctx.stream() != nullptr;
    if (graph && (plan.graph_ == nullptr || plan.graph_context_ != ctx.id())) {
      plan.release_graph();
      cudaGraph_t g = nullptr;
      check(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
      try {
        run<Opt>(plan, ctx);
      } catch (...) {
        if (cudaStreamEndCapture(ctx.stream(), &g) == cudaSuccess && g) cudaGraphDestroy(g);
        throw;
      }
      check(cudaStreamEndCapture(ctx.stream(), &g), "cudaStreamEndCapture");
      const cudaError_t st = cudaGraphInstantiate(&plan.graph_, g, 0);
      cudaGraphDestroy(g);
      check(st, "cudaGraphInstantiate");
      plan.graph_context_ = ctx.id();
    }
    if (graph) {
      check(cudaGraphLaunch(plan.graph_, ctx.stream()), "cudaGraphLaunch");
      result.graph = true;
    } else {
      run<Opt>(plan, ctx);
    }
    for (const StepPlan::Entry& e : plan.entries_) ++opt.layers_[e.id.index].pending;
    return result;
  }

 private:
  static std::size_t layer_bytes(const StepPlan::Chunk& c) {
    using A = WorkspaceArena;
    const std::size_t t = size_of(c.dtype);
    const std::size_t lr = static_cast<std::size_t>(c.low_rank.rows * c.ld);
    std::size_t b = A::align(sizeof(float) * lr) + A::align(t * lr);
    if (c.staged) b += 2 * A::align(t * static_cast<std::size_t>(c.shape.rows * c.ld));
    return b;
  }
  // A candidate basis of one of the chunk's layers (left m x r, right r x n).
  static std::size_t basis_bytes(const StepPlan::Chunk& c) {
    const Index len = c.side == Side::Right ? c.shape.cols : c.shape.rows;
    return WorkspaceArena::align(size_of(c.dtype) * static_cast<std::size_t>(len * c.rank));
  }

  // The hyperparameters on the device, copied when the learning rate changed:
  // after construction it is the only one that does (set_lr, a checkpoint's).
  // A pageable copy: the host buffers may go as soon as the call returns.
  template <class Opt>
  static void upload_params(Opt& opt, StepPlan& plan, Context& ctx) {
    if (plan.uploaded_lr_ == opt.adam_.lr) return;
    const AdamLaunch p = opt.launch(1.0f);
    std::vector<float> scalars{1.0f, 0.0f};  // the projection's alpha and beta, then each chunk's
    for (const StepPlan::Chunk& c : plan.chunks_) {
      scalars.push_back(-p.decay * c.scale);
      scalars.push_back(p.decay);
    }
    check(cudaMemcpyAsync(plan.table(plan.params_offset_), &p, sizeof p, cudaMemcpyHostToDevice, ctx.stream()),
          "cudaMemcpyAsync");
    check(cudaMemcpyAsync(plan.table(plan.scalars_offset_), scalars.data(), sizeof(float) * scalars.size(),
                          cudaMemcpyHostToDevice, ctx.stream()),
          "cudaMemcpyAsync");
    plan.uploaded_lr_ = opt.adam_.lr;
  }

  template <bool Prepare, class In, class Out>
  static void gemm(Context& ctx, Op opa, Op opb, Index rows, Index cols, Index inner, const float* alpha,
                   const In* const* A, Index lda, const In* const* B, Index ldb, const float* beta, Out* const* C,
                   Index ldc, int count, std::uint32_t alignment, bool accumulate) {
    if constexpr (Prepare)
      (void)prepare_gemm_batched<In, Out>(ctx, opa, opb, rows, cols, inner, A, lda, B, ldb, ldc, count, alignment,
                                          accumulate);
    else gemm_batched<In, Out>(ctx, opa, opb, rows, cols, inner, alpha, A, lda, B, ldb, beta, C, ldc, count, alignment);
  }

  // The projection (or, with back = true, the back-projection) of a chunk;
  // Prepare: only make the GEMMs' plans (host work, unless the context
  // measures algorithms: prepare_gemm_batched), run nothing.
  template <class T, bool Prepare = false>
  static void run_chunk_gemms(StepPlan& plan, const StepPlan::Chunk& c, Context& ctx, bool back) {
    const float* scalars = reinterpret_cast<const float*>(plan.table(plan.scalars_offset_));
    const int n = static_cast<int>(c.count);
    const Index m = c.shape.rows, cols = c.staged ? c.ld : c.shape.cols, r = c.rank;
    const Index ldg = c.staged ? c.ld : c.ldg, ldw = c.staged ? c.ld : c.ldw;
    auto arr = [&](std::size_t offset) { return reinterpret_cast<T* const*>(plan.table(offset)); };
    auto carr = [&](std::size_t offset) { return reinterpret_cast<const T* const*>(plan.table(offset)); };
    if (!back) {
      float* const* R = reinterpret_cast<float* const*>(plan.table(c.proj_c));
      if (c.side == Side::Right)  // R (m x r) = G P^T
        gemm<Prepare, T, float>(ctx, Op::N, Op::T, m, r, cols, scalars, carr(c.proj_a), ldg, carr(c.proj_b), cols,
                               scalars + 1, R, r, n, c.alignment, false);
      else  // R (r x cols) = P^T G
        gemm<Prepare, T, float>(ctx, Op::T, Op::N, r, cols, m, scalars, carr(c.proj_a), r, carr(c.proj_b), ldg,
                               scalars + 1, R, c.ld, n, c.alignment, false);
      return;
    }
    // Right W = beta W + alpha D P, left W = beta W + alpha P D: A is m x r and
    // B r x cols either way (a left layer's D has cols columns, padded or not).
    const float* alpha = scalars + c.scalars;
    gemm<Prepare, T, T>(ctx, Op::N, Op::N, m, cols, r, alpha, carr(c.back_a), r, carr(c.back_b), cols, alpha + 1,
                        arr(c.back_c), ldw, n, c.alignment, true);
  }

  template <class T>
  static void stage_chunk(StepPlan& plan, const StepPlan::Chunk& c, cudaStream_t stream, bool weights) {
    for (std::size_t i = 0; i < c.count; ++i) {
      const StepPlan::Entry& e = plan.entries_[c.first + i];
      const Index ld = weights ? e.ldw : e.ldg;
      const T* src = static_cast<const T*>(weights ? e.W : e.G);
      T* dst = static_cast<T*>(weights ? e.W_copy : e.G_copy);
      stage(stream, DeviceView<const T>(src, c.shape.rows, c.shape.cols, ld), DeviceView<T>(dst, c.shape.rows, c.ld));
    }
  }
  template <class T>
  static void unstage_chunk(StepPlan& plan, const StepPlan::Chunk& c, Context& ctx) {
    for (std::size_t i = 0; i < c.count; ++i) {
      const StepPlan::Entry& e = plan.entries_[c.first + i];
      unstage(ctx, DeviceView<const T>(static_cast<const T*>(e.W_copy), c.shape.rows, c.ld),
              DeviceView<T>(static_cast<T*>(e.W), c.shape.rows, c.shape.cols, e.ldw));
    }
  }

  // A chunk's step up to Adam: the padded copies of G, the projection, Adam;
  // the padded copies of W meanwhile on the side stream (joined by run_back, or
  // by the caller's SideStreamJoin if anything throws in between).
  template <class T, class Opt>
  static void run_front(StepPlan& plan, const StepPlan::Chunk& c, Context& ctx) {
    using M = typename Opt::moment_type;
    const auto* layers = reinterpret_cast<const BatchedAdamLayer<M>*>(plan.table(c.layers));
    const auto* items = reinterpret_cast<const BatchedAdamItem*>(plan.table(c.items));
    const auto* params = reinterpret_cast<const AdamLaunch*>(plan.table(plan.params_offset_));
    auto* barrier = reinterpret_cast<BatchBarrier*>(plan.table(plan.barrier_offset_));
    if (!c.dense) {
      if (c.staged) {
        ctx.fork();
        stage_chunk<T>(plan, c, ctx.side_stream(), true);
        stage_chunk<T>(plan, c, ctx.stream(), false);
      }
      run_chunk_gemms<T>(plan, c, ctx, false);
    }
    batched_adam_step<M>(ctx, layers, static_cast<int>(c.count), items, c.num_items, params, barrier, c.elements);
  }
  // The rest: the back-projection (after the padded copies of W), W from its copy.
  template <class T>
  static void run_back(StepPlan& plan, const StepPlan::Chunk& c, Context& ctx) {
    if (c.dense) return;
    ctx.join();
    run_chunk_gemms<T>(plan, c, ctx, true);
    if (c.staged) unstage_chunk<T>(plan, c, ctx);
  }
  template <class T, class Opt>
  static void run_chunk(StepPlan& plan, const StepPlan::Chunk& c, Context& ctx) {
    const SideStreamJoin join(ctx);
    run_front<T, Opt>(plan, c, ctx);
    run_back<T>(plan, c, ctx);
  }

  // Which entries refresh at this step: those without a basis, and those whose
  // schedule is due at their step count (read from the device, one
  // synchronization, for the layers where the host is unsure).
  template <class Opt>
  static std::vector<char> due_layers(Opt& opt, StepPlan& plan, Context& ctx) {
    const std::size_t n = plan.entries_.size();
    std::vector<char> due(n, 0), read(n, 0);
    std::vector<StepCounters> counters(n);
    bool any = false;
    for (std::size_t i = 0; i < n; ++i) {
      auto& l = opt.layers_[plan.entries_[i].id.index];
      if (!l.projected || !opt.refresh_may_be_due(l)) continue;
      if (!l.has_basis) {
        due[i] = 1;
        continue;
      }
      check(cudaMemcpyAsync(&counters[i], Opt::counters_of(l), sizeof(StepCounters), cudaMemcpyDeviceToHost,
                            ctx.stream()),
            "cudaMemcpyAsync");
      read[i] = any = true;
    }
    if (any) ctx.synchronize();
    for (std::size_t i = 0; i < n; ++i) {
      if (!read[i]) continue;
      auto& l = opt.layers_[plan.entries_[i].id.index];
      l.known_applied = counters[i].applied;
      l.pending = 0;
      due[i] = opt.schedule_.due(l.state, l.known_applied) ? 1 : 0;
    }
    return due;
  }

  // A step at which the entries marked in `due` refresh their bases, chunk by
  // chunk, eagerly. Returns how many refreshed (their steps applied).
  template <class Opt>
  static int refresh_step(Opt& opt, StepPlan& plan, const std::vector<char>& due, Context& ctx) {
    try {
      for (const StepPlan::Chunk& c : plan.chunks_) {
        const auto first = due.begin() + static_cast<std::ptrdiff_t>(c.first);
        const auto last = first + static_cast<std::ptrdiff_t>(c.count);
        const bool any = std::find(first, last, 1) != last;
        if (c.dtype == DType::Float32) {
          if (any) refresh_chunk<float>(opt, plan, c, due, ctx);
          else run_chunk<float, Opt>(plan, c, ctx);
        } else {
          if (any) refresh_chunk<bf16>(opt, plan, c, due, ctx);
          else run_chunk<bf16, Opt>(plan, c, ctx);
        }
      }
    } catch (...) {
      // Some chunks may have stepped: the host counts a step pending for every
      // layer, so that it reads the counters before it next decides a refresh
      // (counting too many is safe, too few would miss one).
      for (const StepPlan::Entry& e : plan.entries_) ++opt.layers_[e.id.index].pending;
      throw;
    }
    // The due layers' counters say whose step applied (one synchronization);
    // their bases hold the candidates already.
    const std::size_t n = plan.entries_.size();
    std::vector<StepCounters> counters(n);
    for (std::size_t i = 0; i < n; ++i)
      if (due[i])
        check(cudaMemcpyAsync(&counters[i], Opt::counters_of(opt.layers_[plan.entries_[i].id.index]),
                              sizeof(StepCounters), cudaMemcpyDeviceToHost, ctx.stream()),
              "cudaMemcpyAsync");
    ctx.synchronize();
    int refreshed = 0;
    for (std::size_t i = 0; i < n; ++i) {
      auto& l = opt.layers_[plan.entries_[i].id.index];
      if (!due[i]) {
        ++l.pending;
        continue;
      }
      l.known_applied = counters[i].applied;
      l.pending = 0;
      if (counters[i].last_skipped) continue;
      if (l.dtype == DType::Float32) opt.record_refresh(l, Opt::template basis_of<float>(l, l.storage.data()), counters[i], ctx);
      else opt.record_refresh(l, Opt::template basis_of<bf16>(l, l.storage.data()), counters[i], ctx);
      ++refreshed;
    }
    return refreshed;
  }

  template <class T, class Opt>
  static void refresh_chunk(Opt& opt, StepPlan& plan, const StepPlan::Chunk& c, const std::vector<char>& due,
                            Context& ctx) {
    const Index m = c.shape.rows, n = c.shape.cols, r = c.rank;
    const bool right = c.side == Side::Right;
    // The due layers: their bases, candidates (the workspace's second part) and gradients.
    std::vector<std::size_t> at;
    std::vector<DeviceBasis<T>> stored, candidate;
    std::vector<DeviceView<const T>> G;
    std::vector<AdoptItem> adopt;
    unsigned char* next = plan.workspace_.data() + plan.region_bytes_;
    for (std::size_t i = 0; i < c.count; ++i) {
      if (!due[c.first + i]) continue;
      const StepPlan::Entry& e = plan.entries_[c.first + i];
      auto& l = opt.layers_[e.id.index];
      at.push_back(i);
      stored.push_back(Opt::template basis_of<T>(l, l.storage.data()));
      DeviceBasis<T> b = stored.back();
      (right ? b.right : b.left) = reinterpret_cast<T*>(next);
      next += basis_bytes(c);
      candidate.push_back(b);
      G.emplace_back(static_cast<const T*>(e.G), m, n, e.ldg);
      adopt.push_back(AdoptItem{Opt::counters_of(l), right ? b.right : b.left, right ? stored.back().right : stored.back().left,
                                static_cast<std::int64_t>(sizeof(T)) * (right ? n : m) * r});
    }
    // The candidates, in batches of layers that have a basis (warm) or not yet
    // (cold), each batch as large as the first part of the workspace allows.
    for (const bool warm : {true, false}) {
      std::vector<DeviceView<const T>> g;
      std::vector<DeviceBasis<T>> out, previous;
      for (std::size_t k = 0; k < at.size(); ++k) {
        if (opt.layers_[plan.entries_[c.first + at[k]].id.index].has_basis != warm) continue;
        g.push_back(G[k]);
        out.push_back(candidate[k]);
        if (warm) previous.push_back(stored[k]);
      }
      for (Index done = 0, total = static_cast<Index>(g.size()); done < total;) {
        const Index batch = std::min(c.refresh_batch, total - done);
        WorkspaceArena ws(plan.workspace_.data(), plan.region_bytes_);
        compute_bases(ctx, ws, opt.svd_, Span<const DeviceView<const T>>(g.data() + done, batch), r,
                      Span<const DeviceBasis<T>>(out.data() + done, batch),
                      warm ? Span<const DeviceBasis<T>>(previous.data() + done, batch) : Span<const DeviceBasis<T>>());
        done += batch;
      }
    }
    // The projection reads the candidates: the chunk's basis pointers swapped
    // for this step, and restored after it (ordered before any later launch).
    // Host-to-device copies from pageable memory return once the data is
    // staged, so the host vectors may go.
    const std::size_t slot = right ? c.proj_b : c.proj_a, bytes = sizeof(void*) * c.count;
    std::vector<const void*> pointers(c.count);
    std::memcpy(pointers.data(), plan.image_.data() + slot, bytes);
    for (std::size_t k = 0; k < at.size(); ++k) pointers[at[k]] = right ? candidate[k].right : candidate[k].left;
    check(cudaMemcpyAsync(plan.table(slot), pointers.data(), bytes, cudaMemcpyHostToDevice, ctx.stream()),
          "cudaMemcpyAsync");
    const SideStreamJoin join(ctx);
    run_front<T, Opt>(plan, c, ctx);
    check(cudaMemcpyAsync(plan.table(slot), plan.image_.data() + slot, bytes, cudaMemcpyHostToDevice, ctx.stream()),
          "cudaMemcpyAsync");
    // Where the step applied the candidate becomes the basis, before the
    // back-projection reads it (a skipped layer keeps its basis; its D is 0).
    auto* items = reinterpret_cast<AdoptItem*>(plan.table(c.adopt));
    check(cudaMemcpyAsync(items, adopt.data(), sizeof(AdoptItem) * adopt.size(), cudaMemcpyHostToDevice, ctx.stream()),
          "cudaMemcpyAsync");
    adopt_applied(ctx, items, static_cast<int>(adopt.size()), adopt.front().bytes);
    run_back<T>(plan, c, ctx);
  }

  template <class Opt>
  static void run(StepPlan& plan, Context& ctx) {
    for (const StepPlan::Chunk& c : plan.chunks_) {
      if (c.dtype == DType::Float32) run_chunk<float, Opt>(plan, c, ctx);
      else run_chunk<bf16, Opt>(plan, c, ctx);
    }
  }
};

}  // namespace galore::cuda
