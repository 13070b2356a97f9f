#!/usr/bin/env bash
# The test command (README, CI): sets up what the tests need, then runs them all.
# - .venv: torch, transformers, optuna … for the interop tests (created once, ~3 min, ~6 GB)
# - .cuda: nvcc 13.0 from PyPI, so every CUDA kernel is compiled (scripts/install-nvcc.sh)
# - a throwaway PostgreSQL server (scripts/postgres.sh, stopped at exit) for the studies on
#   PostgreSQL (tests/study_postgres.rs), which must not skip (HPO_GPU_REQUIRE_POSTGRES=1)
# - OpenBLAS (Debian's libopenblas0-pthread, installed as root when missing): the CPU's optional
#   matrix multiply (HPO_GPU_GEMM=openblas), checked against matrixmultiply, which must not skip
#   (HPO_GPU_REQUIRE_OPENBLAS=1); and oneDNN (libdnnl2, likewise): its fp32 products
#   (HPO_GPU_GEMM=onednn, HPO_GPU_REQUIRE_ONEDNN=1) and --precision bf16, whose tests must not
#   skip on a CPU with AMX or AVX512_BF16 (HPO_GPU_REQUIRE_BF16=1)
# - cargo test: unit, parity, gradient, data, storage, CLI and interop tests
# - the GPU path (tests/gpu_*.rs) on the virtual CUDA device of vcuda/ (its own tests first), which
#   runs our kernels on the host: found through LD_LIBRARY_PATH for those tests only, where they
#   must not skip (HPO_GPU_REQUIRE_DEVICE=1); then scripts/vcuda-broken.sh shows broken kernels fail
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
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import torch, transformers, optuna, matplotlib, sklearn, psycopg2' 2>/dev/null; then
  echo "== setting up .venv (Python test dependencies)"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r scripts/requirements-test.txt
fi
scripts/install-nvcc.sh
export CUDA_HOME="$PWD/.cuda/nvidia/cu13"
export HPO_GPU_PYTHON="$PWD/.venv/bin/python"
echo "== the virtual CUDA device (vcuda/): build and its own tests"
vcuda_lib=$(scripts/build-vcuda.sh)
cargo test -q --manifest-path vcuda/Cargo.toml --target-dir target/vcuda
echo "== OpenBLAS (HPO_GPU_GEMM=openblas) and oneDNN (HPO_GPU_GEMM=onednn, --precision bf16) for the CPU"
loads() { .venv/bin/python -c "import ctypes; ctypes.CDLL('$1')" 2>/dev/null; }
if { ! loads libopenblas.so.0 || ! loads libdnnl.so.2; } && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libopenblas0-pthread libdnnl2; } \
    >/dev/null || { echo "error: apt-get install -y libopenblas0-pthread libdnnl2 failed" >&2; exit 1; }
fi
if loads libopenblas.so.0; then
  export HPO_GPU_REQUIRE_OPENBLAS=1
else
  echo "note: libopenblas.so.0 is missing (not root, or no apt-get): the CPU tests run on matrixmultiply only" >&2
fi
if loads libdnnl.so.2; then
  export HPO_GPU_REQUIRE_ONEDNN=1
fi
if ! grep -qwE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null; then
  echo "note: this CPU has no AMX / AVX512_BF16: the --precision bf16 tests check its error line only" >&2
elif loads libdnnl.so.2; then
  export HPO_GPU_REQUIRE_BF16=1
else
  echo "note: libdnnl.so.2 is missing (not root, or no apt-get): the --precision bf16 tests check its error line only" >&2
fi
echo "== PostgreSQL for the storage tests"
pg_dir=$(mktemp -d /tmp/hpo-gpu-postgres.XXXXXX)
trap 'scripts/postgres.sh stop "$pg_dir" >/dev/null 2>&1 || true' EXIT
pg_port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
HPO_GPU_POSTGRES_URL=$(scripts/postgres.sh start "$pg_dir" "$pg_port")
export HPO_GPU_POSTGRES_URL HPO_GPU_POSTGRES_DIR="$pg_dir" HPO_GPU_REQUIRE_POSTGRES=1
echo "== cargo test"
cargo test --all-targets "$@"
echo "== broken kernels must fail on the virtual device"
scripts/vcuda-broken.sh
echo "== the GPU path on the virtual device ($vcuda_lib)"
LD_LIBRARY_PATH="$vcuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" HPO_GPU_REQUIRE_DEVICE=1 \
  cargo test --test gpu_kernels --test gpu_array --test gpu_cli
