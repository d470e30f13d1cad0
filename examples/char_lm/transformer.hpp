// A character-level, decoder-only transformer with a hand-written forward and
// backward on Eigen: token and position embeddings, pre-norm blocks (causal
// multi-head self-attention, 4x GELU MLP), a final LayerNorm and an output head.
//
// It is a third-party trainer's model: it knows nothing of galore. Its weights
// are plain row-major matrices (nn.Linear layout, out x in); backward() reports
// each parameter's gradient to a callback as soon as it is complete, after the
// last use of that parameter's value, so the callback may update the parameter
// at once (per-layer updates) or keep the gradient for later.
//
// Templated on the scalar so that the gradient check can run in double.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace char_lm {

using Index = Eigen::Index;

struct Config {
  Index vocab = 256;   // bytes
  Index context = 128;
  Index width = 256;
  Index heads = 4;
  Index layers = 4;
  Index mlp_ratio = 4;
};

template <class S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// One learnable tensor (1 x n for vectors).
template <class S>
struct Param {
  std::string name;
  Mat<S> value;
  bool projected = false;  // an attention or MLP matrix: what GaLore projects
};

template <class S>
class Transformer {
 public:
  using M = Mat<S>;
  // Called by backward() with (parameter index, gradient); the parameter's value
  // is not read again during this backward pass.
  using GradSink = std::function<void(std::size_t, M&)>;
  // Lends a parameter's current value (a trainer holding quantized weights can
  // dequantize here); the default reads params()[i].value.
  using WeightSource = std::function<const M&(std::size_t, M& scratch)>;

  explicit Transformer(const Config& c, std::uint64_t seed = 1) : c_(c) {
    if (c.width % c.heads != 0) throw std::invalid_argument("width must be a multiple of heads");
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> normal(0.0, 0.02);
    auto randn = [&](Index r, Index k, double scale) {
      M m(r, k);
      for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(normal(gen) * scale);
      return m;
    };
    const double resid = 1.0 / std::sqrt(2.0 * static_cast<double>(c.layers));
    const Index d = c.width, h = c.mlp_ratio * c.width;
    add("tok_emb", randn(c.vocab, d, 1.0), false);
    add("pos_emb", randn(c.context, d, 1.0), false);
    for (Index l = 0; l < c.layers; ++l) {
      const std::string b = "blocks." + std::to_string(l) + ".";
      add(b + "ln1.g", M::Ones(1, d), false);
      add(b + "ln1.b", M::Zero(1, d), false);
      add(b + "attn.wq", randn(d, d, 1.0), true);
      add(b + "attn.wk", randn(d, d, 1.0), true);
      add(b + "attn.wv", randn(d, d, 1.0), true);
      add(b + "attn.wo", randn(d, d, resid), true);
      add(b + "ln2.g", M::Ones(1, d), false);
      add(b + "ln2.b", M::Zero(1, d), false);
      add(b + "mlp.w1", randn(h, d, 1.0), true);
      add(b + "mlp.w2", randn(d, h, resid), true);
    }
    add("lnf.g", M::Ones(1, d), false);
    add("lnf.b", M::Zero(1, d), false);
    add("head", randn(c.vocab, d, 1.0), false);
  }

  const Config& config() const { return c_; }
  std::vector<Param<S>>& params() { return params_; }
  const std::vector<Param<S>>& params() const { return params_; }
  Index num_parameters() const {
    Index n = 0;
    for (const auto& p : params_) n += p.value.size();
    return n;
  }
  void set_weight_source(WeightSource w) { weights_ = std::move(w); }

