#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for FUZZ_SECONDS each (default 300), one after the other,
# then prints one summary line per target (runs, exec/s, coverage, crashes). See docs/fuzzing.md.
#
#   scripts/fuzz.sh                      # all targets, 300 s each
#   FUZZ_SECONDS=60 scripts/fuzz.sh tokenizer search_space
#   FUZZ_MERGE=1 scripts/fuzz.sh         # afterwards, add new-coverage finds (<= 2 KB) to fuzz/corpus/<target>
#
# Each target grows a scratch corpus in fuzz/corpus-work/<target> (git-ignored), seeded from the
# committed fuzz/corpus/<target>; crashes land in fuzz/artifacts/<target>/. `-s none` (no
# sanitizer) needs only stable rustc flags, so this runs on stable 1.95 too; nightly is used when
# installed, as it also allows the sanitizers (`-s address`) when running a target by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-300}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors torch_bin config_json tokenizer dataset_jsonl dataset_csv dataset_parquet search_space)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
  exit 2
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  fuzz=(cargo fuzz)
fi

logs="fuzz/artifacts/logs"
mkdir -p "$logs"
summary=()
failed=0
for target in "${targets[@]}"; do
  work="fuzz/corpus-work/$target"
  mkdir -p "$work" "fuzz/artifacts/$target"
  echo "== $target: ${seconds}s"
  status=0
  # libFuzzer writes new inputs only to the first corpus directory, so the committed one stays as is.
  # One process (no -jobs: that would run a child writing to ./fuzz-N.log instead of this log).
  "${fuzz[@]}" run -s none --fuzz-dir fuzz "$target" "$work" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"$logs/$target.log" 2>&1 || status=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$target.log" | grep -o '[0-9]*$' || true)
  speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$logs/$target.log" | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$logs/$target.log" | tail -1 | grep -o '[0-9]*' || true)
  if [ "$status" -eq 0 ]; then
    result="no crash"
  else
    failed=1
    artifact=$(grep -o 'Test unit written to [^ ]*' "$logs/$target.log" | tail -1 | sed 's/Test unit written to //' || true)
    result="CRASH (exit $status) ${artifact:-see $logs/$target.log}"
  fi
  line=$(printf '%-16s %6ss  runs %-10s exec/s %-7s cov %-6s %s' "$target" "$seconds" "${runs:-?}" "${speed:-?}" "${cov:-?}" "$result")
  summary+=("$line")
  echo "$line"
  if [ "${FUZZ_MERGE:-0}" = 1 ]; then
    # Adds to fuzz/corpus/<target> a minimal set of new finds that reach code (edges, not hit
    # counts) the committed corpus does not, skipping those over 2 KB to keep the corpora small.
    merged="fuzz/corpus-work/$target.merged"
    rm -rf "$merged" && cp -r "fuzz/corpus/$target" "$merged"
    "${fuzz[@]}" run -s none --fuzz-dir fuzz "$target" "$merged" "$work" -- \
      -set_cover_merge=1 -use_counters=0 -rss_limit_mb=2048 -timeout=10 >>"$logs/$target.log" 2>&1
    added=0
    for file in "$merged"/*; do
      name=$(basename "$file")
      if [ ! -e "fuzz/corpus/$target/$name" ] && [ "$(stat -c %s "$file")" -le 2048 ]; then
        cp "$file" "fuzz/corpus/$target/" && added=$((added + 1))
      fi
    done
    rm -rf "$merged"
    echo "   merged $added new inputs into fuzz/corpus/$target"
  fi
done
echo
echo "== summary ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores)"
printf '%s\n' "${summary[@]}"
exit "$failed"
