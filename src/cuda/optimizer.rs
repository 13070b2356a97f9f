//! Per-trial gradient norm and clipping, and multi-trial AdamW over `[T, P]` in one launch.
//!
//! CPU twins: `cpu::adamw::grad_norm`, `cpu::adamw::clip_grad_norm`, `cpu::adamw::AdamW::step`.
//! Kernels: `kernels/optimizer.cu`.

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::kernel::{ADAMW, CLIP_GRADS, GRAD_NORM_FINISH, GRAD_SUMSQ_PARTIAL};
use super::launch::{Launch, Span, blocks, config};
use crate::cpu::adamw::AdamW;

/// Blocks per trial in the first pass of the norm.
const NORM_BLOCKS: usize = 256;

/// Device scratch for the per-trial norm: partial sums `[T, NORM_BLOCKS]`, norms `[T]` (f64) and
/// clip coefficients `[T]`.
pub struct GradNorm {
    pub trials: usize,
    partial: CudaSlice<f64>,
    pub norm: CudaSlice<f64>,
    pub clip_coef: CudaSlice<f32>,
}

impl GradNorm {
    pub fn new(gpu: &Gpu, trials: usize) -> Result<Self> {
        let stream = &gpu.stream;
        let failed = |e| anyhow!("allocating the gradient-norm scratch: {e:?}");
        Ok(GradNorm {
            trials,
            partial: stream.alloc_zeros::<f64>(trials * NORM_BLOCKS).map_err(failed)?,
            norm: stream.alloc_zeros::<f64>(trials).map_err(failed)?,
            clip_coef: stream.alloc_zeros::<f32>(trials).map_err(failed)?,
        })
    }

    /// Computes each trial's global L2 norm of `grads` `[T, P]` (fp64 accumulation) into `norm`
    /// and, with `max_norm`, scales the gradients of every trial whose norm exceeds it by
    /// max_norm/(norm + 1e-6), as `torch.nn.utils.clip_grad_norm_` does.
    pub fn run(
        &mut self,
        gpu: &Gpu,
        grads: &mut CudaSlice<f32>,
        p: usize,
        stride: usize,
        max_norm: Option<f64>,
    ) -> Result<()> {
        let trials = self.trials;
        if let Some(m) = max_norm {
            ensure!(m.is_finite() && m > 0.0, "max gradient norm {m} must be a positive number");
        }
        let block_count = NORM_BLOCKS.min(blocks(p, 256) as usize);
        let mut launch = Launch::new(gpu, GRAD_SUMSQ_PARTIAL, "")?;
        launch.table(&self.partial).buffer("grads", grads, Span::trials(trials, stride, p))?;
        launch.arg(p as u64).arg(stride as u64);
        launch.run(config(block_count as u64, trials, 1, 256, 0)?)?;

        let mut launch = Launch::new(gpu, GRAD_NORM_FINISH, "")?;
        launch.table(&self.norm).table(&self.clip_coef).table(&self.partial);
        launch.arg(block_count as i32).arg(max_norm.unwrap_or(f64::INFINITY));
        launch.run(config(1, trials, 1, 256, 0)?)?;

        if max_norm.is_some() {
            clip_grads(gpu, grads, &self.clip_coef, p, stride)?;
        }
        Ok(())
    }
}

/// Scales each trial's gradients `[T, P]` (`stride` apart) by its coefficient in `clip_coef`
/// `[T]` where that is below 1.
pub fn clip_grads(
    gpu: &Gpu,
    grads: &mut CudaSlice<f32>,
    clip_coef: &CudaSlice<f32>,
    p: usize,
    stride: usize,
) -> Result<()> {
    let trials = clip_coef.len();
    let mut launch = Launch::new(gpu, CLIP_GRADS, "")?;
    launch.buffer("grads", grads, Span::trials(trials, stride, p))?.table(clip_coef);
    launch.arg(p as u64).arg(stride as u64);
    launch.run(config(blocks(p, 256), trials, 1, 256, 0)?)
}

/// One optimizer step's per-trial settings: learning rate (after the schedule), weight decay, and
/// the 1-based number of this update (0 = the trial does not step now, e.g. mid-accumulation).
#[derive(Clone, Debug, Default)]
pub struct TrialSteps {
    pub lr: Vec<f64>,
    pub weight_decay: Vec<f64>,
    pub step: Vec<u32>,
}

/// AdamW over params, grads, m, v `[T, P]` (stride apart) with each trial's settings and the
/// shared decay mask `[P]` (1 = decayed); β1, β2, ε from `adam` (its weight_decay is unused: each
/// trial brings its own).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    gpu: &Gpu,
    adam: &AdamW,
    steps: &TrialSteps,
    decay: &CudaSlice<u8>,
    params: &mut CudaSlice<f32>,
    grads: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    p: usize,
    stride: usize,
) -> Result<()> {
    let trials = steps.lr.len();
    ensure!(
        trials > 0 && steps.weight_decay.len() == trials && steps.step.len() == trials,
        "adamw: {} learning rates, {} weight decays and {} step counts must be one per trial",
        steps.lr.len(),
        steps.weight_decay.len(),
        steps.step.len()
    );
    let span = Span::trials(trials, stride, p);
    let stream = &gpu.stream;
    let upload = |e| anyhow!("adamw: uploading per-trial settings: {e:?}");
    let lr = stream.clone_htod(&steps.lr).map_err(upload)?;
    let weight_decay = stream.clone_htod(&steps.weight_decay).map_err(upload)?;
    let step = stream.clone_htod(&steps.step).map_err(upload)?;
    let mut launch = Launch::new(gpu, ADAMW, "")?;
    launch.buffer("params", params, span)?.buffer("grads", grads, span)?;
    launch.buffer("m", m, span)?.buffer("v", v, span)?.buffer("decay mask", decay, Span::trials(1, 0, p))?;
    launch.table(&lr).table(&weight_decay).table(&step);
    launch.arg(adam.beta1).arg(adam.beta2).arg(adam.eps).arg(p as u64).arg(stride as u64);
    launch.run(config(blocks(p, 256).min(4096), trials, 1, 256, 0)?)
}
