// galore (CUDA backend): Context, what every GPU call runs with.
//
// A Context binds a stream (not owned: the caller's, or the legacy default
// stream), a cuBLAS and a cuSOLVER handle on that stream, and a workspace for
// the temporaries of a step or a refresh. Nothing is global: two contexts on
// two streams step different layers concurrently. The workspace follows
// CUTLASS's pattern: ask the optimizer for workspace_bytes(), then either let
// the context allocate it (reserve) or hand it memory you own (attach).
//
// No member synchronizes the device except the destructor (cudaFree of an owned
// workspace waits for work that uses it). The constructor allocates cuBLASLt's
// 32 MiB workspace, and makes a second stream for work that overlaps the
// context's own inside one call (fork/join below).
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "device_buffer.cuh"
#include "error.cuh"

namespace galore::cuda {

// A bump allocator over a workspace: take<T>(n) hands out 256-byte aligned
// slices. Fresh for every call that uses it, so slices never outlive the call.
class WorkspaceArena {
 public:
  WorkspaceArena(void* base, std::size_t bytes) : base_(static_cast<unsigned char*>(base)), bytes_(bytes) {}

  template <class T>
  T* take(std::size_t count) {
    const std::size_t need = align(count * sizeof(T));
    detail::require(used_ + need <= bytes_, "the CUDA workspace is too small (", bytes_, " bytes; this call needs at least ",
                    used_ + need, "); size it with the optimizer's workspace_bytes()");
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += need;
    return p;
  }
  std::size_t used() const { return used_; }
  std::size_t available() const { return bytes_ - used_; }
  static constexpr std::size_t align(std::size_t b) { return (b + 255) / 256 * 256; }

