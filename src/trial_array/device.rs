//! [`ArrayBackend`] for any device that implements [`ArrayOps`]: the GPU (`cuda::array_ops`, built
//! by [`gpu::cuda_array_backend`]) and, for tests, the host ops (`ops::host`). Each call runs the
//! work of all listed slots as one tick of the trial-array model (`model.rs`): one launch per op
//! over the slots, idle slots padded.
//!
//! Parameters, gradients, Adam moments and the kept best weights live on the device, `[T, P]`
//! each (5·P per slot, as `bytes_per_slot` assumes). Update counters are the model's, per slot.

pub mod gpu;

use anyhow::anyhow;

use super::model::ArrayModel;
use super::{ArrayBackend, ArrayError, ArrayResult, SlotEval, SlotMicroBatch, SlotOptimizerStep};
use crate::cpu::bert::DropoutProbs;
use crate::ops::{ArrayOps, SlotInput, TickLayout};
use crate::train::{MIN_EVAL_BATCH, argmax};

/// The trial array on an [`ArrayOps`] device.
pub struct DeviceArrayBackend<O: ArrayOps> {
    model: ArrayModel<O>,
    name: String,
    /// `[T, P]` kept best weights.
    best: O::Buf,
    has_best: Vec<bool>,
    loaded: Vec<bool>,
}

/// Errors that leave the device as it was and may go away with fewer slots.
fn classify(e: anyhow::Error) -> ArrayError {
    let text = format!("{e:#}");
    if text.contains("OUT_OF_MEMORY") || text.contains("out of memory") {
        ArrayError::OutOfMemory(text)
    } else {
        ArrayError::Other(e)
    }
}

impl<O: ArrayOps> DeviceArrayBackend<O> {
    pub fn new(ops: O, config: &crate::config::BertConfig, slots: usize, name: &str) -> ArrayResult<Self> {
        let model = ArrayModel::new(ops, config, slots).map_err(classify)?;
        let best = model.ops.zeros(slots * model.param_len()).map_err(classify)?;
        Ok(DeviceArrayBackend {
            model,
            name: name.to_string(),
            best,
            has_best: vec![false; slots],
            loaded: vec![false; slots],
        })
    }

    fn check_slot(&self, slot: usize) -> ArrayResult<()> {
        if self.loaded.get(slot).copied().unwrap_or(false) {
            Ok(())
        } else {
            Err(anyhow!("trial-array slot {slot} of {} holds no trial", self.loaded.len()).into())
        }
    }

    /// Out of memory may only be retried (after shrinking) while a tick has changed nothing, and a
    /// tick accumulates gradients as it goes: so allocate, and free, what the tick's activations
    /// need before it starts. Failing here is `OutOfMemory`; an allocation failing later in the
    /// tick is an error like any other.
    fn reserve_activations(&self, layout: &TickLayout) -> ArrayResult<()> {
        let cells = layout
            .attn_full
            .iter()
            .map(|seqs| seqs.iter().map(|s| s.q_len * s.k_len).sum::<usize>())
            .max()
            .unwrap_or(0);
        let bytes = super::activation_bytes(&self.model.config, layout.trials, layout.rows, cells);
        drop(self.model.ops.zeros(bytes.div_ceil(4) as usize).map_err(classify)?);
        Ok(())
    }

    fn heads(&self) -> usize {
        self.model.config.num_attention_heads
    }

    fn pad(&self) -> u32 {
        self.model.config.pad_token_id as u32
    }
}

impl<O: ArrayOps> ArrayBackend for DeviceArrayBackend<O> {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn slots(&self) -> usize {
        self.model.trials
    }

    fn param_len(&self) -> usize {
        self.model.param_len()
    }

    fn load_slot(&mut self, slot: usize, params: &[f32]) -> ArrayResult<()> {
        let p = self.param_len();
        if slot >= self.slots() {
            return Err(anyhow!("trial-array slot {slot} out of range (T = {})", self.slots()).into());
        }
        if params.len() != p {
            return Err(anyhow!("slot {slot}: {} initial parameters for a model of {p}", params.len()).into());
        }
        let model = &mut self.model;
        model.ops.write(&mut model.params, slot * p, params)?;
        for buf in [&mut model.grads, &mut model.m, &mut model.v] {
            model.ops.fill_zero(buf, slot * p, p)?;
        }
        model.reset_slot(slot);
        self.loaded[slot] = true;
        self.has_best[slot] = false;
        Ok(())
    }

