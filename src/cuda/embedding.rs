//! Embedding gather (forward) and scatter-add (backward) for every trial at once.
//!
//! CPU twins: `cpu::bert::embedding_forward`, `cpu::bert::embedding_backward`.
//! Kernels: `kernels/embedding.cu`.

use anyhow::{Result, ensure};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::launch::{Act, KernelArgs, addr, blocks, check_len, config, int, launched};
use crate::cpu::bert::Sequence;
use crate::model::layout::ParamLayout;

/// Where the three embedding tables sit inside one trial's parameter buffer `[P]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddingTables {
    pub word: usize,
    pub position: usize,
    pub token_type: usize,
    pub vocab: usize,
    pub positions: usize,
    pub types: usize,
    pub hidden: usize,
}

impl EmbeddingTables {
    pub fn from_layout(layout: &ParamLayout, hidden: usize) -> Self {
        let e = &layout.embeddings;
        EmbeddingTables {
            word: e.word.start,
            position: e.position.start,
            token_type: e.token_type.start,
            vocab: e.word.len() / hidden,
            positions: e.position.len() / hidden,
            types: e.token_type.len() / hidden,
            hidden,
        }
    }
}

/// A packed batch's token rows on the device: ids, token types and each row's position inside
/// its sequence, `[T, rows]` (or `[rows]` shared by every trial). Built only by `upload`, which
/// checks every index against its table, so the kernels never read outside the tables.
pub struct DeviceTokens {
    pub ids: CudaSlice<u32>,
    pub types: CudaSlice<u32>,
    pub positions: CudaSlice<u32>,
    pub rows: usize,
    /// Elements between trials: `rows`, or 0 when one batch serves every trial.
    pub stride: usize,
    tables: EmbeddingTables,
}

/// Each packed row's position inside its sequence (the CPU's `r` in `s.start + r`).
pub fn positions_of(seqs: &[Sequence], rows: usize) -> Vec<u32> {
    let mut pos = vec![0u32; rows];
    for s in seqs {
        for r in 0..s.len {
            pos[s.start + r] = r as u32;
        }
    }
    pos
}

impl DeviceTokens {
    /// `ids`, `types`, `positions` hold `rows` values (one batch for every trial) or a multiple
    /// of `rows` (one batch per trial, trial-major).
    pub fn upload(
        gpu: &Gpu,
        ids: &[u32],
        types: &[u32],
        positions: &[u32],
        rows: usize,
        tables: EmbeddingTables,
    ) -> Result<Self> {
        ensure!(rows > 0, "token rows: the batch is empty");
        ensure!(
            ids.len() == types.len() && ids.len() == positions.len() && ids.len().is_multiple_of(rows),
            "token rows: {} ids, {} types and {} positions are not whole batches of {rows} rows",
            ids.len(),
            types.len(),
            positions.len()
        );
        for (what, values, limit) in [
            ("token id", ids, tables.vocab),
            ("token type", types, tables.types),
            ("position", positions, tables.positions),
        ] {
            if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| **v as usize >= limit) {
                anyhow::bail!("token rows: {what} {v} at row {i} is outside its table of {limit} rows");
            }
        }
        let up =
            |v: &[u32]| gpu.stream.clone_htod(v).map_err(|e| anyhow::anyhow!("uploading token rows: {e:?}"));
        Ok(DeviceTokens {
            ids: up(ids)?,
            types: up(types)?,
            positions: up(positions)?,
            rows,
            stride: if ids.len() == rows { 0 } else { rows },
            tables,
        })
    }

    fn trials_available(&self) -> usize {
        if self.stride == 0 { usize::MAX } else { self.ids.len() / self.rows }
    }
}

