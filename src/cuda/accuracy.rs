//! Argmax per row and the number of correct predictions per trial.
//!
//! CPU twin: `train::argmax` and the `correct` count of train.rs's evaluation.
//! Kernels: `kernels/accuracy.cu`.

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::cross_entropy::DeviceLabels;
use super::launch::{KernelArgs, addr, blocks, check_len, config, int, launched};

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
    let (b, c) = (labels.rows, labels.classes);
    ensure!(labels.covers(trials), "argmax_accuracy: the labels cover fewer than {trials} trials");
    check_len("argmax_accuracy logits", logits.len(), 0, trials, logit_stride, b * c)?;
    check_len("argmax_accuracy correct", correct.len(), 0, trials, 1, 1)?;
    if let Some(p) = preds.as_ref() {
        check_len("argmax_accuracy preds", p.len(), 0, trials, b, b)?;
    }
    let s = &gpu.stream;
    s.memset_zeros(correct).map_err(|e| anyhow!("argmax_accuracy: clearing the counts: {e:?}"))?;
    let f = gpu.function("accuracy", "argmax_accuracy_f32")?;
    let (pp, _gp) = match preds.as_deref() {
        Some(p) => {
            let (a, g) = addr(p, 0, s);
            (a, Some(g))
        }
        None => (0u64, None),
    };
    let (pc, _g0) = addr(correct, 0, s);
    let (px, _g1) = addr(logits, 0, s);
    let (py, _g2) = addr(&labels.buf, 0, s);
    let (bi, ci) = (int("rows", b)?, int("classes", c)?);
    let (ls, ys, ps) = (logit_stride as u64, labels.stride as u64, b as u64);
    let cfg = config(blocks(b, 128), trials, 1, 128, 0)?;
    let mut bld = KernelArgs::new(&f);
    bld.arg(&pp).arg(&pc).arg(&px).arg(&py).arg(&bi).arg(&ci).arg(&ls).arg(&ys).arg(&ps);
    launched("argmax_accuracy_f32", unsafe { bld.launch(s, cfg) })
}
