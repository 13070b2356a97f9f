//! The device operations the trial-array model is written in, and the layout of one tick. This
//! module sits below both the trial array (`trial_array`, which writes the model in these ops) and
//! the GPU backend (`cuda`, which implements them): what both need lives here.
//!
//! [`ArrayOps`] is the seam between the model's orchestration (`trial_array::model`: which op runs
//! on which buffer, with which offsets, strides and padding) and a device. Two implementations:
//! [`host::HostOps`] emulates every op on host buffers with the CPU reference's functions (the CPU
//! twins), so the whole orchestration is tested against `cpu::bert`; `cuda::array_ops` maps each
//! op onto one kernel launch or one cuBLAS call over all trials. What remains to check on a GPU is
//! only that each kernel matches its twin (tests/gpu_kernels.rs).
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

pub mod host;
pub mod shapes;
pub mod tick;

use anyhow::Result;

pub use shapes::{BiasShape, EmbeddingTables, LayerNormShape, Operand, Out};
pub use tick::{SlotInput, Tick, TickLayout};

use crate::cpu::adamw::AdamW;

/// One slot's optimizer step: clip the accumulated gradient to `max_grad_norm`, apply AdamW at
/// `lr`, then zero the gradient. The scheduler asks for it (`trial_array::ArrayBackend`); the
/// count of updates (Adam's bias correction) is kept per slot by whoever holds the moments.
#[derive(Clone, Copy, Debug)]
pub struct SlotOptimizerStep {
    pub slot: usize,
    pub lr: f64,
    pub adamw: AdamW,
    pub max_grad_norm: f64,
}

/// What a device must provide to run the trial-array model (see the module docs). Each op covers
/// every trial of the buffers at once. Unless said otherwise, outputs are overwritten.
pub trait ArrayOps {
    /// A device buffer of f32.
    type Buf;
    /// What the device keeps of a tick's layout (its copy of tokens, blocks, labels, generators).
    type DeviceTick;

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
    /// The tick every op of it takes: `layout` and the device's copy of it.
    fn tick<'a>(&self, layout: &'a TickLayout) -> Result<Tick<'a, Self::DeviceTick>>;

    /// C = op(A)·op(B) + beta·C for every trial.
    fn gemm(
        &self,
        trials: usize,
        a: (&Self::Buf, Operand),
        b: (&Self::Buf, Operand),
        beta: f32,
        c: (&mut Self::Buf, Out),
    ) -> Result<()>;
    /// out `[T, rows, H]` = word + position + token-type embeddings of the tick's rows, from each
    /// trial's parameters `param_stride` apart.
    fn embedding_forward(
        &self,
        tick: &Tick<'_, Self::DeviceTick>,
        params: &Self::Buf,
        param_stride: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Scatter-adds d `[T, rows, H]` into the embedding gradients (not the padding token's word row).
    fn embedding_backward(
        &self,
        tick: &Tick<'_, Self::DeviceTick>,
        d: &Self::Buf,
        grads: &mut Self::Buf,
        param_stride: usize,
    ) -> Result<()>;
    /// y = LN(x + residual)·γ + β; keeps xhat and rstd `[T, rows]`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        shape: LayerNormShape,
        eps: f64,
        x: &Self::Buf,
        residual: Option<&Self::Buf>,
        params: &Self::Buf,
        y: &mut Self::Buf,
        xhat: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> Result<()>;
    /// dx = LN backward of dy; dγ, dβ added into grads.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        shape: LayerNormShape,
        dy: &Self::Buf,
        xhat: &Self::Buf,
        rstd: &Self::Buf,
        params: &Self::Buf,
        dx: &mut Self::Buf,
        grads: &mut Self::Buf,
    ) -> Result<()>;
    /// y += bias per row.
    fn bias_add(&self, shape: BiasShape, y: &mut Self::Buf, params: &Self::Buf) -> Result<()>;
    /// grads[bias] += Σ rows of dy.
    fn bias_backward(&self, shape: BiasShape, dy: &Self::Buf, grads: &mut Self::Buf) -> Result<()>;
    /// pre += bias (in place), act = gelu(pre).
    fn bias_gelu_forward(
        &self,
        shape: BiasShape,
        pre: &mut Self::Buf,
        act: &mut Self::Buf,
        params: &Self::Buf,
    ) -> Result<()>;
    /// dx = dy·gelu'(pre); grads[bias] += Σ rows of dx.
    fn gelu_backward(
        &self,
        shape: BiasShape,
        pre: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        grads: &mut Self::Buf,
    ) -> Result<()>;
    /// In-place dropout of `n` values per trial (`[T, n]` dense) at `site`, element index from 0.
    fn dropout(
        &self,
        tick: &Tick<'_, Self::DeviceTick>,
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
        tick: &Tick<'_, Self::DeviceTick>,
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
        tick: &Tick<'_, Self::DeviceTick>,
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
        tick: &Tick<'_, Self::DeviceTick>,
        hidden: usize,
        x: &Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// dx `[T, rows, H]` [CLS] rows += d `[T, seqs, H]`.
    fn scatter_add_cls(
        &self,
        tick: &Tick<'_, Self::DeviceTick>,
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
        tick: &Tick<'_, Self::DeviceTick>,
        classes: usize,
        logits: &Self::Buf,
        losses: &mut Self::Buf,
        dlogits: Option<&mut Self::Buf>,
    ) -> Result<()>;
    /// For each listed slot, with the 1-based number of its update (Adam's bias correction): the
    /// global gradient norm of its `[P]` gradients (returned), clip to the slot's max norm, AdamW
    /// (weight decay where the architecture's decay mask says), and zero the gradients. A slot
    /// whose norm is not finite is left unchanged but for its zeroed gradients.
    fn optimizer_step(
        &self,
        param_len: usize,
        steps: &[(SlotOptimizerStep, u64)],
        params: &mut Self::Buf,
        grads: &mut Self::Buf,
        moment1: &mut Self::Buf,
        moment2: &mut Self::Buf,
    ) -> Result<Vec<f64>>;
}
