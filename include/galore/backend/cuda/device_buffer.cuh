// galore (CUDA backend): DeviceBuffer<T>, an owning, move-only array in device
// memory (cudaMalloc / cudaFree). Its address never changes while it lives, so
// kernels and captured graphs may keep pointers into it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "error.cuh"

namespace galore::cuda {

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t count) : count_(count) {
    if (count_ > 0) check(cudaMalloc(reinterpret_cast<void**>(&data_), bytes()), "cudaMalloc");
  }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), count_(std::exchange(o.count_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      count_ = std::exchange(o.count_, 0);
    }
    return *this;
  }

  // `count` elements with every byte 0, ready for any stream: the memset runs
  // on the legacy default stream, which a non-blocking stream does not wait
  // for, so this waits for it.
  static DeviceBuffer zeroed(std::size_t count) {
    DeviceBuffer b(count);
    if (count > 0) {
      check(cudaMemset(b.data(), 0, b.bytes()), "cudaMemset");
      check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
    }
    return b;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return count_; }
  std::size_t bytes() const { return count_ * sizeof(T); }
  bool empty() const { return count_ == 0; }

 private:
  void release() noexcept {
    if (data_) cudaFree(data_);  // cannot throw from a destructor; a failure here is a dead context
    data_ = nullptr;
    count_ = 0;
  }

  T* data_ = nullptr;
  std::size_t count_ = 0;
};

}  // namespace galore::cuda
