// galore: Projector<SVDPolicy, QuantPolicy, SchedulePolicy>, one layer's gradient subspace.
//
// It chooses the side from the projection type and the shape, refreshes its basis
// when the schedule says so (always when it has none), stores the basis through
// the quantization policy and lends it back dequantized (galore_torch's and
// q_galore_torch's GaLoreProjector).
//
// A refresh runs in two phases, so that a step can be abandoned without a trace:
// prepare_refresh() / prepare_adopt() compute the new basis, store it through the
// quantization policy and advance a copy of the schedule state, all into a
// Pending, changing nothing in the projector (and throwing, if they throw, with
// nothing changed); commit() then puts the Pending in force with moves only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "backend/eigen/svd.hpp"
#include "basis.hpp"
#include "policies.hpp"
#include "projection.hpp"
#include "projection_type.hpp"
#include "projector_options.hpp"
#include "quant/none.hpp"
#include "schedule/fixed_gap.hpp"
#include "schedule/traits.hpp"
#include "svd/exact.hpp"
#include "types.hpp"

namespace galore {


// The largest scale accepted: with the Adam step clamped to 2^64 per element,
// scale * back(D) stays far below float32's limit (2^128).
inline constexpr float kMaxProjectionScale = 65536.0f;

// Throws galore::invalid_argument unless rank >= 1, type is one of the
// ProjectionType enumerators and 0 < scale <= kMaxProjectionScale. What depends on
// the shape (rank <= min(m, n)) is checked by Projector::validate.
inline void validate_projector_options(const ProjectorOptions& o) {
  detail::require(o.rank >= 1, "rank must be at least 1 (got ", o.rank, ")");
  (void)resolve_side(o.type, 1, 1);  // throws on an invalid enum value
  detail::require(o.scale > 0.0f && o.scale <= kMaxProjectionScale, "scale must be in (0, ", kMaxProjectionScale,
                  "] (got ", o.scale, ")");
}

namespace detail {


// An SVD policy on the CPU: a member compute(), or a compute_basis(policy, ...)
// found among the Eigen backend's overloads or by ADL.
template <class P, class = void>
struct has_member_compute : std::false_type {};
template <class P>
struct has_member_compute<P, std::void_t<decltype(std::declval<const P&>().compute(
                                 std::declval<ConstMatrixRef<float>>(), Index{}, Side{},
                                 std::declval<const BasisView*>(), std::declval<Basis&>()))>>
    : std::true_type {};

namespace svd_dispatch {
using eigen::compute_basis;
template <class P, class = void>
struct has_compute_basis : std::false_type {};
template <class P>
struct has_compute_basis<P, std::void_t<decltype(compute_basis(std::declval<const P&>(),
                                                               std::declval<ConstMatrixRef<float>>(), Index{},
                                                               Side{}, std::declval<const BasisView*>(),
                                                               std::declval<Basis&>()))>> : std::true_type {};
template <class P>
void compute(const P& policy, ConstMatrixRef<float> G, Index rank, Side side, const BasisView* previous,
             Basis& out) {
  if constexpr (has_member_compute<P>::value) policy.compute(G, rank, side, previous, out);
  else compute_basis(policy, G, rank, side, previous, out);
}
}  // namespace svd_dispatch

template <class P>
struct is_svd_policy
    : std::bool_constant<has_member_compute<P>::value || svd_dispatch::has_compute_basis<P>::value> {};

template <class Q, class = void>
struct is_quant_policy : std::false_type {};
template <class Q>
struct is_quant_policy<
    Q, std::void_t<typename Q::Storage,
                   decltype(std::declval<const Q&>().store(std::declval<const MatrixF&>(),
                                                           std::declval<typename Q::Storage&>())),
                   decltype(std::declval<const Q&>().load(std::declval<const typename Q::Storage&>(),
                                                          std::declval<MatrixF&>()))>>
    : std::true_type {};

}  // namespace detail

// Scratch a caller keeps between calls so that dequantizing a basis allocates nothing.
struct BasisScratch {
  MatrixF left, right;
};

// The default policies are declared with the name in policies.hpp.
template <class SVDPolicy, class QuantPolicy, class SchedulePolicy>
class Projector {
  static_assert(detail::is_svd_policy<SVDPolicy>::value,
                "SVDPolicy needs, on the CPU: void compute(ConstMatrixRef<float> G, Index rank, Side side, "
                "const BasisView* previous, Basis& out) const");
  static_assert(detail::is_quant_policy<QuantPolicy>::value,
                "QuantPolicy needs: a nested Storage, store(const MatrixF&, Storage&) and "
                "const MatrixF& load(const Storage&, MatrixF& scratch)");
  static_assert(detail::is_schedule_policy<SchedulePolicy>::value,
                "SchedulePolicy needs: a nested State, State init() and "
                "bool due(const State&, std::int64_t step)");

