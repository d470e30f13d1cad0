"""galore's PyTorch bridge (python/galore) on CPU tensors: against the reference
galore_torch 1.0 on identical inputs, per-layer hooks against step(), the
state_dict round trip, bf16 parameters, skipped steps, memory and bad input.

    tools/test_python_bridge.sh python3 build/python      (CTest: test_python_bridge)

galore_torch is optional: unpack its wheel into a folder named by
GALORE_TORCH_REFERENCE (pip download --no-deps galore-torch==1.0, then unzip);
without it the comparison is skipped and says so.
"""
import copy
import importlib.util
import io
import os
import sys
import unittest

import torch

from galore import GaLoreAdamW, GaLoreAdamW8bit

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))


def reference_adamw():
    """galore_torch's AdamW, or None when the package is not importable."""
    if importlib.util.find_spec("galore_torch") is None:
        return None
    from reference_env import bare_package
    bare_package("galore_torch")
    from galore_torch.adamw import AdamW
    return AdamW


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"wide": (24, 40), "tall": (48, 20), "square": (16, 16), "bias": (24,)}
    return {k: torch.nn.Parameter((torch.randn(*s, generator=g) * 0.1).to(dtype)) for k, s in shapes.items()}


def groups_of(p, rank=4, gap=1000, proj_type="std", weight_decay=0.0):
    return [
        {"params": [p["wide"], p["tall"]], "rank": rank, "update_proj_gap": gap, "scale": 0.25,
         "proj_type": proj_type, "weight_decay": weight_decay},
        {"params": [p["square"], p["bias"]]},
    ]


def gradients(steps, params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(*v.shape, generator=g).to(v.dtype) for k, v in params.items()} for _ in range(steps)]


def run(opt, params, grads, scheduler=None):
    history = []
    for step_grads in grads:
        for k, p in params.items():
            p.grad = step_grads[k].clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        history.append({k: p.detach().clone() for k, p in params.items()})
    return history


def lr_at(step):
    return 1.0 / (1 + step)  # a changing learning rate: the engines must follow group["lr"]


class AgainstReference(unittest.TestCase):
    def test_matches_galore_torch_step_for_step(self):
        AdamW = reference_adamw()
        if AdamW is None:
            self.skipTest("galore_torch is not importable (see this file's docstring)")
        for proj_type in ("std", "reverse_std", "left", "right", "full"):
            with self.subTest(proj_type=proj_type):
                ours_p, ref_p = make_params(), make_params()
                grads = gradients(6, ours_p)
                # eps 1e-3 keeps the update a smooth function of R: at a refresh step the
                # off-diagonal entries of a two-sided R are rounding noise, which a tiny
                # eps would turn into +-1 updates that differ between any two SVDs.
                ours = GaLoreAdamW(groups_of(ours_p, proj_type=proj_type, weight_decay=0.1), lr=1e-2, eps=1e-3)
                ref = AdamW(groups_of(ref_p, proj_type=proj_type, weight_decay=0.1), lr=1e-2, eps=1e-3,
                            no_deprecation_warning=True)
                a = run(ours, ours_p, grads, torch.optim.lr_scheduler.LambdaLR(ours, lr_at))
                b = run(ref, ref_p, grads, torch.optim.lr_scheduler.LambdaLR(ref, lr_at))
                for t, (x, y) in enumerate(zip(a, b)):
                    for k in x:
                        err = (x[k] - y[k]).abs().max().item()
                        self.assertLess(err, 1e-5, f"step {t}, parameter {k}: {err}")
                # The run moved the weights (the comparison is not of untouched tensors).
                self.assertGreater((a[-1]["wide"] - make_params()["wide"]).abs().max().item(), 1e-3)


