//! The trial array — the one training engine: T trials of one architecture train side by side in
//! "slots", with parameters, gradients and Adam moments laid out `[T, P]`; one model is one slot.
//!
//! - [`schedule::run_array`] is the scheduler: micro-batch ticks, per-slot epoch streams,
//!   optimizer steps every b/m ticks, per-epoch evaluation, pruning, failures, refilling slots;
//!   [`schedule::Engine`] is it as a `trial::protocol::TrialRunner` for the study driver.
//! - [`setup::TrialSetup`] turns a trial's parameters into what a slot trains.
//! - [`ArrayBackend`] is what the scheduler needs from a device: load a slot, forward+backward one
//!   micro-batch for every active slot, clip + AdamW per slot, evaluate, keep/restore the best
//!   epoch's weights, read parameters out, shrink on out-of-memory.
//! - [`reference_backend::ReferenceBackend`] implements it with the CPU reference (`cpu::bert`,
//!   `cpu::adamw`); [`device::DeviceArrayBackend`] implements it for any device that implements the
//!   device ops (`crate::ops`): the GPU (`device::gpu`), or the host twins in tests.
//!
//! **One launch per op.** Every backend call carries the work of *all* active slots of a tick, so
//! a GPU backend can run each op as one batched launch over the slots. Slots' micro-batches are
//! packed (unpadded) and hold different numbers of token rows; the GPU backend pads each slot's
//! packed rows to the tick's largest row count so the GEMMs are strided-batched over slots with
//! one stride (padding rows are computed and ignored: they are never gathered into [CLS] rows,
//! attention runs per sequence over its own keys, and their gradients are masked to zero).
//!
//! **Dropout indexing.** A slot's micro-batch `k` (counted from 0 since its trial was loaded, over
//! all epochs) uses `DropoutRng { seed: trial seed, stream: trial's dropout stream, step: k }`,
//! with element indices over the micro-batch's packed rows as in `cpu::bert`. The GPU backend must
//! use the same indexing. A trial draws the same masks in any slot, alone or beside others; with
//! whole batches (`MicroBatch::WholeBatch`, as `hpo-gpu train` runs) micro-batch k is optimizer
//! batch k. A CPU backend that runs a micro-batch in several passes offsets each pass's indices
//! (`cpu::bert::DropoutOffset`), so the masks do not depend on how it splits the work.

pub mod device;
pub mod model;
pub mod reference_backend;
pub mod schedule;
pub mod setup;

use crate::cpu::bert::{Batch, Dropout};
use crate::data::batch::TokenizedSplit;

/// Errors of a backend operation. `OutOfMemory` promises that the operation changed nothing, so
/// the scheduler can shrink the array and retry it.
#[derive(Debug, thiserror::Error)]
pub enum ArrayError {
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub type ArrayResult<T> = std::result::Result<T, ArrayError>;

/// One slot's share of a tick: a packed micro-batch to run forward and backward.
#[derive(Clone, Debug)]
pub struct SlotMicroBatch<'a> {
    pub slot: usize,
    pub batch: &'a Batch,
    /// Gradient scale of every example: 1 / (examples in the slot's current optimizer batch),
    /// so the accumulated gradient is that of the batch-mean loss, as the Trainer's is.
    pub loss_scale: f32,
    /// Dropout probabilities and generator (see the module docs for its indexing).
    pub dropout: Dropout,
}

/// One slot's optimizer step (defined with the device ops, which carry it out).
pub use crate::ops::SlotOptimizerStep;

/// One slot's evaluation on a split (no dropout).
#[derive(Clone, Copy, Debug)]
pub struct SlotEval<'a> {
    pub slot: usize,
    pub split: &'a TokenizedSplit,
    /// Examples per forward pass (does not change results beyond summation order).
    pub batch_size: usize,
}

