//! The device operations the trial-array model is written in, and the layout of one tick.
//!
//! [`ArrayOps`] is the seam between the model's orchestration (`model.rs`: which op runs on which
//! buffer, with which offsets, strides and padding) and a device. Two implementations:
//! `ops_cpu::CpuOps` emulates every op on host buffers with the CPU reference's functions (the
//! CPU twins), so the whole orchestration is tested here against `cpu::bert`; `cuda::array_ops`
//! maps each op onto one kernel launch or one cuBLAS call over all trials. What remains to check
//! on a GPU is only that each kernel matches its twin (tests/gpu_kernels.rs).
//!
//! **Buffers.** Every buffer is `[T, …]` with a fixed per-trial stride: parameters, gradients and
//! Adam moments `[T, P]`; activations `[T, rows, width]`, densely packed.
//!
//! **Padding.** The slots of a tick hold different micro-batches. Each slot's packed rows come
//! first; the tick pads every slot to the same row count `rows` and sequence count `seqs`:
//! missing sequences become one-row dummy sequences on padding rows (so every slot has `seqs`
//! attention blocks, [CLS] rows and labels), and the rows after them belong to no sequence.
//! Padding rows hold the padding token at position 0, so everything computed on them is finite;
//! their loss gradient is masked to zero, so they add nothing to any parameter gradient. Real
//! rows keep their indices, so dropout masks (indexed by row·H + column, and by the attention
//! block offsets of `cpu::bert::attention_layout`) are the CPU reference's.

use anyhow::{Result, ensure};

pub use super::schedule::DropoutProbs;
use crate::cpu::adamw::AdamW;
use crate::cpu::bert::{AttnSeq, Batch, Dropout, attention_layout};
use crate::cpu::philox::DropoutRng;

/// One GEMM operand: a row-major `rows × cols` matrix at `offset` in its buffer, `stride`
/// elements between trials, optionally transposed.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub rows: usize,
    pub cols: usize,
    pub offset: usize,
    pub stride: usize,
    pub transposed: bool,
}

impl Operand {
    /// A `[rows, cols]` activation of a dense `[T, rows, cols]` buffer.
    pub fn act(rows: usize, cols: usize) -> Self {
        Operand { rows, cols, offset: 0, stride: rows * cols, transposed: false }
    }
    /// The weight `[out, in]` at `offset` of each trial's parameters, used transposed (x·Wᵀ).
    pub fn weight_t(offset: usize, out: usize, inp: usize, param_stride: usize) -> Self {
        Operand { rows: out, cols: inp, offset, stride: param_stride, transposed: true }
    }
    pub fn t(mut self) -> Self {
        self.transposed = !self.transposed;
        self
    }
    /// Shape after the optional transpose.
    pub fn shape(&self) -> (usize, usize) {
        if self.transposed { (self.cols, self.rows) } else { (self.rows, self.cols) }
    }
}

/// Where a GEMM writes: `[m, n]` at `offset`, `stride` between trials.
#[derive(Clone, Copy, Debug)]
pub struct Out {
    pub offset: usize,
    pub stride: usize,
}

/// A `[T, rows, width]` activation and a per-trial parameter slice at `param` (bias, or γ with β
/// at `param2`) inside `[T, P]` parameters or gradients.
#[derive(Clone, Copy, Debug)]
pub struct RowShape {
    pub rows: usize,
    pub width: usize,
    pub param: usize,
    pub param2: usize,
}

