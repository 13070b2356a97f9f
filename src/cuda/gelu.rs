//! Bias + exact GELU after the FFN's first GEMM, and its backward with the bias gradient.
//!
//! CPU twins: `cpu::bert::gelu_forward` (after `linear_forward`'s bias add) and
//! `cpu::bert::gelu_backward` (plus `linear_backward`'s column sums for the FFN bias).
//! Kernels: `kernels/gelu.cu`.

use anyhow::Result;
use cudarc::driver::CudaSlice;

use super::bias::BiasShape;
use super::context::Gpu;
use super::launch::{Act, KernelArgs, addr, blocks, check_len, config, int, launched};

/// x += bias in place (x becomes the pre-activation the backward reads), act = gelu(x).
pub fn bias_gelu_forward<A: Act>(
    gpu: &Gpu,
    sh: &BiasShape,
    x: &mut CudaSlice<A>,
    params: &CudaSlice<f32>,
    act: &mut CudaSlice<A>,
) -> Result<()> {
    sh.check("bias_gelu_forward", x.len(), params.len())?;
    check_len("bias_gelu_forward act", act.len(), 0, sh.trials, sh.act_stride, sh.rows * sh.width)?;
    let name = format!("bias_gelu_forward_{}", A::SUFFIX);
    let f = gpu.function("gelu", &name)?;
    let s = &gpu.stream;
    // In place: x becomes the pre-activation the backward needs.
    let (px, _g0) = addr(x, 0, s);
    let (pa, _g1) = addr(act, 0, s);
    let (pb, _g2) = addr(params, sh.bias, s);
    let (n, m) = (int("rows", sh.rows)?, int("width", sh.width)?);
    let (as_, ps) = (sh.act_stride as u64, sh.param_stride as u64);
    let cfg = config(blocks(sh.rows * sh.width, 256), sh.trials, 1, 256, 0)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&px).arg(&pa).arg(&px).arg(&pb).arg(&n).arg(&m).arg(&as_).arg(&ps);
    launched(&name, unsafe { b.launch(s, cfg) })
}

/// dx = dy · gelu'(pre) (overwrites dx); with `grads`, the bias gradient Σ rows dx is added at
/// `sh.bias`.
pub fn gelu_backward<A: Act>(
    gpu: &Gpu,
    sh: &BiasShape,
    pre: &CudaSlice<A>,
    dy: &CudaSlice<A>,
    dx: &mut CudaSlice<A>,
    grads: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    let per = sh.rows * sh.width;
    check_len("gelu_backward pre", pre.len(), 0, sh.trials, sh.act_stride, per)?;
    check_len("gelu_backward dy", dy.len(), 0, sh.trials, sh.act_stride, per)?;
    check_len("gelu_backward dx", dx.len(), 0, sh.trials, sh.act_stride, per)?;
    if let Some(g) = grads.as_ref() {
        check_len("gelu_backward bias gradient", g.len(), sh.bias, sh.trials, sh.param_stride, sh.width)?;
    }
    let name = format!("gelu_backward_{}", A::SUFFIX);
    let f = gpu.function("gelu", &name)?;
    let s = &gpu.stream;
    let (pdx, _g0) = addr(dx, 0, s);
    let (pg, _g1) = match grads.as_deref() {
        Some(g) => {
            let (p, guard) = addr(g, sh.bias, s);
            (p, Some(guard))
        }
        None => (0u64, None),
    };
    let (pp, _g2) = addr(pre, 0, s);
    let (pd, _g3) = addr(dy, 0, s);
    let (n, m) = (int("rows", sh.rows)?, int("width", sh.width)?);
    let (as_, ps) = (sh.act_stride as u64, sh.param_stride as u64);
    let cfg = config(blocks(sh.rows, 32), sh.trials, 1, 256, 0)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&pdx).arg(&pg).arg(&pp).arg(&pd).arg(&n).arg(&m).arg(&as_).arg(&ps);
    launched(&name, unsafe { b.launch(s, cfg) })
}
