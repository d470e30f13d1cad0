// galore's PyTorch bridge (C++ side): one optimizer engine per parameter group,
// stepping torch tensors in place through the CPU backend (Eigen). No weight or
// gradient is copied: the engine reads and writes the tensors' own storage.
//
// The Python side (galore/torch.py) owns the torch.optim.Optimizer interface;
// this file only maps tensors onto galore's per-layer step and its checkpoint
// format.
#include <torch/extension.h>

#include <galore/galore.hpp>

#include <cstdint>
#include <memory>
#include <sstream>
#include <string>

namespace py = pybind11;

namespace {

// What every engine offers, whatever its policies.
class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::int64_t add_layer(std::int64_t rows, std::int64_t cols, std::int64_t rank, double scale,
                                 const std::string& proj_type, const std::string& name) = 0;
  virtual std::int64_t add_dense(std::int64_t rows, std::int64_t cols, const std::string& name) = 0;
  // Returns "applied" or "skipped" (NaN/Inf in the gradient: nothing changed).
  virtual std::string step(std::int64_t id, torch::Tensor W, torch::Tensor G) = 0;
  virtual void set_lr(double lr) = 0;
  virtual py::bytes save() const = 0;
  virtual void load(const std::string& bytes) = 0;
  virtual std::int64_t state_bytes() const = 0;
  virtual std::int64_t steps(std::int64_t id) const = 0;
  virtual std::int64_t svd_count(std::int64_t id) const = 0;
};

galore::ProjectionType projection_type(const std::string& s) {
  if (s == "std") return galore::ProjectionType::Std;
  if (s == "reverse_std") return galore::ProjectionType::ReverseStd;
  if (s == "left") return galore::ProjectionType::Left;
  if (s == "right") return galore::ProjectionType::Right;
  if (s == "full") return galore::ProjectionType::Full;
  throw std::invalid_argument("proj_type must be 'std', 'reverse_std', 'left', 'right' or 'full' (got '" + s + "')");
}

// W and G: CPU tensors of the registered shape (a 1-D parameter is a 1 x n
// matrix), one element type (float32 or bfloat16), W contiguous; G may have
// any row stride with unit column stride.
void check_tensors(const galore::Shape& shape, const torch::Tensor& W, const torch::Tensor& G) {
  TORCH_CHECK(W.device().is_cpu() && G.device().is_cpu(), "galore: this engine steps CPU tensors (got ", W.device(),
              " and ", G.device(), ")");
  TORCH_CHECK(W.scalar_type() == G.scalar_type(), "galore: the weight is ", W.scalar_type(), " but its gradient is ",
              G.scalar_type());
  TORCH_CHECK(W.scalar_type() == torch::kFloat32 || W.scalar_type() == torch::kBFloat16,
              "galore: weights must be float32 or bfloat16 (got ", W.scalar_type(), ")");
  TORCH_CHECK(W.numel() == shape.size() && G.numel() == shape.size(), "galore: the layer was registered as ",
              shape.rows, "x", shape.cols, " but got a weight of ", W.sizes(), " and a gradient of ", G.sizes());
  TORCH_CHECK(W.is_contiguous(), "galore: the weight must be contiguous (it is stepped in place, without a copy)");
  TORCH_CHECK(G.is_contiguous(), "galore: the gradient must be contiguous");
}

template <class Opt>
class EngineImpl final : public Engine {
 public:
  explicit EngineImpl(Opt opt) : opt_(std::move(opt)) {}

  std::int64_t add_layer(std::int64_t rows, std::int64_t cols, std::int64_t rank, double scale,
                         const std::string& proj_type, const std::string& name) override {
    galore::ProjectorOptions o;
    o.rank = rank;
    o.scale = static_cast<float>(scale);
    o.type = projection_type(proj_type);
    return static_cast<std::int64_t>(remember(opt_.add_layer({rows, cols}, o, name), {rows, cols}).index);
  }
  std::int64_t add_dense(std::int64_t rows, std::int64_t cols, const std::string& name) override {
    return static_cast<std::int64_t>(remember(opt_.add_dense({rows, cols}, name), {rows, cols}).index);
  }

  std::string step(std::int64_t id, torch::Tensor W, torch::Tensor G) override {
    const galore::Shape shape = shape_of(id);
    check_tensors(shape, W, G);
    const galore::LayerId layer{static_cast<std::size_t>(id)};
    galore::StepResult r;
    {
      py::gil_scoped_release release;  // the step may take a while; other Python threads run meanwhile
      if (W.scalar_type() == torch::kFloat32)
        r = opt_.step(layer, W.data_ptr<float>(), G.data_ptr<float>());
      else
        r = opt_.step(layer, reinterpret_cast<galore::bfloat16*>(W.data_ptr<at::BFloat16>()),
                      reinterpret_cast<const galore::bfloat16*>(G.data_ptr<at::BFloat16>()));
    }
    return r.applied() ? "applied" : "skipped";
  }

