#!/usr/bin/env bash
# Runs char_lm jobs in parallel: one line per job in a job file, each line the
# job's name followed by char_lm's arguments. Logs and CSVs go to OUT_DIR.
#
#   tools/char_lm_study.sh CHAR_LM JOBS_FILE OUT_DIR [PARALLEL] [THREADS] [TIMEOUT_S]
set -u
char_lm=$1 jobs=$2 out=$3 parallel=${4:-4} threads=${5:-2} limit=${6:-3600}
mkdir -p "$out"
run() {
  local name=$1; shift
  OMP_NUM_THREADS=$threads timeout "$limit" "$char_lm" "$@" --csv "$out/$name.csv" > "$out/$name.log" 2>&1
  echo "$name: exit $? $(grep -h 'held-out loss' "$out/$name.log" | tail -1)"
}
export -f run
export char_lm out threads limit
grep -v '^\s*#' "$jobs" | grep -v '^\s*$' | xargs -P "$parallel" -L 1 bash -c 'run "$@"' _
