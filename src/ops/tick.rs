//! One tick's layout: the slots' micro-batches padded to one shape (see the padding rules in the
//! module docs of [`crate::ops`]), and [`Tick`], the layout together with the device's copy of it
//! that every op of the tick reads.

use anyhow::{Result, ensure};

use crate::cpu::bert::{AttnSeq, Batch, Dropout, DropoutProbs, attention_layout};
use crate::cpu::philox::DropoutRng;
// The probabilities live with the scheduler for now (its owner moves them); the ops only read them.

/// A tick as every op takes it: the host layout and what the device made of it
/// ([`super::ArrayOps::tick`]).
pub struct Tick<'a, D> {
    pub layout: &'a TickLayout,
    pub device: D,
}

/// Host-side description of one tick, padded as the module docs say. Built by [`TickLayout::new`].
#[derive(Clone, Debug)]
pub struct TickLayout {
    pub trials: usize,
    /// Rows per trial (real rows, dummy-sequence rows, then rows of no sequence).
    pub rows: usize,
    /// Sequences per trial (real ones first, then one-row dummies).
    pub seqs: usize,
    /// `[T, rows]` token ids, token types and positions inside the sequence.
    pub ids: Vec<u32>,
    pub types: Vec<u32>,
    pub positions: Vec<u32>,
    /// Per trial: attention blocks over all rows (every layer but the last) and over [CLS] rows.
    pub attn_full: Vec<Vec<AttnSeq>>,
    pub attn_cls: Vec<Vec<AttnSeq>>,
    /// `[T, seqs]` the first row of each sequence (its [CLS] row).
    pub cls_rows: Vec<u32>,
    /// `[T, seqs]` labels (0 for dummies).
    pub labels: Vec<usize>,
    /// `[T]` real sequences per trial (the rest are dummies).
    pub real_seqs: Vec<usize>,
    /// `[T]` real rows per trial.
    pub real_rows: Vec<usize>,
    /// `[T]` each trial's dropout generator (ignored without dropout).
    pub rngs: Vec<DropoutRng>,
    /// `[T]` gradient scale per example.
    pub loss_scale: Vec<f32>,
    /// Dropout probabilities (the same architecture in every slot), None in eval mode.
    pub dropout: Option<DropoutProbs>,
    pub heads: usize,
}

/// One slot's share of a tick for [`TickLayout::new`].
pub struct SlotInput<'a> {
    pub batch: &'a Batch,
    pub loss_scale: f32,
    pub dropout: Option<Dropout>,
}

impl TickLayout {
    /// Pads the slots' batches to one shape. `slots[t]` None = an idle slot (all dummies).
    pub fn new(slots: &[Option<SlotInput<'_>>], heads: usize, pad_token_id: u32) -> Result<TickLayout> {
        let trials = slots.len();
        ensure!(trials > 0, "a tick needs at least one slot");
        let seqs = slots.iter().flatten().map(|s| s.batch.seqs.len()).max().unwrap_or(0).max(1);
        let rows = slots
            .iter()
            .map(|s| s.as_ref().map_or(seqs, |s| s.batch.rows() + seqs - s.batch.seqs.len()))
            .max()
            .unwrap_or(seqs);
        let dropout = slots.iter().flatten().find_map(|s| s.dropout.as_ref().map(|d| d.probs));
        let mut tick = TickLayout {
            trials,
            rows,
            seqs,
            ids: vec![pad_token_id; trials * rows],
            types: vec![0; trials * rows],
            positions: vec![0; trials * rows],
            attn_full: Vec::with_capacity(trials),
            attn_cls: Vec::with_capacity(trials),
            cls_rows: Vec::with_capacity(trials * seqs),
            labels: Vec::with_capacity(trials * seqs),
            real_seqs: Vec::with_capacity(trials),
            real_rows: Vec::with_capacity(trials),
            rngs: Vec::with_capacity(trials),
            loss_scale: Vec::with_capacity(trials),
            dropout,
            heads,
        };
        let empty = Batch::default();
        for (i, slot) in slots.iter().enumerate() {
            let batch = slot.as_ref().map_or(&empty, |s| s.batch);
            ensure!(
                batch.seqs.iter().all(|s| s.len > 0 && s.valid > 0 && s.valid <= s.len),
                "slot {i}: every sequence needs at least one valid row"
            );
            if let Some(s) = slot {
                ensure!(
                    s.dropout.as_ref().map(|d| d.probs) == dropout,
                    "slot {i}: every slot of a tick must use the same dropout probabilities"
                );
            }
            let n = batch.rows();
            let base = i * rows;
            tick.ids[base..base + n].copy_from_slice(&batch.input_ids);
            tick.types[base..base + n].copy_from_slice(&batch.token_type_ids);
            for s in &batch.seqs {
                for r in 0..s.len {
                    tick.positions[base + s.start + r] = r as u32;
                }
            }
            // One-row dummy sequences on the first padding rows.
            let mut all = batch.seqs.clone();
            for j in 0..seqs - batch.seqs.len() {
                all.push(crate::cpu::bert::Sequence { start: n + j, len: 1, valid: 1 });
            }
            tick.attn_full.push(attention_layout(&all, heads, false).0);
            tick.attn_cls.push(attention_layout(&all, heads, true).0);
            tick.cls_rows.extend(all.iter().map(|s| s.start as u32));
            tick.labels.extend(batch.labels.iter().copied());
            tick.labels.extend(std::iter::repeat_n(0, seqs - batch.labels.len()));
            tick.real_seqs.push(batch.seqs.len());
            tick.real_rows.push(n);
            tick.rngs.push(
                slot.as_ref()
                    .and_then(|s| s.dropout)
                    .map_or(DropoutRng { seed: 0, stream: 0, step: 0 }, |d| d.rng),
            );
            tick.loss_scale.push(slot.as_ref().map_or(0.0, |s| s.loss_scale));
        }
        Ok(tick)
    }
}
