//! [`ArrayOps`] on host buffers: every op is the GPU kernel's contract carried out with the CPU
//! reference's functions, trial by trial. It runs the trial-array model (`model.rs`) without a GPU,
//! so its orchestration (offsets, strides, padding, accumulation) is tested against `cpu::bert`.

use anyhow::{Result, ensure};

use super::ops::{ArrayOps, Operand, Out, RowShape, SlotStep, TickLayout};
use crate::cpu::adamw::{AdamState, clip_grad_norm};
use crate::cpu::bert::{self, AttnSeq};
use crate::cpu::real::{Mat, gemm};

/// The host "device": buffers are `Vec<f32>`.
pub struct CpuOps {
    pub pad_token_id: usize,
    pub embedding: EmbeddingOffsets,
}

/// Where the embedding tables sit in one trial's parameters.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingOffsets {
    pub word: usize,
    pub position: usize,
    pub token_type: usize,
    pub hidden: usize,
}

impl CpuOps {
    /// The host ops for models of `config`'s architecture.
    pub fn new(config: &crate::config::BertConfig) -> Self {
        let layout = crate::model::layout::ParamLayout::new(config);
        CpuOps {
            pad_token_id: config.pad_token_id,
            embedding: EmbeddingOffsets::of(&layout, config.hidden_size),
        }
    }
}

impl EmbeddingOffsets {
    pub fn of(layout: &crate::model::layout::ParamLayout, hidden: usize) -> Self {
        let e = &layout.embeddings;
        EmbeddingOffsets {
            word: e.word.start,
            position: e.position.start,
            token_type: e.token_type.start,
            hidden,
        }
    }
}

fn view(data: &[f32], op: Operand, trial: usize) -> Mat<'_, f32> {
    let d = &data[op.offset + trial * op.stride..];
    if op.transposed { Mat::rm_t(d, op.rows, op.cols) } else { Mat::rm(d, op.rows, op.cols) }
}

fn attn_dropout(lt: &TickLayout, trial: usize, site: u32) -> Option<bert::AttentionDropout<'_>> {
    lt.dropout.filter(|d| d.attention > 0.0).map(|d| bert::AttentionDropout {
        rng: &lt.rngs[trial],
        p: d.attention,
        site,
        first: 0,
    })
}

fn blocks(lt: &TickLayout, trial: usize, cls: bool) -> &[AttnSeq] {
    if cls { &lt.attn_cls[trial] } else { &lt.attn_full[trial] }
}

fn prob_count(seqs: &[AttnSeq], heads: usize) -> usize {
    seqs.iter().map(|s| heads * s.q_len * s.k_len).sum()
}

impl ArrayOps for CpuOps {
    type Buf = Vec<f32>;
    type Tick = ();

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
    fn copy(&self, src: &Vec<f32>, so: usize, dst: &mut Vec<f32>, d_o: usize, n: usize) -> Result<()> {
        dst[d_o..d_o + n].copy_from_slice(&src[so..so + n]);
        Ok(())
    }
    fn fill_zero(&self, buf: &mut Vec<f32>, offset: usize, n: usize) -> Result<()> {
        buf[offset..offset + n].fill(0.0);
        Ok(())
    }
    fn tick(&self, _layout: &TickLayout) -> Result<()> {
        Ok(())
    }

    fn gemm(
        &self,
        trials: usize,
        a: (&Vec<f32>, Operand),
        b: (&Vec<f32>, Operand),
        beta: f32,
        c: (&mut Vec<f32>, Out),
    ) -> Result<()> {
        let ((ab, ao), (bb, bo), (cb, co)) = (a, b, c);
        let (m, k) = ao.shape();
        let (k2, n) = bo.shape();
        ensure!(k == k2, "gemm: {m}×{k} times {k2}×{n}");
        for t in 0..trials {
            let off = co.offset + t * co.stride;
            gemm(1.0, view(ab, ao, t), view(bb, bo, t), beta, &mut cb[off..off + m * n], n);
        }
        Ok(())
    }

    fn embedding_forward(
        &self,
        _: &(),
        lt: &TickLayout,
        params: &Vec<f32>,
        ps: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let e = self.embedding;
        let h = e.hidden;
        for t in 0..lt.trials {
            let p = &params[t * ps..];
            for r in 0..lt.rows {
                let i = t * lt.rows + r;
                let (id, pos, ty) = (lt.ids[i] as usize, lt.positions[i] as usize, lt.types[i] as usize);
                for j in 0..h {
                    out[i * h + j] =
                        p[e.word + id * h + j] + p[e.position + pos * h + j] + p[e.token_type + ty * h + j];
                }
            }
        }
        Ok(())
    }