  void set_lr(double lr) override { opt_.set_lr(lr); }

  py::bytes save() const override {
    std::ostringstream os(std::ios::binary);
    galore::save_checkpoint(opt_, os);
    return py::bytes(os.str());
  }
  void load(const std::string& bytes) override {
    std::istringstream is(bytes, std::ios::binary);
    galore::load_checkpoint(opt_, is);
  }

  std::int64_t state_bytes() const override { return static_cast<std::int64_t>(opt_.state_bytes()); }
  std::int64_t steps(std::int64_t id) const override { return opt_.steps(layer_id(id)); }
  std::int64_t svd_count(std::int64_t id) const override {
    return opt_.is_projected(layer_id(id)) ? opt_.stats(layer_id(id)).svd_count : 0;
  }

 private:
  galore::LayerId remember(galore::LayerId id, galore::Shape s) {
    shapes_.push_back(s);
    return id;
  }
  galore::LayerId layer_id(std::int64_t id) const {
    (void)shape_of(id);
    return galore::LayerId{static_cast<std::size_t>(id)};
  }
  galore::Shape shape_of(std::int64_t id) const {
    TORCH_CHECK(id >= 0 && static_cast<std::size_t>(id) < shapes_.size(), "galore: unknown layer id ", id);
    return shapes_[static_cast<std::size_t>(id)];
  }

  Opt opt_;
  std::vector<galore::Shape> shapes_;
};

template <class State, class SVD>
std::unique_ptr<Engine> make_with(const galore::AdamConfig& adam, std::int64_t gap, SVD svd) {
  using Opt = galore::GaLoreOptimizer<galore::Projector<SVD, galore::quant::None, galore::schedule::FixedGap>,
                                      galore::LowRankAdam<State>>;
  return std::make_unique<EngineImpl<Opt>>(
      Opt(galore::ProjectorOptions{}, galore::LowRankAdam<State>(adam), galore::schedule::FixedGap{gap}, svd));
}

template <class State>
std::unique_ptr<Engine> make_for_state(const galore::AdamConfig& adam, std::int64_t gap, const std::string& svd) {
  if (svd == "exact") return make_with<State>(adam, gap, galore::svd::Exact{});
  if (svd == "randomized") return make_with<State>(adam, gap, galore::svd::Randomized{});
  if (svd == "warm") return make_with<State>(adam, gap, galore::svd::WarmStart{});
  throw std::invalid_argument("svd must be 'exact', 'randomized' or 'warm' (got '" + svd + "')");
}

// An engine for one parameter group: galore_torch's AdamW hyperparameters, the
// refresh gap, the SVD policy and the moments' storage ("float32", "bfloat16",
// or "8bit": bitsandbytes-style blockwise 8-bit, as GaLoreAdamW8bit).
std::unique_ptr<Engine> make_engine(double lr, double beta1, double beta2, double eps, double weight_decay,
                                    bool correct_bias, std::int64_t update_proj_gap, const std::string& svd,
                                    const std::string& state) {
  galore::AdamConfig adam;
  adam.lr = lr;
  adam.beta1 = beta1;
  adam.beta2 = beta2;
  adam.eps = eps;
  adam.weight_decay = weight_decay;
  adam.correct_bias = correct_bias;
  adam.validate();
  if (state == "float32") return make_for_state<galore::state::Float32>(adam, update_proj_gap, svd);
  if (state == "bfloat16") return make_for_state<galore::state::BFloat16>(adam, update_proj_gap, svd);
  if (state == "8bit") return make_for_state<galore::state::Blockwise8bit>(adam, update_proj_gap, svd);
  throw std::invalid_argument("state must be 'float32', 'bfloat16' or '8bit' (got '" + state + "')");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "galore's C++ engines for the PyTorch optimizers in galore.torch";
  py::class_<Engine>(m, "Engine")
      .def("add_layer", &Engine::add_layer, py::arg("rows"), py::arg("cols"), py::arg("rank"), py::arg("scale"),
           py::arg("proj_type"), py::arg("name") = "")
      .def("add_dense", &Engine::add_dense, py::arg("rows"), py::arg("cols"), py::arg("name") = "")
      .def("step", &Engine::step)
      .def("set_lr", &Engine::set_lr)
      .def("save", &Engine::save)
      .def("load", [](Engine& e, const py::bytes& b) { e.load(std::string(b)); })
      .def("state_bytes", &Engine::state_bytes)
      .def("steps", &Engine::steps)
      .def("svd_count", &Engine::svd_count);
  m.def("make_engine", &make_engine, py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("correct_bias"), py::arg("update_proj_gap"), py::arg("svd"),
        py::arg("state"));
}
