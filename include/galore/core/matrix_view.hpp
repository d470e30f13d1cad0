// galore: non-owning views of row-major matrices that carry their system tag.
//
// A view is a data pointer, a shape and a leading dimension (elements between
// the starts of consecutive rows, >= cols). The tag says where the data lives:
// a MatrixView<float, system::cuda> points at device memory. Functions of a
// backend accept only views of their system; passing another is a compile-time
// error (require_system below) rather than a crash at run time.
#pragma once

#include <type_traits>

#include "shape.hpp"
#include "system.hpp"

namespace galore {

template <class T, class System>
struct MatrixView {
  static_assert(system::is_system_v<System>, "galore: MatrixView's second argument must be a system tag");
  using element_type = T;
  using system_type = System;

  T* data = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index ld = 0;  // leading dimension (row stride) in elements

  MatrixView() = default;
  MatrixView(T* d, Index r, Index c) : data(d), rows(r), cols(c), ld(c) {}
  MatrixView(T* d, Index r, Index c, Index leading) : data(d), rows(r), cols(c), ld(leading) {}
  // A view of mutable elements converts to a view of const ones.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  MatrixView(const MatrixView<U, System>& o) : data(o.data), rows(o.rows), cols(o.cols), ld(o.ld) {}

  Shape shape() const { return {rows, cols}; }
  Index size() const { return rows * cols; }
  bool contiguous() const { return ld == cols || rows <= 1; }
};

template <class T>
using DeviceView = MatrixView<T, system::cuda>;
template <class T>
using HostView = MatrixView<T, system::eigen>;

// A view over device memory: `device_view(ptr, rows, cols)`.
template <class T>
DeviceView<T> device_view(T* data, Index rows, Index cols) {
  return {data, rows, cols};
}
template <class T>
DeviceView<T> device_view(T* data, Index rows, Index cols, Index ld) {
  return {data, rows, cols, ld};
}

template <class V>
struct is_matrix_view : std::false_type {};
template <class T, class S>
struct is_matrix_view<MatrixView<T, S>> : std::true_type {};

// Fails to compile, with a message naming both systems, when a view of another
// system reaches a backend.
template <class Expected, class View>
constexpr void require_system() {
  static_assert(is_matrix_view<View>::value, "galore: expected a galore::MatrixView");
  static_assert(std::is_same_v<typename View::system_type, Expected>,
                "galore: this function takes views of another system: device memory goes in "
                "MatrixView<T, system::cuda> (galore/cuda.hpp), host memory in Eigen matrices or "
                "MatrixView<T, system::eigen> (galore/galore.hpp)");
}

}  // namespace galore
