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
use super::launch::{Act, KernelArgs, addr, check_len, config, int, launched};
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

struct Common {
    suffix: String,
    heads: i32,
    scale: f32,
    drop: DropoutArg,
    strides: [u64; 4],
}

fn common<A: Act>(
    sh: &AttnShape,
    seqs: &DeviceAttnSeqs,
    rng: &DeviceRng,
    dropout: Option<AttnDropout>,
) -> Result<Common> {
    ensure!(
        sh.head_dim == 32 || sh.head_dim == 64,
        "attention kernels exist for head sizes 32 and 64, not {}",
        sh.head_dim
    );
    if let Some(t) = seqs.trials {
        ensure!(t >= sh.trials, "attention: the blocks cover {t} trials, the launch {}", sh.trials);
    }
    ensure!(rng.trials >= sh.trials, "attention: {} generators for {} trials", rng.trials, sh.trials);
    let (threshold, scale) = match dropout {
        Some(d) => threshold_and_scale(d.p)?,
        None => (0.0, 1.0),
    };
    Ok(Common {
        suffix: format!("d{}_{}", sh.head_dim, A::SUFFIX),
        heads: int("heads", seqs.heads)?,
        // The CPU scales the scores by (1/√D) computed in f64, then cast.
        scale: (1.0 / (sh.head_dim as f64).sqrt()) as f32,
        drop: DropoutArg { threshold, scale, site: dropout.map_or(0, |d| d.site) },
        strides: [sh.q_stride as u64, sh.kv_stride as u64, sh.lse_stride as u64, seqs.stride as u64],
    })
}

fn check_buffers(
    what: &str,
    sh: &AttnShape,
    seqs: &DeviceAttnSeqs,
    qs: &[(&str, usize)],
    ks: &[(&str, usize)],
    ls: &[(&str, usize)],
) -> Result<()> {
    let h = seqs.heads * sh.head_dim;
    for (name, len) in qs {
        check_len(&format!("{what} {name}"), *len, 0, sh.trials, sh.q_stride, seqs.q_rows * h)?;
    }
    for (name, len) in ks {
        check_len(&format!("{what} {name}"), *len, 0, sh.trials, sh.kv_stride, seqs.k_rows * h)?;
    }
    for (name, len) in ls {
        check_len(&format!("{what} {name}"), *len, 0, sh.trials, sh.lse_stride, seqs.q_rows * seqs.heads)?;
    }
    Ok(())
}

/// ctx = dropout(softmax(q·kᵀ/√D))·v per (trial, sequence, head); lse gets each query row's
/// logsumexp of the scaled scores (what the backward needs instead of the probabilities).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<A: Act>(
    gpu: &Gpu,
    sh: &AttnShape,
    seqs: &DeviceAttnSeqs,
    q: &CudaSlice<A>,
    k: &CudaSlice<A>,
    v: &CudaSlice<A>,
    rng: &DeviceRng,
    dropout: Option<AttnDropout>,
    ctx: &mut CudaSlice<A>,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    let c = common::<A>(sh, seqs, rng, dropout)?;
    check_buffers(
        "attention_forward",
        sh,
        seqs,
        &[("q", q.len()), ("ctx", ctx.len())],
        &[("k", k.len()), ("v", v.len())],
        &[("lse", lse.len())],
    )?;
    let name = format!("attention_forward_{}", c.suffix);
    let f = gpu.function("attention", &name)?;
    let s = &gpu.stream;
    let (pc, _g0) = addr(ctx, 0, s);
    let (pl, _g1) = addr(lse, 0, s);
    let (pq, _g2) = addr(q, 0, s);
    let (pk, _g3) = addr(k, 0, s);
    let (pv, _g4) = addr(v, 0, s);
    let (ps, _g5) = addr(&seqs.buf, 0, s);
    let (pr, _g6) = addr(&rng.buf, 0, s);
    let cfg = config((seqs.max_q.div_ceil(BLOCK_ROWS)) as u64, seqs.count * seqs.heads, sh.trials, 128, 0)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&pc).arg(&pl).arg(&pq).arg(&pk).arg(&pv).arg(&ps).arg(&pr).arg(&c.heads).arg(&c.scale).arg(&c.drop);
    b.arg(&c.strides[0]).arg(&c.strides[1]).arg(&c.strides[2]).arg(&c.strides[3]);
    launched(&name, unsafe { b.launch(s, cfg) })
}