/// out `[T, rows, H]` (stride `out_stride`) = word[id] + position[pos] + token_type[type] from
/// each trial's parameters `params` `[T, P]` (stride `param_stride`).
pub fn embedding_forward<A: Act>(
    gpu: &Gpu,
    out: &mut CudaSlice<A>,
    out_stride: usize,
    params: &CudaSlice<f32>,
    param_stride: usize,
    tokens: &DeviceTokens,
    trials: usize,
) -> Result<()> {
    let tb = tokens.tables;
    let (n, h) = (tokens.rows, tb.hidden);
    ensure!(
        tokens.trials_available() >= trials,
        "embedding_forward: the token rows cover fewer than {trials} trials"
    );
    check_len("embedding_forward out", out.len(), 0, trials, out_stride, n * h)?;
    check_len(
        "embedding_forward params",
        params.len(),
        0,
        trials,
        param_stride,
        tb.token_type + tb.types * h,
    )?;
    let name = format!("embedding_forward_{}", A::SUFFIX);
    let f = gpu.function("embedding", &name)?;
    let s = &gpu.stream;
    let (po, _g0) = addr(out, 0, s);
    let (pp, _g1) = addr(params, 0, s);
    let (pi, _g2) = addr(&tokens.ids, 0, s);
    let (pt, _g3) = addr(&tokens.types, 0, s);
    let (ppos, _g4) = addr(&tokens.positions, 0, s);
    let (ni, hi) = (int("rows", n)?, int("hidden", h)?);
    let (wo, poo, to) = (tb.word as u64, tb.position as u64, tb.token_type as u64);
    let (os, ps, ts) = (out_stride as u64, param_stride as u64, tokens.stride as u64);
    let cfg = config(blocks(n * h, 256), trials, 1, 256, 0)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&po).arg(&pp).arg(&pi).arg(&pt).arg(&ppos).arg(&ni).arg(&hi).arg(&wo).arg(&poo).arg(&to);
    b.arg(&os).arg(&ps).arg(&ts);
    launched(&name, unsafe { b.launch(s, cfg) })
}

/// Scatter-adds d `[T, rows, H]` into the word, position and token-type rows of `grads`
/// `[T, P]`; the padding token's word row gets nothing (`pad_token_id`, None = no padding row).
#[allow(clippy::too_many_arguments)]
pub fn embedding_backward<A: Act>(
    gpu: &Gpu,
    grads: &mut CudaSlice<f32>,
    grad_stride: usize,
    d: &CudaSlice<A>,
    d_stride: usize,
    tokens: &DeviceTokens,
    pad_token_id: Option<usize>,
    trials: usize,
) -> Result<()> {
    let tb = tokens.tables;
    let (n, h) = (tokens.rows, tb.hidden);
    ensure!(
        tokens.trials_available() >= trials,
        "embedding_backward: the token rows cover fewer than {trials} trials"
    );
    check_len("embedding_backward d", d.len(), 0, trials, d_stride, n * h)?;
    check_len("embedding_backward grads", grads.len(), 0, trials, grad_stride, tb.token_type + tb.types * h)?;
    let name = format!("embedding_backward_{}", A::SUFFIX);
    let f = gpu.function("embedding", &name)?;
    let s = &gpu.stream;
    let (pg, _g0) = addr(grads, 0, s);
    let (pd, _g1) = addr(d, 0, s);
    let (pi, _g2) = addr(&tokens.ids, 0, s);
    let (pt, _g3) = addr(&tokens.types, 0, s);
    let (ppos, _g4) = addr(&tokens.positions, 0, s);
    let (ni, hi) = (int("rows", n)?, int("hidden", h)?);
    let pad = pad_token_id.map_or(u32::MAX, |p| u32::try_from(p).unwrap_or(u32::MAX));
    let (wo, poo, to) = (tb.word as u64, tb.position as u64, tb.token_type as u64);
    let (ds, gs, ts) = (d_stride as u64, grad_stride as u64, tokens.stride as u64);
    let cfg = config(blocks(n * h, 256), trials, 1, 256, 0)?;
    let mut b = KernelArgs::new(&f);
    b.arg(&pg).arg(&pd).arg(&pi).arg(&pt).arg(&ppos).arg(&ni).arg(&hi).arg(&pad).arg(&wo).arg(&poo);
    b.arg(&to).arg(&ds).arg(&gs).arg(&ts);
    launched(&name, unsafe { b.launch(s, cfg) })
}
