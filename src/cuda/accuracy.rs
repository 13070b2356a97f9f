//! Argmax per row and the number of correct predictions per trial.
//!
//! CPU twin: `train::argmax` and the `correct` count of train.rs's evaluation.
//! Kernels: `kernels/accuracy.cu`.

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::cross_entropy::DeviceLabels;
use super::kernel::ARGMAX_ACCURACY;
use super::launch::{Launch, Span, blocks, config};

/// Writes each row's argmax into `preds` `[T, rows]` (when given) and the count of rows whose
/// argmax equals the label into `correct` `[T]` (zeroed first).
pub fn argmax_accuracy(
    gpu: &Gpu,
    trials: usize,
    logits: &CudaSlice<f32>,
    logit_stride: usize,
    labels: &DeviceLabels,
    preds: Option<&mut CudaSlice<u32>>,
    correct: &mut CudaSlice<u32>,
) -> Result<()> {
    let (rows, classes) = (labels.rows, labels.classes);
    ensure!(labels.covers(trials), "argmax_accuracy: the labels cover fewer than {trials} trials");
    gpu.stream.memset_zeros(correct).map_err(|e| anyhow!("argmax_accuracy: clearing the counts: {e:?}"))?;
    let mut launch = Launch::new(gpu, ARGMAX_ACCURACY, "")?;
    launch.optional("preds", preds.as_deref(), Span::trials(trials, rows, rows))?;
    launch.buffer("correct", correct, Span::trials(trials, 1, 1))?;
    launch.buffer("logits", logits, Span::trials(trials, logit_stride, rows * classes))?.table(&labels.buf);
    launch.int("rows", rows)?.int("classes", classes)?;
    launch.arg(logit_stride as u64).arg(labels.stride as u64).arg(rows as u64);
    launch.run(config(blocks(rows, 128), trials, 1, 128, 0)?)
}
