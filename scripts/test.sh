#!/usr/bin/env bash
# The test command (README, CI): sets up what the tests need, then runs them all.
# - .venv: torch, transformers, optuna … for the interop tests (created once, ~3 min, ~6 GB)
# - cargo test: unit, parity, gradient, data, storage, CLI and interop tests
# Tests that need ../shared/data or the Python environment say SKIPPED when those are absent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import torch, transformers, optuna, matplotlib, sklearn' 2>/dev/null; then
  echo "== setting up .venv (Python test dependencies)"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r scripts/requirements-test.txt
fi
# .cuda: the pinned nvcc 13.0 wheels (toolchain notes §2), so build.rs compiles every kernel and a
# compile error or a register spill fails the build. One pip command: --target does not merge.
if [ ! -x .cuda/nvidia/cu13/bin/nvcc ]; then
  echo "== installing nvcc 13.0 into .cuda"
  rm -rf .cuda
  python3 -m pip install -q --no-deps --target .cuda \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
export CUDA_HOME="$PWD/.cuda/nvidia/cu13"
export HPO_GPU_PYTHON="$PWD/.venv/bin/python"
echo "== cargo test"
cargo test --all-targets "$@"
