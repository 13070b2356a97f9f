//! A virtual CUDA device for tests: a `libcuda.so` and `libcublas.so` that run hpo-gpu's own
//! kernels (`kernels/*.cu`, compiled for the host with `runtime/cuda_host.h`) on the CPU, so CI
//! executes the `--device cuda` path — launchers, cudarc calls, cuBLAS usage, the scheduler —
//! without a GPU. What it proves and what it cannot: kernels/README.md.

pub mod cublas;
pub mod driver;
pub mod memory;
pub mod ptx;
