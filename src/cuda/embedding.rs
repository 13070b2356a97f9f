//! Embedding gather (forward) and scatter-add (backward) for every trial at once.
//!
//! CPU twins: `cpu::bert::embedding_forward`, `cpu::bert::embedding_backward`.
//! Kernels: `kernels/embedding.cu`.

use anyhow::{Result, ensure};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::kernel::{EMBEDDING_BACKWARD, EMBEDDING_FORWARD, Kernel};
use super::launch::{Act, Launch, Span, blocks, config};
use crate::cpu::bert::Sequence;
use crate::ops::EmbeddingTables;

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
        let upload =
            |v: &[u32]| gpu.stream.clone_htod(v).map_err(|e| anyhow::anyhow!("uploading token rows: {e:?}"));
        Ok(DeviceTokens {
            ids: upload(ids)?,
            types: upload(types)?,
            positions: upload(positions)?,
            rows,
            stride: if ids.len() == rows { 0 } else { rows },
            tables,
        })
    }

    fn trials_available(&self) -> usize {
        if self.stride == 0 { usize::MAX } else { self.ids.len() / self.rows }
    }
}

/// A launch of either embedding kernel over `trials` trials, once the token rows cover them.
fn embedding_launch<'a>(
    gpu: &'a Gpu,
    kernel: Kernel,
    variant: &str,
    tokens: &'a DeviceTokens,
    trials: usize,
) -> Result<Launch<'a>> {
    ensure!(tokens.trials_available() >= trials, "{kernel}: the token rows cover fewer than {trials} trials");
    Launch::new(gpu, kernel, variant)
}

/// Each trial's rows `[rows, H]` of an activation, `stride` apart.
fn rows(tokens: &DeviceTokens, trials: usize, stride: usize) -> Span {
    Span::trials(trials, stride, tokens.rows * tokens.tables.hidden)
}

/// Each trial's three tables, `param_stride` apart.
fn tables(tokens: &DeviceTokens, trials: usize, param_stride: usize) -> Span {
    let tables = tokens.tables;
    Span::trials(trials, param_stride, tables.token_type + tables.types * tables.hidden)
}

/// The token rows' addresses and the sizes after them (up to the offsets).
fn token_args<'a>(launch: &mut Launch<'a>, tokens: &'a DeviceTokens) -> Result<()> {
    launch.table(&tokens.ids).table(&tokens.types).table(&tokens.positions);
    launch.int("rows", tokens.rows)?.int("hidden", tokens.tables.hidden)?;
    Ok(())
}

/// The three table offsets.
fn offset_args(launch: &mut Launch<'_>, tables: EmbeddingTables) {
    launch.arg(tables.word as u64).arg(tables.position as u64).arg(tables.token_type as u64);
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
    let mut launch = embedding_launch(gpu, EMBEDDING_FORWARD, A::SUFFIX, tokens, trials)?;
    launch.buffer("out", out, rows(tokens, trials, out_stride))?;
    launch.buffer("params", params, tables(tokens, trials, param_stride))?;
    token_args(&mut launch, tokens)?;
    offset_args(&mut launch, tokens.tables);
    launch.arg(out_stride as u64).arg(param_stride as u64).arg(tokens.stride as u64);
    launch.run(config(blocks(tokens.rows * tokens.tables.hidden, 256), trials, 1, 256, 0)?)
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
    let mut launch = embedding_launch(gpu, EMBEDDING_BACKWARD, A::SUFFIX, tokens, trials)?;
    launch.buffer("grads", grads, tables(tokens, trials, grad_stride))?;
    launch.buffer("d", d, rows(tokens, trials, d_stride))?;
    token_args(&mut launch, tokens)?;
    launch.arg(pad_token_id.map_or(u32::MAX, |p| u32::try_from(p).unwrap_or(u32::MAX)));
    offset_args(&mut launch, tokens.tables);
    launch.arg(d_stride as u64).arg(grad_stride as u64).arg(tokens.stride as u64);
    launch.run(config(blocks(tokens.rows * tokens.tables.hidden, 256), trials, 1, 256, 0)?)
}
