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
# The binary must carry kernels, or the GPU run would only say so.
strings .gpu/bin/hpo-gpu | grep -q '^\.version' || { echo "the packed binary has no PTX: was nvcc found?" >&2; exit 1; }
du -sh .gpu
