#!/usr/bin/env bash
# Builds the virtual CUDA device (vcuda/: a libcuda.so and libcublas.so that run kernels/*.cu on
# the host) into target/vcuda/lib, for tests only: nothing finds it unless LD_LIBRARY_PATH names
# that folder (scripts/test.sh does so for the GPU tests). See kernels/README.md.
#
#   scripts/build-vcuda.sh                   the real kernels  -> target/vcuda/lib
#   scripts/build-vcuda.sh KERNELS_DIR NAME  other kernel sources (a broken copy) -> target/vcuda-NAME/lib
set -euo pipefail
cd "$(dirname "$0")/.."
kernels="${1:-$PWD/kernels}"
name="${2:-}"
out="target/vcuda${name:+-$name}"
VCUDA_KERNELS="$(cd "$kernels" && pwd)" cargo build -q --manifest-path vcuda/Cargo.toml --target-dir "$out"
mkdir -p "$out/lib"
# One library under every name cudarc tries first; links to one file, so cuBLAS sees the
# driver's allocations (the dynamic loader maps a file once, whatever name opened it).
for n in libcuda.so libcuda.so.1 libcublas.so libcublas.so.13; do
  ln -sf ../debug/libcuda.so "$out/lib/$n"
done
echo "$PWD/$out/lib"
