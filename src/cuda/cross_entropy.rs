//! Softmax cross-entropy per sequence and its gradient, for every trial at once.
//!
//! CPU twins: `cpu::bert::cross_entropy` and the `dlogits` step at the top of
//! `cpu::bert::backward` ((softmax − onehot) · loss_scale).
//! Kernels: `kernels/cross_entropy.cu`.

use anyhow::{Result, anyhow, bail, ensure};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::kernel::SOFTMAX_CROSS_ENTROPY;
use super::launch::{Launch, Span, blocks, config};

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
    let (rows, classes) = (labels.rows, labels.classes);
    ensure!(labels.covers(trials), "softmax_cross_entropy: the labels cover fewer than {trials} trials");
    if dlogits.is_some() && loss_scale.is_none() {
        bail!("softmax_cross_entropy: the gradient needs each trial's loss scale");
    }
    let loss_stride = losses.as_ref().map_or(0, |(_, stride)| *stride);
    let logit_span = Span::trials(trials, logit_stride, rows * classes);
    let mut launch = Launch::new(gpu, SOFTMAX_CROSS_ENTROPY, "")?;
    launch.optional("losses", losses.as_ref().map(|(l, _)| &**l), Span::trials(trials, loss_stride, rows))?;
    launch.optional("dlogits", dlogits.as_deref(), logit_span)?;
    launch.buffer("logits", logits, logit_span)?.table(&labels.buf);
    launch.optional("loss_scale", loss_scale, Span::trials(trials, 1, 1))?;
    launch.int("rows", rows)?.int("classes", classes)?;
    launch.arg(logit_stride as u64).arg(labels.stride as u64).arg(loss_stride as u64);
    launch.run(config(blocks(rows, 128), trials, 1, 128, 0)?)
}
