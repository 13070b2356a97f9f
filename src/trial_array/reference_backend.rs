//! The trial array on the CPU reference: each slot is a plain parameter buffer with its own
//! gradient and Adam state, and every op runs the slots one after another (each op is already
//! parallel inside through rayon). It trains every CPU run (`hpo-gpu train`, `search`), and it is
//! the oracle the GPU backend's trial array is compared with, call for call.

use anyhow::anyhow;

use super::{ArrayBackend, ArrayError, ArrayResult, SlotEval, SlotMicroBatch, SlotOptimizerStep};
use crate::config::BertConfig;
use crate::cpu::adamw::{AdamState, clip_grad_norm};
use crate::cpu::bert::{self, Dropout};
use crate::model::layout::ParamLayout;
use crate::train::evaluate_params;

/// Values of the attention-probability buffers one forward/backward pass may hold (128 MiB of
/// f32 over all layers): a micro-batch over it runs in several passes (same results and dropout
/// masks, up to summation order), so long sequences and large batches fit in memory.
const ATTENTION_BUDGET_VALUES: usize = 1 << 25;

struct CpuSlot {
    params: Vec<f32>,
    grads: Vec<f32>,
    adam: AdamState,
    best: Option<Vec<f32>>,
}

/// [`ArrayBackend`] on the CPU reference. Slots are allocated when first loaded.
pub struct ReferenceBackend {
    config: BertConfig,
    layout: ParamLayout,
    decay: Vec<bool>,
    slots: Vec<Option<CpuSlot>>,
}

impl ReferenceBackend {
    /// An array of `slots` slots for models of `config`'s architecture. Dropout probabilities
    /// come with each micro-batch, not from `config`.
    pub fn new(config: &BertConfig, slots: usize) -> Self {
        let layout = ParamLayout::new(config);
        let decay = layout.decay_mask();
        ReferenceBackend { config: config.clone(), layout, decay, slots: (0..slots).map(|_| None).collect() }
    }

    fn slot(&mut self, slot: usize) -> ArrayResult<&mut CpuSlot> {
        slot_in(&mut self.slots, slot)
    }
}

/// A loaded slot (a free function so callers can borrow the config and layout alongside).
fn slot_in(slots: &mut [Option<CpuSlot>], slot: usize) -> ArrayResult<&mut CpuSlot> {
    let n = slots.len();
    slots
        .get_mut(slot)
        .and_then(|s| s.as_mut())
        .ok_or_else(|| ArrayError::Other(anyhow!("trial-array slot {slot} of {n} holds no trial")))
}

impl ArrayBackend for ReferenceBackend {
    fn describe(&self) -> String {
        "cpu".to_string()
    }

    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn param_len(&self) -> usize {
        self.layout.len
    }

    fn load_slot(&mut self, slot: usize, params: &[f32]) -> ArrayResult<()> {
        if params.len() != self.layout.len {
            return Err(anyhow!(
                "slot {slot}: {} initial parameters for a model of {}",
                params.len(),
                self.layout.len
            )
            .into());
        }
        let n = self.slots.len();
        let entry = self
            .slots
            .get_mut(slot)
            .ok_or_else(|| anyhow!("trial-array slot {slot} out of range (T = {n})"))?;
        *entry = Some(CpuSlot {
            params: params.to_vec(),
            grads: vec![0.0; params.len()],
            adam: AdamState::new(params.len()),
            best: None,
        });
        Ok(())
    }

    fn forward_backward(&mut self, work: &[SlotMicroBatch<'_>]) -> ArrayResult<Vec<f64>> {
        let mut out = Vec::with_capacity(work.len());
        for w in work {
            let (config, layout) = (&self.config, &self.layout);
            let s = slot_in(&mut self.slots, w.slot)?;
            let (heads, layers) = (config.num_attention_heads, config.num_hidden_layers);
            // Summed in f64 in example order.
            let mut loss_sum = 0.0f64;
            for (run, offset) in w.batch.split_by_attention(heads, layers, ATTENTION_BUDGET_VALUES) {
                let dropout = Dropout { offset, ..w.dropout };
                let fwd = bert::forward(config, layout, &s.params, &run, Some(dropout));
                loss_sum += fwd.losses.iter().map(|l| *l as f64).sum::<f64>();
                if !loss_sum.is_finite() {
                    break;
                }
                bert::backward(config, layout, &s.params, &run, &fwd, w.loss_scale, &mut s.grads);
            }
            out.push(loss_sum);
        }
        Ok(out)
    }

    fn optimizer_step(&mut self, work: &[SlotOptimizerStep]) -> ArrayResult<Vec<f64>> {
        let mut out = Vec::with_capacity(work.len());
        for w in work {
            let decay = &self.decay;
            let s = slot_in(&mut self.slots, w.slot)?;
            let norm = clip_grad_norm(&mut s.grads, w.max_grad_norm);
            if norm.is_finite() {
                w.adamw.step(&mut s.params, &s.grads, decay, &mut s.adam, w.lr);
            }
            s.grads.fill(0.0);
            out.push(norm);
        }
        Ok(out)
    }

    fn evaluate(&mut self, work: &[SlotEval<'_>]) -> ArrayResult<Vec<(f64, f64)>> {
        let mut out = Vec::with_capacity(work.len());
        for w in work {
            let (config, layout) = (&self.config, &self.layout);
            let s = slot_in(&mut self.slots, w.slot)?;
            let r = evaluate_params(config, layout, &s.params, w.split, w.batch_size);
            // Non-finite logits fail that slot's trial only.
            out.push(r.unwrap_or((f64::NAN, f64::NAN)));
        }
        Ok(out)
    }

    fn keep_best(&mut self, slot: usize) -> ArrayResult<()> {
        let s = self.slot(slot)?;
        match &mut s.best {
            Some(b) => b.copy_from_slice(&s.params),
            None => s.best = Some(s.params.clone()),
        }
        Ok(())
    }

    fn restore_best(&mut self, slot: usize) -> ArrayResult<()> {
        let s = self.slot(slot)?;
        if let Some(b) = &s.best {
            s.params.copy_from_slice(b);
        }
        Ok(())
    }

    fn read_params(&mut self, slot: usize) -> ArrayResult<Vec<f32>> {
        Ok(self.slot(slot)?.params.clone())
    }

    fn shrink(&mut self, slots: usize) -> ArrayResult<()> {
        self.slots.truncate(slots);
        Ok(())
    }
}
