// char_lm: a character-level transformer trained on real text with galore, as a
// third-party trainer would use the library (only its public API).
//
//   char_lm --optimizer adamw|galore|galore8bit|qgalore [--steps N] [--csv FILE] [--data FILE] ...
//   char_lm --demo [--data FILE]        AdamW against GaLore, a couple of minutes on 2 cores
//   char_lm --help
//
// Without --data the program trains on a corpus it writes itself, so it always runs.
#include <galore/galore.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "data.hpp"
#include "transformer.hpp"

namespace {

using Model = char_lm::Transformer<float>;
using galore::Index;
using galore::LayerId;
using galore::MatrixF;

struct Options {
  std::string optimizer = "galore";
  std::string data;
  std::string csv;
  long steps = 1000;
  long batch = 8;
  char_lm::Config model;
  double lr = -1;  // per optimizer family when not given
  double min_lr_ratio = 0.1;
  double warmup = 0.05;
  double weight_decay = 0.0;
  double eps = -1;
  Index rank = 64;
  long gap = 200;
  float scale = 0.25f;
  std::uint64_t seed = 1;
  bool per_layer = false;
  long eval_every = 50;
  long eval_batches = 8;
  long log_every = 10;
  long sample_bytes = 300;
  bool demo = false;
  bool quiet = false;
};

void usage() {
  std::printf(
      "usage: char_lm [options]\n"
      "  --optimizer NAME   adamw | galore | galore8bit | qgalore (default galore)\n"
      "  --steps N          training steps (default 1000)\n"
      "  --csv FILE         write step,train_loss,val_loss,tokens_per_s,optimizer_state_bytes,gradient_bytes\n"
      "  --data FILE        text to train on; the last 10%% is held out (default: a generated corpus)\n"
      "  --lr X             peak learning rate (default adamw 1e-3, GaLore family 1e-2)\n"
      "  --rank R --gap T --scale A   GaLore rank (64), refresh gap (200), scale (0.25)\n"
      "  --batch B          sequences per step (8); --context T (128); --width D (256);\n"
      "  --layers L (4); --heads H (4)\n"
      "  --warmup F         warm-up fraction of the steps (0.05), then cosine decay to 10%% of lr\n"
      "  --weight-decay X   decoupled weight decay (0); --eps X (1e-6, 8-bit: 1e-8)\n"
      "  --per-layer        step each parameter inside the backward pass and free its gradient\n"
      "  --seed S           initialization, data order and stochastic rounding (1)\n"
      "  --eval-every K     held-out evaluation interval (50); --eval-batches N (8)\n"
      "  --log-every K (10); --sample N bytes generated at the end (300); --quiet\n"
      "  --demo             train AdamW and GaLore briefly and print a comparison table\n");
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + a);
      return argv[++i];
    };
    if (a == "--optimizer") o.optimizer = next();
    else if (a == "--data") o.data = next();
    else if (a == "--csv") o.csv = next();
    else if (a == "--steps") o.steps = std::stol(next());
    else if (a == "--batch") o.batch = std::stol(next());
    else if (a == "--context") o.model.context = std::stol(next());
    else if (a == "--width") o.model.width = std::stol(next());
    else if (a == "--layers") o.model.layers = std::stol(next());
    else if (a == "--heads") o.model.heads = std::stol(next());
    else if (a == "--lr") o.lr = std::stod(next());
    else if (a == "--warmup") o.warmup = std::stod(next());
    else if (a == "--weight-decay") o.weight_decay = std::stod(next());
    else if (a == "--eps") o.eps = std::stod(next());
    else if (a == "--rank") o.rank = std::stol(next());
    else if (a == "--gap") o.gap = std::stol(next());
    else if (a == "--scale") o.scale = std::stof(next());
    else if (a == "--seed") o.seed = std::stoull(next());
    else if (a == "--per-layer") o.per_layer = true;
    else if (a == "--eval-every") o.eval_every = std::stol(next());
    else if (a == "--eval-batches") o.eval_batches = std::stol(next());
    else if (a == "--log-every") o.log_every = std::stol(next());
    else if (a == "--sample") o.sample_bytes = std::stol(next());
    else if (a == "--demo") o.demo = true;
    else if (a == "--quiet") o.quiet = true;
    else if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else {
      throw std::runtime_error("unknown option " + a + " (see --help)");
    }
  }
  if (o.optimizer != "adamw" && o.optimizer != "galore" && o.optimizer != "galore8bit" && o.optimizer != "qgalore")
    throw std::runtime_error("unknown optimizer '" + o.optimizer + "'; use adamw, galore, galore8bit or qgalore");
  if (o.steps < 1 || o.batch < 1 || o.eval_every < 1 || o.eval_batches < 1 || o.log_every < 1)
    throw std::runtime_error("steps, batch and the intervals must be positive");
  const bool eight_bit = o.optimizer == "galore8bit" || o.optimizer == "qgalore";
  if (o.lr < 0) o.lr = o.optimizer == "adamw" ? 1e-3 : 1e-2;
  if (o.eps < 0) o.eps = eight_bit ? 1e-8 : 1e-6;
  return o;
}