    fn forward_backward(&mut self, work: &[SlotMicroBatch<'_>]) -> ArrayResult<Vec<f64>> {
        for w in work {
            self.check_slot(w.slot)?;
        }
        let mut out = vec![0.0; work.len()];
        // One tick per distinct set of dropout probabilities (normally exactly one).
        let mut groups: Vec<DropoutProbs> = Vec::new();
        for w in work {
            if !groups.contains(&w.dropout.probs) {
                groups.push(w.dropout.probs);
            }
        }
        for group in groups {
            let mut slots: Vec<Option<SlotInput>> = (0..self.slots()).map(|_| None).collect();
            for w in work.iter().filter(|w| w.dropout.probs == group) {
                slots[w.slot] =
                    Some(SlotInput { batch: w.batch, loss_scale: w.loss_scale, dropout: Some(w.dropout) });
            }
            let layout = TickLayout::new(&slots, self.heads(), self.pad())?;
            self.reserve_activations(&layout)?;
            let tick = self.model.ops.tick(&layout).map_err(classify)?;
            let sums = self.model.forward_backward(&tick)?;
            for (i, w) in work.iter().enumerate() {
                if w.dropout.probs == group {
                    out[i] = sums[w.slot];
                }
            }
        }
        Ok(out)
    }

    fn optimizer_step(&mut self, work: &[SlotOptimizerStep]) -> ArrayResult<Vec<f64>> {
        for w in work {
            self.check_slot(w.slot)?;
        }
        Ok(self.model.optimizer_step(work)?)
    }

    fn evaluate(&mut self, work: &[SlotEval<'_>]) -> ArrayResult<Vec<(f64, f64)>> {
        for w in work {
            self.check_slot(w.slot)?;
        }
        let classes = self.model.config.num_labels;
        let mut out = vec![(f64::NAN, f64::NAN); work.len()];
        // Slots evaluating the same split with the same batch size share every eval tick.
        let mut done = vec![false; work.len()];
        for i in 0..work.len() {
            if done[i] {
                continue;
            }
            let (split, bs) = (work[i].split, work[i].batch_size.max(MIN_EVAL_BATCH));
            let members: Vec<usize> = (i..work.len())
                .filter(|&j| {
                    std::ptr::eq(work[j].split, split) && work[j].batch_size.max(MIN_EVAL_BATCH) == bs
                })
                .collect();
            let mut loss = vec![0.0f64; members.len()];
            let mut correct = vec![0usize; members.len()];
            let mut finite = vec![true; members.len()];
            let idx: Vec<usize> = (0..split.len()).collect();
            for chunk in idx.chunks(bs) {
                let batch = split.packed_batch(chunk);
                let mut slots: Vec<Option<SlotInput>> = (0..self.slots()).map(|_| None).collect();
                for &j in &members {
                    slots[work[j].slot] = Some(SlotInput { batch: &batch, loss_scale: 0.0, dropout: None });
                }
                let layout = TickLayout::new(&slots, self.heads(), self.pad())?;
                let tick = self.model.ops.tick(&layout).map_err(classify)?;
                // Evaluation changes no slot's state: out of memory anywhere in it can be retried.
                let (logits, sums) = self.model.eval_logits(&tick).map_err(classify)?;
                for (k, &j) in members.iter().enumerate() {
                    let s = work[j].slot;
                    let rows = &logits[s * layout.seqs * classes..(s * layout.seqs + chunk.len()) * classes];
                    if rows.iter().any(|v| !v.is_finite()) {
                        finite[k] = false;
                    }
                    loss[k] += sums[s];
                    correct[k] += rows
                        .chunks_exact(classes)
                        .zip(&batch.labels)
                        .filter(|(r, y)| argmax(r) == **y)
                        .count();
                }
            }
            let n = split.len().max(1) as f64;
            for (k, &j) in members.iter().enumerate() {
                done[j] = true;
                if finite[k] {
                    out[j] = (loss[k] / n, correct[k] as f64 / n);
                }
            }
        }
        Ok(out)
    }

    fn keep_best(&mut self, slot: usize) -> ArrayResult<()> {
        self.check_slot(slot)?;
        let p = self.param_len();
        self.model.ops.copy(&self.model.params, slot * p, &mut self.best, slot * p, p)?;
        self.has_best[slot] = true;
        Ok(())
    }

    fn restore_best(&mut self, slot: usize) -> ArrayResult<()> {
        self.check_slot(slot)?;
        if self.has_best[slot] {
            let p = self.param_len();
            self.model.ops.copy(&self.best, slot * p, &mut self.model.params, slot * p, p)?;
        }
        Ok(())
    }

    fn read_params(&mut self, slot: usize) -> ArrayResult<Vec<f32>> {
        self.check_slot(slot)?;
        let p = self.param_len();
        Ok(self.model.ops.read(&self.model.params, slot * p, p)?)
    }

    fn shrink(&mut self, slots: usize) -> ArrayResult<()> {
        if slots >= self.slots() {
            return Ok(());
        }
        let p = self.param_len();
        let model = &mut self.model;
        // Through the host, freeing each old buffer before its smaller copy is made: shrinking
        // happens because memory ran out, so there may be no room for both.
        for buf in [&mut model.params, &mut model.grads, &mut model.m, &mut model.v, &mut self.best] {
            let kept = model.ops.read(buf, 0, slots * p)?;
            *buf = model.ops.zeros(1)?;
            let mut smaller = model.ops.zeros(slots * p)?;
            model.ops.write(&mut smaller, 0, &kept)?;
            *buf = smaller;
        }
        model.trials = slots;
        model.updates.truncate(slots);
        self.loaded.truncate(slots);
        self.has_best.truncate(slots);
        Ok(())
    }
}
