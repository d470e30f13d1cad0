#!/usr/bin/env python3
"""Times the reference implementation (galore_torch 1.0 on PyTorch's CPU) on the
benchmark suite's workloads, so that the two can be compared on one machine:

  - one GaLore AdamW step over the LLaMA-60M linear layers at rank 128, float32,
    without refresh (steady step) and with it (first step: an SVD of every matrix);
  - torch.optim.AdamW (full rank) on the same layers;
  - torch.linalg.svd in float32 of 768x768 and 2048x768 (LAPACK).

    apt-get install python3-torch libopenblas0-pthread   # Debian's PyTorch
    pip download --no-deps galore-torch==1.0 -d /tmp/whl && (cd /tmp/ref && unzip -oq /tmp/whl/galore_torch*.whl)
    OMP_NUM_THREADS=2 PYTHONPATH=/tmp/ref /usr/bin/python3 tools/bench_reference.py

Prints one line per measurement: name, median milliseconds over the repeats.
"""
import statistics
import sys
import time

import torch

from reference_env import bare_package  # noqa: E402

bare_package("galore_torch")
from galore_torch.adamw import AdamW as GaLoreAdamW  # noqa: E402


def llama60m_shapes():
    h, i, layers = 512, 1376, 8
    return [(h, h)] * 4 * layers + [(i, h)] * 2 * layers + [(h, i)] * layers


def median_ms(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.__config__.parallel_info().splitlines()[0] if hasattr(torch.__config__, 'parallel_info') else ''}")
    params = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in llama60m_shapes()]
    grads = [torch.randn(*s) * 1e-3 for s in llama60m_shapes()]

    def set_grads():
        for p, g in zip(params, grads):
            p.grad = g

    # galore_torch: the first step refreshes (SVD of every matrix), later ones do not.
    opt = GaLoreAdamW([{"params": params, "rank": 128, "update_proj_gap": 10**9, "scale": 0.25,
                        "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)
    set_grads()
    t0 = time.perf_counter()
    opt.step()
    first = (time.perf_counter() - t0) * 1e3
    print(f"reference_galore_first_step_llama60m_r128 {first:.1f}")

    def step():
        set_grads()
        opt.step()
    print(f"reference_galore_step_llama60m_r128 {median_ms(step, 10):.1f}")

    plain = torch.optim.AdamW(params, lr=1e-3)

    def adamw_step():
        set_grads()
        plain.step()
    print(f"reference_torch_adamw_llama60m {median_ms(adamw_step, 10):.1f}")

    for m, n in [(768, 768), (2048, 768), (512, 512), (1376, 512)]:
        A = torch.randn(m, n)
        print(f"reference_linalg_svd_{m}x{n} {median_ms(lambda: torch.linalg.svd(A, full_matrices=False), 5):.1f}")


if __name__ == "__main__":
    main()