// The optimizer side of the trainer: one galore facade, whatever its type.
class Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual void step(std::size_t param, MatrixF& grad) = 0;
  virtual void set_lr(double lr) = 0;
  virtual std::size_t state_bytes() const = 0;
  virtual std::size_t weight_bytes() const = 0;
};

template <class Facade>
class FacadeOptimizer final : public Optimizer {
 public:
  // all_dense: full-rank AdamW on every parameter. quantize: hold the projected
  // matrices as INT8 codes (Q-GaLore); the model then reads them dequantized.
  FacadeOptimizer(Facade facade, Model& model, bool all_dense, bool quantize)
      : opt_(std::move(facade)), model_(model) {
    auto& params = model.params();
    ids_.resize(params.size());
    quantized_.resize(params.size());
    for (std::size_t i = 0; i < params.size(); ++i) {
      auto& p = params[i];
      const galore::Shape s{p.value.rows(), p.value.cols()};
      ids_[i] = p.projected && !all_dense ? opt_.add_layer(s, p.name) : opt_.add_dense(s, p.name);
      if (quantize && p.projected) {
        quantized_[i] = std::make_unique<galore::QuantizedWeight<8>>(p.value, 256);
        p.value.resize(0, 0);  // no float copy is kept
      }
    }
    if (quantize) {
      model.set_weight_source([this](std::size_t i, MatrixF& scratch) -> const MatrixF& {
        if (!quantized_[i]) return model_.params()[i].value;
        scratch = quantized_[i]->dequantize();
        return scratch;
      });
    }
  }

  void step(std::size_t i, MatrixF& g) override {
    if (quantized_[i]) opt_.step(ids_[i], *quantized_[i], g);
    else opt_.step(ids_[i], model_.params()[i].value, g);
  }
  void set_lr(double lr) override { opt_.set_lr(lr); }
  std::size_t state_bytes() const override { return opt_.state_bytes(); }
  std::size_t weight_bytes() const override {
    std::size_t b = 0;
    for (std::size_t i = 0; i < ids_.size(); ++i)
      b += quantized_[i] ? quantized_[i]->bytes() : sizeof(float) * model_.params()[i].value.size();
    return b;
  }

 private:
  Facade opt_;
  Model& model_;
  std::vector<LayerId> ids_;
  std::vector<std::unique_ptr<galore::QuantizedWeight<8>>> quantized_;
};

std::unique_ptr<Optimizer> make_optimizer(const Options& o, Model& model) {
  galore::AdamConfig adam;
  adam.lr = o.lr;
  adam.eps = o.eps;
  adam.weight_decay = o.weight_decay;
  const galore::ProjectorOptions proj{o.rank, galore::ProjectionType::Std, o.scale};
  if (o.optimizer == "adamw")
    return std::make_unique<FacadeOptimizer<galore::GaLoreAdamW>>(
        galore::GaLoreAdamW(proj, galore::LowRankAdam<>(adam)), model, true, false);
  if (o.optimizer == "galore")
    return std::make_unique<FacadeOptimizer<galore::GaLoreAdamW>>(
        galore::GaLoreAdamW(proj, galore::LowRankAdam<>(adam), galore::schedule::FixedGap{o.gap}), model, false,
        false);
  if (o.optimizer == "galore8bit")
    return std::make_unique<FacadeOptimizer<galore::GaLoreAdamW8bit>>(
        galore::GaLoreAdamW8bit(proj, galore::LowRankAdam<galore::state::Blockwise8bit>(adam),
                                galore::schedule::FixedGap{o.gap}),
        model, false, false);
  // Q-GaLore as its paper runs it: INT4 basis and INT8 weights in groups of 256,
  // the lazy schedule's defaults, 8-bit moments, stochastic rounding.
  return std::make_unique<FacadeOptimizer<galore::QGaLoreAdamW8bit>>(
      galore::QGaLoreAdamW8bit(proj, galore::LowRankAdam<galore::state::Blockwise8bit>(adam),
                               galore::schedule::Lazy{o.gap, 0.4, 2.0, 5}, galore::svd::Exact{},
                               galore::quant::Int4{256}, galore::StochasticRounder<8>(o.seed)),
      model, false, true);
}

