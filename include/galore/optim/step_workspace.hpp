// galore: the scratch of a GaLore step, kept between steps so that a steady
// step allocates nothing.
//
// One step needs R and D (the projected gradient and Adam's step, both of the
// low-rank shape), P*D on two-sided projections (m x r), and a float panel for
// bf16 or quantized weights and gradients. A StepWorkspace holds one buffer for
// all of them, grown to the largest layer it has served and never shrunk, plus
// the dequantized basis of a quantizing projector. galore_step() takes one; the
// facades keep a pool, so that layers stepped from several threads at once each
// get their own.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <vector>

#include "../projector.hpp"
#include "../types.hpp"

namespace galore {

class StepWorkspace {
 public:
  // A buffer of at least `floats` floats; earlier pointers into it are invalid
  // after a call that grows it.
  float* floats(std::size_t count) {
    if (buffer_.size() < count) {
      buffer_.reserve(count);  // exactly count: bytes() is the largest request
      buffer_.resize(count);
    }
    return buffer_.data();
  }
  BasisScratch& basis() { return basis_; }

  // Bytes held: the buffer and the dequantized basis.
  std::size_t bytes() const {
    return sizeof(float) * (buffer_.capacity() + static_cast<std::size_t>(basis_.left.size()) +
                            static_cast<std::size_t>(basis_.right.size()));
  }

 private:
  std::vector<float> buffer_;
  BasisScratch basis_;
};

// Workspaces lent to concurrent steps: acquire() takes a free one (or makes
// one), and the lease gives it back when it ends. Copying a pool gives an empty
// one (workspaces hold no state).
class StepWorkspacePool {
 public:
  StepWorkspacePool() = default;
  StepWorkspacePool(const StepWorkspacePool&) {}
  StepWorkspacePool& operator=(const StepWorkspacePool&) { return *this; }

  class Lease {
   public:
    Lease(StepWorkspacePool& pool, StepWorkspace* w) : pool_(&pool), w_(w) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { pool_->give_back(w_); }
    StepWorkspace& operator*() const { return *w_; }

   private:
    StepWorkspacePool* pool_;
    StepWorkspace* w_;
  };

  Lease acquire() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) {
      all_.push_back({std::make_unique<StepWorkspace>(), 0});
      return Lease(*this, all_.back().workspace.get());
    }
    StepWorkspace* w = free_.back();
    free_.pop_back();
    return Lease(*this, w);
  }

  // Bytes the pool's workspaces held when they were last given back.
  std::size_t bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::size_t b = 0;
    for (const Entry& e : all_) b += e.bytes;
    return b;
  }

 private:
  struct Entry {
    std::unique_ptr<StepWorkspace> workspace;
    std::size_t bytes;
  };

  void give_back(StepWorkspace* w) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (Entry& e : all_)
      if (e.workspace.get() == w) e.bytes = w->bytes();
    free_.push_back(w);
  }

  mutable std::mutex mutex_;
  std::vector<Entry> all_;
  std::vector<StepWorkspace*> free_;
};

}  // namespace galore
