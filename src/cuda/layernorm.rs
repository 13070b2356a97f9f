//! LayerNorm fused with the residual add, forward and backward, for every trial at once.
//!
//! CPU twins: `cpu::bert::layernorm_forward` (applied to `x + residual`, as `layer_forward` adds
//! the residual first), `cpu::bert::layernorm_backward`.
//! Kernels: `kernels/layernorm.cu`.

use anyhow::{Result, ensure};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::kernel::{LAYERNORM_BACKWARD, LAYERNORM_FORWARD};
use super::launch::{Act, Launch, Span, blocks, config};
pub use crate::ops::LayerNormShape;

/// The spans of one LayerNorm's buffers: activations, rstd, and γ / β (or their gradients).
struct Spans {
    acts: Span,
    rows: Span,
    gamma: Span,
    beta: Span,
}

fn spans(what: &str, shape: &LayerNormShape) -> Result<Spans> {
    ensure!(shape.hidden > 0 && shape.rows > 0, "{what}: empty shape {shape:?}");
    ensure!(
        shape.gamma + shape.hidden <= shape.beta,
        "{what}: γ (at {}) must come before β (at {}) without overlapping",
        shape.gamma,
        shape.beta
    );
    let params = Span::trials(shape.trials, shape.param_stride, shape.hidden);
    Ok(Spans {
        acts: Span::trials(shape.trials, shape.act_stride, shape.rows * shape.hidden),
        rows: Span::trials(shape.trials, shape.row_stride, shape.rows),
        gamma: params.at(shape.gamma),
        beta: params.at(shape.beta),
    })
}

/// Appends the sizes and strides both kernels end with.
fn shape_args(launch: &mut Launch<'_>, shape: &LayerNormShape) -> Result<()> {
    launch.int("rows", shape.rows)?.int("hidden", shape.hidden)?;
    launch.arg(shape.act_stride as u64).arg(shape.row_stride as u64).arg(shape.param_stride as u64);
    Ok(())
}

/// y = LN(x + residual)·γ + β, keeping xhat and rstd for the backward; `residual` None = no add.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<A: Act>(
    gpu: &Gpu,
    shape: &LayerNormShape,
    eps: f64,
    x: &CudaSlice<A>,
    residual: Option<&CudaSlice<A>>,
    params: &CudaSlice<f32>,
    y: &mut CudaSlice<A>,
    xhat: &mut CudaSlice<f32>,
    rstd: &mut CudaSlice<f32>,
) -> Result<()> {
    let spans = spans("layernorm_forward", shape)?;
    let mut launch = Launch::new(gpu, LAYERNORM_FORWARD, A::SUFFIX)?;
    launch.buffer("y", y, spans.acts)?.buffer("xhat", xhat, spans.acts)?.buffer("rstd", rstd, spans.rows)?;
    launch.buffer("x", x, spans.acts)?.optional("residual", residual, spans.acts)?;
    launch.buffer("γ", params, spans.gamma)?.buffer("β", params, spans.beta)?.arg(eps as f32);
    shape_args(&mut launch, shape)?;
    launch.run(config(blocks(shape.rows, 4), shape.trials, 1, 128, 0)?)
}

/// dx = LN backward of dy (overwrites dx); dγ and dβ are added into `grads` at the same offsets
/// as γ and β in the parameters.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<A: Act>(
    gpu: &Gpu,
    shape: &LayerNormShape,
    dy: &CudaSlice<A>,
    xhat: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
    params: &CudaSlice<f32>,
    dx: &mut CudaSlice<A>,
    grads: &mut CudaSlice<f32>,
) -> Result<()> {
    let spans = spans("layernorm_backward", shape)?;
    // 32 rows per block (LN_BWD_ROWS in the kernel); shared memory holds the block's dγ and dβ.
    let shared = u32::try_from(2 * shape.hidden * 4).map_err(|_| anyhow::anyhow!("hidden size too large"))?;
    ensure!(
        shared <= 48 * 1024,
        "layernorm_backward: hidden size {} needs more than 48 KB of shared memory",
        shape.hidden
    );
    let mut launch = Launch::new(gpu, LAYERNORM_BACKWARD, A::SUFFIX)?;
    launch.buffer("dx", dx, spans.acts)?.buffer("dγ", grads, spans.gamma)?.buffer("dβ", grads, spans.beta)?;
    launch
        .buffer("dy", dy, spans.acts)?
        .buffer("xhat", xhat, spans.acts)?
        .buffer("rstd", rstd, spans.rows)?;
    launch.buffer("γ", params, spans.gamma)?;
    shape_args(&mut launch, shape)?;
    launch.run(config(blocks(shape.rows, 32), shape.trials, 1, 128, shared)?)
}