double lr_at(const Options& o, long step) {
  const long warm = std::max(1L, static_cast<long>(o.warmup * static_cast<double>(o.steps)));
  if (step < warm) return o.lr * static_cast<double>(step + 1) / static_cast<double>(warm);
  const double progress = static_cast<double>(step - warm) / static_cast<double>(std::max(1L, o.steps - warm));
  return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + std::cos(3.14159265358979323846 * progress)));
}

struct Result {
  std::string optimizer;
  double final_val = NAN, best_val = NAN, tokens_per_s = 0, seconds = 0;
  std::size_t state_bytes = 0, weight_bytes = 0, peak_gradient_bytes = 0;
  long steps = 0;
};

double evaluate(Model& model, const char_lm::Corpus& corpus, const Options& o) {
  std::mt19937_64 gen(1234);  // the same held-out windows for every run
  double sum = 0;
  for (long b = 0; b < o.eval_batches; ++b) {
    const auto batch = char_lm::sample_batch(corpus.val, o.batch, o.model.context, gen);
    sum += model.forward(batch.tokens, batch.targets, o.batch);
  }
  return sum / static_cast<double>(o.eval_batches);
}

std::string generate(Model& model, const std::string& prompt, long bytes, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::string text = prompt;
  const Index T = model.config().context;
  for (long i = 0; i < bytes; ++i) {
    const std::string window = text.substr(text.size() > static_cast<std::size_t>(T) ? text.size() - T : 0);
    std::vector<std::uint8_t> tokens(window.begin(), window.end());
    model.forward(tokens, tokens, 1);
    Eigen::RowVectorXf p = model.next_byte_probs(0, static_cast<Index>(tokens.size()) - 1);
    p = p.array().pow(1.0f / 0.8f);  // temperature 0.8
    std::discrete_distribution<int> pick(p.data(), p.data() + p.size());
    text.push_back(static_cast<char>(pick(gen)));
  }
  return text;
}