    fn embedding_backward(
        &self,
        _: &(),
        lt: &TickLayout,
        d: &Vec<f32>,
        grads: &mut Vec<f32>,
        ps: usize,
    ) -> Result<()> {
        let e = self.embedding;
        let h = e.hidden;
        for t in 0..lt.trials {
            let g = &mut grads[t * ps..(t + 1) * ps];
            for r in 0..lt.rows {
                let i = t * lt.rows + r;
                let (id, pos, ty) = (lt.ids[i] as usize, lt.positions[i] as usize, lt.types[i] as usize);
                for j in 0..h {
                    let v = d[i * h + j];
                    if id != self.pad_token_id {
                        g[e.word + id * h + j] += v;
                    }
                    g[e.position + pos * h + j] += v;
                    g[e.token_type + ty * h + j] += v;
                }
            }
        }
        Ok(())
    }

    fn layernorm_forward(
        &self,
        trials: usize,
        sh: RowShape,
        eps: f64,
        x: &Vec<f32>,
        residual: Option<&Vec<f32>>,
        params: &Vec<f32>,
        ps: usize,
        y: &mut Vec<f32>,
        xhat: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        let (n, h) = (sh.rows, sh.width);
        for t in 0..trials {
            let a = t * n * h..(t + 1) * n * h;
            let mut sum = x[a.clone()].to_vec();
            if let Some(r) = residual {
                sum.iter_mut().zip(&r[a.clone()]).for_each(|(s, r)| *s += *r);
            }
            let p = &params[t * ps..];
            bert::layernorm_forward(
                &sum,
                &p[sh.param..sh.param + h],
                &p[sh.param2..sh.param2 + h],
                eps,
                h,
                &mut y[a.clone()],
                &mut xhat[a],
                &mut rstd[t * n..(t + 1) * n],
            );
        }
        Ok(())
    }

    fn layernorm_backward(
        &self,
        trials: usize,
        sh: RowShape,
        dy: &Vec<f32>,
        xhat: &Vec<f32>,
        rstd: &Vec<f32>,
        params: &Vec<f32>,
        ps: usize,
        dx: &mut Vec<f32>,
        grads: &mut Vec<f32>,
    ) -> Result<()> {
        let (n, h) = (sh.rows, sh.width);
        ensure!(sh.param + h <= sh.param2, "γ must come before β");
        for t in 0..trials {
            let a = t * n * h..(t + 1) * n * h;
            let g = &mut grads[t * ps..(t + 1) * ps];
            let (lo, hi) = g.split_at_mut(sh.param2);
            bert::layernorm_backward(
                &dy[a.clone()],
                &xhat[a.clone()],
                &rstd[t * n..(t + 1) * n],
                &params[t * ps + sh.param..t * ps + sh.param + h],
                h,
                &mut dx[a],
                &mut lo[sh.param..sh.param + h],
                &mut hi[..h],
            );
        }
        Ok(())
    }

