// galore/libtorch.hpp: galore's optimizers as a torch::optim::Optimizer, for
// C++ trainers written against LibTorch.
//
//   auto model = torch::nn::Linear(512, 512);
//   galore::libtorch::Optimizer<> opt(
//       {torch::optim::OptimizerParamGroup({model->weight},
//            std::make_unique<galore::libtorch::Options>(galore::libtorch::Options(0.01).rank(128))),
//        torch::optim::OptimizerParamGroup({model->bias})},  // the defaults: plain AdamW
//       galore::libtorch::Options(0.001));
//   loss.backward();
//   opt.step();                                 // or opt.step(param) per layer, as soon as its gradient exists
//
// Each parameter group is one galore optimizer (its own hyperparameters, as in
// galore_torch's param groups). A group with rank > 0 projects its 2-D
// parameters; its other parameters, and every parameter of a group with rank 0,
// take plain AdamW (galore's dense layers, the same update galore_torch applies
// to them). Weights are stepped in place, without copies: CPU tensors of float32
// or bfloat16, contiguous. The learning rate is read from the group's options
// at every step, so torch's LR schedulers work.
//
// Opt chooses the policies (galore::GaLoreAdamW, GaLoreAdamW8bit,
// QGaLoreAdamW8bit's INT4 bases and 8-bit moments on float weights, or any
// GaLoreOptimizer); `policies` carries their settings, the group's
// update_proj_gap overriding the schedule's gap.
//
// Needs LibTorch (torch/torch.h); galore/galore.hpp does not include it.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "galore.hpp"

namespace galore::libtorch {

// One parameter group's settings: galore_torch's AdamW (its defaults) and
// GaLore's (rank, update_proj_gap, scale, proj_type).
struct Options : public torch::optim::OptimizerCloneableOptions<Options> {
  Options(double lr = 1e-3) : lr_(lr) {}  // NOLINT(google-explicit-constructor): torch's options read this way
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, beta1) = 0.9;
  TORCH_ARG(double, beta2) = 0.999;
  TORCH_ARG(double, eps) = 1e-6;
  TORCH_ARG(double, weight_decay) = 0.0;
  TORCH_ARG(bool, correct_bias) = true;
  TORCH_ARG(std::int64_t, rank) = 0;  // 0: plain AdamW for the group
  TORCH_ARG(std::int64_t, update_proj_gap) = 200;
  TORCH_ARG(double, scale) = 0.25;
  TORCH_ARG(ProjectionType, proj_type) = ProjectionType::Std;

  double get_lr() const override { return lr(); }
  void set_lr(const double value) override { lr(value); }
};

template <class Opt = GaLoreAdamW>
class Optimizer final : public torch::optim::Optimizer {
 public:
  // Settings of Opt's policies other than the refresh gap.
  struct Policies {
    typename Opt::SVDPolicy svd{};
    typename Opt::QuantPolicy quant{};
    typename Opt::SchedulePolicy schedule{};
    typename Opt::rounder_type rounder{};
  };

  explicit Optimizer(std::vector<torch::optim::OptimizerParamGroup> groups, Options defaults = {},
                     Policies policies = {})
      : torch::optim::Optimizer(std::move(groups), std::make_unique<Options>(std::move(defaults))),
        policies_(std::move(policies)) {
    sync();
  }
  explicit Optimizer(std::vector<torch::Tensor> params, Options defaults = {}, Policies policies = {})
      : Optimizer(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
                  std::move(defaults), std::move(policies)) {}

  // Steps every parameter that has a gradient. A parameter whose gradient holds
  // NaN or Inf is left as it was, with its state (status() says so).
  torch::Tensor step(LossClosure closure = nullptr) override {
    torch::Tensor loss;
    if (closure) {
      torch::AutoGradMode enable(true);
      loss = closure();
    }
    sync();
    for (std::size_t g = 0; g < param_groups_.size(); ++g) {
      set_group_lr(g);
      const auto& params = param_groups_[g].params();
      for (std::size_t i = 0; i < params.size(); ++i)
        if (params[i].grad().defined()) step_layer(g, i);
    }
    return loss;
  }

