// galore: bitsandbytes' 8-bit blockwise Adam state (bitsandbytes' Adam8bit with
// blockwise quantization), a StateT for LowRankAdam.
//
// m is stored as codes of the signed dynamic map, v of the unsigned one, each
// block of `block_size` elements scaled by its own float32 absmax. Tensors under
// `min_8bit_size` elements keep float32 states, as bitsandbytes does. Per step and
// element (bitsandbytes' formula, eps scaled by the bias correction):
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2      (on the dequantized states)
//   d = lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + sqrt(1 - b2^t) * eps)
// then each block's new absmax is max |.| and the states are re-quantized to the
// nearest code (quant::CodeIndex: a table lookup and a few comparisons instead of
// bitsandbytes' binary search, the same codes but for exact halfway ties); an m
// whose code would flip its sign moves one code towards it.
// An element whose gradient is NaN or Inf keeps its state and gets d = 0, as in
// bitsandbytes; so does one beyond +-AdamConfig::max_input, whose square could
// overflow float32 and store an Inf absmax (0 * Inf = NaN at the next step). Every
// element of d is clamped to +-AdamConfig::max_update. (LowRankAdam::update and
// the steps skip a gradient holding any such element as a whole.)
// With correct_bias off, both corrections are 1.
// No Eigen: the CUDA backend reads the policy's settings and stores its
// moments in the same form (checkpoints).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../config.hpp"
#include "../core/shape.hpp"
#include "../math/adam.hpp"
#include "../math/adam8bit.hpp"
#include "../quant/dynamic_map.hpp"
#include "adam_config.hpp"

namespace galore::state {

struct Blockwise8bit {
  Index block_size = 256;     // bitsandbytes >= 0.44 (2048 before)
  Index min_8bit_size = 4096;
  static constexpr Index kChunk = 1024;  // elements per pass of the float32 path

  struct Moments {
    Shape shape_;
    Index block_size = 256;
    bool quantized = false;
    std::vector<std::uint8_t> m_code, v_code;  // 8-bit path
    std::vector<float> m_absmax, v_absmax;
    std::vector<float> m32, v32;               // float32 path (small tensors)

    Shape shape() const { return shape_; }
    std::size_t bytes() const {
      return m_code.size() + v_code.size() + sizeof(float) * (m_absmax.size() + v_absmax.size() + m32.size() + v32.size());
    }
  };

  // Throws galore::invalid_argument for a block size outside [1, 65536] or a
  // negative min_8bit_size (LowRankAdam's constructor calls it).
  void validate() const {
    detail::require(block_size > 0 && block_size <= 65536, "8-bit block size must be in [1, 65536] (got ",
                    block_size, ")");
    detail::require(min_8bit_size >= 0, "min_8bit_size must be >= 0 (got ", min_8bit_size, ")");
  }

  Moments init(Shape s) const {
    validate();
    Moments mo;
    mo.shape_ = s;
    mo.block_size = block_size;
    const auto n = static_cast<std::size_t>(s.size());
    mo.quantized = s.size() >= min_8bit_size;
    if (mo.quantized) {
      const auto blocks = static_cast<std::size_t>((s.size() + block_size - 1) / block_size);
      mo.m_code.assign(n, 0);  // bitsandbytes starts from zero codes with zero absmax
      mo.v_code.assign(n, 0);
      mo.m_absmax.assign(blocks, 0.0f);
      mo.v_absmax.assign(blocks, 0.0f);
    } else {
      mo.m32.assign(n, 0.0f);
      mo.v32.assign(n, 0.0f);
    }
    return mo;
  }

  std::size_t bytes_for(Shape s) const {
    const auto n = static_cast<std::size_t>(s.size());
    if (s.size() < min_8bit_size) return 2 * sizeof(float) * n;
    const auto blocks = static_cast<std::size_t>((s.size() + block_size - 1) / block_size);
    return 2 * n + 2 * sizeof(float) * blocks;
  }

