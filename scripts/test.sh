#!/usr/bin/env bash
# The test command (README, CI): sets up what the tests need, then runs them all.
# - .venv: torch, transformers, optuna … for the interop tests (created once, ~3 min, ~6 GB)
# - .cuda: nvcc 13.0 from PyPI, so every CUDA kernel is compiled (scripts/install-nvcc.sh)
# - cargo test: unit, parity, gradient, data, storage, CLI and interop tests
# Tests that need ../shared/data or the Python environment say SKIPPED when those are absent.
set -euo pipefail
cd "$(dirname "$0")/.."
# A full run needs ~14 GB (6 GB .venv, ~7 GB target/); when the disk runs out the linker fails with
# an error that is easy to miss, so say how much there is up front.
free_gb=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
echo "== free disk space here: ${free_gb} GB"
if [ "$free_gb" -lt 15 ]; then
  echo "warning: under 15 GB free; the build may fail with 'No space left on device'" >&2
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import torch, transformers, optuna, matplotlib, sklearn' 2>/dev/null; then
  echo "== setting up .venv (Python test dependencies)"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r scripts/requirements-test.txt
fi
scripts/install-nvcc.sh
export CUDA_HOME="$PWD/.cuda/nvidia/cu13"
export HPO_GPU_PYTHON="$PWD/.venv/bin/python"
echo "== cargo test"
cargo test --all-targets "$@"
