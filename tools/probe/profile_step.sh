#!/usr/bin/env bash
# Where the whole-model step's time goes: ncu times every kernel of one steady
# step_all (the step BM_CudaStepAll runs between cudaProfilerStart and Stop),
# graph replay and eager, and profile_summary.py sums them by kind (GEMM, Adam,
# padded copies). With build-device/ built by dev_run.sh (or built here).
#   bash tools/probe/profile_step.sh [model regex, default llama1b] [benchmarks, default "StepAll/galore StepAll/galore_eager"]
# (CudaStep/galore profiles one pass of the per-layer step the same way.)
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/.deps/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
model=${1:-llama1b}
[ -x build-device/bench/cuda/galore_bench_cuda ] || cmake --build build-device -j16 --target galore_bench_cuda > "$OUT/build_bench.log" 2>&1
for variant in ${2:-StepAll/galore StepAll/galore_eager}; do
  timeout 240 ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --print-units base \
    ./build-device/bench/cuda/galore_bench_cuda --benchmark_filter="$variant/$model" \
    > "$OUT/ncu_${variant//\//_}_${model}.csv" 2> "$OUT/ncu_${variant//\//_}_${model}.err"
  echo "== $variant/$model (ncu rc $?)"
  python3 "$(dirname "$0")/profile_summary.py" "$OUT/ncu_${variant//\//_}_${model}.csv"
done
