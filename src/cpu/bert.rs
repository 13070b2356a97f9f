//! The CPU reference of transformers' `BertForSequenceClassification`: forward, backward and loss,
//! in plain Rust, generic over f32 (training) and f64 (finite-difference checks).
//!
//! This file is the model. It is meant to be read in one sitting and is the oracle every GPU kernel
//! is checked against, so it favours clarity over speed: no processor-specific code here — the
//! multithreaded GEMM (`real::gemm`), the vectorized GELU/softmax (`Real`'s slice functions, in
//! `vmath` for f32) and one (sequence, head) of attention (`Real::attention_head`: gemm, softmax,
//! gemm for f64; `fused_attention` for f32) live beside it — and rayon over rows or (sequence,
//! head) pairs. Evaluation keeps nothing for a backward pass (no LayerNorm xhat, no attention
//! probabilities, GELU in place); it computes the same bits as training with dropout off.
//!
//! Shapes legend: B = sequences in the batch, N = packed token rows (the sum of the sequences'
//! lengths), H = hidden size, A = attention heads, D = H/A head size, I = intermediate (FFN) size,
//! C = labels, V = vocabulary. Matrices are row-major; linear weights are `[out, in]` as in torch.
//!
//! **Unpadded execution.** A batch's tokens are packed end to end: sequence `s` owns rows
//! `start..start+len`. Token-wise ops (embeddings, LayerNorm, linears, GELU) run over real rows
//! only; attention runs per sequence over its own keys. A padded batch is the special case
//! `len = padded length`, `valid = real length`: keys past `valid` are masked, exactly as
//! transformers' additive attention mask does (its `finfo.min` makes their softmax weight 0).
//!
//! **The last layer computes only the [CLS] rows** after its key/value projections: the pooler
//! reads nothing else, so this gives the same logits and gradients as computing every row.
//!
//! **Q, K and V are one product** over the rows they share (their weights stacked per step, a
//! copy of 3·H² values): each row `[q | k | v]`, or in the last layer `[k | v]` with the [CLS]
//! queries after them (`QkvLayout`); attention reads them in place with row strides, and the
//! backward forms their gradients in the same layout for one weight-gradient and one dX product.
//!
//! Dropout sites (for the counter-based generator): 0 = embeddings; for layer l, 1+3l = attention
//! probabilities, 2+3l = attention output, 3+3l = FFN output; 1+3L = pooled output.

use std::ops::Range;

use rayon::prelude::*;

use super::philox::DropoutRng;
use super::real::{Head, Mat, Real, SendPtr, gemm, gemm_serial_raw, linear_gemm};
use crate::config::BertConfig;
use crate::model::layout::{LayerParams, ParamLayout};

/// Rows per chunk in the deterministic parallel reductions (bias and LayerNorm gradients):
/// partial sums are formed per fixed chunk and added in order, so results do not depend on how
/// rayon schedules the work.
const REDUCE_CHUNK: usize = 64;

/// Rows per parallel work item when filling each row of a linear layer's output with its bias.
const ROW_BLOCK: usize = 32;

/// Σ f(x) in a fixed order: eight running sums side by side (which the compiler keeps in one
/// vector register), added pairwise at the end, then the remainder in order. The order depends
/// only on the length, never on where the slice sits.
fn lane_sum<F: Real>(x: &[F], f: impl Fn(F) -> F) -> F {
    let mut acc = [F::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += f(*v);
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for v in rest {
        sum += f(*v);
    }
    sum
}

/// One sequence of a packed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sequence {
    /// First row of the sequence in the packed token arrays.
    pub start: usize,
    /// Rows (positions) the sequence occupies.
    pub len: usize,
    /// Leading rows that are real tokens and may be attended to (`len` when unpadded).
    pub valid: usize,
}

/// A batch: packed token rows, the sequences over them and one label per sequence.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    pub seqs: Vec<Sequence>,
    pub labels: Vec<usize>,
}

impl Batch {
    /// Packs sequences of token ids end to end (token type 0), unpadded.
    pub fn packed(sequences: &[&[u32]], labels: &[usize]) -> Batch {
        let mut b = Batch::default();
        for s in sequences {
            b.seqs.push(Sequence { start: b.input_ids.len(), len: s.len(), valid: s.len() });
            b.input_ids.extend_from_slice(s);
        }
        b.token_type_ids = vec![0; b.input_ids.len()];
        b.labels = labels.to_vec();
        b
    }

    /// Number of packed rows (N).
    pub fn rows(&self) -> usize {
        self.input_ids.len()
    }

    /// Splits the batch into runs of consecutive sequences whose attention probabilities (over
    /// all `layers`, `heads` per layer) hold at most `budget` values — a sequence over the budget
    /// alone is a run of its own — each with its dropout offsets in this batch. Running the runs
    /// one after another gives the whole batch's results up to summation order, with the same
    /// dropout masks. One run (the batch itself) when it fits.
    pub fn split_by_attention(
        &self,
        heads: usize,
        layers: usize,
        budget: usize,
    ) -> Vec<(Batch, DropoutOffset)> {
        let cost = |s: &Sequence| heads * layers * s.len * s.valid;
        if self.seqs.iter().map(cost).sum::<usize>() <= budget {
            return vec![(self.clone(), DropoutOffset::default())];
        }
        let mut runs = Vec::new();
        let (mut first, mut used) = (0, 0);
        let mut offset = DropoutOffset::default();
        let mut next = offset;
        for (i, s) in self.seqs.iter().enumerate() {
            if i > first && used + cost(s) > budget {
                runs.push((self.select(first..i), offset));
                (first, used, offset) = (i, 0, next);
            }
            used += cost(s);
            next.rows = s.start + s.len;
            next.seqs = i + 1;
            next.attention += heads * s.len * s.valid;
            next.cls_attention += heads * s.valid;
        }
        runs.push((self.select(first..self.seqs.len()), offset));
        runs
    }

    /// The sequences `range` (consecutive in the packed rows) as a batch of their own.
    fn select(&self, range: Range<usize>) -> Batch {
        let seqs = &self.seqs[range.clone()];
        let (Some(first), Some(last)) = (seqs.first(), seqs.last()) else { return Batch::default() };
        let rows = first.start..last.start + last.len;
        Batch {
            input_ids: self.input_ids[rows.clone()].to_vec(),
            token_type_ids: self.token_type_ids[rows.clone()].to_vec(),
            seqs: seqs.iter().map(|s| Sequence { start: s.start - rows.start, ..*s }).collect(),
            labels: self.labels[range].to_vec(),
        }
    }
}

/// Dropout probabilities of one model (they may differ between the trials of an array; the
/// architecture may not).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutProbs {
    pub hidden: f64,
    pub attention: f64,
    pub classifier: f64,
}

impl DropoutProbs {
    pub fn from_config(c: &BertConfig) -> Self {
        DropoutProbs {
            hidden: c.hidden_dropout_prob,
            attention: c.attention_probs_dropout_prob,
            classifier: c.classifier_dropout_prob(),
        }
    }
}

/// Where a chunk of a micro-batch starts in each of dropout's element index spaces (token rows,
/// sequences, attention cells of full layers and of the last, [CLS]-query layer), so that running
/// a micro-batch in chunks draws exactly the masks of running it whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropoutOffset {
    pub rows: usize,
    pub seqs: usize,
    pub attention: usize,
    pub cls_attention: usize,
}

/// Dropout probabilities and the generator for one training forward pass. `None` = eval mode.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub rng: DropoutRng,
    pub probs: DropoutProbs,
    /// Zero unless this pass is a chunk of a larger micro-batch.
    pub offset: DropoutOffset,
}

