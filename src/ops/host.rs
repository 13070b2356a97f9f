//! [`ArrayOps`] on host buffers: every op is the GPU kernel's contract carried out with the CPU
//! reference's functions, trial by trial. It runs the trial-array model (`trial_array::model`)
//! without a GPU, so its orchestration (offsets, strides, padding, accumulation) is tested against
//! `cpu::bert`.

use std::ops::Range;

use anyhow::{Result, ensure};

use super::{
    ArrayOps, BiasShape, EmbeddingTables, LayerNormShape, Operand, Out, SlotOptimizerStep, Tick, TickLayout,
};
use crate::cpu::adamw::{AdamState, clip_grad_norm};
use crate::cpu::bert::{self, AttnSeq};
use crate::cpu::real::{Mat, gemm};
use crate::model::layout::ParamLayout;

/// The host "device": buffers are `Vec<f32>`.
pub struct HostOps {
    pub pad_token_id: usize,
    pub embedding: EmbeddingTables,
    /// `[P]`: where weight decay applies.
    decay_mask: Vec<bool>,
}

impl HostOps {
    /// The host ops for models of `config`'s architecture.
    pub fn new(config: &crate::config::BertConfig) -> Self {
        let layout = ParamLayout::new(config);
        HostOps {
            pad_token_id: config.pad_token_id,
            embedding: EmbeddingTables::from_layout(&layout, config.hidden_size),
            decay_mask: layout.decay_mask(),
        }
    }
}

fn view(data: &[f32], operand: Operand, trial: usize) -> Mat<'_, f32> {
    let d = &data[operand.offset + trial * operand.stride..];
    if operand.transposed {
        Mat::rm_t(d, operand.rows, operand.cols)
    } else {
        Mat::rm(d, operand.rows, operand.cols)
    }
}

fn attn_dropout(layout: &TickLayout, trial: usize, site: u32) -> Option<bert::AttentionDropout<'_>> {
    layout.dropout.filter(|d| d.attention > 0.0).map(|d| bert::AttentionDropout {
        rng: &layout.rngs[trial],
        p: d.attention,
        site,
        first: 0,
    })
}

fn blocks(layout: &TickLayout, trial: usize, cls: bool) -> &[AttnSeq] {
    if cls { &layout.attn_cls[trial] } else { &layout.attn_full[trial] }
}

/// Every trial's [CLS] rows: (offset in the `[T, rows, H]` activation, offset in the
/// `[T, seqs, H]` one of the [CLS] rows alone).
fn cls_offsets(layout: &TickLayout, h: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    (0..layout.trials).flat_map(move |t| {
        (0..layout.seqs).map(move |i| {
            let row = layout.cls_rows[t * layout.seqs + i] as usize;
            ((t * layout.rows + row) * h, (t * layout.seqs + i) * h)
        })
    })
}

fn prob_count(seqs: &[AttnSeq], heads: usize) -> usize {
    seqs.iter().map(|s| heads * s.q_len * s.k_len).sum()
}

/// Trial `t`'s query rows (`[seqs, H]` with `cls`, else `[rows, H]`) and key rows `[rows, H]`.
fn attention_rows(layout: &TickLayout, cls: bool, h: usize, t: usize) -> (Range<usize>, Range<usize>) {
    let q_rows = if cls { layout.seqs } else { layout.rows };
    (t * q_rows * h..(t + 1) * q_rows * h, t * layout.rows * h..(t + 1) * layout.rows * h)
}

/// `cpu::bert::attention_forward` over trial `t`'s rows of q, k and v, its context written to
/// `ctx` (the trial's query rows); returns the attention probabilities.
fn trial_attention(
    layout: &TickLayout,
    cls: bool,
    h: usize,
    t: usize,
    (q, k, v): (&[f32], &[f32], &[f32]),
    ctx: &mut [f32],
    dropout: Option<bert::AttentionDropout<'_>>,
) -> Vec<f32> {
    let seqs = blocks(layout, t, cls);
    let (queries, keys) = attention_rows(layout, cls, h, t);
    let mut probs = vec![0.0f32; prob_count(seqs, layout.heads)];
    let (q, k, v) = (&q[queries], &k[keys.clone()], &v[keys]);
    let qkv = bert::Qkv::separate(q, k, v, h);
    bert::attention_forward(qkv, seqs, layout.heads, h, Some(&mut probs), ctx, dropout);
    probs
}

