// A LibTorch trainer using galore through torch::optim: a 3-layer MLP fitted to
// a random teacher network, once with torch's AdamW and once with galore's
// GaLoreAdamW (the two hidden 512 x 512 weights projected at rank 64, the rest
// plain AdamW), with the same data. Prints the loss curves and the optimizer
// state each holds.
//   ./build/examples/libtorch_mlp [steps]
#include <galore/libtorch.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

struct MLP : torch::nn::Module {
  torch::nn::Linear in{nullptr}, hidden{nullptr}, out{nullptr};
  MLP() {
    in = register_module("in", torch::nn::Linear(64, 512));
    hidden = register_module("hidden", torch::nn::Linear(512, 512));
    out = register_module("out", torch::nn::Linear(512, 16));
  }
  torch::Tensor forward(torch::Tensor x) {
    return out->forward(torch::gelu(hidden->forward(torch::gelu(in->forward(x)))));
  }
};

// AdamW's state: two float moments per parameter element.
std::size_t adamw_state_bytes(const MLP& m) {
  std::size_t n = 0;
  for (const auto& p : m.parameters()) n += static_cast<std::size_t>(p.numel());
  return 2 * sizeof(float) * n;
}

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 300;
  if (steps < 1) {
    std::fprintf(stderr, "usage: %s [steps >= 1]\n", argv[0]);
    return 2;
  }
  torch::manual_seed(0);
  MLP teacher;
  const torch::Tensor x = torch::randn({4096, 64});
  torch::Tensor y;
  {
    torch::NoGradGuard no_grad;
    y = teacher.forward(x);
  }

  auto train = [&](auto& model, auto& opt, const char* name) {
    std::printf("%s\n", name);
    float last = 0.0f;
    for (int t = 0; t < steps; ++t) {
      const torch::Tensor batch = torch::randint(0, x.size(0), {256});
      opt.zero_grad();
      torch::Tensor loss = torch::mse_loss(model.forward(x.index({batch})), y.index({batch}));
      loss.backward();
      opt.step();
      last = loss.item<float>();
      if (t % (steps / 5 > 0 ? steps / 5 : 1) == 0 || t == steps - 1) std::printf("  step %4d  loss %.5f\n", t, last);
    }
    return last;
  };

  torch::manual_seed(1);
  MLP a;
  torch::optim::AdamW adamw(a.parameters(), torch::optim::AdamWOptions(1e-3).weight_decay(0.0));
  torch::manual_seed(2);
  const float adamw_loss = train(a, adamw, "torch::optim::AdamW (lr 1e-3)");

  torch::manual_seed(1);
  MLP b;
  std::vector<torch::optim::OptimizerParamGroup> groups;
  // galore_torch's recipe: the 2-D weights inside the network projected, with
  // about ten times AdamW's learning rate; the rest (input and output layers,
  // biases) plain AdamW at AdamW's rate.
  groups.emplace_back(std::vector<torch::Tensor>{b.hidden->weight},
                      std::make_unique<galore::libtorch::Options>(
                          galore::libtorch::Options(1e-2).rank(64).update_proj_gap(50).scale(0.25)));
  groups.emplace_back(std::vector<torch::Tensor>{b.in->weight, b.in->bias, b.hidden->bias, b.out->weight, b.out->bias});
  galore::libtorch::Optimizer<> galore_opt(std::move(groups), galore::libtorch::Options(1e-3));
  torch::manual_seed(2);
  const float galore_loss = train(b, galore_opt, "galore::libtorch::Optimizer<GaLoreAdamW> (rank 64 on the 512 x 512 weight)");

  std::printf("\nfinal loss: AdamW %.5f, GaLore %.5f\n", adamw_loss, galore_loss);
  std::printf("optimizer state: AdamW %zu bytes, GaLore %zu bytes\n", adamw_state_bytes(a), galore_opt.state_bytes());
  return std::isfinite(galore_loss) ? 0 : 1;
}