/// One slot's optimizer settings for a step.
#[derive(Clone, Copy, Debug)]
pub struct SlotStep {
    pub slot: usize,
    pub lr: f64,
    pub adamw: AdamW,
    pub max_grad_norm: f64,
    /// The 1-based number of this update (Adam's bias correction).
    pub step: u64,
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
        let dropout = slots.iter().flatten().find_map(|s| s.dropout.as_ref().map(DropoutProbs::of));
        let mut t = TickLayout {
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
                    s.dropout.as_ref().map(DropoutProbs::of) == dropout,
                    "slot {i}: every slot of a tick must use the same dropout probabilities"
                );
            }
            let n = batch.rows();
            let base = i * rows;
            t.ids[base..base + n].copy_from_slice(&batch.input_ids);
            t.types[base..base + n].copy_from_slice(&batch.token_type_ids);
            for s in &batch.seqs {
                for r in 0..s.len {
                    t.positions[base + s.start + r] = r as u32;
                }
            }
            // One-row dummy sequences on the first padding rows.
            let mut all = batch.seqs.clone();
            for j in 0..seqs - batch.seqs.len() {
                all.push(crate::cpu::bert::Sequence { start: n + j, len: 1, valid: 1 });
            }
            t.attn_full.push(attention_layout(&all, heads, false).0);
            t.attn_cls.push(attention_layout(&all, heads, true).0);
            t.cls_rows.extend(all.iter().map(|s| s.start as u32));
            t.labels.extend(batch.labels.iter().copied());
            t.labels.extend(std::iter::repeat_n(0, seqs - batch.labels.len()));
            t.real_seqs.push(batch.seqs.len());
            t.real_rows.push(n);
            t.rngs.push(
                slot.as_ref()
                    .and_then(|s| s.dropout)
                    .map_or(DropoutRng { seed: 0, stream: 0, step: 0 }, |d| d.rng),
            );
            t.loss_scale.push(slot.as_ref().map_or(0.0, |s| s.loss_scale));
        }
        Ok(t)
    }
}

/// What a device must provide to run the trial-array model (see the module docs). Each op covers
/// every trial of the buffers at once. Unless said otherwise, outputs are overwritten.
pub trait ArrayOps {
    /// A device buffer of f32.
    type Buf;
    /// A tick's layout on the device.
    type Tick;

    /// A zeroed buffer of `n` values.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Writes `data` at `offset`.
    fn write(&self, dst: &mut Self::Buf, offset: usize, data: &[f32]) -> Result<()>;
    /// Reads `n` values from `offset`.
    fn read(&self, src: &Self::Buf, offset: usize, n: usize) -> Result<Vec<f32>>;
    /// Copies `n` values between buffers (may be the same buffer only through two calls).
    fn copy(
        &self,
        src: &Self::Buf,
        src_offset: usize,
        dst: &mut Self::Buf,
        dst_offset: usize,
        n: usize,
    ) -> Result<()>;
    fn fill_zero(&self, buf: &mut Self::Buf, offset: usize, n: usize) -> Result<()>;
    fn tick(&self, layout: &TickLayout) -> Result<Self::Tick>;