impl Dropout {
    pub fn new(probs: DropoutProbs, rng: DropoutRng) -> Self {
        Dropout { rng, probs, offset: DropoutOffset::default() }
    }

    pub fn from_config(c: &BertConfig, rng: DropoutRng) -> Self {
        Dropout::new(DropoutProbs::from_config(c), rng)
    }

    /// Attention-probability dropout of layer `l` (`cls_only`: the last layer, whose queries are
    /// the [CLS] rows).
    fn attention(&self, l: usize, cls_only: bool) -> AttentionDropout<'_> {
        let first = if cls_only { self.offset.cls_attention } else { self.offset.attention };
        AttentionDropout { rng: &self.rng, p: self.probs.attention, site: site_attn_probs(l), first }
    }
}

/// Dropout on attention probabilities: the generator, probability, site, and the index of the
/// pass's first probability in its micro-batch.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDropout<'a> {
    pub rng: &'a DropoutRng,
    pub p: f64,
    pub site: u32,
    pub first: usize,
}

/// The rows a hidden-width dropout site covers: every token row, or one [CLS] row per sequence.
#[derive(Clone, Copy, Debug)]
enum SiteRows {
    Tokens,
    Sequences,
}

/// The rows of an encoder layer's output: the last layer keeps only the [CLS] rows.
fn layer_rows(last: bool) -> SiteRows {
    if last { SiteRows::Sequences } else { SiteRows::Tokens }
}

fn apply_dropout<F: Real>(
    d: Option<&Dropout>,
    p: impl Fn(&DropoutProbs) -> f64,
    site: u32,
    rows: SiteRows,
    width: usize,
    x: &mut [F],
) {
    if let Some(d) = d {
        let first_row = match rows {
            SiteRows::Tokens => d.offset.rows,
            SiteRows::Sequences => d.offset.seqs,
        };
        d.rng.apply(p(&d.probs), site, first_row * width, x);
    }
}

pub fn site_embeddings() -> u32 {
    0
}
pub fn site_attn_probs(l: usize) -> u32 {
    1 + 3 * l as u32
}
pub fn site_attn_out(l: usize) -> u32 {
    2 + 3 * l as u32
}
pub fn site_ffn_out(l: usize) -> u32 {
    3 + 3 * l as u32
}
pub fn site_pooled(layers: usize) -> u32 {
    1 + 3 * layers as u32
}

// ---------------------------------------------------------------------------------------------
// Linear: y = x·Wᵀ + b
// ---------------------------------------------------------------------------------------------

/// y = x·Wᵀ + b into a fresh buffer: x is (n, k), w is (m, k), b is (m), y is (n, m).
pub fn linear_new<F: Real>(x: &[F], w: &[F], b: &[F], n: usize, k: usize, m: usize) -> Vec<F> {
    let mut y = Vec::with_capacity(n * m);
    linear_append(&mut y, x, w, b, n, k, m);
    y
}

/// Appends y = x·Wᵀ + b (n rows of m) to `out`. y is never zero-filled: oneDNN adds the bias in
/// its product where it takes it; elsewhere y's rows start as copies of the bias and the product
/// is added onto them (no separate bias pass either way).
pub fn linear_append<F: Real>(out: &mut Vec<F>, x: &[F], w: &[F], b: &[F], n: usize, k: usize, m: usize) {
    let first = out.len();
    out.reserve(n * m);
    let (a, wt) = (Mat::rm(x, n, k), Mat::rm_t(w, m, k));
    let fresh = &mut out.spare_capacity_mut()[..n * m];
    if F::linear_onednn(a, wt, b, fresh, m) {
        // SAFETY: oneDNN wrote every one of the n·m elements past the old length.
        unsafe { out.set_len(first + n * m) };
        return;
    }
    fresh.par_chunks_mut(m * ROW_BLOCK).for_each(|rows| {
        for row in rows.chunks_mut(m) {
            row.iter_mut().zip(b).for_each(|(y, b)| {
                y.write(*b);
            });
        }
    });
    // SAFETY: every one of the n·m elements past the old length was written just above.
    unsafe { out.set_len(first + n * m) };
    linear_gemm(a, wt, F::one(), &mut out[first..], m);
}

/// The weights and biases of linears that read the same rows, stacked into one linear's
/// `[Σ out, in]` weight and `[Σ out]` bias — one product instead of one per linear.
fn stacked<F: Real>(p: &[F], parts: &[(&Range<usize>, &Range<usize>)]) -> (Vec<F>, Vec<F>) {
    let w = parts.iter().flat_map(|(w, _)| &p[(*w).clone()]).copied().collect();
    let b = parts.iter().flat_map(|(_, b)| &p[(*b).clone()]).copied().collect();
    (w, b)
}

/// [`linear_param_backward`] of linears stacked by [`stacked`]: dy has their outputs side by side
/// (n rows of Σ out); one product gives all their weight gradients, added into each one's ranges.
#[allow(clippy::too_many_arguments)]
fn stacked_param_backward<F: Real>(
    x: &[F],
    p: &[F],
    parts: &[(&Range<usize>, &Range<usize>)],
    dy: &[F],
    n: usize,
    k: usize,
    dx: Option<(&mut [F], bool)>,
    grads: &mut [F],
) {
    let (w, b) = stacked(p, parts);
    let m = b.len();
    let (mut dw, mut db) = (vec![F::zero(); m * k], vec![F::zero(); m]);
    linear_backward(x, &w, dy, n, k, m, dx, &mut dw, &mut db);
    let (mut dw, mut db) = (dw.as_slice(), db.as_slice());
    for (w, b) in parts {
        let (this_w, rest_w) = dw.split_at(w.len());
        let (this_b, rest_b) = db.split_at(b.len());
        grads[(*w).clone()].iter_mut().zip(this_w).for_each(|(g, d)| *g += *d);
        grads[(*b).clone()].iter_mut().zip(this_b).for_each(|(g, d)| *g += *d);
        (dw, db) = (rest_w, rest_b);
    }
}

/// Accumulates dw += dyᵀ·x and db += Σ rows of dy; writes dx = dy·w when asked
/// (`accumulate_dx` adds instead of overwriting).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<F: Real>(
    x: &[F],
    w: &[F],
    dy: &[F],
    n: usize,
    k: usize,
    m: usize,
    dx: Option<(&mut [F], bool)>,
    dw: &mut [F],
    db: &mut [F],
) {
    linear_gemm(Mat::rm_t(dy, n, m), Mat::rm(x, n, k), F::one(), dw, k);
    add_column_sums(dy, m, db);
    if let Some((dx, accumulate)) = dx {
        let beta = if accumulate { F::one() } else { F::zero() };
        linear_gemm(Mat::rm(dy, n, m), Mat::rm(w, m, k), beta, dx, k);
    }
}

/// out[j] += Σ_i x[i, j] for x of row width `m`, summed deterministically.
fn add_column_sums<F: Real>(x: &[F], m: usize, out: &mut [F]) {
    let partials: Vec<Vec<F>> = x
        .par_chunks(REDUCE_CHUNK * m)
        .map(|chunk| {
            let mut s = vec![F::zero(); m];
            for row in chunk.chunks_exact(m) {
                s.iter_mut().zip(row).for_each(|(a, v)| *a += *v);
            }
            s
        })
        .collect();
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(a, v)| *a += *v);
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------------------------

