//! Softmax cross-entropy per sequence and its gradient, for every trial at once.
//!
//! CPU twins: `cpu::bert::cross_entropy` and the `dlogits` step at the top of
//! `cpu::bert::backward` ((softmax − onehot) · loss_scale).
//! Kernels: `kernels/cross_entropy.cu`.

use anyhow::{Result, anyhow, bail, ensure};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::launch::{KernelArgs, addr, blocks, check_len, config, int, launched};

/// Labels `[T, rows]` (or `[rows]` for every trial), each checked against the label count.
pub struct DeviceLabels {
    pub buf: CudaSlice<u32>,
    pub rows: usize,
    pub classes: usize,
    /// 0 when one set of labels serves every trial.
    pub stride: usize,
}

impl DeviceLabels {
    pub fn upload(gpu: &Gpu, labels: &[usize], rows: usize, classes: usize) -> Result<Self> {
        ensure!(
            rows > 0 && labels.len().is_multiple_of(rows),
            "labels: {} values are not whole batches of {rows}",
            labels.len()
        );
        if let Some((i, y)) = labels.iter().enumerate().find(|(_, y)| **y >= classes) {
            bail!("labels: label {y} at row {i} is not one of the {classes} classes");
        }
        let words: Vec<u32> = labels.iter().map(|y| *y as u32).collect();
        let buf = gpu.stream.clone_htod(&words).map_err(|e| anyhow!("uploading labels: {e:?}"))?;
        Ok(DeviceLabels { buf, rows, classes, stride: if labels.len() == rows { 0 } else { rows } })
    }

    pub(crate) fn covers(&self, trials: usize) -> bool {
        self.stride == 0 || self.buf.len() / self.rows >= trials
    }
}

/// logits `[T, rows, classes]` (`logit_stride`); losses `[T, rows]` (`loss_stride`) get each
/// row's loss; dlogits (same layout as logits) get (softmax − onehot)·loss_scale[t].
/// `loss_scale` `[T]` is needed only with dlogits.
#[allow(clippy::too_many_arguments)]
pub fn softmax_cross_entropy(
    gpu: &Gpu,
    trials: usize,
    logits: &CudaSlice<f32>,
    logit_stride: usize,
    labels: &DeviceLabels,
    losses: Option<(&mut CudaSlice<f32>, usize)>,
    dlogits: Option<&mut CudaSlice<f32>>,
    loss_scale: Option<&CudaSlice<f32>>,
) -> Result<()> {
    let (b, c) = (labels.rows, labels.classes);
    ensure!(labels.covers(trials), "softmax_cross_entropy: the labels cover fewer than {trials} trials");
    check_len("softmax_cross_entropy logits", logits.len(), 0, trials, logit_stride, b * c)?;
    let s = &gpu.stream;
    let (pl, _gl, loss_stride) = match losses.as_ref() {
        Some((l, stride)) => {
            check_len("softmax_cross_entropy losses", l.len(), 0, trials, *stride, b)?;
            let (p, g) = addr(l, 0, s);
            (p, Some(g), *stride as u64)
        }
        None => (0u64, None, 0),
    };
    let (pd, _gd) = match dlogits.as_deref() {
        Some(d) => {
            check_len("softmax_cross_entropy dlogits", d.len(), 0, trials, logit_stride, b * c)?;
            let (p, g) = addr(d, 0, s);
            (p, Some(g))
        }
        None => (0u64, None),
    };
    let (ps, _gs) = match (loss_scale, pd != 0) {
        (Some(sc), _) => {
            check_len("softmax_cross_entropy loss_scale", sc.len(), 0, trials, 1, 1)?;
            let (p, g) = addr(sc, 0, s);
            (p, Some(g))
        }
        (None, true) => bail!("softmax_cross_entropy: the gradient needs each trial's loss scale"),
        (None, false) => (0u64, None),
    };
    let f = gpu.function("cross_entropy", "softmax_cross_entropy_f32")?;
    let (px, _g0) = addr(logits, 0, s);
    let (py, _g1) = addr(&labels.buf, 0, s);
    let (bi, ci) = (int("rows", b)?, int("classes", c)?);
    let (ls, ys) = (logit_stride as u64, labels.stride as u64);
    let cfg = config(blocks(b, 128), trials, 1, 128, 0)?;
    let mut bld = KernelArgs::new(&f);
    bld.arg(&pl).arg(&pd).arg(&px).arg(&py).arg(&ps).arg(&bi).arg(&ci).arg(&ls).arg(&ys).arg(&loss_stride);
    launched("softmax_cross_entropy_f32", unsafe { bld.launch(s, cfg) })
}