  // Mean cross-entropy of predicting targets[i] from tokens[0..i] within each of
  // the `batch` sequences of length T (tokens and targets hold batch * T bytes).
  // Keeps what backward() needs.
  S forward(const std::vector<std::uint8_t>& tokens, const std::vector<std::uint8_t>& targets, Index batch) {
    const Index T = static_cast<Index>(tokens.size()) / batch, d = c_.width, N = batch * T;
    if (T > c_.context || T * batch != static_cast<Index>(tokens.size()) || targets.size() != tokens.size())
      throw std::invalid_argument("forward: bad token or target sizes");
    B_ = batch;
    T_ = T;
    tokens_ = tokens;
    targets_ = targets;
    M h(N, d);
    {
      M s1, s2;
      const M& tok = w(0, s1);
      const M& pos = w(1, s2);
      for (Index i = 0; i < N; ++i) h.row(i) = tok.row(tokens[static_cast<std::size_t>(i)]) + pos.row(i % T);
    }
    blocks_.resize(static_cast<std::size_t>(c_.layers));
    for (Index l = 0; l < c_.layers; ++l) {
      Block& k = blocks_[static_cast<std::size_t>(l)];
      const std::size_t p0 = block_param(l);
      k.h_in = h;
      layer_norm(h, pv(p0 + 0), pv(p0 + 1), k.a, k.ln1);
      M s;
      k.q.noalias() = k.a * w(p0 + 2, s).transpose();
      k.k.noalias() = k.a * w(p0 + 3, s).transpose();
      k.v.noalias() = k.a * w(p0 + 4, s).transpose();
      attention_forward(k);
      h.noalias() += k.o * w(p0 + 5, s).transpose();
      k.h_mid = h;
      layer_norm(h, pv(p0 + 6), pv(p0 + 7), k.m, k.ln2);
      k.u.noalias() = k.m * w(p0 + 8, s).transpose();
      k.g = k.u;
      gelu_inplace(k.g);
      h.noalias() += k.g * w(p0 + 9, s).transpose();
    }
    h_final_ = h;
    const std::size_t f = final_param();
    layer_norm(h, pv(f), pv(f + 1), hf_, lnf_);
    M s;
    probs_.noalias() = hf_ * w(f + 2, s).transpose();
    S loss = 0;
    for (Index i = 0; i < N; ++i) {
      auto row = probs_.row(i);
      const S mx = row.maxCoeff();
      row = (row.array() - mx).exp();
      const S sum = row.sum();
      row /= sum;
      loss -= std::log(std::max(row(targets[static_cast<std::size_t>(i)]), S(1e-30)));
    }
    return loss / static_cast<S>(N);
  }

  // Gradients of the last forward()'s loss, parameter by parameter, in reverse
  // order of use. `sink` may update the parameter immediately.
  void backward(const GradSink& sink) {
    const Index N = B_ * T_, d = c_.width;
    const std::size_t f = final_param();
    M dlogits = probs_;
    for (Index i = 0; i < N; ++i) dlogits(i, targets_[static_cast<std::size_t>(i)]) -= 1;
    dlogits /= static_cast<S>(N);
    M dh, s;
    {
      M dhf = dlogits * w(f + 2, s);
      M gW = dlogits.transpose() * hf_;
      dlogits.resize(0, 0);
      sink(f + 2, gW);
      M dg, db;
      layer_norm_backward(dhf, h_final_, pv(f), lnf_, dh, dg, db);
      sink(f, dg);
      sink(f + 1, db);
    }
    for (Index l = c_.layers - 1; l >= 0; --l) {
      Block& k = blocks_[static_cast<std::size_t>(l)];
      const std::size_t p0 = block_param(l);
      // MLP: h += gelu(m W1^T) W2^T
      {
        M dgelu = dh * w(p0 + 9, s);
        M gW2 = dh.transpose() * k.g;
        sink(p0 + 9, gW2);
        gelu_backward_inplace(k.u, dgelu);  // dgelu becomes du
        M dm = dgelu * w(p0 + 8, s);
        M gW1 = dgelu.transpose() * k.m;
        sink(p0 + 8, gW1);
        M dx, dg, db;
        layer_norm_backward(dm, k.h_mid, pv(p0 + 6), k.ln2, dx, dg, db);
        sink(p0 + 6, dg);
        sink(p0 + 7, db);
        dh += dx;
      }
      // Attention: h += attn(a) Wo^T
      {
        M dO = dh * w(p0 + 5, s);
        M gWo = dh.transpose() * k.o;
        sink(p0 + 5, gWo);
        M dq(N, d), dk(N, d), dv(N, d);
        attention_backward(k, dO, dq, dk, dv);
        M da = dq * w(p0 + 2, s);
        da.noalias() += dk * w(p0 + 3, s);
        da.noalias() += dv * w(p0 + 4, s);
        M gWq = dq.transpose() * k.a;
        sink(p0 + 2, gWq);
        M gWk = dk.transpose() * k.a;
        sink(p0 + 3, gWk);
        M gWv = dv.transpose() * k.a;
        sink(p0 + 4, gWv);
        M dx, dg, db;
        layer_norm_backward(da, k.h_in, pv(p0 + 0), k.ln1, dx, dg, db);
        sink(p0 + 0, dg);
        sink(p0 + 1, db);
        dh += dx;
      }
    }
    M gpos = M::Zero(c_.context, d), gtok = M::Zero(c_.vocab, d);
    for (Index i = 0; i < N; ++i) {
      gpos.row(i % T_) += dh.row(i);
      gtok.row(tokens_[static_cast<std::size_t>(i)]) += dh.row(i);
    }
    sink(1, gpos);
    sink(0, gtok);
  }