/// x, residual, y, xhat are (n, h); rstd is (n). y = xhat·γ + β with xhat = (s − mean)·rstd and
/// s = x + residual (or x). `keep` receives (xhat, rstd) for the backward pass; evaluation passes
/// `None` and y is the same.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<F: Real>(
    x: &[F],
    residual: Option<&[F]>,
    gamma: &[F],
    beta: &[F],
    eps: f64,
    h: usize,
    y: &mut [F],
    keep: Option<(&mut [F], &mut [F])>,
) {
    let hf = F::of(h as f64);
    // y = s, then returns (mean, rstd) of the row.
    let stats = |i: usize, y: &mut [F]| {
        let x = &x[i * h..(i + 1) * h];
        match residual {
            Some(r) => y.iter_mut().zip(x).zip(&r[i * h..(i + 1) * h]).for_each(|((y, x), r)| *y = *x + *r),
            None => y.copy_from_slice(x),
        }
        let mean = lane_sum(y, |v| v) / hf;
        let var = lane_sum(y, |v| (v - mean) * (v - mean)) / hf;
        (mean, F::one() / (var + F::of(eps)).sqrt())
    };
    let n = x.len() / h;
    match keep {
        Some((xhat, rstd)) => y[..n * h]
            .par_chunks_mut(h)
            .zip(xhat.par_chunks_mut(h))
            .zip(rstd.par_iter_mut())
            .enumerate()
            .for_each(|(i, ((y, xh), rs))| {
                let (mean, r) = stats(i, y);
                *rs = r;
                for j in 0..h {
                    xh[j] = (y[j] - mean) * r;
                    y[j] = xh[j] * gamma[j] + beta[j];
                }
            }),
        None => y[..n * h].par_chunks_mut(h).enumerate().for_each(|(i, y)| {
            let (mean, r) = stats(i, y);
            for j in 0..h {
                y[j] = ((y[j] - mean) * r) * gamma[j] + beta[j];
            }
        }),
    }
}

/// `layernorm_forward` into fresh buffers: returns (y, xhat, rstd), the last two empty unless
/// `keep` (training).
pub fn layernorm_new<F: Real>(
    x: &[F],
    residual: Option<&[F]>,
    gamma: &[F],
    beta: &[F],
    eps: f64,
    h: usize,
    keep: bool,
) -> (Vec<F>, Vec<F>, Vec<F>) {
    let n = x.len() / h;
    let mut y = vec![F::zero(); n * h];
    if !keep {
        layernorm_forward(x, residual, gamma, beta, eps, h, &mut y, None);
        return (y, Vec::new(), Vec::new());
    }
    let (mut xhat, mut rstd) = (vec![F::zero(); n * h], vec![F::zero(); n]);
    layernorm_forward(x, residual, gamma, beta, eps, h, &mut y, Some((&mut xhat, &mut rstd)));
    (y, xhat, rstd)
}

/// dy, xhat, dx are (n, h): dx = rstd/h · (h·g − Σg − xhat·Σ(g·xhat)) with g = dy·γ;
/// accumulates dγ += Σ dy·xhat, dβ += Σ dy.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<F: Real>(
    dy: &[F],
    xhat: &[F],
    rstd: &[F],
    gamma: &[F],
    h: usize,
    dx: &mut [F],
    dgamma: &mut [F],
    dbeta: &mut [F],
) {
    let hf = F::of(h as f64);
    dx.par_chunks_mut(h).zip(dy.par_chunks(h)).zip(xhat.par_chunks(h)).zip(rstd.par_iter()).for_each(
        |(((dx, dy), xh), rs)| {
            let mut sum_g = F::zero();
            let mut sum_gx = F::zero();
            for j in 0..h {
                let g = dy[j] * gamma[j];
                sum_g += g;
                sum_gx += g * xh[j];
            }
            for j in 0..h {
                let g = dy[j] * gamma[j];
                dx[j] = *rs / hf * (hf * g - sum_g - xh[j] * sum_gx);
            }
        },
    );
    let partials: Vec<(Vec<F>, Vec<F>)> = dy
        .par_chunks(REDUCE_CHUNK * h)
        .zip(xhat.par_chunks(REDUCE_CHUNK * h))
        .map(|(dy, xh)| {
            let (mut dg, mut db) = (vec![F::zero(); h], vec![F::zero(); h]);
            for (dyr, xr) in dy.chunks_exact(h).zip(xh.chunks_exact(h)) {
                for j in 0..h {
                    dg[j] += dyr[j] * xr[j];
                    db[j] += dyr[j];
                }
            }
            (dg, db)
        })
        .collect();
    for (dg, db) in partials {
        dgamma.iter_mut().zip(&dg).for_each(|(a, v)| *a += *v);
        dbeta.iter_mut().zip(&db).for_each(|(a, v)| *a += *v);
    }
}

// ---------------------------------------------------------------------------------------------
// GELU (exact, erf-based, as BERT's "gelu")
// ---------------------------------------------------------------------------------------------

pub use super::real::{gelu, gelu_grad};

pub fn gelu_forward<F: Real>(x: &[F], y: &mut [F]) {
    y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(y, x)| F::gelu_slice(x, y));
}

pub fn gelu_in_place<F: Real>(x: &mut [F]) {
    x.par_chunks_mut(4096).for_each(F::gelu_in_place);
}

/// dx = dy · gelu'(x) (overwrites dx).
pub fn gelu_backward<F: Real>(x: &[F], dy: &[F], dx: &mut [F]) {
    dx.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .zip(dy.par_chunks(4096))
        .for_each(|((dx, x), dy)| F::gelu_grad_slice(x, dy, dx));
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Where one sequence's queries and keys live, and where its probabilities are stored.
#[derive(Clone, Copy, Debug)]
pub struct AttnSeq {
    /// First row of the sequence's queries in Q (and of its context rows).
    pub q_start: usize,
    pub q_len: usize,
    /// First row of its keys/values in K and V; `k_len` keys are attended (the valid ones).
    pub k_start: usize,
    pub k_len: usize,
    /// Offset of its `[A, q_len, k_len]` probability block.
    pub p_offset: usize,
}

/// Lays out attention blocks for `seqs`; `cls_only` selects one query row per sequence (query
/// row s in Q) instead of all its rows. Returns the blocks and the total probability count.
pub fn attention_layout(seqs: &[Sequence], heads: usize, cls_only: bool) -> (Vec<AttnSeq>, usize) {
    let mut out = Vec::with_capacity(seqs.len());
    let mut p = 0;
    for (i, s) in seqs.iter().enumerate() {
        let (q_start, q_len) = if cls_only { (i, 1) } else { (s.start, s.len) };
        out.push(AttnSeq { q_start, q_len, k_start: s.start, k_len: s.valid, p_offset: p });
        p += heads * q_len * s.valid;
    }
    (out, p)
}

/// Where a layer's Q, K and V rows lie: row i of Q at `q[i·q_stride..]`, row j of K (of V) at
/// `k[j·kv_stride..]` (`v[j·kv_stride..]`), H values each — three (rows, H) buffers, or views into
/// one buffer that one product wrote with the projections side by side ([`QkvLayout`]).
#[derive(Clone, Copy)]
pub struct Qkv<'a, F> {
    pub q: &'a [F],
    pub k: &'a [F],
    pub v: &'a [F],
    pub q_stride: usize,
    pub kv_stride: usize,
}

impl<'a, F> Qkv<'a, F> {
    /// Three buffers of H-wide rows.
    pub fn separate(q: &'a [F], k: &'a [F], v: &'a [F], h: usize) -> Self {
        Qkv { q, k, v, q_stride: h, kv_stride: h }
    }

    /// Views into one buffer laid out as `at`.
    pub fn within(buf: &'a [F], at: QkvLayout) -> Self {
        assert!(buf.len() >= at.buffer_len(), "Q, K and V: the buffer is smaller than its layout");
        let QkvLayout { q, k, v, q_stride, kv_stride, .. } = at;
        Qkv { q: &buf[q..], k: &buf[k..], v: &buf[v..], q_stride, kv_stride }
    }
}

