#!/usr/bin/env bash
# Probe: per-kernel durations of a steady LLaMA-1B GaLore step, from Nsight
# Compute (the kernels serialized, so each duration is the kernel alone).
# Run on a GPU machine after tools/cuda_device_check.sh has built build-device/.
#   tools/probe/ncu_step.sh [skip] [count]   -> $OUT/ncu_step.csv and a summary
# (the default skip passes the first step's refresh of every basis; ncu locks the
# clocks at base, so short kernels read longer than in the benchmark)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
skip=${1:-2200}
count=${2:-70}
ncu --metrics gpu__time_duration.sum -k 'regex:nvjet|gemm_bf16|adam_step|adamw_dense_step' \
    --launch-skip "$skip" --launch-count "$count" --csv \
    ./build-device/bench/cuda/galore_bench_cuda --benchmark_filter='BM_CudaStep/galore/llama1b' > "$OUT/ncu_step.csv" 2>&1
# Kernel name (shortened), grid, duration in us.
python3 - "$OUT/ncu_step.csv" <<'PY'
import csv, sys, re
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; rows = rows[1:]
k, g, u, v = head.index("Kernel Name"), head.index("Grid Size"), head.index("Metric Unit"), head.index("Metric Value")
for r in rows:
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(r[u], float("nan"))
    val = float(r[v].replace(",", "")) * scale
    print(f"{re.sub(r'<.*', '', r[k])[:60]:60s} {r[g]:>16s} {val:9.1f} us")
PY
