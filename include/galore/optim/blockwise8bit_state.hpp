// galore: bitsandbytes' 8-bit blockwise Adam state (DESIGN.md 2.4), a StateT for
// LowRankAdam.
//
// m is stored as codes of the signed dynamic map, v of the unsigned one, each
// block of `block_size` elements scaled by its own float32 absmax. Tensors under
// `min_8bit_size` elements keep float32 states, as bitsandbytes does. Per step and
// element (bitsandbytes' formula, eps scaled by the bias correction):
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2      (on the dequantized states)
//   d = lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + sqrt(1 - b2^t) * eps)
// then each block's new absmax is max |.| and the states are re-quantized to the
// nearest code; an m whose code would flip its sign moves one code towards it.
// An element whose gradient is NaN or Inf keeps its state and gets d = 0.
// With correct_bias off, both corrections are 1.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../quant/dynamic_map.hpp"
#include "../types.hpp"
#include "adam_config.hpp"
#include "dense_state.hpp"

namespace galore::state {

struct Blockwise8bit {
  Index block_size = 256;     // bitsandbytes >= 0.44 (2048 before)
  Index min_8bit_size = 4096;

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

  Moments init(Shape s) const {
    detail::require(block_size > 0 && block_size <= 65536, "8-bit block size must be in [1, 65536] (got ",
                    block_size, ")");
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
    const float b1 = static_cast<float>(c.beta1), b2 = static_cast<float>(c.beta2);
    const float a1 = 1.0f - b1, a2 = 1.0f - b2;
    const float corr1 = c.correct_bias ? 1.0f - std::pow(b1, static_cast<float>(t)) : 1.0f;
    const float corr2 = c.correct_bias ? std::sqrt(1.0f - std::pow(b2, static_cast<float>(t))) : 1.0f;
    const float step = static_cast<float>(c.lr) * corr2 / corr1;
    const float eps = corr2 * static_cast<float>(c.eps);
    const Index n = mo.shape_.size();

    if (!mo.quantized) {
      for (Index off = 0; off < n; off += kChunk) {
        const Index len = std::min(kChunk, n - off);
        float d[kChunk];
        for (Index k = 0; k < len; ++k) {
          const Index i = off + k;
          const float x = g[i];
          if (!std::isfinite(x)) {
            d[k] = 0.0f;
            continue;
          }
          float& m = mo.m32[static_cast<std::size_t>(i)];
          float& v = mo.v32[static_cast<std::size_t>(i)];
          m = m * b1 + a1 * x;
          v = v * b2 + a2 * x * x;
          d[k] = step * (m / (std::sqrt(v) + eps));
        }
        sink(off, d, len);
      }
      return;
    }

    const quant::CodeMap& qm = quant::dynamic_map_signed();
    const quant::CodeMap& qv = quant::dynamic_map_unsigned();
    const Index bs = mo.block_size;
    std::vector<float> s1(static_cast<std::size_t>(bs)), s2(static_cast<std::size_t>(bs)),
        d(static_cast<std::size_t>(bs));
    for (Index b = 0; b * bs < n; ++b) {
      const Index lo = b * bs, len = std::min(bs, n - lo);
      const float am = mo.m_absmax[static_cast<std::size_t>(b)], av = mo.v_absmax[static_cast<std::size_t>(b)];
      float new_am = 0.0f, new_av = 0.0f;
      for (Index k = 0; k < len; ++k) {
        const auto i = static_cast<std::size_t>(lo + k);
        float m = qm[mo.m_code[i]] * am, v = qv[mo.v_code[i]] * av;
        const float x = g[lo + k];
        const bool finite = std::isfinite(x);
        if (finite) {
          m = m * b1 + a1 * x;
          v = v * b2 + a2 * x * x;
        }
        s1[static_cast<std::size_t>(k)] = m;
        s2[static_cast<std::size_t>(k)] = v;
        d[static_cast<std::size_t>(k)] = finite ? step * (m / (std::sqrt(v) + eps)) : 0.0f;
        new_am = std::max(new_am, std::abs(m));
        new_av = std::max(new_av, std::abs(v));
      }
      mo.m_absmax[static_cast<std::size_t>(b)] = new_am;
      mo.v_absmax[static_cast<std::size_t>(b)] = new_av;
      for (Index k = 0; k < len; ++k) {
        const auto i = static_cast<std::size_t>(lo + k);
        const float m = s1[static_cast<std::size_t>(k)], v = s2[static_cast<std::size_t>(k)];
        // An all-zero block (absmax 0) stores the zero codes instead of 0/0.
        int cm = new_am > 0.0f ? quant::nearest_code(qm.data(), m / new_am, true) : 127;
        if (new_am > 0.0f && std::signbit(qm[static_cast<std::size_t>(cm)]) != std::signbit(m))
          cm += m > 0.0f ? 1 : -1;
        mo.m_code[i] = static_cast<std::uint8_t>(cm);
        mo.v_code[i] = new_av > 0.0f ? quant::nearest_code(qv.data(), v / new_av, false) : 0;
      }
      sink(lo, d.data(), len);
    }
  }
};

}  // namespace galore::state
