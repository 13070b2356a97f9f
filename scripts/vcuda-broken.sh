#!/usr/bin/env bash
# Shows that the virtual CUDA device can fail: builds it from deliberately broken copies of
# kernels/ and checks that the GPU tests report each break, and that the --device auto self-check
# falls back to the CPU (--device cuda stops) on a broken kernel. Run by scripts/test.sh after the
# GPU tests; the expected failures go to target/vcuda-broken-logs/, one summary line per break.
set -euo pipefail
cd "$(dirname "$0")/.."
logs=target/vcuda-broken-logs
rm -rf "$logs" && mkdir -p "$logs"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

# break NAME FILE OLD NEW: a copy of kernels/ with OLD (which must occur) replaced once by NEW.
break_copy() {
  local name=$1 file=$2 old=$3 new=$4
  rm -rf "${tmp:?}/$name" && cp -r kernels "$tmp/$name"
  python3 - "$tmp/$name/$file" "$old" "$new" <<'PY'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
assert old in text, f"{path}: the text to break is not there any more: {old!r}"
open(path, "w").write(text.replace(old, new, 1))
PY
  scripts/build-vcuda.sh "$tmp/$name" "broken-$name" >/dev/null
}

# expect NAME DESCRIPTION PATTERN COMMAND...: COMMAND must fail and its output match PATTERN.
expect_reported() {
  local name=$1 what=$2 pattern=$3
  shift 3
  if "$@" >"$logs/$name.log" 2>&1; then
    echo "NOT CAUGHT: $what: the run passed (log: $logs/$name.log)"
    failed=$((failed + 1))
  elif grep -qE "$pattern" "$logs/$name.log"; then
    echo "caught: $what"
    passed=$((passed + 1))
  else
    echo "NOT CAUGHT AS EXPECTED: $what: no line matches /$pattern/ (log: $logs/$name.log)"
    failed=$((failed + 1))
  fi
}

with_lib() { LD_LIBRARY_PATH="$PWD/target/vcuda-$1/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" HPO_GPU_REQUIRE_DEVICE=1 "${@:2}"; }

# 1. A removed barrier: lane 0 of warp 0 sums the per-warp partial sums before the others wrote them.
break_copy no-barrier optimizer.cu $'    __syncthreads();\n    if (warp == 0) {' $'    if (warp == 0) {'
expect_reported no-barrier "optimizer.cu without the barrier in grad_sumsq_partial" \
  "grad_norm_and_clipping_match_cpu.*FAILED|test grad_norm_and_clipping_match_cpu \.\.\. FAILED" \
  with_lib broken-no-barrier cargo test -q --test gpu_kernels grad_norm_and_clipping_match_cpu

# 2. An off-by-one row: each warp of the LayerNorm forward normalises the next row.
break_copy row-off-by-one layernorm.cu \
  'const int row = blockIdx.x * (blockDim.x / 32) + warp;' 'const int row = blockIdx.x * (blockDim.x / 32) + warp + 1;'
expect_reported row-off-by-one "layernorm.cu normalising row i+1 into row i" \
  "layernorm_matches_cpu.*FAILED|test layernorm_matches_cpu \.\.\. FAILED" \
  with_lib broken-row-off-by-one cargo test -q --test gpu_kernels layernorm_matches_cpu

# 3. The same broken kernel under `search`: --device cuda stops, --device auto runs on the CPU
# (the test spawns hpo-gpu on the broken device and asserts both; it must pass, and must have run).
if HPO_GPU_BROKEN_DEVICE_LIB="$PWD/target/vcuda-broken-row-off-by-one/lib" \
  cargo test -q --test gpu_cli self_check_catches_a_broken_kernel -- --nocapture >"$logs/self-check.log" 2>&1 &&
  grep -q "1 passed" "$logs/self-check.log" && grep -q "self-check caught the broken kernel" "$logs/self-check.log"; then
  echo "caught: the --device cuda/auto self-check on the broken layernorm.cu"
  passed=$((passed + 1))
else
  echo "NOT CAUGHT: the --device cuda/auto self-check on the broken layernorm.cu (log: $logs/self-check.log)"
  failed=$((failed + 1))
fi
echo "broken kernels: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