/// Gradients of `attention_forward`: dq (overwritten), dk and dv (zeroed first, so key rows
/// outside every sequence's valid keys are 0 as on the CPU). `ctx` and `lse` are the forward's
/// outputs; `delta` `[T, q_rows, heads]` is scratch (dctx·ctx per row and head).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<A: Act>(
    gpu: &Gpu,
    sh: &AttnShape,
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
    let c = common::<A>(sh, seqs, rng, dropout)?;
    check_buffers(
        "attention_backward",
        sh,
        seqs,
        &[("q", q.len()), ("ctx", ctx.len()), ("dctx", dctx.len()), ("dq", dq.len())],
        &[("k", k.len()), ("v", v.len()), ("dk", dk.len()), ("dv", dv.len())],
        &[("lse", lse.len()), ("delta", delta.len())],
    )?;
    let s = &gpu.stream;
    s.memset_zeros(dk).map_err(|e| anyhow!("attention_backward: clearing dk: {e:?}"))?;
    s.memset_zeros(dv).map_err(|e| anyhow!("attention_backward: clearing dv: {e:?}"))?;
    let (pq, _g0) = addr(q, 0, s);
    let (pk, _g1) = addr(k, 0, s);
    let (pv, _g2) = addr(v, 0, s);
    let (pc, _g3) = addr(ctx, 0, s);
    let (pl, _g4) = addr(lse, 0, s);
    let (pdc, _g5) = addr(dctx, 0, s);
    let (ps, _g6) = addr(&seqs.buf, 0, s);
    let (pr, _g7) = addr(&rng.buf, 0, s);
    let (pdl, _g8) = addr(delta, 0, s);
    let (pdq, _g9) = addr(dq, 0, s);
    let (pdk, _g10) = addr(dk, 0, s);
    let (pdv, _g11) = addr(dv, 0, s);
    let y = seqs.count * seqs.heads;

    // dq first: it also writes delta, which the dk/dv kernel reads.
    let name = format!("attention_dq_{}", c.suffix);
    let f = gpu.function("attention", &name)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&pdq).arg(&pdl).arg(&pq).arg(&pk).arg(&pv).arg(&pc).arg(&pdc).arg(&pl).arg(&ps).arg(&pr);
    b.arg(&c.heads).arg(&c.scale).arg(&c.drop);
    b.arg(&c.strides[0]).arg(&c.strides[1]).arg(&c.strides[2]).arg(&c.strides[3]);
    let cfg = config(seqs.max_q.div_ceil(BLOCK_ROWS) as u64, y, sh.trials, 128, 0)?;
    launched(&name, unsafe { b.launch(s, cfg) })?;

    let name = format!("attention_dkdv_{}", c.suffix);
    let f = gpu.function("attention", &name)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&pdk).arg(&pdv).arg(&pq).arg(&pk).arg(&pv).arg(&pdc).arg(&pl).arg(&pdl).arg(&ps).arg(&pr);
    b.arg(&c.heads).arg(&c.scale).arg(&c.drop);
    b.arg(&c.strides[0]).arg(&c.strides[1]).arg(&c.strides[2]).arg(&c.strides[3]);
    let cfg = config(seqs.max_k.div_ceil(BLOCK_ROWS) as u64, y, sh.trials, 128, 0)?;
    launched(&name, unsafe { b.launch(s, cfg) })
}
