//! The bias half of a linear layer (the GEMM half is `gemm.rs`): y += b, and db += Σ rows dy.
//!
//! CPU twins: the bias add in `cpu::bert::linear_forward`, the column sums in
//! `cpu::bert::linear_backward`.
//! Kernels: `kernels/bias.cu`; `gelu.rs` fuses the FFN's bias with its GELU.

use anyhow::Result;
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::launch::{Act, KernelArgs, addr, blocks, check_len, config, int, launched};

/// A `[T, rows, width]` activation (`act_stride` between trials) and its bias at `bias` inside
/// each trial's `[P]` parameter or gradient buffer (`param_stride`).
#[derive(Clone, Copy, Debug)]
pub struct BiasShape {
    pub trials: usize,
    pub rows: usize,
    pub width: usize,
    pub act_stride: usize,
    pub param_stride: usize,
    pub bias: usize,
}

impl BiasShape {
    pub(crate) fn check(&self, what: &str, act_len: usize, param_len: usize) -> Result<()> {
        check_len(
            &format!("{what} activations"),
            act_len,
            0,
            self.trials,
            self.act_stride,
            self.rows * self.width,
        )?;
        check_len(&format!("{what} bias"), param_len, self.bias, self.trials, self.param_stride, self.width)
    }
}

/// y += bias per row.
pub fn bias_add<A: Act>(
    gpu: &Gpu,
    sh: &BiasShape,
    y: &mut CudaSlice<A>,
    params: &CudaSlice<f32>,
) -> Result<()> {
    sh.check("bias_add", y.len(), params.len())?;
    let name = format!("bias_add_{}", A::SUFFIX);
    let f = gpu.function("bias", &name)?;
    let s = &gpu.stream;
    let (py, _g0) = addr(y, 0, s);
    let (pb, _g1) = addr(params, sh.bias, s);
    let (n, m) = (int("rows", sh.rows)?, int("width", sh.width)?);
    let (as_, ps) = (sh.act_stride as u64, sh.param_stride as u64);
    let cfg = config(blocks(sh.rows * sh.width, 256), sh.trials, 1, 256, 0)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&py).arg(&pb).arg(&n).arg(&m).arg(&as_).arg(&ps);
    launched(&name, unsafe { b.launch(s, cfg) })
}

/// grads[bias] += Σ rows of dy.
pub fn bias_backward<A: Act>(
    gpu: &Gpu,
    sh: &BiasShape,
    dy: &CudaSlice<A>,
    grads: &mut CudaSlice<f32>,
) -> Result<()> {
    sh.check("bias_backward", dy.len(), grads.len())?;
    let name = format!("bias_backward_{}", A::SUFFIX);
    let f = gpu.function("bias", &name)?;
    let s = &gpu.stream;
    let (pg, _g0) = addr(grads, sh.bias, s);
    let (pd, _g1) = addr(dy, 0, s);
    let (n, m) = (int("rows", sh.rows)?, int("width", sh.width)?);
    let (as_, ps) = (sh.act_stride as u64, sh.param_stride as u64);
    let cfg = config(blocks(sh.rows, 32), sh.trials, 1, 256, 0)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&pg).arg(&pd).arg(&n).arg(&m).arg(&as_).arg(&ps);
    launched(&name, unsafe { b.launch(s, cfg) })
}