  template <class Sink>
  void update(Moments& mo, const float* g, std::int64_t t, const AdamConfig& c, Sink&& sink) const {
    const math::Adam8bitCoefficients coef =
        math::adam8bit_coefficients(c.lr, c.beta1, c.beta2, c.eps, t, c.correct_bias);
    const Index n = mo.shape_.size();

    if (!mo.quantized) {
      for (Index off = 0; off < n; off += kChunk) {
        const Index len = std::min(kChunk, n - off);
        float d[kChunk];
        for (Index k = 0; k < len; ++k) {
          const Index i = off + k;
          const float x = g[i];
          if (!math::in_adam_range(x)) {
            d[k] = 0.0f;
            continue;
          }
          float& m = mo.m32[static_cast<std::size_t>(i)];
          float& v = mo.v32[static_cast<std::size_t>(i)];
          const math::AdamElement e = math::adam8bit_element(x, m, v, coef);
          m = e.m;
          v = e.v;
          d[k] = math::clamp_update(e.d);
        }
        sink(off, d, len);
      }
      return;
    }

    const quant::CodeMap& qm = quant::dynamic_map_signed();
    const quant::CodeMap& qv = quant::dynamic_map_unsigned();
    const quant::CodeIndex& im = quant::signed_code_index();
    const quant::CodeIndex& iv = quant::unsigned_code_index();
    const Index bs = mo.block_size;
    const Index blocks = (n + bs - 1) / bs;
    // Blocks are independent: with OpenMP they are spread over threads (the sink
    // receives disjoint ranges).
GALORE_OMP(omp parallel if (n >= (Index{1} << 16)))
    {
    // Per-thread scratch for one block (3 x block_size floats), kept between
    // calls so that a steady step allocates nothing.
    static thread_local std::vector<float> scratch;
    if (scratch.size() < static_cast<std::size_t>(3 * bs)) scratch.resize(static_cast<std::size_t>(3 * bs));
    float* const s1 = scratch.data();
    float* const s2 = s1 + bs;
    float* const d = s2 + bs;
GALORE_OMP(omp for schedule(static))
    for (Index b = 0; b < blocks; ++b) {
      const Index lo = b * bs, len = std::min(bs, n - lo);
      const float am = mo.m_absmax[static_cast<std::size_t>(b)], av = mo.v_absmax[static_cast<std::size_t>(b)];
      const std::uint8_t* __restrict mc = mo.m_code.data() + lo;
      const std::uint8_t* __restrict vc = mo.v_code.data() + lo;
      const float* __restrict x = g + lo;
      float* __restrict m1 = s1;
      float* __restrict v1 = s2;
      float* __restrict dd = d;
      // Dequantize, update, and the step: one vectorizable pass (table gathers aside).
      float new_am = 0.0f, new_av = 0.0f;
      for (Index j = 0; j < len; ++j) {
        const float m = qm[mc[j]] * am, v = qv[vc[j]] * av, gj = x[j];
        const bool ok = math::in_adam_range(gj);
        const math::AdamElement e = math::adam8bit_element(ok ? gj : 0.0f, m, v, coef);
        const float mn = ok ? e.m : m;
        const float vn = ok ? e.v : v;
        m1[j] = mn;
        v1[j] = vn;
        dd[j] = ok ? e.d : 0.0f;
        new_am = std::max(new_am, std::abs(mn));
        new_av = std::max(new_av, vn);
      }
      // The clamp as its own pass: inside the loop above it slows the block by ~10%.
      for (Index k = 0; k < len; ++k) dd[k] = math::clamp_update(dd[k]);
      mo.m_absmax[static_cast<std::size_t>(b)] = new_am;
      mo.v_absmax[static_cast<std::size_t>(b)] = new_av;
      std::uint8_t* mcw = mo.m_code.data() + lo;
      std::uint8_t* vcw = mo.v_code.data() + lo;
      for (Index k = 0; k < len; ++k) {
        // An all-zero block (absmax 0) stores the zero codes instead of 0/0.
        int cm = 127;
        if (new_am > 0.0f) {
          const float m = m1[k];
          cm = im.nearest(m / new_am);
          // As bitsandbytes: a state never changes sign through quantization.
          if (std::signbit(qm[static_cast<std::size_t>(cm)]) != std::signbit(m)) cm += m > 0.0f ? 1 : -1;
        }
        mcw[k] = static_cast<std::uint8_t>(cm);
        vcw[k] = new_av > 0.0f ? iv.nearest(v1[k] / new_av) : 0;
      }
      sink(lo, d, len);
    }
    }
  }
};

}  // namespace galore::state