  // Steps one parameter now (per-layer mode: call it as soon as the parameter's
  // gradient exists, then free the gradient).
  StepResult step(const torch::Tensor& param) {
    sync();
    const auto [g, i] = where(param);
    set_group_lr(g);
    return step_layer(g, i);
  }

  // The last step's outcome for a parameter (Applied before its first step).
  StepStatus status(const torch::Tensor& param) const {
    const auto [g, i] = where(param);
    return groups_[g].status[i];
  }
  // Moments and projection matrices of every group, in bytes (galore's formula).
  std::size_t state_bytes() const {
    std::size_t b = 0;
    for (const Group& g : groups_) b += g.opt->state_bytes();
    return b;
  }
  // The galore optimizer behind group g and the layer of a parameter, for
  // stats() and everything else the facade offers.
  const Opt& galore_optimizer(std::size_t g) const { return *groups_.at(g).opt; }
  LayerId layer_of(const torch::Tensor& param) const {
    const auto [g, i] = where(param);
    return groups_[g].ids[i];
  }

  // Every group's state in galore's checkpoint format, one uint8 tensor per group.
  void save(torch::serialize::OutputArchive& archive) const override {
    archive.write("galore/groups", torch::tensor(static_cast<std::int64_t>(groups_.size())));
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      std::ostringstream os(std::ios::binary);
      save_checkpoint(*groups_[g].opt, os);
      const std::string bytes = os.str();
      torch::Tensor t = torch::empty({static_cast<std::int64_t>(bytes.size())}, torch::kUInt8);
      std::memcpy(t.data_ptr<std::uint8_t>(), bytes.data(), bytes.size());
      archive.write("galore/group/" + std::to_string(g), t);
    }
  }
  // Loads what save() wrote into optimizers built afresh with the same groups
  // and layers; only when every group has loaded do they replace the current
  // ones, so an archive that does not fit changes nothing (checkpoint_error).
  void load(torch::serialize::InputArchive& archive) override {
    sync();
    torch::Tensor count;
    if (!archive.try_read("galore/groups", count))
      throw checkpoint_error("galore::libtorch: the archive holds no galore optimizer state");
    if (count.item<std::int64_t>() != static_cast<std::int64_t>(groups_.size()))
      throw checkpoint_error("galore::libtorch: the archive holds " + std::to_string(count.item<std::int64_t>()) +
                             " parameter groups, this optimizer " + std::to_string(groups_.size()));
    std::vector<Group> fresh;
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      torch::Tensor t;
      if (!archive.try_read("galore/group/" + std::to_string(g), t))
        throw checkpoint_error("galore::libtorch: the archive lacks parameter group " + std::to_string(g));
      t = t.contiguous();
      TORCH_CHECK(t.scalar_type() == torch::kUInt8, "galore::libtorch: group ", g, " is not a byte tensor");
      Group next = make_group(g);
      std::istringstream is(std::string(reinterpret_cast<const char*>(t.data_ptr<std::uint8_t>()),
                                        static_cast<std::size_t>(t.numel())),
                            std::ios::binary);
      load_checkpoint(*next.opt, is);
      fresh.push_back(std::move(next));
    }
    groups_ = std::move(fresh);
  }

 private:
  struct Group {
    std::unique_ptr<Opt> opt;  // galore optimizers are not movable once layers hold workspaces
    std::vector<LayerId> ids;  // per parameter of the group, in order
    std::vector<StepStatus> status;
  };

  static const Options& options_of(const torch::optim::OptimizerParamGroup& group) {
    const auto* o = dynamic_cast<const Options*>(&group.options());
    TORCH_CHECK(o != nullptr, "galore::libtorch: a parameter group's options must be galore::libtorch::Options");
    return *o;
  }

  // A galore optimizer for group g with its parameters registered, in order.
  Group make_group(std::size_t g) const {
    const Options& o = options_of(param_groups_[g]);
    AdamConfig adam;
    adam.lr = o.lr();
    adam.beta1 = o.beta1();
    adam.beta2 = o.beta2();
    adam.eps = o.eps();
    adam.weight_decay = o.weight_decay();
    adam.correct_bias = o.correct_bias();
    typename Opt::SchedulePolicy schedule = policies_.schedule;
    schedule.gap = o.update_proj_gap();
    ProjectorOptions projection;
    projection.rank = o.rank() > 0 ? o.rank() : 1;
    projection.scale = static_cast<float>(o.scale());
    projection.type = o.proj_type();
    Group group;
    group.opt = std::make_unique<Opt>(projection, typename Opt::adam_type(adam), schedule, policies_.svd,
                                      policies_.quant, policies_.rounder);
    for (const torch::Tensor& p : param_groups_[g].params()) register_param(group, p, o.rank() > 0);
    return group;
  }

  static void register_param(Group& group, const torch::Tensor& p, bool projected_group) {
    const std::string name = "param" + std::to_string(group.ids.size());
    if (projected_group && p.dim() == 2)
      group.ids.push_back(group.opt->add_layer({p.size(0), p.size(1)}, name));
    else
      group.ids.push_back(group.opt->add_dense({1, p.numel()}, name));
    group.status.push_back(StepStatus::Applied);
  }

  // Registers the groups and parameters added since the last call
  // (torch's add_param_group and add_parameters are not virtual).
  void sync() {
    for (std::size_t g = 0; g < param_groups_.size(); ++g) {
      if (g == groups_.size()) {
        groups_.push_back(make_group(g));
        continue;
      }
      Group& group = groups_[g];
      const auto& params = param_groups_[g].params();
      for (std::size_t i = group.ids.size(); i < params.size(); ++i)
        register_param(group, params[i], options_of(param_groups_[g]).rank() > 0);
    }
  }

  std::pair<std::size_t, std::size_t> where(const torch::Tensor& param) const {
    for (std::size_t g = 0; g < param_groups_.size(); ++g) {
      const auto& params = param_groups_[g].params();
      for (std::size_t i = 0; i < params.size(); ++i)
        if (params[i].unsafeGetTensorImpl() == param.unsafeGetTensorImpl()) return {g, i};
    }
    TORCH_CHECK(false, "galore::libtorch: the tensor is not a parameter of this optimizer");
    return {0, 0};
  }

  void set_group_lr(std::size_t g) { groups_[g].opt->set_lr(options_of(param_groups_[g]).lr()); }

  StepResult step_layer(std::size_t g, std::size_t i) {
    const torch::Tensor& W = param_groups_[g].params()[i];
    const torch::Tensor G = W.grad();
    TORCH_CHECK(G.defined(), "galore::libtorch: parameter ", i, " of group ", g, " has no gradient");
    TORCH_CHECK(W.device().is_cpu() && G.device().is_cpu(), "galore::libtorch: this adapter steps CPU tensors (got ",
                W.device(), "); CUDA tensors need the CUDA backend, which it does not drive yet");
    TORCH_CHECK(W.scalar_type() == G.scalar_type(), "galore::libtorch: the weight is ", W.scalar_type(),
                " but its gradient is ", G.scalar_type());
    TORCH_CHECK(W.scalar_type() == torch::kFloat32 || W.scalar_type() == torch::kBFloat16,
                "galore::libtorch: weights must be float32 or bfloat16 (got ", W.scalar_type(), ")");
    TORCH_CHECK(W.is_contiguous() && G.is_contiguous(),
                "galore::libtorch: the weight and its gradient must be contiguous (stepped in place, without a copy)");
    Group& group = groups_[g];
    StepResult r;
    {
      torch::NoGradGuard no_grad;
      if (W.scalar_type() == torch::kFloat32)
        r = group.opt->step(group.ids[i], W.data_ptr<float>(), G.data_ptr<float>());
      else
        r = group.opt->step(group.ids[i], reinterpret_cast<bfloat16*>(W.data_ptr<at::BFloat16>()),
                            reinterpret_cast<const bfloat16*>(G.data_ptr<at::BFloat16>()));
    }
    group.status[i] = r.status;
    return r;
  }

  Policies policies_;
  std::vector<Group> groups_;
};

}  // namespace galore::libtorch
