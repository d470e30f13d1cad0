#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA backend's tests, example and
# benchmarks, run the tests, compute-sanitizer on them, and the benchmarks.
# Logs and JSON go to $OUT (default ./out).
#   tools/cuda_device_check.sh [tests] [sanitize] [bench] [bench_filter=REGEX]
# SANITIZE_TOOLS and SANITIZE_TESTS narrow the sanitizer pass (default: both
# tools on every test); TEST_TIMEOUT limits each run (default 240 s).
# With .deps/ from tools/device_deps.sh when the machine lacks Eigen/doctest/benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
want() { [[ " $* " == *" all "* ]] || [[ " $ARGS " == *" $1 "* ]]; }
ARGS=" ${*:-tests sanitize bench} "
filter=$(sed -n 's/.*bench_filter=\([^ ]*\).*/\1/p' <<<"$ARGS")
prefix=()
[ -d .deps ] && prefix=(-DCMAKE_PREFIX_PATH="$PWD/.deps") && export LD_LIBRARY_PATH="$PWD/.deps/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
cmake -S . -B build-device -DCMAKE_BUILD_TYPE=Release -DGALORE_ENABLE_CUDA=ON -DGALORE_CHECK_HEADERS=OFF \
      -DGALORE_NATIVE_OPTIMIZATIONS=ON "${prefix[@]}" > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build build-device -j16 --target test_cuda_step test_cuda_step_all test_cuda_refresh test_cuda_elementwise test_cuda_checkpoint test_cuda_golden test_cuda_quantized_weight test_cuda_adam8bit test_cuda_qgalore galore_bench_cuda least_squares_cuda > "$OUT/build.log" 2>&1 \
  || { grep -E "error" "$OUT/build.log" | head -40; exit 1; }
status=0
# A hung kernel must not eat the whole device call: each run gets a time limit.
limit=${TEST_TIMEOUT:-240}
CUDA_TESTS="test_cuda_qgalore test_cuda_step test_cuda_step_all test_cuda_refresh test_cuda_elementwise test_cuda_checkpoint test_cuda_golden test_cuda_quantized_weight test_cuda_adam8bit"
if want tests; then
  echo "== tests"
  for t in $CUDA_TESTS; do
    timeout "$limit" ./build-device/tests/cuda/$t 2>&1 | tee "$OUT/$t.log" | tail -25
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
  timeout "$limit" ./build-device/examples/cuda/least_squares_cuda 2>&1 | tee "$OUT/least_squares_cuda.log" | tail -14
fi
if want bench; then
  echo "== benchmarks"
  timeout 400 ./build-device/bench/cuda/galore_bench_cuda ${filter:+--benchmark_filter="$filter"} \
    --benchmark_out="$OUT/bench_cuda.json" --benchmark_out_format=json 2>&1 | tee "$OUT/bench_cuda.log" | tail -30
fi
if want sanitize; then
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    echo "== compute-sanitizer $tool"
    rc=0
    for t in ${SANITIZE_TESTS:-$CUDA_TESTS}; do
      timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 99 ./build-device/tests/cuda/$t \
        >> "$OUT/sanitizer_$tool.log" 2>&1 || rc=$?
    done
    tail -4 "$OUT/sanitizer_$tool.log"
    [ $rc -eq 0 ] || { echo "$tool: exit $rc"; status=1; }
  done
fi
exit $status
