// galore: LowRankAdam<StateT>, Adam (AdamW) on a projected gradient R.
//
// The hyperparameters live here; the per-tensor moments (built when the shape is
// known, in the StateT's format) live with the caller. The update is the
// descent step D in R's space: the caller applies W -= scale * back(D), then
// decoupled weight decay (galore_torch's AdamW).
//
// update() refuses, changing nothing, an R holding NaN, Inf or an element beyond
// +-AdamConfig::max_input (whose square could overflow the second moment); every
// update it applies leaves the moments finite and D clamped to
// +-AdamConfig::max_update.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../detail/elementwise.hpp"
#include "../policies.hpp"
#include "../types.hpp"
#include "adam_config.hpp"
#include "dense_state.hpp"

namespace galore {

namespace detail {
template <class S, class = void>
struct is_state_policy : std::false_type {};
template <class S>
struct is_state_policy<S, std::void_t<typename S::Moments,
                                      decltype(std::declval<const S&>().init(Shape{})),
                                      decltype(std::declval<const S&>().bytes_for(Shape{}))>>
    : std::true_type {};

}  // namespace detail

// The default state is declared with the name in policies.hpp.
template <class StateT>
class LowRankAdam {
  static_assert(detail::is_state_policy<StateT>::value,
                "StateT needs: a nested Moments, Moments init(Shape), std::size_t bytes_for(Shape) "
                "and update(Moments&, const float* g, std::int64_t t, const AdamConfig&, Sink)");

 public:
  using state_policy = StateT;
  using Moments = typename StateT::Moments;

  explicit LowRankAdam(AdamConfig config = {}, StateT state = {})
      : config_(config), state_(std::move(state)) {
    config_.validate();
    detail::validate_policy(state_);
  }

  const AdamConfig& config() const { return config_; }
  const StateT& state_policy_object() const { return state_; }

  // Learning-rate schedules change lr between steps; the rest stays fixed.
  void set_lr(double lr) {
    AdamConfig c = config_;
    c.lr = lr;
    c.validate();
    config_ = c;
  }

  Moments init(Shape s) const { return state_.init(s); }
  std::size_t moments_bytes(Shape s) const { return state_.bytes_for(s); }

  // Advances `moments` with R at step t (1-based) and writes the descent step D
  // (R's shape). Returns false, changing neither the moments nor D, when R holds
  // NaN, Inf or an element beyond +-AdamConfig::max_input.
  bool update(Moments& moments, ConstMatrixRef<float> R, std::int64_t t, MatrixF& D) const {
    check(moments, shape_of(R), t);
    if (!detail::adam_input_in_range(R)) return false;
    update_in_range(moments, R, t, D);
    return true;
  }

  // The same, handing D to sink(offset, d, length) in chunks instead of storing it.
  template <class Sink>
  bool update(Moments& moments, ConstMatrixRef<float> R, std::int64_t t, Sink&& sink) const {
    check(moments, shape_of(R), t);
    if (!detail::adam_input_in_range(R)) return false;
    update_in_range(moments, R, t, std::forward<Sink>(sink));
    return true;
  }

  // update() without the range check, for callers that have checked R with
  // detail::adam_input_in_range (the steps check R, or G, anyway).
  void update_in_range(Moments& moments, ConstMatrixRef<float> R, std::int64_t t, MatrixF& D) const {
    check(moments, shape_of(R), t);
    D.resize(R.rows(), R.cols());
    float* out = D.data();
    detail::with_contiguous(R, [&](const float* g) {
      state_.update(moments, g, t, config_, [out](Index off, const float* d, Index len) {
        std::memcpy(out + off, d, sizeof(float) * static_cast<std::size_t>(len));
      });
    });
  }
  template <class Sink>
  void update_in_range(Moments& moments, ConstMatrixRef<float> R, std::int64_t t, Sink&& sink) const {
    check(moments, shape_of(R), t);
    detail::with_contiguous(R, [&](const float* g) { state_.update(moments, g, t, config_, sink); });
  }

 private:
  static void check(const Moments& moments, Shape s, std::int64_t t) {
    detail::require(moments.shape() == s, "moments are ", moments.shape().rows, "x", moments.shape().cols,
                    " but the gradient is ", s.rows, "x", s.cols);
    detail::require(t >= 1, "Adam's step counter starts at 1 (got ", t, ")");
  }


  AdamConfig config_;
  StateT state_;
};

}  // namespace galore