impl ArrayOps for HostOps {
    type Buf = Vec<f32>;
    type DeviceTick = ();

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn write(&self, dst: &mut Vec<f32>, offset: usize, data: &[f32]) -> Result<()> {
        ensure!(offset + data.len() <= dst.len(), "write past the end of a buffer");
        dst[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn read(&self, src: &Vec<f32>, offset: usize, n: usize) -> Result<Vec<f32>> {
        ensure!(offset + n <= src.len(), "read past the end of a buffer");
        Ok(src[offset..offset + n].to_vec())
    }
    fn copy(
        &self,
        src: &Vec<f32>,
        src_offset: usize,
        dst: &mut Vec<f32>,
        dst_offset: usize,
        n: usize,
    ) -> Result<()> {
        dst[dst_offset..dst_offset + n].copy_from_slice(&src[src_offset..src_offset + n]);
        Ok(())
    }
    fn fill_zero(&self, buf: &mut Vec<f32>, offset: usize, n: usize) -> Result<()> {
        buf[offset..offset + n].fill(0.0);
        Ok(())
    }
    fn tick<'a>(&self, layout: &'a TickLayout) -> Result<Tick<'a, ()>> {
        Ok(Tick { layout, device: () })
    }

    fn gemm(
        &self,
        trials: usize,
        a: (&Vec<f32>, Operand),
        b: (&Vec<f32>, Operand),
        beta: f32,
        c: (&mut Vec<f32>, Out),
    ) -> Result<()> {
        let ((a_buf, a_operand), (b_buf, b_operand), (c_buf, c_out)) = (a, b, c);
        let (m, k) = a_operand.shape();
        let (k2, n) = b_operand.shape();
        ensure!(k == k2, "gemm: {m}×{k} times {k2}×{n}");
        for t in 0..trials {
            let offset = c_out.offset + t * c_out.stride;
            gemm(
                1.0,
                view(a_buf, a_operand, t),
                view(b_buf, b_operand, t),
                beta,
                &mut c_buf[offset..offset + m * n],
                n,
            );
        }
        Ok(())
    }

    fn embedding_forward(
        &self,
        tick: &Tick<'_, ()>,
        params: &Vec<f32>,
        param_stride: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (layout, tables) = (tick.layout, self.embedding);
        let h = tables.hidden;
        for t in 0..layout.trials {
            let p = &params[t * param_stride..];
            for r in 0..layout.rows {
                let i = t * layout.rows + r;
                let (id, pos, ty) =
                    (layout.ids[i] as usize, layout.positions[i] as usize, layout.types[i] as usize);
                for j in 0..h {
                    out[i * h + j] = p[tables.word + id * h + j]
                        + p[tables.position + pos * h + j]
                        + p[tables.token_type + ty * h + j];
                }
            }
        }
        Ok(())
    }

    fn embedding_backward(
        &self,
        tick: &Tick<'_, ()>,
        d: &Vec<f32>,
        grads: &mut Vec<f32>,
        param_stride: usize,
    ) -> Result<()> {
        let (layout, tables) = (tick.layout, self.embedding);
        let h = tables.hidden;
        for t in 0..layout.trials {
            let g = &mut grads[t * param_stride..(t + 1) * param_stride];
            for r in 0..layout.rows {
                let i = t * layout.rows + r;
                let (id, pos, ty) =
                    (layout.ids[i] as usize, layout.positions[i] as usize, layout.types[i] as usize);
                for j in 0..h {
                    let value = d[i * h + j];
                    if id != self.pad_token_id {
                        g[tables.word + id * h + j] += value;
                    }
                    g[tables.position + pos * h + j] += value;
                    g[tables.token_type + ty * h + j] += value;
                }
            }
        }
        Ok(())
    }

    fn layernorm_forward(
        &self,
        shape: LayerNormShape,
        eps: f64,
        x: &Vec<f32>,
        residual: Option<&Vec<f32>>,
        params: &Vec<f32>,
        y: &mut Vec<f32>,
        xhat: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        let (n, h) = (shape.rows, shape.hidden);
        for t in 0..shape.trials {
            let acts = t * shape.act_stride..t * shape.act_stride + n * h;
            let p = &params[t * shape.param_stride..];
            bert::layernorm_forward(
                &x[acts.clone()],
                residual.map(|r| &r[acts.clone()]),
                &p[shape.gamma..shape.gamma + h],
                &p[shape.beta..shape.beta + h],
                eps,
                h,
                &mut y[acts.clone()],
                Some((&mut xhat[acts], &mut rstd[t * shape.row_stride..t * shape.row_stride + n])),
            );
        }
        Ok(())
    }