/// Where Q, K and V lie inside one buffer: offsets of their first rows, row strides and row counts
/// (N key/value rows, Nq query rows). Made only by the two constructors, whose regions never
/// share an element.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QkvLayout {
    q: usize,
    k: usize,
    v: usize,
    q_stride: usize,
    kv_stride: usize,
    rows: usize,
    q_rows: usize,
    h: usize,
}

impl QkvLayout {
    /// Every row queries: one (N, 3H) product, each row `[q | k | v]`.
    pub fn side_by_side(n: usize, h: usize) -> Self {
        QkvLayout { q: 0, k: h, v: 2 * h, q_stride: 3 * h, kv_stride: 3 * h, rows: n, q_rows: n, h }
    }

    /// Only the [CLS] rows query (the last layer): an (N, 2H) product of rows `[k | v]`, then the
    /// (Nq, H) query rows.
    pub fn keys_then_queries(n: usize, nq: usize, h: usize) -> Self {
        QkvLayout { q: 2 * n * h, k: 0, v: h, q_stride: h, kv_stride: 2 * h, rows: n, q_rows: nq, h }
    }

    /// Values in the whole buffer: up to the end of the region that ends last.
    pub fn buffer_len(&self) -> usize {
        let end = |first: usize, stride: usize, rows: usize| {
            if rows == 0 { 0 } else { first + (rows - 1) * stride + self.h }
        };
        let kv = end(self.v, self.kv_stride, self.rows).max(end(self.k, self.kv_stride, self.rows));
        kv.max(end(self.q, self.q_stride, self.q_rows))
    }
}

/// Where [`attention_backward`] writes the gradients of Q, K and V: the places [`Qkv`] reads them
/// from, in buffers the value borrows mutably.
pub struct QkvGrads<'a, F> {
    q: RowsOut<F>,
    k: RowsOut<F>,
    v: RowsOut<F>,
    _borrow: std::marker::PhantomData<&'a mut [F]>,
}

/// `rows` rows of H values, `stride` apart from `first`; no other `RowsOut` of the same
/// [`QkvGrads`] reaches them.
#[derive(Clone, Copy)]
struct RowsOut<F> {
    first: SendPtr<F>,
    stride: usize,
    rows: usize,
}

impl<F> RowsOut<F> {
    /// Element c of row r: inside the borrowed region, and so valid to write, where r < rows and
    /// c < H, which the callers check.
    fn at(self, r: usize, c: usize) -> *mut F {
        debug_assert!(r < self.rows);
        self.first.get().wrapping_add(r * self.stride + c)
    }
}

impl<'a, F> QkvGrads<'a, F> {
    /// Three buffers of H-wide rows.
    pub fn separate(dq: &'a mut [F], dk: &'a mut [F], dv: &'a mut [F], h: usize) -> Self {
        let rows = |b: &mut [F]| RowsOut { first: SendPtr(b.as_mut_ptr()), stride: h, rows: b.len() / h };
        QkvGrads { q: rows(dq), k: rows(dk), v: rows(dv), _borrow: std::marker::PhantomData }
    }

    /// One buffer laid out as `at` (the same layout as the forward's Q, K and V).
    pub fn within(buf: &'a mut [F], at: QkvLayout) -> Self {
        assert!(buf.len() >= at.buffer_len(), "Q, K and V gradients: the buffer is smaller than its layout");
        let base = buf.as_mut_ptr();
        // SAFETY: every offset is inside `buf` (its length asserted just above); the layout's
        // constructors keep Q's, K's and V's elements apart.
        let part = |offset: usize, stride: usize, rows: usize| RowsOut {
            first: SendPtr(unsafe { base.add(offset) }),
            stride,
            rows,
        };
        QkvGrads {
            q: part(at.q, at.q_stride, at.q_rows),
            k: part(at.k, at.kv_stride, at.rows),
            v: part(at.v, at.kv_stride, at.rows),
            _borrow: std::marker::PhantomData,
        }
    }
}

/// Q, K, V and ctx have H-wide rows (ctx (Nq, H) with stride H); probs, when given (training),
/// receives each sequence's `[A, q_len, k_len]` softmax(q·kᵀ/√D) block (before dropout).
/// ctx = dropout(probs)·v per head.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<F: Real>(
    qkv: Qkv<'_, F>,
    seqs: &[AttnSeq],
    heads: usize,
    h: usize,
    probs: Option<&mut [F]>,
    ctx: &mut [F],
    dropout: Option<AttentionDropout<'_>>,
) {
    let d = h / heads;
    let scale = F::of(1.0 / (d as f64).sqrt());
    let (plen, pp) = match probs {
        Some(p) => (p.len(), Some(SendPtr(p.as_mut_ptr()))),
        None => (usize::MAX, None),
    };
    let (cp, clen) = (SendPtr(ctx.as_mut_ptr()), ctx.len());
    assert!(seqs.iter().all(|s| s.q_len > 0 && s.k_len > 0), "every sequence needs a query and a key");
    let Qkv { q, k, v, q_stride, kv_stride } = qkv;
    let work: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|s| (0..heads).map(move |a| (s, a))).collect();
    work.into_par_iter().for_each_init(F::AttentionScratch::default, |scratch, (s, a)| {
        let sq = seqs[s];
        let (lq, lk) = (sq.q_len, sq.k_len);
        let off = sq.p_offset + a * lq * lk;
        assert!(off.saturating_add(lq * lk) <= plen && (sq.q_start + lq) * h <= clen);
        let head = Head {
            q: &q[sq.q_start * q_stride + a * d..],
            k: &k[sq.k_start * kv_stride + a * d..],
            v: &v[sq.k_start * kv_stride + a * d..],
            q_stride,
            kv_stride,
            q_len: lq,
            k_len: lk,
            d,
            scale,
        };
        // Keep the probabilities (training), then drop some out before they weigh V.
        let mut each_block = |first: usize, block: &mut [F]| {
            let at = off + first * lk;
            if let Some(pp) = pp {
                // SAFETY: each (sequence, head) owns its probability block (bounds asserted above).
                unsafe { std::slice::from_raw_parts_mut(pp.get().add(at), block.len()) }
                    .copy_from_slice(block);
            }
            if let Some(d) = dropout.filter(|d| d.p > 0.0) {
                d.rng.apply(d.p, d.site, d.first + at, block);
            }
        };
        // SAFETY: each (sequence, head) writes only the head's columns of its own query rows in
        // ctx, which is reached only through raw pointers.
        unsafe { F::attention_head(head, cp.get().add(sq.q_start * h + a * d), h, scratch, &mut each_block) };
    });
}

