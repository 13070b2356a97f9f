//! LayerNorm fused with the residual add, forward and backward, for every trial at once.
//!
//! CPU twins: `cpu::bert::layernorm_forward` (applied to `x + residual`, as `layer_forward` adds
//! the residual first), `cpu::bert::layernorm_backward`.
//! Kernels: `kernels/layernorm.cu`.

use anyhow::{Result, ensure};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::launch::{Act, KernelArgs, addr, blocks, check_len, config, int, launched};

/// Rows and widths of one LayerNorm launch. Activations (x, residual, y, xhat, dy, dx) are
/// `[T, rows, hidden]` with `act_stride` between trials; rstd is `[T, rows]` (`row_stride`);
/// γ and β live at `gamma`/`beta` inside each trial's `[P]` parameter buffer (`param_stride`).
#[derive(Clone, Copy, Debug)]
pub struct LayerNormShape {
    pub trials: usize,
    pub rows: usize,
    pub hidden: usize,
    pub act_stride: usize,
    pub row_stride: usize,
    pub param_stride: usize,
    pub gamma: usize,
    pub beta: usize,
}

impl LayerNormShape {
    fn check(&self, what: &str, param_len: usize) -> Result<()> {
        ensure!(self.hidden > 0 && self.rows > 0, "{what}: empty shape {self:?}");
        let end = self.gamma.max(self.beta) + self.hidden;
        check_len(&format!("{what} parameters"), param_len, 0, self.trials, self.param_stride, end)?;
        ensure!(
            self.gamma + self.hidden <= self.beta,
            "{what}: γ (at {}) must come before β (at {}) without overlapping",
            self.gamma,
            self.beta
        );
        Ok(())
    }
}

/// y = LN(x + residual)·γ + β, keeping xhat and rstd for the backward; `residual` None = no add.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<A: Act>(
    gpu: &Gpu,
    sh: &LayerNormShape,
    eps: f64,
    x: &CudaSlice<A>,
    residual: Option<&CudaSlice<A>>,
    params: &CudaSlice<f32>,
    y: &mut CudaSlice<A>,
    xhat: &mut CudaSlice<f32>,
    rstd: &mut CudaSlice<f32>,
) -> Result<()> {
    sh.check("layernorm_forward", params.len())?;
    let per = sh.rows * sh.hidden;
    check_len("layernorm_forward x", x.len(), 0, sh.trials, sh.act_stride, per)?;
    if let Some(r) = residual {
        check_len("layernorm_forward residual", r.len(), 0, sh.trials, sh.act_stride, per)?;
    }
    check_len("layernorm_forward y", y.len(), 0, sh.trials, sh.act_stride, per)?;
    check_len("layernorm_forward xhat", xhat.len(), 0, sh.trials, sh.act_stride, per)?;
    check_len("layernorm_forward rstd", rstd.len(), 0, sh.trials, sh.row_stride, sh.rows)?;
    let name = format!("layernorm_forward_{}", A::SUFFIX);
    let f = gpu.function("layernorm", &name)?;
    let s = &gpu.stream;
    let (py, _g0) = addr(y, 0, s);
    let (pxh, _g1) = addr(xhat, 0, s);
    let (prs, _g2) = addr(rstd, 0, s);
    let (px, _g3) = addr(x, 0, s);
    let (pr, _g4) = match residual {
        Some(r) => {
            let (p, g) = addr(r, 0, s);
            (p, Some(g))
        }
        None => (0u64, None),
    };
    let (pg, _g5) = addr(params, sh.gamma, s);
    let (pb, _g6) = addr(params, sh.beta, s);
    let epsf = eps as f32;
    let (n, h) = (int("rows", sh.rows)?, int("hidden", sh.hidden)?);
    let (as_, rs, ps) = (sh.act_stride as u64, sh.row_stride as u64, sh.param_stride as u64);
    let cfg = config(blocks(sh.rows, 4), sh.trials, 1, 128, 0)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&py).arg(&pxh).arg(&prs).arg(&px).arg(&pr).arg(&pg).arg(&pb).arg(&epsf).arg(&n).arg(&h);
    b.arg(&as_).arg(&rs).arg(&ps);
    launched(&name, unsafe { b.launch(s, cfg) })
}

/// dx = LN backward of dy (overwrites dx); dγ and dβ are added into `grads` at the same offsets
/// as γ and β in the parameters.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<A: Act>(
    gpu: &Gpu,
    sh: &LayerNormShape,
    dy: &CudaSlice<A>,
    xhat: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
    params: &CudaSlice<f32>,
    dx: &mut CudaSlice<A>,
    grads: &mut CudaSlice<f32>,
) -> Result<()> {
    sh.check("layernorm_backward", params.len())?;
    sh.check("layernorm_backward gradients", grads.len())?;
    let per = sh.rows * sh.hidden;
    check_len("layernorm_backward dy", dy.len(), 0, sh.trials, sh.act_stride, per)?;
    check_len("layernorm_backward xhat", xhat.len(), 0, sh.trials, sh.act_stride, per)?;
    check_len("layernorm_backward dx", dx.len(), 0, sh.trials, sh.act_stride, per)?;
    check_len("layernorm_backward rstd", rstd.len(), 0, sh.trials, sh.row_stride, sh.rows)?;
    let name = format!("layernorm_backward_{}", A::SUFFIX);
    let f = gpu.function("layernorm", &name)?;
    let s = &gpu.stream;
    let (pdx, _g0) = addr(dx, 0, s);
    let (pdg, _g1) = addr(grads, sh.gamma, s);
    let (pdb, _g2) = addr(grads, sh.beta, s);
    let (pdy, _g3) = addr(dy, 0, s);
    let (pxh, _g4) = addr(xhat, 0, s);
    let (prs, _g5) = addr(rstd, 0, s);
    let (pg, _g6) = addr(params, sh.gamma, s);
    let (n, h) = (int("rows", sh.rows)?, int("hidden", sh.hidden)?);
    let (as_, rs, ps) = (sh.act_stride as u64, sh.row_stride as u64, sh.param_stride as u64);
    // 32 rows per block (LN_BWD_ROWS in the kernel); shared memory holds the block's dγ and dβ.
    let shared = u32::try_from(2 * sh.hidden * 4).map_err(|_| anyhow::anyhow!("hidden size too large"))?;
    ensure!(
        shared <= 48 * 1024,
        "layernorm_backward: hidden size {} needs more than 48 KB of shared memory",
        sh.hidden
    );
    let cfg = config(blocks(sh.rows, 32), sh.trials, 1, 128, shared)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&pdx).arg(&pdg).arg(&pdb).arg(&pdy).arg(&pxh).arg(&prs).arg(&pg).arg(&n).arg(&h);
    b.arg(&as_).arg(&rs).arg(&ps);
    launched(&name, unsafe { b.launch(s, cfg) })
}