    fn layernorm_backward(
        &self,
        shape: LayerNormShape,
        dy: &Vec<f32>,
        xhat: &Vec<f32>,
        rstd: &Vec<f32>,
        params: &Vec<f32>,
        dx: &mut Vec<f32>,
        grads: &mut Vec<f32>,
    ) -> Result<()> {
        let (n, h, param_stride) = (shape.rows, shape.hidden, shape.param_stride);
        ensure!(shape.gamma + h <= shape.beta, "γ must come before β");
        for t in 0..shape.trials {
            let acts = t * shape.act_stride..t * shape.act_stride + n * h;
            let g = &mut grads[t * param_stride..(t + 1) * param_stride];
            let (below_beta, from_beta) = g.split_at_mut(shape.beta);
            bert::layernorm_backward(
                &dy[acts.clone()],
                &xhat[acts.clone()],
                &rstd[t * shape.row_stride..t * shape.row_stride + n],
                &params[t * param_stride + shape.gamma..t * param_stride + shape.gamma + h],
                h,
                &mut dx[acts],
                &mut below_beta[shape.gamma..shape.gamma + h],
                &mut from_beta[..h],
            );
        }
        Ok(())
    }

    fn bias_add(&self, shape: BiasShape, y: &mut Vec<f32>, params: &Vec<f32>) -> Result<()> {
        let (n, w) = (shape.rows, shape.width);
        for t in 0..shape.trials {
            let bias = &params[t * shape.param_stride + shape.bias..][..w];
            for row in y[t * shape.act_stride..][..n * w].chunks_exact_mut(w) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += *b);
            }
        }
        Ok(())
    }

    fn bias_backward(&self, shape: BiasShape, dy: &Vec<f32>, grads: &mut Vec<f32>) -> Result<()> {
        let (n, w) = (shape.rows, shape.width);
        for t in 0..shape.trials {
            let g = &mut grads[t * shape.param_stride + shape.bias..][..w];
            for row in dy[t * shape.act_stride..][..n * w].chunks_exact(w) {
                g.iter_mut().zip(row).for_each(|(g, d)| *g += *d);
            }
        }
        Ok(())
    }

    fn bias_gelu_forward(
        &self,
        shape: BiasShape,
        pre: &mut Vec<f32>,
        act: &mut Vec<f32>,
        params: &Vec<f32>,
    ) -> Result<()> {
        self.bias_add(shape, pre, params)?;
        let per_trial = shape.rows * shape.width;
        for t in 0..shape.trials {
            let acts = t * shape.act_stride..t * shape.act_stride + per_trial;
            bert::gelu_forward(&pre[acts.clone()], &mut act[acts]);
        }
        Ok(())
    }

    fn gelu_backward(
        &self,
        shape: BiasShape,
        pre: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
        grads: &mut Vec<f32>,
    ) -> Result<()> {
        let per_trial = shape.rows * shape.width;
        for t in 0..shape.trials {
            let acts = t * shape.act_stride..t * shape.act_stride + per_trial;
            bert::gelu_backward(&pre[acts.clone()], &dy[acts.clone()], &mut dx[acts]);
        }
        self.bias_backward(shape, dx, grads)
    }

    fn dropout(&self, tick: &Tick<'_, ()>, x: &mut Vec<f32>, n: usize, site: u32, p: f64) -> Result<()> {
        for t in 0..tick.layout.trials {
            tick.layout.rngs[t].apply(p, site, 0, &mut x[t * n..(t + 1) * n]);
        }
        Ok(())
    }

    fn attention_forward(
        &self,
        tick: &Tick<'_, ()>,
        cls: bool,
        h: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        ctx: &mut Vec<f32>,
        _lse: &mut Vec<f32>,
        site: u32,
    ) -> Result<()> {
        let layout = tick.layout;
        for t in 0..layout.trials {
            let (queries, _) = attention_rows(layout, cls, h, t);
            let dropout = attn_dropout(layout, t, site);
            trial_attention(layout, cls, h, t, (q, k, v), &mut ctx[queries], dropout);
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        tick: &Tick<'_, ()>,
        cls: bool,
        h: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        _ctx: &Vec<f32>,
        _lse: &Vec<f32>,
        dctx: &Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        site: u32,
    ) -> Result<()> {
        let layout = tick.layout;
        for t in 0..layout.trials {
            let (queries, keys) = attention_rows(layout, cls, h, t);
            // Recompute the probabilities, as the GPU does from lse.
            let mut scratch = vec![0.0f32; queries.len()];
            let probs = trial_attention(layout, cls, h, t, (q, k, v), &mut scratch, None);
            let qkv = bert::Qkv::separate(&q[queries.clone()], &k[keys.clone()], &v[keys.clone()], h);
            let grads =
                bert::QkvGrads::separate(&mut dq[queries.clone()], &mut dk[keys.clone()], &mut dv[keys], h);
            let (seqs, dctx) = (blocks(layout, t, cls), &dctx[queries]);
            bert::attention_backward(
                qkv,
                &probs,
                dctx,
                seqs,
                layout.heads,
                h,
                grads,
                attn_dropout(layout, t, site),
            );
        }
        Ok(())
    }

    fn gather_cls(&self, tick: &Tick<'_, ()>, h: usize, x: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        for (full, selected) in cls_offsets(tick.layout, h) {
            out[selected..selected + h].copy_from_slice(&x[full..full + h]);
        }
        Ok(())
    }

    fn scatter_add_cls(&self, tick: &Tick<'_, ()>, h: usize, d: &Vec<f32>, dx: &mut Vec<f32>) -> Result<()> {
        for (full, selected) in cls_offsets(tick.layout, h) {
            dx[full..full + h].iter_mut().zip(&d[selected..selected + h]).for_each(|(dx, d)| *dx += *d);
        }
        Ok(())
    }

    fn tanh_forward(&self, x: &mut Vec<f32>, n: usize) -> Result<()> {
        x[..n].iter_mut().for_each(|v| *v = v.tanh());
        Ok(())
    }
    fn tanh_backward(&self, y: &Vec<f32>, d: &mut Vec<f32>, n: usize) -> Result<()> {
        d[..n].iter_mut().zip(&y[..n]).for_each(|(d, y)| *d *= 1.0 - *y * *y);
        Ok(())
    }
    fn add(&self, y: &mut Vec<f32>, x: &Vec<f32>, n: usize) -> Result<()> {
        y[..n].iter_mut().zip(&x[..n]).for_each(|(y, x)| *y += *x);
        Ok(())
    }

    fn cross_entropy(
        &self,
        tick: &Tick<'_, ()>,
        classes: usize,
        logits: &Vec<f32>,
        losses: &mut Vec<f32>,
        dlogits: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let (layout, c) = (tick.layout, classes);
        let b = layout.seqs;
        for t in 0..layout.trials {
            let rows = &logits[t * b * c..(t + 1) * b * c];
            let row_losses = bert::cross_entropy(rows, &layout.labels[t * b..(t + 1) * b], c);
            losses[t * b..(t + 1) * b].copy_from_slice(&row_losses);
        }
        if let Some(d) = dlogits {
            for t in 0..layout.trials {
                let scale = layout.loss_scale[t];
                for i in 0..b {
                    let offset = (t * b + i) * c;
                    let (row, d_row) = (&logits[offset..offset + c], &mut d[offset..offset + c]);
                    if i >= layout.real_seqs[t] {
                        d_row.fill(0.0);
                        continue;
                    }
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = row.iter().map(|v| (*v - max).exp()).sum();
                    for j in 0..c {
                        d_row[j] = (row[j] - max).exp() / sum * scale;
                    }
                    d_row[layout.labels[t * b + i]] -= scale;
                }
            }
        }
        Ok(())
    }

    fn optimizer_step(
        &self,
        param_len: usize,
        steps: &[(SlotOptimizerStep, u64)],
        params: &mut Vec<f32>,
        grads: &mut Vec<f32>,
        moment1: &mut Vec<f32>,
        moment2: &mut Vec<f32>,
    ) -> Result<Vec<f64>> {
        let mut norms = Vec::with_capacity(steps.len());
        for (step, update) in steps {
            let slot = step.slot * param_len..(step.slot + 1) * param_len;
            let g = &mut grads[slot.clone()];
            let norm = clip_grad_norm(g, step.max_grad_norm);
            if norm.is_finite() {
                let mut state = AdamState {
                    m: moment1[slot.clone()].to_vec(),
                    v: moment2[slot.clone()].to_vec(),
                    step: update - 1,
                };
                step.adamw.step(&mut params[slot.clone()], g, &self.decay_mask, &mut state, step.lr);
                moment1[slot.clone()].copy_from_slice(&state.m);
                moment2[slot.clone()].copy_from_slice(&state.v);
            }
            g.fill(0.0);
            norms.push(norm);
        }
        Ok(norms)
    }
}
