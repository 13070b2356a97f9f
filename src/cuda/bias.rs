//! The bias half of a linear layer (the GEMM half is `gemm.rs`): y += b, and db += Σ rows dy.
//!
//! CPU twins: the bias of `cpu::bert::linear_new`, the column sums in
//! `cpu::bert::linear_backward`.
//! Kernels: `kernels/bias.cu`; `gelu.rs` fuses the FFN's bias with its GELU.

use anyhow::Result;
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::kernel::{BIAS_ADD, BIAS_BACKWARD};
use super::launch::{Act, Launch, Span, blocks, config};
pub use crate::ops::BiasShape;

/// The activation `[T, rows, width]` of `shape`.
pub(crate) fn activations(shape: &BiasShape) -> Span {
    Span::trials(shape.trials, shape.act_stride, shape.rows * shape.width)
}

/// Each trial's bias inside its `[P]` parameters or gradients.
pub(crate) fn bias(shape: &BiasShape) -> Span {
    Span::trials(shape.trials, shape.param_stride, shape.width).at(shape.bias)
}

/// Appends the row count, width and the two strides every bias kernel ends with.
pub(crate) fn shape_args(launch: &mut Launch<'_>, shape: &BiasShape) -> Result<()> {
    launch.int("rows", shape.rows)?.int("width", shape.width)?;
    launch.arg(shape.act_stride as u64).arg(shape.param_stride as u64);
    Ok(())
}

/// y += bias per row.
pub fn bias_add<A: Act>(
    gpu: &Gpu,
    shape: &BiasShape,
    y: &mut CudaSlice<A>,
    params: &CudaSlice<f32>,
) -> Result<()> {
    let mut launch = Launch::new(gpu, BIAS_ADD, A::SUFFIX)?;
    launch.buffer("activations", y, activations(shape))?.buffer("bias", params, bias(shape))?;
    shape_args(&mut launch, shape)?;
    launch.run(config(blocks(shape.rows * shape.width, 256), shape.trials, 1, 256, 0)?)
}

/// grads[bias] += Σ rows of dy.
pub fn bias_backward<A: Act>(
    gpu: &Gpu,
    shape: &BiasShape,
    dy: &CudaSlice<A>,
    grads: &mut CudaSlice<f32>,
) -> Result<()> {
    let mut launch = Launch::new(gpu, BIAS_BACKWARD, A::SUFFIX)?;
    launch.buffer("bias", grads, bias(shape))?.buffer("activations", dy, activations(shape))?;
    shape_args(&mut launch, shape)?;
    launch.run(config(blocks(shape.rows, 32), shape.trials, 1, 256, 0)?)
}