 public:
  using svd_policy = SVDPolicy;
  using quant_policy = QuantPolicy;
  using schedule_policy = SchedulePolicy;
  using Storage = typename QuantPolicy::Storage;
  using ScheduleState = typename SchedulePolicy::State;

  Projector(Shape shape, const ProjectorOptions& options, SchedulePolicy schedule = {},
            SVDPolicy svd = {}, QuantPolicy quant = {})
      : shape_(shape),
        options_(options),
        side_(resolve_side(options.type, shape.rows, shape.cols)),
        svd_(std::move(svd)),
        quant_(std::move(quant)),
        schedule_(std::move(schedule)),
        schedule_state_(schedule_.init()) {
    validate(shape, options);
    detail::validate_policy(svd_);
    detail::validate_policy(quant_);
  }

  // Throws galore::invalid_argument if a projector of these options cannot exist.
  static void validate(Shape shape, const ProjectorOptions& o) {
    detail::require(shape.rows > 0 && shape.cols > 0, "a projected matrix needs a positive shape (got ",
                    shape.rows, "x", shape.cols, ")");
    const Index max_rank = std::min(shape.rows, shape.cols);
    detail::require(o.rank >= 1 && o.rank <= max_rank, "rank ", o.rank, " is out of range for a ",
                    shape.rows, "x", shape.cols, " matrix; choose 1 <= rank <= ", max_rank);
    validate_projector_options(o);
  }

  // A refresh (or a drift measurement) computed but not in force yet; see commit().
  struct Pending {
    Storage left, right;          // the new basis, as the quant policy stores it
    ScheduleState schedule{};     // the schedule state after the refresh or measurement
    bool has_basis = false;
    bool has_schedule = false;
    std::int64_t refreshes = 0;   // SVDs to count
  };

  Shape shape() const { return shape_; }
  Side side() const { return side_; }
  Index rank() const { return options_.rank; }
  float scale() const { return options_.scale; }
  const ProjectorOptions& options() const { return options_; }
  Shape low_rank_shape() const { return galore::low_rank_shape(side_, shape_, options_.rank); }
  bool has_basis() const { return has_basis_; }
  std::int64_t svd_count() const { return svd_count_; }
  std::int64_t update_gap() const { return schedule_.current_gap(schedule_state_); }
  const SchedulePolicy& schedule() const { return schedule_; }
  const ScheduleState& schedule_state() const { return schedule_state_; }
  const QuantPolicy& quantizer() const { return quant_; }
  const Storage& left_storage() const { return left_; }
  const Storage& right_storage() const { return right_; }

  // Would update_basis() refresh before this step?
  bool refresh_due(std::int64_t step) const {
    return !has_basis_ || schedule_.due(schedule_state_, step);
  }

  // Refreshes the basis from G if it is due at `step`; returns whether it did (a
  // refresh whose SVD gives non-finite vectors does not happen; see refresh()).
  bool update_basis(ConstMatrixRef<float> G, std::int64_t step) {
    if (!refresh_due(step)) return false;
    return refresh(G, step);
  }

  // Does the schedule watch drift (schedule/drift.hpp)?
  static constexpr bool watches_drift = detail::watches_drift<SchedulePolicy>::value;

  // For drift-watching schedules: should the caller measure, after projecting
  // G at `step`, the fraction of G's energy the basis captured?
  bool wants_measurement(std::int64_t step, bool just_refreshed) const {
    if constexpr (watches_drift) return schedule_.wants_measurement(schedule_state_, step, just_refreshed);
    else return false;
  }
  // Reports that fraction; true means the schedule asks for a refresh now.
  bool report_captured(std::int64_t step, double captured, bool just_refreshed) {
    Pending p;
    const bool want = prepare_measurement(step, captured, just_refreshed, p);
    commit(p);
    return want;
  }

  // Recomputes the basis from G now, whatever the schedule says (`step` is the
  // layer's step, for schedules that keep time). Returns false, changing nothing,
  // when the SVD policy gives non-finite vectors (G holds NaN or Inf).
  bool refresh(ConstMatrixRef<float> G, std::int64_t step = 0) {
    Pending p;
    if (!prepare_refresh(G, step, p)) return false;
    commit(p);
    return true;
  }

