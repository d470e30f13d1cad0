// galore: Span<T>, a pointer and a length (C++17 has no std::span), so that
// interfaces shared by the backends take vectors without naming Eigen.
#pragma once

#include <type_traits>
#include <utility>

#include "shape.hpp"

namespace galore {

template <class T>
class Span {
 public:
  Span() = default;
  Span(T* data, Index size) : data_(data), size_(size) {}
  // Any contiguous container with data() and size() (std::vector, an Eigen
  // vector, std::array); a Span<const T> also binds to temporaries, which live
  // until the end of the full expression that passes them.
  template <class C, class = std::enable_if_t<std::is_convertible_v<decltype(std::declval<C&>().data()), T*>>>
  Span(C& c) : data_(c.data()), size_(static_cast<Index>(c.size())) {}  // NOLINT(google-explicit-constructor)
  template <class C, class U = T, class = std::enable_if_t<std::is_const_v<U>>,
            class = std::enable_if_t<std::is_convertible_v<decltype(std::declval<const C&>().data()), T*>>>
  Span(const C& c) : data_(c.data()), size_(static_cast<Index>(c.size())) {}  // NOLINT(google-explicit-constructor)

  T* data() const { return data_; }
  Index size() const { return size_; }
  bool empty() const { return size_ == 0; }
  T& operator[](Index i) const { return data_[i]; }
  T* begin() const { return data_; }
  T* end() const { return data_ + size_; }

 private:
  T* data_ = nullptr;
  Index size_ = 0;
};

}  // namespace galore