class Bridge(unittest.TestCase):
    def test_per_layer_hooks_give_what_step_gives(self):
        for Opt in (GaLoreAdamW, GaLoreAdamW8bit):
            with self.subTest(optimizer=Opt.__name__):
                torch.manual_seed(3)
                model = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))
                twin = copy.deepcopy(model)
                x, y = torch.randn(16, 32), torch.randn(16, 8)

                def groups(m):
                    mats = [m[0].weight, m[2].weight]
                    return [{"params": mats, "rank": 4, "update_proj_gap": 2},
                            {"params": [m[0].bias, m[2].bias]}]

                stepped = Opt(groups(model), lr=1e-2)
                hooked = Opt(groups(twin), lr=1e-2)
                hooked.register_per_layer_hooks()
                for _ in range(5):
                    torch.nn.functional.mse_loss(model(x), y).backward()
                    stepped.step()
                    stepped.zero_grad()
                    torch.nn.functional.mse_loss(twin(x), y).backward()
                    for p in twin.parameters():
                        self.assertIsNone(p.grad)  # each gradient was freed after its step
                    hooked.step()  # finds no gradients: a no-op
                for p, q in zip(model.parameters(), twin.parameters()):
                    self.assertTrue(torch.equal(p, q))

    def test_state_dict_round_trip_continues_identically(self):
        for Opt in (GaLoreAdamW, GaLoreAdamW8bit):
            with self.subTest(optimizer=Opt.__name__):
                p = make_params()
                grads = gradients(6, p)
                opt = Opt(groups_of(p, gap=2), lr=1e-2)
                run(opt, p, grads[:3])
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                q = {k: torch.nn.Parameter(v.detach().clone()) for k, v in p.items()}
                resumed = Opt(groups_of(q, gap=2), lr=1e-2)
                buf.seek(0)
                resumed.load_state_dict(torch.load(buf))
                a = run(opt, p, grads[3:])
                b = run(resumed, q, grads[3:])
                for x, y in zip(a, b):
                    for k in x:
                        self.assertTrue(torch.equal(x[k], y[k]), k)

    def test_load_state_dict_refuses_other_layouts(self):
        p = make_params()
        opt = GaLoreAdamW(groups_of(p), lr=1e-2)
        run(opt, p, gradients(1, p))
        sd = opt.state_dict()
        with self.assertRaises(ValueError):
            GaLoreAdamW(groups_of(make_params()), lr=1e-2).load_state_dict(torch.optim.AdamW(
                [torch.nn.Parameter(torch.zeros(2))]).state_dict())
        other = make_params()
        other["wide"] = torch.nn.Parameter(torch.zeros(24, 41))  # another shape
        victim = GaLoreAdamW(groups_of(other), lr=1e-3)
        run(victim, other, gradients(2, other))
        before = [bytes(t.numpy().tobytes()) for t in victim.state_dict()["galore"]]
        with self.assertRaises(RuntimeError):
            victim.load_state_dict(sd)
        # Refused before anything changed: the engines and the groups' settings.
        self.assertEqual([bytes(t.numpy().tobytes()) for t in victim.state_dict()["galore"]], before)
        self.assertEqual(victim.param_groups[0]["lr"], 1e-3)

    def test_bf16_parameters_follow_float32_within_bf16_rounding(self):
        p32, p16 = make_params(), make_params(dtype=torch.bfloat16)
        grads = gradients(4, p32)
        a = run(GaLoreAdamW(groups_of(p32), lr=1e-2), p32, grads)
        b = run(GaLoreAdamW(groups_of(p16), lr=1e-2), p16,
                [{k: v.to(torch.bfloat16) for k, v in g.items()} for g in grads])
        for k in a[-1]:
            self.assertEqual(b[-1][k].dtype, torch.bfloat16)
            err = (a[-1][k] - b[-1][k].float()).abs().max().item()
            self.assertLess(err, 0.02, k)  # a few bf16 ulps of weights about 0.1-0.3
            self.assertGreater((b[-1][k].float() - make_params()[k]).abs().max().item(), 1e-3, k)

    def test_a_non_finite_gradient_skips_that_parameter_only(self):
        p = make_params()
        opt = GaLoreAdamW(groups_of(p), lr=1e-2)
        run(opt, p, gradients(2, p))
        before = {k: v.detach().clone() for k, v in p.items()}
        bad = gradients(1, p, seed=9)[0]
        bad["wide"][3, 5] = float("nan")
        bad["bias"][0] = float("inf")
        run(opt, p, [bad])
        self.assertEqual(opt.last_skipped, 2)
        self.assertTrue(torch.equal(p["wide"], before["wide"]))
        self.assertTrue(torch.equal(p["bias"], before["bias"]))
        self.assertFalse(torch.equal(p["tall"], before["tall"]))

    def test_state_bytes_equal_the_formula(self):
        p = make_params()
        opt = GaLoreAdamW(groups_of(p, rank=4), lr=1e-2)
        run(opt, p, gradients(1, p))
        # wide 24x40 (std: left, R 4x40, P 24x4), tall 48x20 (right, R 48x4, P 4x20):
        # float32 moments m and v at the low-rank shape, the basis in float32;
        # dense square 16x16 and bias 24: m and v at full size.
        expected = 4 * (2 * 4 * 40 + 24 * 4) + 4 * (2 * 48 * 4 + 4 * 20) + 4 * 2 * (16 * 16 + 24)
        self.assertEqual(opt.state_bytes(), expected)

    def test_bad_input_is_refused_with_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, "2-D"):
            GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(2, 3, 4))], "rank": 2}])
        with self.assertRaisesRegex(ValueError, "rank"):
            GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(8, 8))], "rank": 0}])
        with self.assertRaisesRegex(ValueError, "proj_type"):
            GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(8, 8))], "rank": 2, "proj_type": "diagonal"}])
        with self.assertRaisesRegex(ValueError, "float32 or bfloat16"):
            GaLoreAdamW([torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))])
        with self.assertRaisesRegex(ValueError, "svd"):
            opt = GaLoreAdamW([torch.nn.Parameter(torch.zeros(8))], svd="qr")
            opt.state_bytes()
        with self.assertRaisesRegex(ValueError, "rank"):  # rank above min(rows, cols): the library's own check
            GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(8, 3))], "rank": 4}]).state_bytes()
        with self.assertRaisesRegex(ValueError, "learning rate"):
            GaLoreAdamW([torch.nn.Parameter(torch.zeros(8))], lr=-1.0).state_bytes()
        w = torch.nn.Parameter(torch.zeros(8, 6))
        opt = GaLoreAdamW([{"params": [w], "rank": 2}])
        w.grad = torch.zeros(6, 8).t()  # not contiguous: refused, never copied
        with self.assertRaisesRegex(RuntimeError, "contiguous"):
            opt.step()


if __name__ == "__main__":
    unittest.main()
