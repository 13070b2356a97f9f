//! Fused attention over packed sequences, forward and backward, for every trial at once; the
//! scores and probabilities never reach device memory (the backward recomputes them from each
//! row's logsumexp).
//!
//! CPU twins: `cpu::bert::attention_forward`, `cpu::bert::attention_backward`, with the blocks of
//! `cpu::bert::attention_layout` (the [CLS]-only last layer included).
//! Kernels: `kernels/attention.cu` (head sizes 32 and 64).

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::{CudaSlice, DeviceRepr};

use super::context::Gpu;
use super::dropout::{DeviceRng, threshold_and_scale};
use super::kernel::{ATTENTION_DKDV, ATTENTION_DQ, ATTENTION_FORWARD};
use super::launch::{Act, Launch, Span, config, int};
use crate::cpu::bert::AttnSeq;

/// Query rows per block (4 warps × 4 rows) and key rows per block in the dk/dv kernel.
const BLOCK_ROWS: usize = 16;

/// The attention blocks of a batch on the device, `[T, B]` (or `[B]` for every trial), checked
/// against the query and key row counts they were uploaded for.
pub struct DeviceAttnSeqs {
    pub buf: CudaSlice<u32>,
    pub count: usize,
    /// Sequences between trials: 0 when one batch serves every trial.
    pub stride: usize,
    pub trials: Option<usize>,
    pub q_rows: usize,
    pub k_rows: usize,
    pub heads: usize,
    max_q: usize,
    max_k: usize,
}

impl DeviceAttnSeqs {
    /// `per_trial` holds one layout (shared by every trial) or one per trial, each with the same
    /// number of sequences, over `q_rows` query and `k_rows` key rows and `heads` heads.
    pub fn upload(
        gpu: &Gpu,
        per_trial: &[Vec<AttnSeq>],
        q_rows: usize,
        k_rows: usize,
        heads: usize,
    ) -> Result<Self> {
        let count = per_trial.first().map_or(0, |s| s.len());
        ensure!(count > 0, "attention: the batch has no sequences");
        let mut words = Vec::with_capacity(per_trial.len() * count * 5);
        let (mut max_q, mut max_k) = (0, 0);
        for (t, seqs) in per_trial.iter().enumerate() {
            ensure!(
                seqs.len() == count,
                "attention: trial {t} has {} sequences, trial 0 has {count}",
                seqs.len()
            );
            for (i, s) in seqs.iter().enumerate() {
                ensure!(
                    s.q_len > 0
                        && s.k_len > 0
                        && s.q_start + s.q_len <= q_rows
                        && s.k_start + s.k_len <= k_rows,
                    "attention: sequence {i} of trial {t} ({s:?}) is empty or outside {q_rows} query / {k_rows} key rows"
                );
                let end = s.p_offset as u64 + (heads * s.q_len * s.k_len) as u64;
                ensure!(
                    end <= u32::MAX as u64,
                    "attention: dropout index {end} of sequence {i} exceeds 32 bits"
                );
                words.extend([s.q_start, s.q_len, s.k_start, s.k_len, s.p_offset].map(|v| v as u32));
                max_q = max_q.max(s.q_len);
                max_k = max_k.max(s.k_len);
            }
        }
        let buf = gpu.stream.clone_htod(&words).map_err(|e| anyhow!("uploading attention blocks: {e:?}"))?;
        let shared = per_trial.len() == 1;
        Ok(DeviceAttnSeqs {
            buf,
            count,
            // In AttnSeq records (the kernel indexes `seqs[t * seq_stride + s]`).
            stride: if shared { 0 } else { count },
            trials: if shared { None } else { Some(per_trial.len()) },
            q_rows,
            k_rows,
            heads,
            max_q,
            max_k,
        })
    }
}

/// Trial counts and strides: q, ctx, dctx, dq `[T, q_rows, H]` (`q_stride`); k, v, dk, dv
/// `[T, k_rows, H]` (`kv_stride`); lse and delta `[T, q_rows, heads]` (`lse_stride`).
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub trials: usize,
    pub head_dim: usize,
    pub q_stride: usize,
    pub kv_stride: usize,
    pub lse_stride: usize,
}

/// Attention-probability dropout: probability `p` at dropout site `site`.
#[derive(Clone, Copy, Debug)]
pub struct AttnDropout {
    pub p: f64,
    pub site: u32,
}

/// The kernel's `AttnDropout` struct.
#[repr(C)]
#[derive(Clone, Copy)]
struct DropoutArg {
    threshold: f32,
    scale: f32,
    site: u32,
}
unsafe impl DeviceRepr for DropoutArg {}

/// What every attention launch shares: the kernel variant, its scalar arguments and the spans
/// of its buffers.
struct Common {
    variant: String,
    heads: i32,
    scale: f32,
    drop: DropoutArg,
    strides: [u64; 4],
    /// q, ctx, dctx, dq; k, v, dk, dv; lse, delta.
    queries: Span,
    keys: Span,
    rows: Span,
}

impl Common {
    /// The arguments after the buffers, the same in all three kernels.
    fn tail(&self, launch: &mut Launch<'_>) {
        launch.arg(self.heads).arg(self.scale).arg(self.drop);
        for stride in self.strides {
            launch.arg(stride);
        }
    }
}

