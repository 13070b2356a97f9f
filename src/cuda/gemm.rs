//! Row-major GEMMs for every trial at once: one cuBLAS strided-batched call over the trial
//! dimension (fp32, fp32 with TF32 tensor cores, or bf16 storage with fp32 accumulation).
//!
//! CPU twin: the `gemm` calls of `cpu::bert::linear_forward` / `linear_backward` (through
//! `cpu::real::gemm`).

use anyhow::{Result, anyhow, ensure};
use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::launch::check_len;

/// How cuBLAS may compute fp32 GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp32Math {
    /// IEEE fp32 (parity with the CPU).
    Exact,
    /// TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation).
    Tf32,
}

/// Sets the math mode of the context's cuBLAS handle for the GEMMs that follow.
pub fn set_fp32_math(gpu: &Gpu, math: Fp32Math) -> Result<()> {
    let mode = match math {
        Fp32Math::Exact => cublasMath_t::CUBLAS_DEFAULT_MATH,
        Fp32Math::Tf32 => cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
    };
    unsafe { cudarc::cublas::sys::cublasSetMathMode(*gpu.blas.handle(), mode) }
        .result()
        .map_err(|e| anyhow!("cuBLAS refused math mode {math:?}: {e:?}"))
}

/// One operand (row-major, offset, per-trial stride, optional transpose): the trial-array ops' own.
pub use crate::trial_array::ops::Operand;

/// C = alpha·op(A)·op(B) + beta·C for each of `trials` trials, all row-major. C is `m × n` at
/// `c_offset` with `c_stride` between trials.
///
/// cuBLAS is column-major: a row-major X is a column-major Xᵀ, so it computes
/// Cᵀ = op(B)ᵀ·op(A)ᵀ with the operands swapped.
#[allow(clippy::too_many_arguments)]
pub fn gemm_trials<T>(
    gpu: &Gpu,
    trials: usize,
    alpha: T,
    a: (&CudaSlice<T>, Operand),
    b: (&CudaSlice<T>, Operand),
    beta: T,
    c: &mut CudaSlice<T>,
    c_offset: usize,
    c_stride: usize,
) -> Result<()>
where
    cudarc::cublas::CudaBlas: Gemm<T>,
{
    let ((abuf, ao), (bbuf, bo)) = (a, b);
    let (m, k) = ao.shape();
    let (k2, n) = bo.shape();
    ensure!(k == k2, "gemm: op(A) is {m}×{k} but op(B) is {k2}×{n}");
    ensure!(trials > 0 && m > 0 && n > 0 && k > 0, "gemm: empty problem ({trials} trials, {m}×{n}×{k})");
    check_len("gemm A", abuf.len(), ao.offset, trials, ao.stride, ao.rows * ao.cols)?;
    check_len("gemm B", bbuf.len(), bo.offset, trials, bo.stride, bo.rows * bo.cols)?;
    check_len("gemm C", c.len(), c_offset, trials, c_stride, m * n)?;
    let i = |name: &str, v: usize| {
        i32::try_from(v).map_err(|_| anyhow!("gemm: {name} = {v} exceeds cuBLAS's int"))
    };
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            // cuBLAS's A is our B and its B is our A; leading dimensions are the stored row widths.
            transa: op(bo.transposed),
            transb: op(ao.transposed),
            m: i("n", n)?,
            n: i("m", m)?,
            k: i("k", k)?,
            alpha,
            lda: i("B columns", bo.cols)?,
            ldb: i("A columns", ao.cols)?,
            beta,
            ldc: i("n", n)?,
        },
        batch_size: i("trials", trials)?,
        stride_a: bo.stride as i64,
        stride_b: ao.stride as i64,
        stride_c: c_stride as i64,
    };
    let av = abuf.slice(ao.offset..);
    let bv = bbuf.slice(bo.offset..);
    let mut cv = c.slice_mut(c_offset..);
    unsafe { gpu.blas.gemm_strided_batched(cfg, &bv, &av, &mut cv) }
        .map_err(|e| anyhow!("cuBLAS gemm failed: {e:?}"))
}