 private:
  unsigned char* base_;
  std::size_t bytes_;
  std::size_t used_ = 0;
};

// How a GEMM's cuBLASLt algorithm is chosen, once per problem:
//   Heuristic  cuBLASLt's heuristic's first choice (host work only; the same
//              choice every run);
//   Measured   the fastest of the heuristic's first kGemmCandidates, timed on
//              the first call's own operands into scratch output (that call
//              synchronizes the stream and allocates the scratch for its
//              duration; another run may time another algorithm the fastest,
//              so results may differ in the last bits between runs). A call
//              made during stream capture takes the heuristic's choice.
enum class GemmSelection { Heuristic, Measured };
inline constexpr int kGemmCandidates = 8;

// A cuBLASLt matmul prepared for one problem (operations, sizes, leading
// dimensions, types, pointer mode): descriptors, the heuristic's algorithms
// (first = its choice) and the one in use. Contexts cache them, so the
// heuristic runs once per problem, not per call.
struct LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  std::vector<cublasLtMatmulAlgo_t> candidates;
  bool has_algo = false;
  bool to_measure = false;  // made under GemmSelection::Measured, not yet timed
  bool measured = false;    // its candidates were timed (a failed timing leaves the heuristic's choice)
  LtPlan() = default;
  LtPlan(const LtPlan&) = delete;
  LtPlan& operator=(const LtPlan&) = delete;
  ~LtPlan() {
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};
using LtPlanKey = std::array<std::int64_t, 13>;

class Context {
 public:
  explicit Context(cudaStream_t stream = nullptr) : stream_(stream) {
    check(cublasCreate(&blas_), "cublasCreate");
    try {
      check(cublasSetStream(blas_, stream_), "cublasSetStream");
      check(cusolverDnCreate(&solver_), "cusolverDnCreate");
      check(cusolverDnSetStream(solver_, stream_), "cusolverDnSetStream");
      check(cusolverDnCreateParams(&solver_params_), "cusolverDnCreateParams");
      check(cublasLtCreate(&lt_), "cublasLtCreate");
      lt_workspace_ = DeviceBuffer<unsigned char>(kLtWorkspaceBytes);
      int device = 0;
      check(cudaGetDevice(&device), "cudaGetDevice");
      check(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device),
            "cudaDeviceGetAttribute(multiProcessorCount)");
      check(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      check(cudaEventCreateWithFlags(&forked_at_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      check(cudaEventCreateWithFlags(&joined_at_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    } catch (...) {
      destroy();
      throw;
    }
  }
  ~Context() { destroy(); }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  cudaStream_t stream() const { return stream_; }

  // A call's second stream: fork() makes it wait for everything queued on
  // stream() so far, join() makes stream() wait for everything queued on it
  // since (a no-op when not forked). Between the two, work on side_stream()
  // overlaps the work queued on stream(); a call that forks joins before it
  // returns or throws (SideStreamJoin), so callers see one stream. Both are
  // stream operations only, and a CUDA graph captures them as dependencies.
  cudaStream_t side_stream() const { return side_; }
  void fork() {
    check(cudaEventRecord(forked_at_, stream_), "cudaEventRecord");
    check(cudaStreamWaitEvent(side_, forked_at_, 0), "cudaStreamWaitEvent");
    forked_ = true;
  }
  void join() {
    if (!forked_) return;
    forked_ = false;
    check(cudaEventRecord(joined_at_, side_), "cudaEventRecord");
    check(cudaStreamWaitEvent(stream_, joined_at_, 0), "cudaStreamWaitEvent");
  }
  // A number no other context of this process has had: what a captured CUDA
  // graph records to know the context (and its cuBLASLt workspace) it belongs to.
  std::uint64_t id() const { return id_; }
  cublasHandle_t blas() const { return blas_; }
  cusolverDnHandle_t solver() const { return solver_; }
  cusolverDnParams_t solver_params() const { return solver_params_; }
  cublasLtHandle_t blas_lt() const { return lt_; }

  // cuBLASLt's own workspace (32 MiB, allocated with the context) and the
  // plans of the GEMMs run so far.
  static constexpr std::size_t kLtWorkspaceBytes = std::size_t{32} << 20;
  void* lt_workspace() { return lt_workspace_.data(); }
  std::map<LtPlanKey, std::unique_ptr<LtPlan>>& lt_plans() { return lt_plans_; }
  // How GEMM algorithms are chosen for the problems met from now on (plans
  // made before keep their choice, or their pending measurement).
  void select_gemm_algorithms(GemmSelection s) { gemm_selection_ = s; }
  GemmSelection gemm_selection() const { return gemm_selection_; }

  // Makes sure the workspace holds at least `bytes`, allocating it (owned by the
  // context) if it does not. Reallocation changes its address.
  void reserve_workspace(std::size_t bytes) {
    if (workspace_bytes() >= bytes) return;
    owned_ = DeviceBuffer<unsigned char>(bytes);
    external_ = nullptr;
    external_bytes_ = 0;
  }
  // Uses caller-owned device memory as the workspace (it must outlive its use).
  void attach_workspace(void* device_memory, std::size_t bytes) {
    detail::require(device_memory != nullptr || bytes == 0, "attach_workspace got a null pointer");
    owned_ = DeviceBuffer<unsigned char>();
    external_ = device_memory;
    external_bytes_ = bytes;
  }
  std::size_t workspace_bytes() const { return external_ ? external_bytes_ : owned_.bytes(); }
  WorkspaceArena arena() {
    return external_ ? WorkspaceArena(external_, external_bytes_) : WorkspaceArena(owned_.data(), owned_.bytes());
  }

  // The device's multiprocessors.
  int multiprocessors() const { return sm_count_; }

  // How many blocks of `threads` threads of `kernel` the device holds at once
  // (a cooperative launch may not exceed it), cached per kernel.
  int resident_blocks(const void* kernel, int threads) {
    auto it = resident_.find({kernel, threads});
    if (it == resident_.end()) {
      int per_sm = 0;
      check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0),
            "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
      detail::require(per_sm > 0, "a kernel of ", threads, " threads per block does not fit on this device");
      it = resident_.emplace(std::make_pair(kernel, threads), per_sm * sm_count_).first;
    }
    return it->second;
  }

  // Host scratch for cuSOLVER's host workspace (usually empty).
  std::vector<unsigned char>& host_scratch() { return host_scratch_; }

  // Waits for everything queued on the stream. The only synchronizing member.
  void synchronize() const { check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

 private:
  void destroy() noexcept {
    if (joined_at_) cudaEventDestroy(joined_at_);
    if (forked_at_) cudaEventDestroy(forked_at_);
    if (side_) cudaStreamDestroy(side_);
    joined_at_ = forked_at_ = nullptr;
    side_ = nullptr;
    lt_plans_.clear();
    if (lt_) cublasLtDestroy(lt_);
    lt_ = nullptr;
    if (solver_params_) cusolverDnDestroyParams(solver_params_);
    if (solver_) cusolverDnDestroy(solver_);
    if (blas_) cublasDestroy(blas_);
    solver_params_ = nullptr;
    solver_ = nullptr;
    blas_ = nullptr;
  }

  static std::uint64_t next_id() {
    static std::atomic<std::uint64_t> counter{0};
    return ++counter;
  }

  cudaStream_t stream_ = nullptr;
  cudaStream_t side_ = nullptr;
  cudaEvent_t forked_at_ = nullptr, joined_at_ = nullptr;
  bool forked_ = false;
  std::uint64_t id_ = next_id();
  cublasHandle_t blas_ = nullptr;
  cusolverDnHandle_t solver_ = nullptr;
  cusolverDnParams_t solver_params_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  DeviceBuffer<unsigned char> lt_workspace_;
  std::map<LtPlanKey, std::unique_ptr<LtPlan>> lt_plans_;
  GemmSelection gemm_selection_ = GemmSelection::Heuristic;
  DeviceBuffer<unsigned char> owned_;
  void* external_ = nullptr;
  std::size_t external_bytes_ = 0;
  std::vector<unsigned char> host_scratch_;
  int sm_count_ = 0;
  std::map<std::pair<const void*, int>, int> resident_;
};

// Joins the context's side stream when it goes out of scope (an exception
// included), so that no work of a call outlives it on the side stream.
class SideStreamJoin {
 public:
  explicit SideStreamJoin(Context& ctx) : ctx_(ctx) {}
  ~SideStreamJoin() {
    try {
      ctx_.join();
    } catch (...) {  // a failing event record is a dead context; the first error was thrown already
    }
  }
  SideStreamJoin(const SideStreamJoin&) = delete;
  SideStreamJoin& operator=(const SideStreamJoin&) = delete;

 private:
  Context& ctx_;
};

}  // namespace galore::cuda