/// Backward of `attention_forward`: given dctx (Nq, H), writes the gradients of the sequences'
/// query rows and of every key and value row into `grads`. Key/value rows outside every
/// sequence's valid keys get zeros; query rows outside every sequence are left as they are.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<F: Real>(
    qkv: Qkv<'_, F>,
    probs: &[F],
    dctx: &[F],
    seqs: &[AttnSeq],
    heads: usize,
    h: usize,
    grads: QkvGrads<'_, F>,
    dropout: Option<AttentionDropout<'_>>,
) {
    let d = h / heads;
    let scale = F::of(1.0 / (d as f64).sqrt());
    assert!(seqs.iter().all(|s| s.q_len > 0 && s.k_len > 0), "every sequence needs a query and a key");
    let QkvGrads { q: gq, k: gk, v: gv, .. } = grads;
    assert!(gk.rows == gv.rows);
    // Key rows no sequence attends (padding past its valid keys) get zero gradients; every other
    // row is written whole below, each head's columns by one work item.
    let zero_rows = |rows: Range<usize>| {
        for r in rows {
            for g in [gk, gv] {
                // SAFETY: r < rows (the ranges end at the last sequence's keys or at `rows`),
                // and the H values of a row are the region's own.
                unsafe { std::slice::from_raw_parts_mut(g.at(r, 0), h) }.fill(F::zero());
            }
        }
    };
    let mut next = 0;
    for s in seqs {
        assert!(s.k_start >= next && s.k_start + s.k_len <= gk.rows, "sequences' keys come in order, apart");
        assert!(s.q_start + s.q_len <= gq.rows && s.q_start * h + s.q_len * h <= dctx.len());
        zero_rows(next..s.k_start);
        next = s.k_start + s.k_len;
    }
    zero_rows(next..gk.rows);
    let Qkv { q, k, v, q_stride, kv_stride } = qkv;
    let work: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|s| (0..heads).map(move |a| (s, a))).collect();
    // Per work group: the score gradients and, under dropout, the dropped-out probabilities —
    // buffers reused from head to head instead of allocated per head.
    let buffers = || (Vec::new(), Vec::new());
    work.into_par_iter().for_each_init(buffers, |(dp, dropped): &mut (Vec<F>, Vec<F>), (s, a)| {
        let sq = seqs[s];
        let (lq, lk) = (sq.q_len, sq.k_len);
        let off = sq.p_offset + a * lq * lk;
        let p = &probs[off..off + lq * lk];
        let pv: &[F] = match dropout {
            Some(d) if d.p > 0.0 => {
                dropped.clear();
                dropped.extend_from_slice(p);
                d.rng.apply(d.p, d.site, d.first + off, dropped);
                dropped
            }
            _ => p,
        };
        let dc = Mat { data: &dctx[sq.q_start * h + a * d..], rows: lq, cols: d, rs: h, cs: 1 };
        // SAFETY (the three products below): each (sequence, head) writes only its head's columns
        // of its own rows of dq, dk and dv (rows bounds-checked above), reached only through raw
        // pointers.
        // dv = dropout(p)ᵀ · dctx
        unsafe {
            gemm_serial_raw(
                F::one(),
                Mat::rm_t(pv, lq, lk),
                dc,
                F::zero(),
                gv.at(sq.k_start, a * d),
                gv.stride,
            )
        };
        // dp = dctx · vᵀ, then through the dropout mask — read off dropout(p) rather than drawn
        // again: where dropout(p) is 0 the element was dropped (or p is 0, where the softmax
        // backward below gives 0 whatever dp is).
        // Sized only: the product overwrites every element (beta 0).
        dp.resize(lq * lk, F::zero());
        let vt = Mat { data: &v[sq.k_start * kv_stride + a * d..], rows: d, cols: lk, rs: 1, cs: kv_stride };
        gemm(F::one(), dc, vt, F::zero(), dp, lk);
        if let Some(d) = dropout.filter(|d| d.p > 0.0) {
            let keep_scale = F::of(1.0 / (1.0 - d.p));
            dp.iter_mut()
                .zip(pv)
                .for_each(|(g, kept)| *g = if *kept == F::zero() { F::zero() } else { *g * keep_scale });
        }
        // softmax backward: ds = p ⊙ (dp − Σ dp⊙p), then the 1/√D scale
        for (dsr, pr) in dp.chunks_exact_mut(lk).zip(p.chunks_exact(lk)) {
            let dot: F = dsr.iter().zip(pr).map(|(a, b)| *a * *b).sum();
            for (x, pp) in dsr.iter_mut().zip(pr) {
                *x = *pp * (*x - dot) * scale;
            }
        }
        let kv = Mat { data: &k[sq.k_start * kv_stride + a * d..], rows: lk, cols: d, rs: kv_stride, cs: 1 };
        unsafe {
            gemm_serial_raw(F::one(), Mat::rm(dp, lq, lk), kv, F::zero(), gq.at(sq.q_start, a * d), gq.stride)
        };
        let qv = Mat { data: &q[sq.q_start * q_stride + a * d..], rows: lq, cols: d, rs: q_stride, cs: 1 };
        unsafe {
            gemm_serial_raw(
                F::one(),
                Mat::rm_t(dp, lq, lk),
                qv,
                F::zero(),
                gk.at(sq.k_start, a * d),
                gk.stride,
            )
        };
    });
}

// ---------------------------------------------------------------------------------------------
// Embeddings
// ---------------------------------------------------------------------------------------------

/// out (N, H) = word[id] + position[row − start] + token_type[type], before LayerNorm.
pub fn embedding_forward<F: Real>(p: &[F], layout: &ParamLayout, batch: &Batch, h: usize, out: &mut [F]) {
    let e = &layout.embeddings;
    let (word, pos, typ) = (&p[e.word.clone()], &p[e.position.clone()], &p[e.token_type.clone()]);
    for s in &batch.seqs {
        for r in 0..s.len {
            let row = s.start + r;
            let (t, ty) = (batch.input_ids[row] as usize, batch.token_type_ids[row] as usize);
            let o = &mut out[row * h..(row + 1) * h];
            for j in 0..h {
                o[j] = word[t * h + j] + pos[r * h + j] + typ[ty * h + j];
            }
        }
    }
}

