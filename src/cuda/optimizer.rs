//! Per-trial gradient norm and clipping, and multi-trial AdamW over `[T, P]` in one launch.
//!
//! CPU twins: `cpu::adamw::grad_norm`, `cpu::adamw::clip_grad_norm`, `cpu::adamw::AdamW::step`.
//! Kernels: `kernels/optimizer.cu`.

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::launch::{KernelArgs, addr, blocks, check_len, config, launched};
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
        let s = &gpu.stream;
        let e = |e| anyhow!("allocating the gradient-norm scratch: {e:?}");
        Ok(GradNorm {
            trials,
            partial: s.alloc_zeros::<f64>(trials * NORM_BLOCKS).map_err(e)?,
            norm: s.alloc_zeros::<f64>(trials).map_err(e)?,
            clip_coef: s.alloc_zeros::<f32>(trials).map_err(e)?,
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
        let t = self.trials;
        check_len("grad_norm grads", grads.len(), 0, t, stride, p)?;
        if let Some(m) = max_norm {
            ensure!(m.is_finite() && m > 0.0, "max gradient norm {m} must be a positive number");
        }
        let s = &gpu.stream;
        let nb = NORM_BLOCKS.min(blocks(p, 256) as usize);
        let (pp, _g0) = addr(&self.partial, 0, s);
        let (pg, _g1) = addr(grads, 0, s);
        let (pu, su) = (p as u64, stride as u64);
        let f = gpu.function("optimizer", "grad_sumsq_partial")?;
        let mut b = KernelArgs::new(&f);
        b.arg(&pp).arg(&pg).arg(&pu).arg(&su);
        launched("grad_sumsq_partial", unsafe { b.launch(s, config(nb as u64, t, 1, 256, 0)?) })?;

        let (pn, _g2) = addr(&self.norm, 0, s);
        let (pc, _g3) = addr(&self.clip_coef, 0, s);
        let nbi = nb as i32;
        let mx = max_norm.unwrap_or(f64::INFINITY);
        let f = gpu.function("optimizer", "grad_norm_finish")?;
        let mut b = KernelArgs::new(&f);
        b.arg(&pn).arg(&pc).arg(&pp).arg(&nbi).arg(&mx);
        launched("grad_norm_finish", unsafe { b.launch(s, config(1, t, 1, 256, 0)?) })?;

        if max_norm.is_some() {
            let f = gpu.function("optimizer", "clip_grads")?;
            let mut b = KernelArgs::new(&f);
            b.arg(&pg).arg(&pc).arg(&pu).arg(&su);
            launched("clip_grads", unsafe { b.launch(s, config(blocks(p, 256), t, 1, 256, 0)?) })?;
        }
        Ok(())
    }
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
    let t = steps.lr.len();
    ensure!(
        t > 0 && steps.weight_decay.len() == t && steps.step.len() == t,
        "adamw: {} learning rates, {} weight decays and {} step counts must be one per trial",
        steps.lr.len(),
        steps.weight_decay.len(),
        steps.step.len()
    );
    for name_buf in [("params", params.len()), ("grads", grads.len()), ("m", m.len()), ("v", v.len())] {
        check_len(&format!("adamw {}", name_buf.0), name_buf.1, 0, t, stride, p)?;
    }
    check_len("adamw decay mask", decay.len(), 0, 1, 0, p)?;
    let s = &gpu.stream;
    let e = |e| anyhow!("adamw: uploading per-trial settings: {e:?}");
    let lr = s.clone_htod(&steps.lr).map_err(e)?;
    let wd = s.clone_htod(&steps.weight_decay).map_err(e)?;
    let st = s.clone_htod(&steps.step).map_err(e)?;
    let f = gpu.function("optimizer", "adamw")?;
    let (pp, _g0) = addr(params, 0, s);
    let (pg, _g1) = addr(grads, 0, s);
    let (pm, _g2) = addr(m, 0, s);
    let (pv, _g3) = addr(v, 0, s);
    let (pd, _g4) = addr(decay, 0, s);
    let (plr, _g5) = addr(&lr, 0, s);
    let (pwd, _g6) = addr(&wd, 0, s);
    let (pst, _g7) = addr(&st, 0, s);
    let (b1, b2, eps, pu, su) = (adam.beta1, adam.beta2, adam.eps, p as u64, stride as u64);
    let cfg = config(blocks(p, 256).min(4096), t, 1, 256, 0)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&pp).arg(&pg).arg(&pm).arg(&pv).arg(&pd).arg(&plr).arg(&pwd).arg(&pst).arg(&b1).arg(&b2).arg(&eps);
    b.arg(&pu).arg(&su);
    launched("adamw", unsafe { b.launch(s, cfg) })
}
