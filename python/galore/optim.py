"""torch.optim optimizers that step through galore's C++ engines.

GaLoreAdamW mirrors galore_torch.GaLoreAdamW: parameters in a group that has a
``rank`` are trained with GaLore (Adam in a rank-``rank`` subspace of their
gradient, refreshed every ``update_proj_gap`` steps, the update scaled by
``scale``; ``proj_type`` picks the side), the other groups with plain AdamW.
GaLoreAdamW8bit keeps the moments in bitsandbytes-style blockwise 8 bits, as
galore_torch's GaLoreAdamW8bit.

Each parameter group is one engine in C++ (galore::GaLoreOptimizer), built at
the first step from the group's parameters; every step updates the tensors in
place, without copies. The engines hold their own state, so ``state_dict()``
carries it as galore's checkpoint bytes under the key ``"galore"``.
"""

import torch

from . import _C

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit"]

_PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


class GaLoreAdamW(torch.optim.Optimizer):
    """galore_torch's GaLoreAdamW on galore's engines.

    Group keys (with the defaults given here): lr, betas, eps, weight_decay,
    correct_bias; for GaLore groups rank, update_proj_gap (200), scale (0.25)
    and proj_type ("std"). Extras: ``svd`` ("exact", "randomized" or "warm":
    the refresh's SVD policy) and ``state`` ("float32", "bfloat16" or "8bit":
    the moments' storage).

    Parameters must be float32 or bfloat16 CPU tensors, contiguous, and 2-D in
    GaLore groups. A step whose gradient holds NaN or Inf leaves that parameter
    and its state unchanged (``last_skipped`` counts such parameters).
    """

    _state_kind = "float32"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 *, svd="exact", state=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        svd=svd, state=state or self._state_kind)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
        self._engines = None  # one per group, built at the first step (or load_state_dict)
        self._ids = None  # per group: {id(param): layer id in the group's engine}
        self.last_skipped = 0

    # -- engines -------------------------------------------------------------
    def _build(self):
        if self._engines is None:
            self._engines, self._ids = self._make_engines()

    def _make_engines(self):
        engines, ids = [], []
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            engine = _C.make_engine(float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                                    float(group["weight_decay"]), bool(group["correct_bias"]),
                                    int(group.get("update_proj_gap", 200)), group["svd"], group["state"])
            layer_ids = {}
            for pi, p in enumerate(group["params"]):
                name = f"group{gi}.param{pi}"
                if "rank" in group:
                    rows, cols = p.shape
                    layer_ids[id(p)] = engine.add_layer(rows, cols, int(group["rank"]), float(group.get("scale", 0.25)),
                                                        group.get("proj_type", "std"), name)
                else:
                    rows, cols = _as_matrix(p)
                    layer_ids[id(p)] = engine.add_dense(rows, cols, name)
            engines.append(engine)
            ids.append(layer_ids)
        return engines, ids

    def _step_one(self, engine, group, layer, p):
        engine.set_lr(float(group["lr"]))  # learning-rate schedulers change group["lr"]
        status = engine.step(layer, p.data, p.grad)
        if status == "skipped":
            self.last_skipped += 1

    # -- torch.optim.Optimizer -------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._build()
        self.last_skipped = 0
        for engine, group, layer_ids in zip(self._engines, self.param_groups, self._ids):
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._step_one(engine, group, layer_ids[id(p)], p)
        return loss

    def register_per_layer_hooks(self):
        """Per-layer mode: step each parameter as soon as its gradient is
        accumulated during backward, then free the gradient (as galore_torch's
        per-layer example does), so that at most one gradient lives at a time
        beyond those autograd still needs. ``step()`` then finds no gradients.
        Returns the hook handles (the optimizer keeps them too: on PyTorch
        before 2.1 they hold the gradient accumulators the hooks live on)."""
        self._build()
        handles = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                handles.append(_after_accumulation(p, self._make_hook(gi, self._ids[gi][id(p)])))
        self._hook_handles = getattr(self, "_hook_handles", []) + handles
        return handles

    def _make_hook(self, gi, layer):
        # The engine is looked up when the hook runs: load_state_dict replaces them.
        def hook(p):
            if p.grad is None:
                return
            with torch.no_grad():
                self._step_one(self._engines[gi], self.param_groups[gi], layer, p)
            p.grad = None
        return hook

    def state_dict(self):
        self._build()
        out = super().state_dict()
        out["galore"] = [torch.frombuffer(bytearray(e.save()), dtype=torch.uint8) for e in self._engines]
        return out

    def load_state_dict(self, state_dict):
        if "galore" not in state_dict:
            raise ValueError("galore: this state_dict was not saved by a galore optimizer (no 'galore' entry)")
        saved = state_dict["galore"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"galore: the state_dict has {len(saved)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}")
        # Fresh engines take the saved state first: a file that does not fit
        # raises here, and this optimizer is left as it was.
        engines, ids = self._make_engines()
        for engine, blob in zip(engines, saved):
            engine.load(bytes(blob.cpu().numpy().tobytes()))
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "galore"})
        self._engines, self._ids = engines, ids

    def state_bytes(self):
        """Bytes of optimizer state the engines hold (moments and bases)."""
        self._build()
        return sum(e.state_bytes() for e in self._engines)


class GaLoreAdamW8bit(GaLoreAdamW):
    """galore_torch's GaLoreAdamW8bit: the moments in blockwise 8 bits."""

    _state_kind = "8bit"


def _check_group(group):
    if "rank" in group:
        if int(group["rank"]) < 1:
            raise ValueError(f"galore: rank must be at least 1 (got {group['rank']})")
        if group.get("proj_type", "std") not in _PROJ_TYPES:
            raise ValueError(f"galore: proj_type must be one of {_PROJ_TYPES} (got {group['proj_type']!r})")
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(f"galore: parameters of a group with a rank must be 2-D (got shape {tuple(p.shape)})")
    for p in group["params"]:
        if p.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"galore: parameters must be float32 or bfloat16 (got {p.dtype})")
        if p.device.type != "cpu":
            raise ValueError(f"galore: this build steps CPU tensors only (got a parameter on {p.device})")


def _as_matrix(p):
    if p.dim() == 2:
        return tuple(p.shape)
    return 1, p.numel()


def _after_accumulation(p, hook):
    """Calls hook(p) once p.grad holds the accumulated gradient."""
    if hasattr(p, "register_post_accumulate_grad_hook"):  # PyTorch >= 2.1
        return p.register_post_accumulate_grad_hook(hook)
    # Older PyTorch: a hook on the parameter's AccumulateGrad node runs after it
    # has written p.grad.
    accumulator = p.expand_as(p).grad_fn.next_functions[0][0]
    handle = accumulator.register_hook(lambda *_: hook(p))
    handle._galore_keep = accumulator  # the node must outlive the hook
    return handle
