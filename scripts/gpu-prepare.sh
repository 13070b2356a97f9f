#!/usr/bin/env bash
# Builds and packs everything one GPU run needs into .gpu/ (git-ignored), on this machine:
# ../shared/tools/gpu-pack.sh (release binary, release test executables, the IMDB subsets,
# run.sh), plus the release bench executables (criterion) and the nvcc-built kernels checked.
# Then, on the device (carry [".gpu"]):   bash .gpu/run.sh scripts/gpu-check.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
scripts/install-nvcc.sh
export CUDA_HOME="$root/.cuda/nvidia/cu13"
../shared/tools/gpu-pack.sh
mkdir -p .gpu/benches
cargo bench --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and "bench" in m.get("target",{}).get("kind",[]): print(m["executable"])' \
  | while read -r exe; do cp "$exe" .gpu/benches/; done
strip .gpu/benches/* 2>/dev/null || true
# Only what scripts/gpu-check.sh runs travels (a device call carries at most 64 MiB in all).
find .gpu/tests -type f ! -name 'gpu_*' -delete
find .gpu/benches -type f ! -name 'kernels-*' ! -name 'train_step-*' -delete
rm -rf .gpu/wheels   # optuna wheels: only the transformers side-by-side needs them
# The binary must carry kernels, or the GPU run would only say so.
grep -qa '\.version 9' .gpu/bin/hpo-gpu || { echo "the packed binary has no PTX: was nvcc found?" >&2; exit 1; }
ls .gpu/tests .gpu/benches
# Apparent sizes in KiB (many small corpus files would count 4 KiB each in disk blocks).
total=$(( ( $(du -sb .gpu | cut -f1) + $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) ) / 1024 ))
echo "travels: about $(( total / 1024 )) MiB (.gpu + tracked files; the limit is 64 MiB)"
[ "$total" -lt $(( 60 * 1024 )) ] || { echo "too large to carry" >&2; exit 1; }