    fn bias_add(
        &self,
        trials: usize,
        sh: RowShape,
        y: &mut Vec<f32>,
        params: &Vec<f32>,
        ps: usize,
    ) -> Result<()> {
        let (n, w) = (sh.rows, sh.width);
        for t in 0..trials {
            let b = &params[t * ps + sh.param..t * ps + sh.param + w];
            for row in y[t * n * w..(t + 1) * n * w].chunks_exact_mut(w) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += *b);
            }
        }
        Ok(())
    }

    fn bias_backward(
        &self,
        trials: usize,
        sh: RowShape,
        dy: &Vec<f32>,
        grads: &mut Vec<f32>,
        ps: usize,
    ) -> Result<()> {
        let (n, w) = (sh.rows, sh.width);
        for t in 0..trials {
            let g = &mut grads[t * ps + sh.param..t * ps + sh.param + w];
            for row in dy[t * n * w..(t + 1) * n * w].chunks_exact(w) {
                g.iter_mut().zip(row).for_each(|(g, d)| *g += *d);
            }
        }
        Ok(())
    }

    fn bias_gelu_forward(
        &self,
        trials: usize,
        sh: RowShape,
        pre: &mut Vec<f32>,
        act: &mut Vec<f32>,
        params: &Vec<f32>,
        ps: usize,
    ) -> Result<()> {
        self.bias_add(trials, sh, pre, params, ps)?;
        let n = trials * sh.rows * sh.width;
        bert::gelu_forward(&pre[..n], &mut act[..n]);
        Ok(())
    }

    fn gelu_backward(
        &self,
        trials: usize,
        sh: RowShape,
        pre: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
        grads: &mut Vec<f32>,
        ps: usize,
    ) -> Result<()> {
        let n = trials * sh.rows * sh.width;
        bert::gelu_backward(&pre[..n], &dy[..n], &mut dx[..n]);
        self.bias_backward(trials, sh, dx, grads, ps)
    }

    fn dropout(&self, _: &(), lt: &TickLayout, x: &mut Vec<f32>, n: usize, site: u32, p: f64) -> Result<()> {
        for t in 0..lt.trials {
            lt.rngs[t].apply(p, site, 0, &mut x[t * n..(t + 1) * n]);
        }
        Ok(())
    }

    fn attention_forward(
        &self,
        _: &(),
        lt: &TickLayout,
        cls: bool,
        h: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        ctx: &mut Vec<f32>,
        _lse: &mut Vec<f32>,
        site: u32,
    ) -> Result<()> {
        let nq = if cls { lt.seqs } else { lt.rows };
        let n = lt.rows;
        for t in 0..lt.trials {
            let seqs = blocks(lt, t, cls);
            let mut probs = vec![0.0f32; prob_count(seqs, lt.heads)];
            bert::attention_forward(
                &q[t * nq * h..(t + 1) * nq * h],
                &k[t * n * h..(t + 1) * n * h],
                &v[t * n * h..(t + 1) * n * h],
                seqs,
                lt.heads,
                h,
                &mut probs,
                &mut ctx[t * nq * h..(t + 1) * nq * h],
                attn_dropout(lt, t, site),
            );
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        _: &(),
        lt: &TickLayout,
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
        let nq = if cls { lt.seqs } else { lt.rows };
        let n = lt.rows;
        for t in 0..lt.trials {
            let seqs = blocks(lt, t, cls);
            let (qa, ka) = (t * nq * h..(t + 1) * nq * h, t * n * h..(t + 1) * n * h);
            // Recompute the probabilities, as the GPU does from lse.
            let mut probs = vec![0.0f32; prob_count(seqs, lt.heads)];
            let mut scratch = vec![0.0f32; nq * h];
            bert::attention_forward(
                &q[qa.clone()],
                &k[ka.clone()],
                &v[ka.clone()],
                seqs,
                lt.heads,
                h,
                &mut probs,
                &mut scratch,
                None,
            );
            bert::attention_backward(
                &q[qa.clone()],
                &k[ka.clone()],
                &v[ka.clone()],
                &probs,
                &dctx[qa.clone()],
                seqs,
                lt.heads,
                h,
                &mut dq[qa],
                &mut dk[ka.clone()],
                &mut dv[ka],
                attn_dropout(lt, t, site),
            );
        }
        Ok(())
    }

    fn gather_cls(&self, _: &(), lt: &TickLayout, h: usize, x: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        for t in 0..lt.trials {
            for i in 0..lt.seqs {
                let r = lt.cls_rows[t * lt.seqs + i] as usize;
                let src = (t * lt.rows + r) * h;
                let dst = (t * lt.seqs + i) * h;
                out[dst..dst + h].copy_from_slice(&x[src..src + h]);
            }
        }
        Ok(())
    }

    fn scatter_add_cls(
        &self,
        _: &(),
        lt: &TickLayout,
        h: usize,
        d: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        for t in 0..lt.trials {
            for i in 0..lt.seqs {
                let r = lt.cls_rows[t * lt.seqs + i] as usize;
                let dst = (t * lt.rows + r) * h;
                let src = (t * lt.seqs + i) * h;
                for j in 0..h {
                    dx[dst + j] += d[src + j];
                }
            }
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
        _: &(),
        lt: &TickLayout,
        c: usize,
        logits: &Vec<f32>,
        losses: &mut Vec<f32>,
        dlogits: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let b = lt.seqs;
        for t in 0..lt.trials {
            let rows = &logits[t * b * c..(t + 1) * b * c];
            let l = bert::cross_entropy(rows, &lt.labels[t * b..(t + 1) * b], c);
            losses[t * b..(t + 1) * b].copy_from_slice(&l);
        }
        if let Some(d) = dlogits {
            for t in 0..lt.trials {
                let scale = lt.loss_scale[t];
                for i in 0..b {
                    let o = (t * b + i) * c;
                    let (row, dr) = (&logits[o..o + c], &mut d[o..o + c]);
                    if i >= lt.real_seqs[t] {
                        dr.fill(0.0);
                        continue;
                    }
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = row.iter().map(|v| (*v - max).exp()).sum();
                    for j in 0..c {
                        dr[j] = (row[j] - max).exp() / sum * scale;
                    }
                    dr[lt.labels[t * b + i]] -= scale;
                }
            }
        }
        Ok(())
    }

    fn optimizer_step(
        &self,
        p: usize,
        steps: &[SlotStep],
        decay: &Vec<f32>,
        params: &mut Vec<f32>,
        grads: &mut Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<Vec<f64>> {
        let decay: Vec<bool> = decay.iter().map(|d| *d != 0.0).collect();
        let mut norms = Vec::with_capacity(steps.len());
        for s in steps {
            let r = s.slot * p..(s.slot + 1) * p;
            let g = &mut grads[r.clone()];
            let norm = clip_grad_norm(g, s.max_grad_norm);
            if norm.is_finite() {
                let mut state =
                    AdamState { m: m[r.clone()].to_vec(), v: v[r.clone()].to_vec(), step: s.step - 1 };
                s.adamw.step(&mut params[r.clone()], g, &decay, &mut state, s.lr);
                m[r.clone()].copy_from_slice(&state.m);
                v[r.clone()].copy_from_slice(&state.v);
            }
            g.fill(0.0);
            norms.push(norm);
        }
        Ok(norms)
    }
}
