// galore: what a refresh schedule can do, detected from its members (both
// backends use these to accept a schedule and to drive it).
//
//   is_schedule_policy: a nested State, init() and due(state, step).
//   watches_drift:      wants_measurement(state, step, just_refreshed) too, and
//                       on_measurement(state, step, captured, just_refreshed)
//                       (schedule/drift.hpp): the step measures the fraction of
//                       G's energy the basis captured and may refresh at once.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

namespace galore::detail {

template <class S, class = void>
struct watches_drift : std::false_type {};
template <class S>
struct watches_drift<S, std::void_t<decltype(std::declval<const S&>().wants_measurement(
                            std::declval<const typename S::State&>(), std::int64_t{}, bool{}))>>
    : std::true_type {};

template <class S, class = void>
struct is_schedule_policy : std::false_type {};
template <class S>
struct is_schedule_policy<
    S, std::void_t<typename S::State, decltype(std::declval<const S&>().init()),
                   decltype(std::declval<const S&>().due(std::declval<const typename S::State&>(),
                                                         std::int64_t{}))>>
    : std::true_type {};

}  // namespace galore::detail