fn common<A: Act>(
    shape: &AttnShape,
    seqs: &DeviceAttnSeqs,
    rng: &DeviceRng,
    dropout: Option<AttnDropout>,
) -> Result<Common> {
    ensure!(
        shape.head_dim == 32 || shape.head_dim == 64,
        "attention kernels exist for head sizes 32 and 64, not {}",
        shape.head_dim
    );
    if let Some(t) = seqs.trials {
        ensure!(t >= shape.trials, "attention: the blocks cover {t} trials, the launch {}", shape.trials);
    }
    ensure!(rng.trials >= shape.trials, "attention: {} generators for {} trials", rng.trials, shape.trials);
    let (threshold, scale) = match dropout {
        Some(d) => threshold_and_scale(d.p)?,
        None => (0.0, 1.0),
    };
    let hidden = seqs.heads * shape.head_dim;
    Ok(Common {
        variant: format!("d{}_{}", shape.head_dim, A::SUFFIX),
        heads: int("heads", seqs.heads)?,
        // The CPU scales the scores by (1/√D) computed in f64, then cast.
        scale: (1.0 / (shape.head_dim as f64).sqrt()) as f32,
        drop: DropoutArg { threshold, scale, site: dropout.map_or(0, |d| d.site) },
        strides: [shape.q_stride as u64, shape.kv_stride as u64, shape.lse_stride as u64, seqs.stride as u64],
        queries: Span::trials(shape.trials, shape.q_stride, seqs.q_rows * hidden),
        keys: Span::trials(shape.trials, shape.kv_stride, seqs.k_rows * hidden),
        rows: Span::trials(shape.trials, shape.lse_stride, seqs.q_rows * seqs.heads),
    })
}

/// ctx = dropout(softmax(q·kᵀ/√D))·v per (trial, sequence, head); lse gets each query row's
/// logsumexp of the scaled scores (what the backward needs instead of the probabilities).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<A: Act>(
    gpu: &Gpu,
    shape: &AttnShape,
    seqs: &DeviceAttnSeqs,
    q: &CudaSlice<A>,
    k: &CudaSlice<A>,
    v: &CudaSlice<A>,
    rng: &DeviceRng,
    dropout: Option<AttnDropout>,
    ctx: &mut CudaSlice<A>,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    let common = common::<A>(shape, seqs, rng, dropout)?;
    let mut launch = Launch::new(gpu, ATTENTION_FORWARD, &common.variant)?;
    launch.buffer("ctx", ctx, common.queries)?.buffer("lse", lse, common.rows)?;
    launch.buffer("q", q, common.queries)?.buffer("k", k, common.keys)?.buffer("v", v, common.keys)?;
    launch.table(&seqs.buf).table(&rng.buf);
    common.tail(&mut launch);
    launch.run(config(
        (seqs.max_q.div_ceil(BLOCK_ROWS)) as u64,
        seqs.count * seqs.heads,
        shape.trials,
        128,
        0,
    )?)
}

/// Gradients of `attention_forward`: dq (overwritten), dk and dv (zeroed first, so key rows
/// outside every sequence's valid keys are 0 as on the CPU). `ctx` and `lse` are the forward's
/// outputs; `delta` `[T, q_rows, heads]` is scratch (dctx·ctx per row and head).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<A: Act>(
    gpu: &Gpu,
    shape: &AttnShape,
    seqs: &DeviceAttnSeqs,
    q: &CudaSlice<A>,
    k: &CudaSlice<A>,
    v: &CudaSlice<A>,
    ctx: &CudaSlice<A>,
    lse: &CudaSlice<f32>,
    dctx: &CudaSlice<A>,
    rng: &DeviceRng,
    dropout: Option<AttnDropout>,
    delta: &mut CudaSlice<f32>,
    dq: &mut CudaSlice<A>,
    dk: &mut CudaSlice<A>,
    dv: &mut CudaSlice<A>,
) -> Result<()> {
    let common = common::<A>(shape, seqs, rng, dropout)?;
    let stream = &gpu.stream;
    stream.memset_zeros(dk).map_err(|e| anyhow!("attention_backward: clearing dk: {e:?}"))?;
    stream.memset_zeros(dv).map_err(|e| anyhow!("attention_backward: clearing dv: {e:?}"))?;
    let blocks_y = seqs.count * seqs.heads;

    // dq first: it also writes delta, which the dk/dv kernel reads.
    let mut launch = Launch::new(gpu, ATTENTION_DQ, &common.variant)?;
    launch.buffer("dq", dq, common.queries)?.buffer("delta", delta, common.rows)?;
    launch.buffer("q", q, common.queries)?.buffer("k", k, common.keys)?.buffer("v", v, common.keys)?;
    launch.buffer("ctx", ctx, common.queries)?.buffer("dctx", dctx, common.queries)?;
    launch.buffer("lse", lse, common.rows)?.table(&seqs.buf).table(&rng.buf);
    common.tail(&mut launch);
    launch.run(config(seqs.max_q.div_ceil(BLOCK_ROWS) as u64, blocks_y, shape.trials, 128, 0)?)?;

    let mut launch = Launch::new(gpu, ATTENTION_DKDV, &common.variant)?;
    launch.buffer("dk", dk, common.keys)?.buffer("dv", dv, common.keys)?;
    launch.buffer("q", q, common.queries)?.buffer("k", k, common.keys)?.buffer("v", v, common.keys)?;
    launch.buffer("dctx", dctx, common.queries)?.buffer("lse", lse, common.rows)?;
    launch.buffer("delta", delta, common.rows)?.table(&seqs.buf).table(&rng.buf);
    common.tail(&mut launch);
    launch.run(config(seqs.max_k.div_ceil(BLOCK_ROWS) as u64, blocks_y, shape.trials, 128, 0)?)
}