Result train(const Options& o, const char_lm::Corpus& corpus) {
  Model model(o.model, o.seed);
  auto opt = make_optimizer(o, model);
  std::mt19937_64 gen(o.seed * 7919 + 17);
  std::FILE* csv = nullptr;
  if (!o.csv.empty()) {
    csv = std::fopen(o.csv.c_str(), "w");
    if (!csv) throw std::runtime_error("cannot write " + o.csv);
    std::fprintf(csv, "step,train_loss,val_loss,tokens_per_s,optimizer_state_bytes,gradient_bytes\n");
  }
  if (!o.quiet)
    std::printf("%s: %ld parameters, %s, %s updates, lr %g, batch %ld x %ld, data: %s\n", o.optimizer.c_str(),
                static_cast<long>(model.num_parameters()), o.optimizer == "adamw" ? "full rank" : "rank/gap/scale set",
                o.per_layer ? "per-layer" : "end-of-step", o.lr, o.batch, static_cast<long>(o.model.context),
                corpus.source.c_str());

  Result r;
  r.optimizer = o.optimizer;
  std::vector<MatrixF> grads(model.params().size());
  std::size_t live = 0;
  const auto start = std::chrono::steady_clock::now();
  double tokens_per_s = 0;
  for (long step = 0; step < o.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    opt->set_lr(lr_at(o, step));
    const auto batch = char_lm::sample_batch(corpus.train, o.batch, o.model.context, gen);
    const float loss = model.forward(batch.tokens, batch.targets, o.batch);
    std::size_t peak = 0;
    if (o.per_layer) {
      model.backward([&](std::size_t i, MatrixF& g) {
        live += sizeof(float) * g.size();
        peak = std::max(peak, live);
        opt->step(i, g);
        live -= sizeof(float) * g.size();
        g.resize(0, 0);  // the gradient is freed as soon as its layer has stepped
      });
    } else {
      model.backward([&](std::size_t i, MatrixF& g) {
        grads[i] = std::move(g);
        live += sizeof(float) * grads[i].size();
        peak = std::max(peak, live);
      });
      for (std::size_t i = 0; i < grads.size(); ++i) {
        opt->step(i, grads[i]);
        live -= sizeof(float) * grads[i].size();
        grads[i].resize(0, 0);
      }
    }
    r.peak_gradient_bytes = std::max(r.peak_gradient_bytes, peak);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    tokens_per_s = static_cast<double>(o.batch * o.model.context) / dt;

    const bool eval = (step + 1) % o.eval_every == 0 || step == 0 || step + 1 == o.steps;
    double val = NAN;
    if (eval) {
      val = evaluate(model, corpus, o);
      r.final_val = val;
      r.best_val = std::isnan(r.best_val) ? val : std::min(r.best_val, val);
    }
    if (csv) {
      std::fprintf(csv, "%ld,%.6f,", step + 1, loss);
      if (eval) std::fprintf(csv, "%.6f", val);
      std::fprintf(csv, ",%.1f,%zu,%zu\n", tokens_per_s, opt->state_bytes(), peak);
      if (eval) std::fflush(csv);  // a run stopped early keeps its curve
    }
    if (!o.quiet && ((step + 1) % o.log_every == 0 || eval)) {
      std::printf("step %5ld  loss %.4f", step + 1, loss);
      if (eval) std::printf("  val %.4f", val);
      else std::printf("            ");
      std::printf("  %7.0f tok/s  state %8.2f KiB  grads %8.2f KiB  lr %.2e\n", tokens_per_s,
                  opt->state_bytes() / 1024.0, peak / 1024.0, lr_at(o, step));
      std::fflush(stdout);
    }
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.tokens_per_s = static_cast<double>(o.steps * o.batch * o.model.context) / r.seconds;
  r.state_bytes = opt->state_bytes();
  r.weight_bytes = opt->weight_bytes();
  r.steps = o.steps;
  if (csv) std::fclose(csv);
  if (!o.quiet) {
    std::printf("\n%s: held-out loss %.4f (best %.4f) after %ld steps, %.0f tokens/s, %.1f s\n", o.optimizer.c_str(),
                r.final_val, r.best_val, r.steps, r.tokens_per_s, r.seconds);
    std::printf("optimizer state %zu bytes, weights %zu bytes, peak gradients %zu bytes\n", r.state_bytes,
                r.weight_bytes, r.peak_gradient_bytes);
    if (o.sample_bytes > 0) {
      const std::string prompt = corpus.val.substr(0, 40);
      std::printf("\nsample (temperature 0.8):\n%s\n", generate(model, prompt, o.sample_bytes, o.seed).c_str());
    }
  }
  return r;
}

void print_table(const std::vector<Result>& rs) {
  const Result& base = rs.front();
  std::printf("\n%-11s %9s %14s %9s %16s %9s %11s %9s\n", "optimizer", "val loss", "state bytes", "vs AdamW",
              "state+weights", "vs AdamW", "peak grads", "tok/s");
  for (const Result& r : rs)
    std::printf("%-11s %9.4f %14zu %8.1f%% %16zu %8.1f%% %11zu %9.0f\n", r.optimizer.c_str(), r.final_val,
                r.state_bytes, 100.0 * r.state_bytes / base.state_bytes, r.state_bytes + r.weight_bytes,
                100.0 * (r.state_bytes + r.weight_bytes) / (base.state_bytes + base.weight_bytes),
                r.peak_gradient_bytes, r.tokens_per_s);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o = parse(argc, argv);
    const char_lm::Corpus corpus = char_lm::load_corpus(o.data);
    if (!o.demo) {
      train(o, corpus);
      return 0;
    }
    // The demo: the same short run under AdamW and GaLore, then the table.
    std::printf("char_lm demo: AdamW against GaLore on %s\n", corpus.source.c_str());
    std::vector<Result> results;
    for (const char* name : {"adamw", "galore"}) {
      Options d = o;
      d.optimizer = name;
      d.steps = o.steps == 1000 ? 300 : o.steps;
      d.lr = std::string(name) == "adamw" ? 2e-3 : 2e-2;
      d.eval_every = 50;
      d.log_every = 50;
      d.sample_bytes = 0;
      d.gap = 50;
      results.push_back(train(d, corpus));
    }
    print_table(results);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "char_lm: %s\n", e.what());
    return 1;
  }
}