/// What a device must do for the scheduler. Every method takes the work of all slots involved at
/// once (see the module docs); results come back in the order of the work items.
pub trait ArrayBackend {
    /// Short description for messages ("cpu", a GPU's name).
    fn describe(&self) -> String;
    /// Slots currently allocated (T).
    fn slots(&self) -> usize;
    /// Parameters per slot (P).
    fn param_len(&self) -> usize;
    /// Copies a trial's initial parameters into `slot`, zeroes its gradient and Adam moments,
    /// resets its step counter and forgets its kept best weights.
    fn load_slot(&mut self, slot: usize, params: &[f32]) -> ArrayResult<()>;
    /// Forward and backward of one micro-batch per listed slot, accumulating `loss_scale`-scaled
    /// gradients; returns each slot's sum of per-example losses (unscaled; NaN/inf when the slot
    /// diverged, which concerns that slot only).
    fn forward_backward(&mut self, work: &[SlotMicroBatch<'_>]) -> ArrayResult<Vec<f64>>;
    /// One optimizer step per listed slot; returns each slot's gradient norm before clipping. A
    /// slot whose norm is not finite is left unchanged (its trial is failed by the scheduler).
    fn optimizer_step(&mut self, work: &[SlotOptimizerStep]) -> ArrayResult<Vec<f64>>;
    /// Mean loss and accuracy per listed slot; (NaN, NaN) for a slot whose logits are not finite.
    fn evaluate(&mut self, work: &[SlotEval<'_>]) -> ArrayResult<Vec<(f64, f64)>>;
    /// Remembers the slot's current parameters as its best epoch's.
    fn keep_best(&mut self, slot: usize) -> ArrayResult<()>;
    /// Puts the kept best parameters back (no-op when none were kept).
    fn restore_best(&mut self, slot: usize) -> ArrayResult<()>;
    /// The slot's current parameters (P values).
    fn read_params(&mut self, slot: usize) -> ArrayResult<Vec<f32>>;
    /// Frees slots `slots..` (after an out-of-memory error); the others keep their state.
    fn shrink(&mut self, slots: usize) -> ArrayResult<()>;
}

/// Bytes one slot needs on a device: fp32 parameters, gradients, both Adam moments and the kept
/// best weights (5·P), plus training activations for one micro-batch of `micro_batch` sequences
/// of up to `max_len` tokens (the largest the tick can hold). An estimate from the shapes the
/// backward pass keeps per layer, not a measurement: size with headroom.
pub fn bytes_per_slot(
    config: &crate::config::BertConfig,
    param_len: usize,
    micro_batch: usize,
    max_len: usize,
) -> u64 {
    let rows = micro_batch * max_len;
    4 * 5 * param_len as u64 + activation_bytes(config, 1, rows, rows * max_len)
}

/// Bytes of activations a training tick of `trials` slots keeps for its backward pass, each slot
/// with `rows` token rows and `attention_cells` query·key pairs (Σ q_len·k_len over its
/// sequences). Per layer: input, q, k, v, ctx, attention output, LayerNorm caches (2×), FFN
/// pre/post activation, and the attention probabilities; doubled for the backward's temporaries.
pub fn activation_bytes(
    config: &crate::config::BertConfig,
    trials: usize,
    rows: usize,
    attention_cells: usize,
) -> u64 {
    let (h, i, a) =
        (config.hidden_size as u64, config.intermediate_size as u64, config.num_attention_heads as u64);
    let rows = rows as u64;
    let per_layer = rows * (9 * h + 2 * i) + a * attention_cells as u64;
    let per_slot = config.num_hidden_layers as u64 * per_layer + rows * 3 * h;
    4 * 2 * trials as u64 * per_slot
}

/// How many slots fit in `free_bytes` keeping `headroom` (a fraction, e.g. 0.1) free, at most
/// `wanted`. Errors when not even one fits.
pub fn slots_that_fit(wanted: usize, free_bytes: u64, per_slot: u64, headroom: f64) -> anyhow::Result<usize> {
    let usable = (free_bytes as f64 * (1.0 - headroom.clamp(0.0, 0.9))) as u64;
    let fit = (usable / per_slot.max(1)) as usize;
    if fit == 0 {
        anyhow::bail!(
            "one trial-array slot needs about {} MiB but only {} MiB of device memory are free",
            per_slot >> 20,
            free_bytes >> 20
        );
    }
    Ok(fit.min(wanted))
}

/// The micro-batch size: `requested`, or the gcd of 16 and every batch size in use. Errors when a
/// batch size is not a multiple of it.
pub fn micro_batch_size(requested: Option<usize>, batch_sizes: &[usize]) -> anyhow::Result<usize> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let m = match requested {
        Some(0) => anyhow::bail!("--micro-batch must be at least 1"),
        Some(m) => m,
        None => batch_sizes.iter().fold(16, |g, &b| gcd(g, b)).max(1),
    };
    if let Some(b) = batch_sizes.iter().find(|&&b| !b.is_multiple_of(m)) {
        anyhow::bail!(
            "--micro-batch {m} does not divide the batch size {b}: every batch size the search can choose \
             must be a multiple of the micro-batch size"
        );
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batch_defaults_to_gcd_with_16_and_rejects_non_divisors() {
        assert_eq!(micro_batch_size(None, &[16, 32, 64, 128]).unwrap(), 16);
        assert_eq!(micro_batch_size(None, &[2, 4, 8]).unwrap(), 2);
        assert_eq!(micro_batch_size(None, &[24, 48]).unwrap(), 8);
        assert_eq!(micro_batch_size(Some(4), &[8, 12]).unwrap(), 4);
        let e = micro_batch_size(Some(8), &[8, 12]).unwrap_err().to_string();
        assert!(e.contains("does not divide the batch size 12"), "{e}");
        assert!(micro_batch_size(Some(0), &[8]).is_err());
    }

    #[test]
    fn slot_bytes_count_five_parameter_copies_and_grow_with_the_micro_batch() {
        let c = crate::config::BertConfig::from_json_str(
            r#"{"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 32, "max_position_embeddings": 64}"#,
        )
        .unwrap();
        let p = 10_000;
        let one = bytes_per_slot(&c, p, 1, 8);
        let two = bytes_per_slot(&c, p, 2, 8);
        assert!(one > 20 * p as u64, "{one}");
        // Per layer and sequence: 8 rows × (9·16 + 2·32) + 2·64 attention = 1792 values; two
        // layers plus 8 × 48 embedding values = 3968, kept twice (forward + backward), 4 bytes.
        assert_eq!(two - one, 4 * 2 * 3968);
    }

    #[test]
    fn slots_are_sized_from_free_memory() {
        assert_eq!(slots_that_fit(100, 1000, 100, 0.1).unwrap(), 9);
        assert_eq!(slots_that_fit(4, 1000, 100, 0.1).unwrap(), 4);
        let e = slots_that_fit(4, 50 << 20, 100 << 20, 0.0).unwrap_err().to_string();
        assert!(e.contains("100 MiB") && e.contains("50 MiB"), "{e}");
    }
}