  // Installs a basis computed elsewhere (for example by a replay or a custom
  // solver); it counts as a refresh for the schedule. Throws, changing nothing,
  // for a basis of the wrong side or shape, or holding NaN or Inf.
  void adopt(Basis fresh, std::int64_t step = 0) {
    Pending p;
    prepare_adopt(std::move(fresh), step, p);
    commit(p);
  }

  // ---- The two phases of a refresh (see the top of this file) ----

  // Computes the basis of G as refresh() would, into p (on top of what p already
  // holds: a basis prepared earlier in the same step is the previous one). Returns
  // false, leaving p as it was, when the SVD policy gives non-finite vectors.
  bool prepare_refresh(ConstMatrixRef<float> G, std::int64_t step, Pending& p) const {
    check_shape(G);
    Basis fresh;
    if (p.has_basis || has_basis_) {
      BasisScratch scratch;
      const BasisView previous = basis(p, scratch);
      detail::svd_dispatch::compute(svd_, G, options_.rank, side_, &previous, fresh);
    } else {
      detail::svd_dispatch::compute(svd_, G, options_.rank, side_, nullptr, fresh);
    }
    check_basis_shape(fresh);
    if (!detail::basis_is_finite(fresh)) return false;
    stage(fresh, step, p);
    return true;
  }

  // The same for a basis computed elsewhere; throws on a wrong side or shape, or NaN or Inf.
  void prepare_adopt(Basis fresh, std::int64_t step, Pending& p) const {
    check_basis_shape(fresh);
    detail::require(detail::basis_is_finite(fresh), "the basis to adopt holds NaN or Inf");
    stage(fresh, step, p);
  }

  // For drift-watching schedules: the measurement of report_captured(), applied to
  // p's schedule state (or a copy of the one in force). True asks for a refresh now.
  bool prepare_measurement(std::int64_t step, double captured, bool just_refreshed, Pending& p) const {
    if constexpr (watches_drift) {
      ScheduleState next = p.has_schedule ? p.schedule : schedule_state_;
      const bool want = schedule_.on_measurement(next, step, captured, just_refreshed);
      p.schedule = std::move(next);
      p.has_schedule = true;
      return want;
    } else {
      (void)step, (void)captured, (void)just_refreshed, (void)p;
      return false;
    }
  }

  // Puts p in force (basis, schedule state, SVD count) with moves only, and empties it.
  void commit(Pending& p) {
    if (p.has_basis) {
      if (side_ != Side::Right) left_ = std::move(p.left);
      if (side_ != Side::Left) right_ = std::move(p.right);
      has_basis_ = true;
    }
    if (p.has_schedule) schedule_state_ = std::move(p.schedule);
    svd_count_ += p.refreshes;
    p.has_basis = p.has_schedule = false;
    p.refreshes = 0;
  }

  // The basis in use, dequantized into `scratch` when the policy stores it quantized.
  BasisView basis(BasisScratch& scratch) const {
    detail::require(has_basis_, "the projector has no basis yet; call update_basis() or refresh() first");
    return view(left_, right_, scratch);
  }

  // The basis p holds if it holds one, else the basis in use. The view points
  // into p (or scratch) until p is committed or changed.
  BasisView basis(const Pending& p, BasisScratch& scratch) const {
    return p.has_basis ? view(p.left, p.right, scratch) : basis(scratch);
  }

  // The reference's project(G, step): refresh if due, then R = projection of G.
  // Returns false, changing neither the projector nor R, when a due refresh
  // cannot compute a finite basis from G.
  bool project(ConstMatrixRef<float> G, std::int64_t step, MatrixF& R) {
    if (refresh_due(step) && !refresh(G, step)) return false;
    project(G, R);
    return true;
  }

  // R = projection of G with the basis in use.
  void project(ConstMatrixRef<float> G, MatrixF& R) const {
    check_shape(G);
    BasisScratch scratch;
    galore::project(basis(scratch), G, R);
  }

  // out = scale * back(N), the reference's project_back.
  void project_back(const MatrixF& N, MatrixF& out) const {
    const Shape lr = low_rank_shape();
    detail::require(N.rows() == lr.rows && N.cols() == lr.cols, "low-rank matrix must be ", lr.rows,
                    "x", lr.cols, " (got ", N.rows(), "x", N.cols(), ")");
    BasisScratch scratch;
    galore::project_back(basis(scratch), N, options_.scale, shape_.rows, shape_.cols, out);
  }

  // Replaces the whole state at once (checkpoint loading; galore/checkpoint.hpp
  // validates every piece first). Storages are ignored when has_basis is false.
  void restore(bool has_basis, std::int64_t svd_count, ScheduleState schedule_state, Storage left, Storage right) {
    has_basis_ = has_basis;
    svd_count_ = svd_count;
    schedule_state_ = std::move(schedule_state);
    left_ = has_basis && side_ != Side::Right ? std::move(left) : Storage{};
    right_ = has_basis && side_ != Side::Left ? std::move(right) : Storage{};
  }