  // Probabilities of the next byte after the last forward(), row i of sequence b.
  Eigen::Matrix<S, 1, Eigen::Dynamic> next_byte_probs(Index b, Index t) const { return probs_.row(b * T_ + t); }

 private:
  struct LNCache {
    M xhat;
    Eigen::Matrix<S, Eigen::Dynamic, 1> rstd;
  };
  struct Block {
    M h_in, a, q, k, v, o, h_mid, m, u, g;
    std::vector<M> P;  // softmax probabilities per (sequence, head)
    LNCache ln1, ln2;
  };

  void add(std::string name, M value, bool projected) {
    params_.push_back({std::move(name), std::move(value), projected});
  }
  std::size_t block_param(Index l) const { return 2 + static_cast<std::size_t>(l) * 10; }
  std::size_t final_param() const { return 2 + static_cast<std::size_t>(c_.layers) * 10; }
  const M& pv(std::size_t i) const { return params_[i].value; }
  const M& w(std::size_t i, M& scratch) const { return weights_ ? weights_(i, scratch) : params_[i].value; }

  static void layer_norm(const M& x, const M& g, const M& b, M& y, LNCache& c) {
    const Index N = x.rows(), d = x.cols();
    c.xhat.resize(N, d);
    c.rstd.resize(N);
    y.resize(N, d);
#pragma omp parallel for if (N > 256)
    for (Index i = 0; i < N; ++i) {
      const S mean = x.row(i).mean();
      const S var = (x.row(i).array() - mean).square().mean();
      const S rstd = S(1) / std::sqrt(var + S(1e-5));
      c.rstd(i) = rstd;
      c.xhat.row(i) = (x.row(i).array() - mean) * rstd;
      y.row(i) = c.xhat.row(i).cwiseProduct(g) + b;
    }
  }

  static void layer_norm_backward(const M& dy, const M& /*x*/, const M& g, const LNCache& c, M& dx, M& dg, M& db) {
    const Index N = dy.rows(), d = dy.cols();
    dg = (dy.cwiseProduct(c.xhat)).colwise().sum();
    db = dy.colwise().sum();
    dx.resize(N, d);
#pragma omp parallel for if (N > 256)
    for (Index i = 0; i < N; ++i) {
      const auto dxhat = dy.row(i).cwiseProduct(g).array();
      const S mean_dxhat = dxhat.mean();
      const S mean_dxhat_xhat = (dxhat * c.xhat.row(i).array()).mean();
      dx.row(i) = c.rstd(i) * (dxhat - mean_dxhat - c.xhat.row(i).array() * mean_dxhat_xhat);
    }
  }

