#!/usr/bin/env bash
# The one prepared GPU run (issue 4): every kernel against its CPU twin, the trial array against
# the CPU reference, the kernel and train-step benches, and a short `hpo-gpu search --device cuda`
# on the recipe's IMDB subsets. Writes $OUT/results.md (summary) and one log per step.
# Prepare here with scripts/gpu-prepare.sh; on the device: bash .gpu/run.sh scripts/gpu-check.sh
# Dry run without a GPU: GPU_PACK=.gpu OUT=/tmp/gpu-check scripts/gpu-check.sh (every GPU step
# then reports its skip reason).
set -uo pipefail
pack=${GPU_PACK:-.gpu}
out=${OUT:-/tmp/gpu-check}
bin=${HPO_GPU_BIN:-$pack/bin/hpo-gpu}
mkdir -p "$out"
results="$out/results.md"
started=$(date +%s)
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  echo '```'
} > "$results"

# step NAME LIMIT_SECONDS COMMAND...: runs one step with a time limit, logs it, records the status.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" bash -c '"$@"' step "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  echo "- **$name**: exit $rc in ${secs} s ($*)" >> "$results"
  grep -E "test result:|SKIPPED|skipped|panicked|FAILED|error" "$out/$name.log" | head -20 | sed 's/^/    /' >> "$results"
}

run_tests() {  # every packed test executable whose name starts with $1
  local found=0
  for t in "$pack"/tests/"$1"-*; do
    [ -x "$t" ] || continue
    found=1
    "$t" --test-threads=1 --nocapture || return $?
  done
  [ $found = 1 ] || { echo "SKIPPED: no $1 test executable in $pack/tests"; return 0; }
}

run_bench() {  # the packed criterion bench $1, short measurement
  local found=0
  for b in "$pack"/benches/"$1"-*; do
    [ -x "$b" ] || continue
    found=1
    "$b" --bench --warm-up-time 1 --measurement-time 3 || return $?
  done
  [ $found = 1 ] || echo "SKIPPED: no $1 bench executable in $pack/benches"
}

export -f run_tests run_bench
export pack
# On a GPU machine the GPU tests must run, not skip (a dry run here still reports skip reasons).
if nvidia-smi -L >/dev/null 2>&1; then export HPO_GPU_REQUIRE_DEVICE=1; fi
step kernels 120 run_tests gpu_kernels
step array 90 run_tests gpu_array
step bench_kernels 120 run_bench kernels
step bench_train_step 90 run_bench train_step
# The study stays on the machine: $OUT brings back at most 8 files (SQLite may add -wal/-shm).
db=/tmp/gpu-check-study.db
rm -f "$db"
step search 60 "$bin" search --device cuda --slots 8 --model configs/bert-tiny --random-init \
  --tokenizer "$pack/data/bert-base-uncased" \
  --dataset "$pack/data/imdb_train_seed42_2500.jsonl.gz" \
  --eval-dataset "$pack/data/imdb_test_seed42_1000.jsonl.gz" \
  --train-samples 0 --eval-samples 0 --n-trials 8 --storage "sqlite:///$db" --study-name gpu_check
grep -vE "test result:|SKIPPED|skipped|panicked|FAILED|error" "$out/search.log" | tail -12 | sed 's/^/    /' >> "$results"
echo >> "$results"
echo "total: $(( $(date +%s) - started )) s" >> "$results"
cat "$results"
