//! Row-major GEMMs for every trial at once: one cuBLAS strided-batched call over the trial
//! dimension (fp32, fp32 with TF32 tensor cores, or bf16 storage with fp32 accumulation).
//!
//! CPU twin: the `gemm` calls of `cpu::bert::linear_new` / `linear_backward` (through
//! `cpu::real::gemm`).

use anyhow::{Result, anyhow, ensure};
use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::launch::check_len;
use crate::ops::{Operand, Out};

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

/// C = alpha·op(A)·op(B) + beta·C for each of `trials` trials, all row-major. C is `m × n` where
/// `c`'s [`Out`] says.
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
    c: (&mut CudaSlice<T>, Out),
) -> Result<()>
where
    cudarc::cublas::CudaBlas: Gemm<T>,
{
    let ((a_buf, a_operand), (b_buf, b_operand), (c, c_out)) = (a, b, c);
    let (c_offset, c_stride) = (c_out.offset, c_out.stride);
    let (m, k) = a_operand.shape();
    let (k2, n) = b_operand.shape();
    ensure!(k == k2, "gemm: op(A) is {m}×{k} but op(B) is {k2}×{n}");
    ensure!(trials > 0 && m > 0 && n > 0 && k > 0, "gemm: empty problem ({trials} trials, {m}×{n}×{k})");
    check_len(
        "gemm A",
        a_buf.len(),
        a_operand.offset,
        trials,
        a_operand.stride,
        a_operand.rows * a_operand.cols,
    )?;
    check_len(
        "gemm B",
        b_buf.len(),
        b_operand.offset,
        trials,
        b_operand.stride,
        b_operand.rows * b_operand.cols,
    )?;
    check_len("gemm C", c.len(), c_offset, trials, c_stride, m * n)?;
    let cublas_int = |name: &str, v: usize| {
        i32::try_from(v).map_err(|_| anyhow!("gemm: {name} = {v} exceeds cuBLAS's int"))
    };
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            // cuBLAS's A is our B and its B is our A; leading dimensions are the stored row widths.
            transa: op(b_operand.transposed),
            transb: op(a_operand.transposed),
            m: cublas_int("n", n)?,
            n: cublas_int("m", m)?,
            k: cublas_int("k", k)?,
            alpha,
            lda: cublas_int("B columns", b_operand.cols)?,
            ldb: cublas_int("A columns", a_operand.cols)?,
            beta,
            ldc: cublas_int("n", n)?,
        },
        batch_size: cublas_int("trials", trials)?,
        stride_a: b_operand.stride as i64,
        stride_b: a_operand.stride as i64,
        stride_c: c_stride as i64,
    };
    let a_view = a_buf.slice(a_operand.offset..);
    let b_view = b_buf.slice(b_operand.offset..);
    let mut c_view = c.slice_mut(c_offset..);
    unsafe { gpu.blas.gemm_strided_batched(cfg, &b_view, &a_view, &mut c_view) }
        .map_err(|e| anyhow!("cuBLAS gemm failed: {e:?}"))
}
