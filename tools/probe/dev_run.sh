# One device call for the whole-model step: build, its tests, the per-layer
# tests, memcheck and racecheck on test_cuda_step_all, and the step benchmarks.
#   bash tools/probe/dev_run.sh    (BENCH=regex picks the benchmarks; with .deps carried)
# RACECHECK_ARGS: doctest arguments for the racecheck run (racecheck is slow:
# e.g. -tc='*odd offsets*' runs one case to completion).
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/.deps/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
cmake -S . -B build-device -DCMAKE_BUILD_TYPE=Release -DGALORE_ENABLE_CUDA=ON -DGALORE_CHECK_HEADERS=OFF -DGALORE_ENABLE_LIBTORCH=OFF -DGALORE_NATIVE_OPTIMIZATIONS=ON -DCMAKE_PREFIX_PATH=$PWD/.deps > $OUT/configure.log 2>&1 || { tail -20 $OUT/configure.log; exit 1; }
cmake --build build-device -j16 --target test_cuda_step_all ${TARGETS:-test_cuda_step galore_bench_cuda} > $OUT/build.log 2>&1 || { grep -E "error" $OUT/build.log | head -30; exit 1; }
for t in test_cuda_step_all ${TESTS-test_cuda_step}; do
  timeout 150 ./build-device/tests/cuda/$t > $OUT/$t.log 2>&1; echo "$t rc $?"; grep -B3 -A3 "ERROR" $OUT/$t.log | head -30; tail -3 $OUT/$t.log
done
for tool in memcheck racecheck; do
  args=""; [ $tool = racecheck ] && args="${RACECHECK_ARGS:-}"
  timeout ${SANITIZE_TIMEOUT:-90} compute-sanitizer --tool $tool --error-exitcode 99 ./build-device/tests/cuda/test_cuda_step_all $args > $OUT/$tool.log 2>&1; echo "$tool rc $?"; grep -E "ERROR SUMMARY|Hazard|test cases" $OUT/$tool.log | tail -3
done
[ -z "${NO_BENCH:-}" ] && timeout 200 ./build-device/bench/cuda/galore_bench_cuda --benchmark_filter="${BENCH:-StepAll|GemmFloor|CudaStep/galore}" --benchmark_out=$OUT/bench.json --benchmark_out_format=json > $OUT/bench.txt 2>&1; grep -E "^BM_|what|error" $OUT/bench.txt