  static constexpr S kGeluC = S(0.7978845608028654);  // sqrt(2 / pi)

  static void gelu_inplace(M& u) {
    auto a = u.array();
    a = S(0.5) * a * (S(1) + (kGeluC * (a + S(0.044715) * a.cube())).tanh());
  }
  // du = dg * gelu'(u), written over dg.
  static void gelu_backward_inplace(const M& u, M& dg) {
    const auto x = u.array();
    const auto t = (kGeluC * (x + S(0.044715) * x.cube())).tanh();
    dg.array() *= S(0.5) * (S(1) + t) + S(0.5) * x * (S(1) - t.square()) * kGeluC * (S(1) + S(3 * 0.044715) * x.square());
  }

  void attention_forward(Block& k) const {
    const Index H = c_.heads, dh = c_.width / H, T = T_, N = B_ * T;
    const S scale = S(1) / std::sqrt(static_cast<S>(dh));
    k.o.resize(N, c_.width);
    k.P.assign(static_cast<std::size_t>(B_ * H), M());
#pragma omp parallel for schedule(dynamic)
    for (Index bh = 0; bh < B_ * H; ++bh) {
      const Index b = bh / H, hd = bh % H;
      const auto q = k.q.block(b * T, hd * dh, T, dh);
      const auto kk = k.k.block(b * T, hd * dh, T, dh);
      const auto v = k.v.block(b * T, hd * dh, T, dh);
      M& P = k.P[static_cast<std::size_t>(bh)];
      P.noalias() = scale * (q * kk.transpose());
      for (Index i = 0; i < T; ++i) {
        auto row = P.row(i);
        const S mx = row.head(i + 1).maxCoeff();
        row.head(i + 1) = (row.head(i + 1).array() - mx).exp();
        row.tail(T - i - 1).setZero();  // causal mask
        row /= row.sum();
      }
      k.o.block(b * T, hd * dh, T, dh).noalias() = P * v;
    }
  }

  void attention_backward(const Block& k, const M& dO, M& dq, M& dk, M& dv) const {
    const Index H = c_.heads, dh = c_.width / H, T = T_;
    const S scale = S(1) / std::sqrt(static_cast<S>(dh));
#pragma omp parallel for schedule(dynamic)
    for (Index bh = 0; bh < B_ * H; ++bh) {
      const Index b = bh / H, hd = bh % H;
      const M& P = k.P[static_cast<std::size_t>(bh)];
      const auto dOb = dO.block(b * T, hd * dh, T, dh);
      const auto q = k.q.block(b * T, hd * dh, T, dh);
      const auto kk = k.k.block(b * T, hd * dh, T, dh);
      const auto v = k.v.block(b * T, hd * dh, T, dh);
      M dP = dOb * v.transpose();
      dv.block(b * T, hd * dh, T, dh).noalias() = P.transpose() * dOb;
      // softmax backward: dS = P * (dP - rowsum(dP * P))
      M dS = P.cwiseProduct(dP);
      const Eigen::Matrix<S, Eigen::Dynamic, 1> rows = dS.rowwise().sum();
      dS.noalias() -= P.cwiseProduct(rows.replicate(1, T));
      dS *= scale;
      dq.block(b * T, hd * dh, T, dh).noalias() = dS * kk;
      dk.block(b * T, hd * dh, T, dh).noalias() = dS.transpose() * q;
    }
  }

  Config c_;
  std::vector<Param<S>> params_;
  WeightSource weights_;
  Index B_ = 0, T_ = 0;
  std::vector<std::uint8_t> tokens_, targets_;
  std::vector<Block> blocks_;
  M h_final_, hf_, probs_;
  LNCache lnf_;
};

}  // namespace char_lm