  // Bytes held: the stored factors and the schedule's state (a schedule whose
  // State is not empty provides state_bytes(State) and state_bytes_for(length)).
  std::size_t bytes() const {
    std::size_t b = 0;
    if (has_basis_) {
      if (side_ != Side::Right) b += left_.bytes();
      if (side_ != Side::Left) b += right_.bytes();
    }
    return b + schedule_bytes();
  }

  // What bytes() will be once a basis exists, without building one.
  std::size_t bytes_when_filled() const { return footprint(shape_, options_, quant_, schedule_); }

  // The bytes a filled projector of this shape and these policies holds: the
  // stored basis plus the schedule's state. Allocates nothing.
  static std::size_t footprint(Shape shape, const ProjectorOptions& o, const QuantPolicy& quant,
                               const SchedulePolicy& schedule) {
    return basis_footprint(shape, o, quant) + schedule_footprint(shape, o, schedule);
  }
  static std::size_t basis_footprint(Shape shape, const ProjectorOptions& o, const QuantPolicy& quant) {
    const Side side = resolve_side(o.type, shape.rows, shape.cols);
    std::size_t b = 0;
    if (side != Side::Right) b += quant.storage_bytes({shape.rows, o.rank});
    if (side != Side::Left) b += quant.storage_bytes({o.rank, shape.cols});
    return b;
  }
  static std::size_t schedule_footprint(Shape shape, const ProjectorOptions& o, const SchedulePolicy& schedule) {
    if constexpr (std::is_empty_v<ScheduleState>) {
      return 0;
    } else {
      const Side side = resolve_side(o.type, shape.rows, shape.cols);
      return schedule.state_bytes_for(side == Side::Right ? shape.cols : shape.rows);
    }
  }

 private:
  std::size_t schedule_bytes() const {
    if constexpr (std::is_empty_v<ScheduleState>) return 0;
    else return schedule_.state_bytes(schedule_state_);
  }

  BasisView view(const Storage& left, const Storage& right, BasisScratch& scratch) const {
    BasisView v;
    v.side = side_;
    if (side_ != Side::Right) v.left = &quant_.load(left, scratch.left);
    if (side_ != Side::Left) v.right = &quant_.load(right, scratch.right);
    return v;
  }

  void check_basis_shape(const Basis& fresh) const {
    detail::require(fresh.side == side_, "basis side ", to_string(fresh.side),
                    " does not match the projector's side ", to_string(side_));
    if (side_ != Side::Right)
      detail::require(fresh.left.rows() == shape_.rows && fresh.left.cols() == options_.rank,
                      "left factor must be ", shape_.rows, "x", options_.rank, " (got ",
                      fresh.left.rows(), "x", fresh.left.cols(), ")");
    if (side_ != Side::Left)
      detail::require(fresh.right.rows() == options_.rank && fresh.right.cols() == shape_.cols,
                      "right factor must be ", options_.rank, "x", shape_.cols, " (got ",
                      fresh.right.rows(), "x", fresh.right.cols(), ")");
  }

  // Stores `fresh` and advances the schedule into temporaries first (either may
  // throw), then moves them into p.
  void stage(const Basis& fresh, std::int64_t step, Pending& p) const {
    Storage left, right;
    if (side_ != Side::Right) quant_.store(fresh.left, left);
    if (side_ != Side::Left) quant_.store(fresh.right, right);
    ScheduleState next = p.has_schedule ? p.schedule : schedule_state_;
    schedule_.on_refresh(next, step, first_singular_vector(BasisView(fresh)));
    if (side_ != Side::Right) p.left = std::move(left);
    if (side_ != Side::Left) p.right = std::move(right);
    p.schedule = std::move(next);
    p.has_basis = p.has_schedule = true;
    ++p.refreshes;
  }

  void check_shape(const ConstMatrixRef<float>& G) const {
    detail::require(G.rows() == shape_.rows && G.cols() == shape_.cols, "gradient is ", G.rows(), "x",
                    G.cols(), " but the projector was built for ", shape_.rows, "x", shape_.cols);
  }

  Shape shape_;
  ProjectorOptions options_;
  Side side_;
  SVDPolicy svd_;
  QuantPolicy quant_;
  SchedulePolicy schedule_;
  ScheduleState schedule_state_;
  Storage left_, right_;
  bool has_basis_ = false;
  std::int64_t svd_count_ = 0;
};

}  // namespace galore
