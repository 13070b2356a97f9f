//! Bias + exact GELU after the FFN's first GEMM, and its backward with the bias gradient.
//!
//! CPU twins: `cpu::bert::gelu_forward` (after `linear_new`'s bias) and
//! `cpu::bert::gelu_backward` (plus `linear_backward`'s column sums for the FFN bias).
//! Kernels: `kernels/gelu.cu`.

use anyhow::Result;
use cudarc::driver::CudaSlice;

use super::bias::{activations, bias, shape_args};
use super::context::Gpu;
use super::kernel::{BIAS_GELU_FORWARD, GELU_BACKWARD};
use super::launch::{Act, Launch, blocks, config};
use crate::ops::BiasShape;

/// x += bias in place (x becomes the pre-activation the backward reads), act = gelu(x).
pub fn bias_gelu_forward<A: Act>(
    gpu: &Gpu,
    shape: &BiasShape,
    x: &mut CudaSlice<A>,
    params: &CudaSlice<f32>,
    act: &mut CudaSlice<A>,
) -> Result<()> {
    let mut launch = Launch::new(gpu, BIAS_GELU_FORWARD, A::SUFFIX)?;
    // In place: x is both the input and the pre-activation the backward needs.
    launch.buffer("pre-activation", x, activations(shape))?.buffer("act", act, activations(shape))?;
    launch.buffer("x", x, activations(shape))?.buffer("bias", params, bias(shape))?;
    shape_args(&mut launch, shape)?;
    launch.run(config(blocks(shape.rows * shape.width, 256), shape.trials, 1, 256, 0)?)
}

/// dx = dy · gelu'(pre) (overwrites dx); with `grads`, the bias gradient Σ rows dx is added at
/// `shape.bias`.
pub fn gelu_backward<A: Act>(
    gpu: &Gpu,
    shape: &BiasShape,
    pre: &CudaSlice<A>,
    dy: &CudaSlice<A>,
    dx: &mut CudaSlice<A>,
    grads: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    let mut launch = Launch::new(gpu, GELU_BACKWARD, A::SUFFIX)?;
    launch.buffer("dx", dx, activations(shape))?.optional("bias gradient", grads.as_deref(), bias(shape))?;
    launch.buffer("pre", pre, activations(shape))?.buffer("dy", dy, activations(shape))?;
    shape_args(&mut launch, shape)?;
    launch.run(config(blocks(shape.rows, 32), shape.trials, 1, 256, 0)?)
}