    /// C = op(A)·op(B) + beta·C for every trial.
    fn gemm(
        &self,
        trials: usize,
        a: (&Self::Buf, Operand),
        b: (&Self::Buf, Operand),
        beta: f32,
        c: (&mut Self::Buf, Out),
    ) -> Result<()>;
    /// out `[T, rows, H]` = word + position + token-type embeddings of the tick's rows.
    fn embedding_forward(
        &self,
        tick: &Self::Tick,
        layout: &TickLayout,
        params: &Self::Buf,
        param_stride: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Scatter-adds d `[T, rows, H]` into the embedding gradients (not the padding token's word row).
    fn embedding_backward(
        &self,
        tick: &Self::Tick,
        layout: &TickLayout,
        d: &Self::Buf,
        grads: &mut Self::Buf,
        param_stride: usize,
    ) -> Result<()>;
    /// y = LN(x + residual)·γ + β; keeps xhat and rstd `[T, rows]`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        trials: usize,
        sh: RowShape,
        eps: f64,
        x: &Self::Buf,
        residual: Option<&Self::Buf>,
        params: &Self::Buf,
        param_stride: usize,
        y: &mut Self::Buf,
        xhat: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> Result<()>;
    /// dx = LN backward of dy; dγ, dβ added into grads.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        trials: usize,
        sh: RowShape,
        dy: &Self::Buf,
        xhat: &Self::Buf,
        rstd: &Self::Buf,
        params: &Self::Buf,
        param_stride: usize,
        dx: &mut Self::Buf,
        grads: &mut Self::Buf,
    ) -> Result<()>;
    /// y += bias per row.
    fn bias_add(
        &self,
        trials: usize,
        sh: RowShape,
        y: &mut Self::Buf,
        params: &Self::Buf,
        param_stride: usize,
    ) -> Result<()>;
    /// grads[bias] += Σ rows of dy.
    fn bias_backward(
        &self,
        trials: usize,
        sh: RowShape,
        dy: &Self::Buf,
        grads: &mut Self::Buf,
        param_stride: usize,
    ) -> Result<()>;
    /// pre += bias (in place), act = gelu(pre).
    fn bias_gelu_forward(
        &self,
        trials: usize,
        sh: RowShape,
        pre: &mut Self::Buf,
        act: &mut Self::Buf,
        params: &Self::Buf,
        param_stride: usize,
    ) -> Result<()>;
    /// dx = dy·gelu'(pre); grads[bias] += Σ rows of dx.
    #[allow(clippy::too_many_arguments)]
    fn gelu_backward(
        &self,
        trials: usize,
        sh: RowShape,
        pre: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        grads: &mut Self::Buf,
        param_stride: usize,
    ) -> Result<()>;
    /// In-place dropout of `n` values per trial (`[T, n]` dense) at `site`, element index from 0.
    fn dropout(
        &self,
        tick: &Self::Tick,
        layout: &TickLayout,
        x: &mut Self::Buf,
        n: usize,
        site: u32,
        p: f64,
    ) -> Result<()>;
    /// ctx = dropout(softmax(q·kᵀ/√D))·v per block (`cls`: the [CLS]-only blocks, q has `seqs`
    /// rows); lse `[T, q_rows, heads]`. Query rows of no block are left as they are.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        tick: &Self::Tick,
        layout: &TickLayout,
        cls: bool,
        hidden: usize,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        ctx: &mut Self::Buf,
        lse: &mut Self::Buf,
        site: u32,
    ) -> Result<()>;
    /// dq (rows of no block left as they are), dk and dv (zeroed first).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        tick: &Self::Tick,
        layout: &TickLayout,
        cls: bool,
        hidden: usize,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        ctx: &Self::Buf,
        lse: &Self::Buf,
        dctx: &Self::Buf,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        site: u32,
    ) -> Result<()>;
    /// out `[T, seqs, H]` = the [CLS] rows of x `[T, rows, H]`.
    fn gather_cls(
        &self,
        tick: &Self::Tick,
        layout: &TickLayout,
        hidden: usize,
        x: &Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// dx `[T, rows, H]` [CLS] rows += d `[T, seqs, H]`.
    fn scatter_add_cls(
        &self,
        tick: &Self::Tick,
        layout: &TickLayout,
        hidden: usize,
        d: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// x = tanh(x), n values in all.
    fn tanh_forward(&self, x: &mut Self::Buf, n: usize) -> Result<()>;
    /// d *= 1 − y², n values in all.
    fn tanh_backward(&self, y: &Self::Buf, d: &mut Self::Buf, n: usize) -> Result<()>;
    /// y += x, n values in all.
    fn add(&self, y: &mut Self::Buf, x: &Self::Buf, n: usize) -> Result<()>;
    /// Per-sequence losses `[T, seqs]` and, with `dlogits`, (softmax − onehot)·loss_scale with the
    /// dummy sequences' rows zeroed.
    fn cross_entropy(
        &self,
        tick: &Self::Tick,
        layout: &TickLayout,
        classes: usize,
        logits: &Self::Buf,
        losses: &mut Self::Buf,
        dlogits: Option<&mut Self::Buf>,
    ) -> Result<()>;
    /// For each listed slot: global gradient norm of its `[P]` gradients (returned), clip to the
    /// slot's max norm, AdamW, and zero the gradients. A slot whose norm is not finite is left
    /// unchanged but for its zeroed gradients.
    #[allow(clippy::too_many_arguments)]
    fn optimizer_step(
        &self,
        param_len: usize,
        steps: &[SlotStep],
        decay: &Self::Buf,
        params: &mut Self::Buf,
        grads: &mut Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
    ) -> Result<Vec<f64>>;
}
