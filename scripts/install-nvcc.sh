#!/usr/bin/env bash
# Installs the pinned nvcc 13.0 wheels into .cuda (toolchain notes §2) unless they are there, so
# build.rs compiles every kernel (a compile error or a register spill fails the build). nvcc 13.0
# writes PTX 9.0, which the GPU machines' driver 580 accepts; newer nvcc writes newer PTX.
# One pip command: --target does not merge into an existing folder.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .cuda/nvidia/cu13/bin/nvcc ]; then
  echo "== installing nvcc 13.0 into .cuda"
  rm -rf .cuda
  python3 -m pip install -q --no-deps --target .cuda \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  # build.rs looks in .cuda/ too; make cargo run it again so the next build compiles the kernels.
  touch build.rs
fi