/// Scatter-adds d (N, H) into the word, position and token-type gradient rows. The padding
/// token's row gets no gradient (`nn.Embedding(padding_idx=pad_token_id)`).
pub fn embedding_backward<F: Real>(
    d: &[F],
    layout: &ParamLayout,
    batch: &Batch,
    h: usize,
    pad_token_id: usize,
    grads: &mut [F],
) {
    let e = &layout.embeddings;
    for s in &batch.seqs {
        for r in 0..s.len {
            let row = s.start + r;
            let (t, ty) = (batch.input_ids[row] as usize, batch.token_type_ids[row] as usize);
            let dr = &d[row * h..(row + 1) * h];
            for j in 0..h {
                if t != pad_token_id {
                    grads[e.word.start + t * h + j] += dr[j];
                }
                grads[e.position.start + r * h + j] += dr[j];
                grads[e.token_type.start + ty * h + j] += dr[j];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The whole model
// ---------------------------------------------------------------------------------------------

/// What one encoder layer keeps for its backward pass.
#[derive(Default)]
pub struct LayerCache<F> {
    /// The last layer's [CLS] rows (B, H), which its queries come from; `None` in the other
    /// layers, whose queries come from every row of their input.
    pub xq: Option<Vec<F>>,
    /// Q, K and V of one product, laid out as `qkv_at`.
    pub qkv: Vec<F>,
    pub qkv_at: QkvLayout,
    pub attn: Vec<AttnSeq>,
    pub probs: Vec<F>,
    pub ctx: Vec<F>,
    pub ln1_xhat: Vec<F>,
    pub ln1_rstd: Vec<F>,
    pub h1: Vec<F>,
    pub inter_pre: Vec<F>,
    pub inter_act: Vec<F>,
    pub ln2_xhat: Vec<F>,
    pub ln2_rstd: Vec<F>,
    /// Query rows (Nq).
    pub rows: usize,
}

/// Everything the forward pass produced; the caches are empty in eval mode.
pub struct Forward<F> {
    /// (B, C)
    pub logits: Vec<F>,
    /// Cross-entropy per sequence (B).
    pub losses: Vec<F>,
    emb_xhat: Vec<F>,
    emb_rstd: Vec<F>,
    /// Each layer's input (N, H), then the last layer's output ([CLS] rows only).
    layer_inputs: Vec<Vec<F>>,
    layers: Vec<LayerCache<F>>,
    /// pooled = tanh(cls·Wpᵀ + bp) (B, H), and after dropout.
    pooled: Vec<F>,
    pooled_dropped: Vec<F>,
    dropout: Option<Dropout>,
}

impl<F: Real> Forward<F> {
    pub fn mean_loss(&self) -> F {
        self.losses.iter().copied().sum::<F>() / F::of(self.losses.len().max(1) as f64)
    }
}

fn gather_rows<F: Real>(x: &[F], rows: impl Iterator<Item = usize>, h: usize) -> Vec<F> {
    let mut out = Vec::new();
    for r in rows {
        out.extend_from_slice(&x[r * h..(r + 1) * h]);
    }
    out
}

/// Runs the model on `batch`. With `dropout` (training) every activation the backward needs is
/// kept; without it (evaluation) they are dropped as soon as they are used.
pub fn forward<F: Real>(
    c: &BertConfig,
    layout: &ParamLayout,
    p: &[F],
    batch: &Batch,
    dropout: Option<Dropout>,
) -> Forward<F> {
    let (h, nl) = (c.hidden_size, c.num_labels);
    let n = batch.rows();
    let b = batch.seqs.len();
    let train = dropout.is_some();
    let dr = dropout.as_ref();

    // Embeddings → LayerNorm → dropout
    let mut emb = vec![F::zero(); n * h];
    embedding_forward(p, layout, batch, h, &mut emb);
    let e = &layout.embeddings;
    let (mut x, emb_xhat, emb_rstd) =
        layernorm_new(&emb, None, &p[e.ln_weight.clone()], &p[e.ln_bias.clone()], c.layer_norm_eps, h, train);
    apply_dropout(dr, |p| p.hidden, site_embeddings(), SiteRows::Tokens, h, &mut x);

    let mut layer_inputs = Vec::new();
    let mut layers = Vec::new();
    for (l, lp) in layout.layers.iter().enumerate() {
        let last = l + 1 == layout.layers.len();
        let (out, cache) = layer_forward(c, lp, p, batch, &x, last, dr, l);
        if train {
            layer_inputs.push(std::mem::replace(&mut x, out));
            layers.push(cache);
        } else {
            x = out;
        }
    }
    // After the last layer x holds the B [CLS] rows.
    let cls = x;

    // Pooler: tanh(dense(cls)) → dropout → classifier
    let mut pooled = linear_new(&cls, &p[layout.pooler_w.clone()], &p[layout.pooler_b.clone()], b, h, h);
    pooled.iter_mut().for_each(|v| *v = v.tanh());
    let mut pooled_dropped = pooled.clone();
    apply_dropout(
        dr,
        |p| p.classifier,
        site_pooled(layout.layers.len()),
        SiteRows::Sequences,
        h,
        &mut pooled_dropped,
    );
    let logits = linear_new(
        &pooled_dropped,
        &p[layout.classifier_w.clone()],
        &p[layout.classifier_b.clone()],
        b,
        h,
        nl,
    );
    let losses = cross_entropy(&logits, &batch.labels, nl);

    if train {
        layer_inputs.push(cls);
    }
    Forward {
        logits,
        losses,
        emb_xhat,
        emb_rstd,
        layer_inputs,
        layers,
        pooled: if train { pooled } else { Vec::new() },
        pooled_dropped: if train { pooled_dropped } else { Vec::new() },
        dropout,
    }
}

/// Cross-entropy of each row of `logits` (B, C) against `labels`; empty when there are no labels.
pub fn cross_entropy<F: Real>(logits: &[F], labels: &[usize], c: usize) -> Vec<F> {
    labels
        .iter()
        .zip(logits.chunks_exact(c))
        .map(|(&y, row)| {
            let max = row.iter().copied().fold(F::neg_infinity(), F::max);
            let lse = row.iter().map(|v| (*v - max).exp()).sum::<F>().ln() + max;
            lse - row[y]
        })
        .collect()
}

/// One encoder layer on x (N, H). Returns the output rows (N, H), or (B, H) [CLS] rows when
/// `last`, and the cache for its backward.
#[allow(clippy::too_many_arguments)]
fn layer_forward<F: Real>(
    c: &BertConfig,
    lp: &LayerParams,
    p: &[F],
    batch: &Batch,
    x: &[F],
    last: bool,
    dropout: Option<&Dropout>,
    l: usize,
) -> (Vec<F>, LayerCache<F>) {
    let (h, heads, inter) = (c.hidden_size, c.num_attention_heads, c.intermediate_size);
    let n = batch.rows();
    // The query rows: the last layer's [CLS] rows, gathered; every row (x itself) elsewhere.
    let gathered = last.then(|| gather_rows(x, batch.seqs.iter().map(|s| s.start), h));
    let xq = gathered.as_deref().unwrap_or(x);
    let nq = xq.len() / h;

    // Q, K and V as one product over the rows they share: every row's [q | k | v], or, where only
    // the [CLS] rows query, every row's [k | v] and then the queries.
    let (qw, qb) = (&lp.query_w, &lp.query_b);
    let (kv_parts, qkv_at) = if last {
        (&[(&lp.key_w, &lp.key_b), (&lp.value_w, &lp.value_b)][..], QkvLayout::keys_then_queries(n, nq, h))
    } else {
        (&[(qw, qb), (&lp.key_w, &lp.key_b), (&lp.value_w, &lp.value_b)][..], QkvLayout::side_by_side(n, h))
    };
    let mut qkv = Vec::with_capacity(qkv_at.buffer_len());
    let (w, b) = stacked(p, kv_parts);
    linear_append(&mut qkv, x, &w, &b, n, h, b.len());
    if last {
        linear_append(&mut qkv, xq, &p[qw.clone()], &p[qb.clone()], nq, h, h);
    }

    let train = dropout.is_some();
    let (attn, nprobs) = attention_layout(&batch.seqs, heads, last);
    // Evaluation keeps no probabilities: each (sequence, head) uses scratch space instead.
    let mut probs = vec![F::zero(); if train { nprobs } else { 0 }];
    let mut ctx = vec![F::zero(); nq * h];
    let attn_drop = dropout.map(|d| d.attention(l, last));
    let keep_probs = if train { Some(probs.as_mut_slice()) } else { None };
    attention_forward(Qkv::within(&qkv, qkv_at), &attn, heads, h, keep_probs, &mut ctx, attn_drop);

    // Attention output: dense → dropout → + residual → LayerNorm
    let mut y = linear_new(&ctx, &p[lp.attn_out_w.clone()], &p[lp.attn_out_b.clone()], nq, h, h);
    apply_dropout(dropout, |p| p.hidden, site_attn_out(l), layer_rows(last), h, &mut y);
    let (h1, ln1_xhat, ln1_rstd) = layernorm_new(
        &y,
        Some(xq),
        &p[lp.attn_ln_weight.clone()],
        &p[lp.attn_ln_bias.clone()],
        c.layer_norm_eps,
        h,
        train,
    );

    // FFN: dense → GELU → dense → dropout → + residual → LayerNorm
    let mut inter_pre = linear_new(&h1, &p[lp.inter_w.clone()], &p[lp.inter_b.clone()], nq, h, inter);
    let inter_act = if train {
        let mut act = vec![F::zero(); nq * inter];
        gelu_forward(&inter_pre, &mut act);
        act
    } else {
        // Evaluation needs no pre-activation: GELU in place.
        gelu_in_place(&mut inter_pre);
        std::mem::take(&mut inter_pre)
    };
    let mut z = linear_new(&inter_act, &p[lp.out_w.clone()], &p[lp.out_b.clone()], nq, inter, h);
    apply_dropout(dropout, |p| p.hidden, site_ffn_out(l), layer_rows(last), h, &mut z);
    let (out, ln2_xhat, ln2_rstd) = layernorm_new(
        &z,
        Some(&h1),
        &p[lp.out_ln_weight.clone()],
        &p[lp.out_ln_bias.clone()],
        c.layer_norm_eps,
        h,
        train,
    );

    let cache = if train {
        LayerCache {
            xq: gathered,
            qkv,
            qkv_at,
            attn,
            probs,
            ctx,
            ln1_xhat,
            ln1_rstd,
            h1,
            inter_pre,
            inter_act,
            ln2_xhat,
            ln2_rstd,
            rows: nq,
        }
    } else {
        LayerCache::default()
    };
    (out, cache)
}

/// Backward of the loss `Σ_b loss_b · loss_scale` (loss_scale = 1/batch size gives the batch mean,
/// as the Trainer's loss is). Accumulates into `grads` (same layout as `p`).
pub fn backward<F: Real>(
    c: &BertConfig,
    layout: &ParamLayout,
    p: &[F],
    batch: &Batch,
    fwd: &Forward<F>,
    loss_scale: F,
    grads: &mut [F],
) {
    assert!(!fwd.layers.is_empty(), "backward needs a training forward (with dropout settings)");
    let (h, nl) = (c.hidden_size, c.num_labels);
    let b = batch.seqs.len();
    let n = batch.rows();
    let dr = fwd.dropout.as_ref();

    // d loss / d logits = (softmax − onehot) · scale
    let mut dlogits = vec![F::zero(); b * nl];
    for ((row, d), &y) in fwd.logits.chunks_exact(nl).zip(dlogits.chunks_exact_mut(nl)).zip(&batch.labels) {
        let max = row.iter().copied().fold(F::neg_infinity(), F::max);
        let sum: F = row.iter().map(|v| (*v - max).exp()).sum();
        for j in 0..nl {
            d[j] = (row[j] - max).exp() / sum * loss_scale;
        }
        d[y] -= loss_scale;
    }

    // Classifier and pooler
    let mut dpooled = vec![F::zero(); b * h];
    let (cw, cb) = (&layout.classifier_w, &layout.classifier_b);
    linear_param_backward(
        &fwd.pooled_dropped,
        p,
        cw,
        cb,
        &dlogits,
        b,
        h,
        nl,
        Some((&mut dpooled, false)),
        grads,
    );
    apply_dropout(
        dr,
        |p| p.classifier,
        site_pooled(layout.layers.len()),
        SiteRows::Sequences,
        h,
        &mut dpooled,
    );
    dpooled.iter_mut().zip(&fwd.pooled).for_each(|(d, y)| *d *= F::one() - *y * *y);
    let cls = &fwd.layer_inputs[layout.layers.len()];
    let mut dx = vec![F::zero(); b * h];
    let (pw, pb) = (&layout.pooler_w, &layout.pooler_b);
    linear_param_backward(cls, p, pw, pb, &dpooled, b, h, h, Some((&mut dx, false)), grads);

    // Encoder layers, last to first; dx is the gradient of the current layer's output.
    for l in (0..layout.layers.len()).rev() {
        dx = layer_backward(
            c,
            &layout.layers[l],
            p,
            batch,
            &fwd.layer_inputs[l],
            &fwd.layers[l],
            &dx,
            dr,
            l,
            grads,
        );
    }

    // Embeddings: dropout → LayerNorm → scatter
    apply_dropout(dr, |p| p.hidden, site_embeddings(), SiteRows::Tokens, h, &mut dx);
    let e = &layout.embeddings;
    let mut demb = vec![F::zero(); n * h];
    {
        let (dg, dbeta) = two_ranges(grads, e.ln_weight.clone(), e.ln_bias.clone());
        layernorm_backward(
            &dx,
            &fwd.emb_xhat,
            &fwd.emb_rstd,
            &p[e.ln_weight.clone()],
            h,
            &mut demb,
            dg,
            dbeta,
        );
    }
    embedding_backward(&demb, layout, batch, h, c.pad_token_id, grads);
}

/// `linear_backward` for a layer whose weight and bias live at `w` and `b` in the parameter
/// buffer `p`, accumulating their gradients into the same ranges of `grads`.
#[allow(clippy::too_many_arguments)]
fn linear_param_backward<F: Real>(
    x: &[F],
    p: &[F],
    w: &Range<usize>,
    b: &Range<usize>,
    dy: &[F],
    n: usize,
    k: usize,
    m: usize,
    dx: Option<(&mut [F], bool)>,
    grads: &mut [F],
) {
    let (dw, db) = two_ranges(grads, w.clone(), b.clone());
    linear_backward(x, &p[w.clone()], dy, n, k, m, dx, dw, db);
}

/// Two disjoint mutable parameter ranges of one buffer.
fn two_ranges<F>(g: &mut [F], a: Range<usize>, b: Range<usize>) -> (&mut [F], &mut [F]) {
    assert!(a.end <= b.start, "parameter ranges must be ordered and disjoint");
    let (lo, hi) = g.split_at_mut(b.start);
    (&mut lo[a], &mut hi[..b.end - b.start])
}

/// Backward of one layer given dout, the gradient of its output rows; returns d(input) (N, H).
#[allow(clippy::too_many_arguments)]
fn layer_backward<F: Real>(
    c: &BertConfig,
    lp: &LayerParams,
    p: &[F],
    batch: &Batch,
    x: &[F],
    lc: &LayerCache<F>,
    dout: &[F],
    dropout: Option<&Dropout>,
    l: usize,
    grads: &mut [F],
) -> Vec<F> {
    let (h, heads, inter) = (c.hidden_size, c.num_attention_heads, c.intermediate_size);
    let n = batch.rows();
    let nq = lc.rows;
    let last = l + 1 == c.num_hidden_layers;

    // Output LayerNorm
    let mut dz = vec![F::zero(); nq * h];
    {
        let (dg, db) = two_ranges(grads, lp.out_ln_weight.clone(), lp.out_ln_bias.clone());
        layernorm_backward(
            dout,
            &lc.ln2_xhat,
            &lc.ln2_rstd,
            &p[lp.out_ln_weight.clone()],
            h,
            &mut dz,
            dg,
            db,
        );
    }
    // dz flows to the residual (h1) and, through dropout, into the FFN output dense.
    let mut dh1 = dz.clone();
    apply_dropout(dropout, |p| p.hidden, site_ffn_out(l), layer_rows(last), h, &mut dz);
    let mut dact = vec![F::zero(); nq * inter];
    let dact_out = Some((&mut dact[..], false));
    linear_param_backward(&lc.inter_act, p, &lp.out_w, &lp.out_b, &dz, nq, inter, h, dact_out, grads);
    let mut dpre = vec![F::zero(); nq * inter];
    gelu_backward(&lc.inter_pre, &dact, &mut dpre);
    linear_param_backward(
        &lc.h1,
        p,
        &lp.inter_w,
        &lp.inter_b,
        &dpre,
        nq,
        h,
        inter,
        Some((&mut dh1, true)),
        grads,
    );

    // Attention output LayerNorm
    let mut dy = vec![F::zero(); nq * h];
    {
        let (dg, db) = two_ranges(grads, lp.attn_ln_weight.clone(), lp.attn_ln_bias.clone());
        layernorm_backward(
            &dh1,
            &lc.ln1_xhat,
            &lc.ln1_rstd,
            &p[lp.attn_ln_weight.clone()],
            h,
            &mut dy,
            dg,
            db,
        );
    }
    let mut dxq = dy.clone();
    apply_dropout(dropout, |p| p.hidden, site_attn_out(l), layer_rows(last), h, &mut dy);
    let mut dctx = vec![F::zero(); nq * h];
    linear_param_backward(
        &lc.ctx,
        p,
        &lp.attn_out_w,
        &lp.attn_out_b,
        &dy,
        nq,
        h,
        h,
        Some((&mut dctx, false)),
        grads,
    );

    // Attention, its Q, K and V gradients laid out as the forward's product
    let mut dqkv = vec![F::zero(); lc.qkv_at.buffer_len()];
    let attn_drop = dropout.map(|d| d.attention(l, last));
    let (qkv, qkv_grads) = (Qkv::within(&lc.qkv, lc.qkv_at), QkvGrads::within(&mut dqkv, lc.qkv_at));
    attention_backward(qkv, &lc.probs, &dctx, &lc.attn, heads, h, qkv_grads, attn_drop);

    // Q, K and V projections, as the forward stacked them; dxq holds the residual's gradient.
    let (qw, qb) = (&lp.query_w, &lp.query_b);
    let (kv, v) = ((&lp.key_w, &lp.key_b), (&lp.value_w, &lp.value_b));
    if last {
        let (dkv, dq) = dqkv.split_at(2 * n * h);
        let xq = lc.xq.as_deref().expect("the last layer keeps its [CLS] rows");
        linear_param_backward(xq, p, qw, qb, dq, nq, h, h, Some((&mut dxq, true)), grads);
        let mut dx = vec![F::zero(); n * h];
        stacked_param_backward(x, p, &[kv, v], dkv, n, h, Some((&mut dx, false)), grads);
        for (i, s) in batch.seqs.iter().enumerate() {
            let (dst, src) = (&mut dx[s.start * h..(s.start + 1) * h], &dxq[i * h..(i + 1) * h]);
            dst.iter_mut().zip(src).for_each(|(a, b)| *a += *b);
        }
        dx
    } else {
        stacked_param_backward(x, p, &[(qw, qb), kv, v], &dqkv, n, h, Some((&mut dxq, true)), grads);
        dxq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Evaluation's leaner forward (no kept activations, GELU in place, scratch attention
    /// probabilities) computes exactly what the training forward does with dropout off.
    #[test]
    fn evaluation_gives_the_training_forwards_logits_bit_for_bit() {
        let config = BertConfig::from_json_str(
            r#"{"vocab_size": 50, "hidden_size": 24, "num_hidden_layers": 3, "num_attention_heads": 3,
                "intermediate_size": 40, "max_position_embeddings": 64}"#,
        )
        .unwrap();
        let model = crate::model::BertModel::random_init(&config, 5);
        let seqs: Vec<Vec<u32>> =
            [9usize, 17, 4].iter().map(|&n| (0..n).map(|j| (j * 7 % 50) as u32).collect()).collect();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let batch = Batch::packed(&refs, &[1, 0, 1]);
        let off = DropoutProbs { hidden: 0.0, attention: 0.0, classifier: 0.0 };
        let rng = DropoutRng { seed: 1, stream: 0, step: 0 };
        let train = forward(&config, &model.layout, &model.params, &batch, Some(Dropout::new(off, rng)));
        let eval = forward::<f32>(&config, &model.layout, &model.params, &batch, None);
        assert_eq!(eval.logits, train.logits);
        assert_eq!(eval.losses, train.losses);
        assert!(train.layers.iter().all(|l| !l.probs.is_empty() && !l.ln1_xhat.is_empty()));
        assert!(eval.layers.is_empty());
    }

    /// The attention backward overwrites every row of dk and dv: the valid keys' rows with their
    /// gradients, padding rows with zeros, whatever the buffers held.
    #[test]
    fn attention_backward_overwrites_every_key_row() {
        let (heads, h) = (2, 8);
        let seqs = [Sequence { start: 0, len: 5, valid: 3 }, Sequence { start: 5, len: 4, valid: 4 }];
        let (attn, nprobs) = attention_layout(&seqs, heads, false);
        let n = 9;
        let fill = |seed: usize| -> Vec<f64> {
            (0..n * h).map(|i| ((i * 37 + seed * 11) % 17) as f64 / 8.0 - 1.0).collect()
        };
        let (q, k, v, dctx) = (fill(1), fill(2), fill(3), fill(4));
        let mut probs = vec![0.0; nprobs];
        let mut ctx = vec![0.0; n * h];
        let qkv = Qkv::separate(&q, &k, &v, h);
        attention_forward(qkv, &attn, heads, h, Some(&mut probs), &mut ctx, None);
        let run = |start: f64| {
            let (mut dq, mut dk, mut dv) = (vec![start; n * h], vec![start; n * h], vec![start; n * h]);
            let grads = QkvGrads::separate(&mut dq, &mut dk, &mut dv, h);
            attention_backward(qkv, &probs, &dctx, &attn, heads, h, grads, None);
            (dq, dk, dv)
        };
        let (zeroed, dirty) = (run(0.0), run(f64::NAN));
        assert_eq!(zeroed, dirty);
        // Rows 3 and 4 are the first sequence's padding: no query attends them.
        assert!(zeroed.1[3 * h..5 * h].iter().chain(&zeroed.2[3 * h..5 * h]).all(|g| *g == 0.0));
        assert!(zeroed.2[..3 * h].iter().any(|g| *g != 0.0));
    }

    /// A micro-batch run in chunks (`split_by_attention`) gives the whole batch's losses and
    /// gradients up to summation order, with the same dropout masks.
    #[test]
    fn attention_chunks_train_like_the_whole_batch() {
        let config = BertConfig::from_json_str(
            r#"{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 32, "max_position_embeddings": 64, "hidden_dropout_prob": 0.2,
                "attention_probs_dropout_prob": 0.3}"#,
        )
        .unwrap();
        let model = crate::model::BertModel::random_init(&config, 3);
        let lens = [7usize, 12, 3, 9, 12, 5];
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| ((i * 7 + j * 3) % 50) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let labels: Vec<usize> = (0..lens.len()).map(|i| i % 2).collect();
        let batch = Batch::packed(&refs, &labels);
        let rng = DropoutRng { seed: 9, stream: 1, step: 4 };
        let dropout = Dropout::from_config(&config, rng);
        let run = |runs: Vec<(Batch, DropoutOffset)>| {
            let mut grads = vec![0.0f32; model.layout.len];
            let mut losses = Vec::new();
            for (run, offset) in runs {
                let d = Dropout { offset, ..dropout };
                let fwd = forward(&config, &model.layout, &model.params, &run, Some(d));
                backward(&config, &model.layout, &model.params, &run, &fwd, 0.25, &mut grads);
                losses.extend(fwd.losses);
            }
            (losses, grads)
        };
        // 2 heads × 2 layers × len²: a budget of 800 splits the six sequences into three runs.
        let runs = batch.split_by_attention(2, 2, 800);
        let seqs_per_run: Vec<usize> = runs.iter().map(|(b, _)| b.seqs.len()).collect();
        assert_eq!(seqs_per_run, [2, 2, 2]);
        assert_eq!(
            runs[1].1,
            DropoutOffset { rows: 19, seqs: 2, attention: 2 * (49 + 144), cls_attention: 2 * 19 }
        );
        let (whole_losses, whole_grads) = run(batch.split_by_attention(2, 2, usize::MAX));
        let (chunked_losses, chunked_grads) = run(runs);
        assert_eq!(chunked_losses, whole_losses);
        let max_grad = whole_grads.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        for (a, b) in chunked_grads.iter().zip(&whole_grads) {
            assert!((a - b).abs() <= 1e-5 * max_grad, "{a} vs {b}");
        }
        // Without the offsets the chunks would redraw the first chunk's masks.
        let mut no_offsets = batch.split_by_attention(2, 2, 800);
        no_offsets.iter_mut().for_each(|(_, o)| *o = DropoutOffset::default());
        assert_ne!(run(no_offsets).0, whole_losses);
    }
}
