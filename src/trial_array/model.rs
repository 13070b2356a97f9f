//! The BERT classifier for T trials at once, written in the device operations of `ops.rs`: the
//! same computation as `cpu::bert::{forward, backward}`, op for op, over `[T, …]` buffers. Reading
//! it next to `cpu/bert.rs` shows the correspondence line by line; `ops_cpu::CpuOps` runs it on the
//! host, where the tests compare it with `cpu::bert`.
//!
//! Activations are allocated per call (simple and correct; reusing them across ticks is a speed
//! item for the GPU backend).

use anyhow::{Result, ensure};

use super::ops::{ArrayOps, Operand, Out, RowShape, SlotStep, TickLayout};
use crate::config::BertConfig;
use crate::cpu::bert::{site_attn_out, site_attn_probs, site_embeddings, site_ffn_out, site_pooled};
use crate::model::layout::{LayerParams, ParamLayout};

/// What one encoder layer keeps for its backward pass (`cpu::bert::LayerCache`).
struct LayerCache<B> {
    /// The [CLS] rows of the layer input in the last layer (otherwise the input itself is used).
    xq: Option<B>,
    q: B,
    k: B,
    v: B,
    ctx: B,
    lse: B,
    h1: B,
    ln1_xhat: B,
    ln1_rstd: B,
    pre: B,
    act: B,
    ln2_xhat: B,
    ln2_rstd: B,
}

/// What the forward pass produced.
pub struct ForwardState<B> {
    /// `[T, seqs, C]`
    pub logits: B,
    emb_xhat: B,
    emb_rstd: B,
    /// Each layer's input `[T, rows, H]`, then the [CLS] rows of the last layer's output.
    inputs: Vec<B>,
    layers: Vec<LayerCache<B>>,
    pooled: Option<B>,
    pooled_dropped: Option<B>,
}

/// The parameters, gradients and Adam moments of T slots, and the model over them.
pub struct ArrayModel<O: ArrayOps> {
    pub ops: O,
    pub config: BertConfig,
    pub layout: ParamLayout,
    pub trials: usize,
    /// `[T, P]`
    pub params: O::Buf,
    pub grads: O::Buf,
    pub m: O::Buf,
    pub v: O::Buf,
    /// `[P]`: 1 where weight decay applies.
    pub decay: O::Buf,
}

impl<O: ArrayOps> ArrayModel<O> {
    pub fn new(ops: O, config: &BertConfig, trials: usize) -> Result<Self> {
        let layout = ParamLayout::new(config);
        let p = layout.len;
        let decay: Vec<f32> = layout.decay_mask().iter().map(|d| if *d { 1.0 } else { 0.0 }).collect();
        Ok(ArrayModel {
            params: ops.zeros(trials * p)?,
            grads: ops.zeros(trials * p)?,
            m: ops.zeros(trials * p)?,
            v: ops.zeros(trials * p)?,
            decay: ops.upload(&decay)?,
            ops,
            config: config.clone(),
            layout,
            trials,
        })
    }

    pub fn param_len(&self) -> usize {
        self.layout.len
    }

    /// y `[T, n, out]` = x `[T, n, in]` · Wᵀ + b for the weight/bias at `w`/`b` of every trial.
    fn linear(&self, x: &O::Buf, n: usize, inp: usize, out: usize, w: usize, b: usize) -> Result<O::Buf> {
        let (ops, t, p) = (&self.ops, self.trials, self.layout.len);
        let mut y = ops.zeros(t * n * out)?;
        ops.gemm(
            t,
            (x, Operand::act(n, inp)),
            (&self.params, Operand::weight_t(w, out, inp, p)),
            0.0,
            (&mut y, Out { offset: 0, stride: n * out }),
        )?;
        ops.bias_add(t, RowShape { rows: n, width: out, param: b, param2: 0 }, &mut y, &self.params, p)?;
        Ok(y)
    }

    /// Backward of `linear`: grads[w] += dyᵀ·x, grads[b] += Σ rows dy, and dx = dy·W (added to
    /// `dx` when `accumulate`).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &mut self,
        x: &O::Buf,
        dy: &O::Buf,
        n: usize,
        inp: usize,
        out: usize,
        w: usize,
        b: Option<usize>,
        dx: Option<(&mut O::Buf, bool)>,
    ) -> Result<()> {
        let (t, p) = (self.trials, self.layout.len);
        let ops = &self.ops;
        ops.gemm(
            t,
            (dy, Operand::act(n, out).t()),
            (x, Operand::act(n, inp)),
            1.0,
            (&mut self.grads, Out { offset: w, stride: p }),
        )?;
        if let Some(b) = b {
            ops.bias_backward(
                t,
                RowShape { rows: n, width: out, param: b, param2: 0 },
                dy,
                &mut self.grads,
                p,
            )?;
        }
        if let Some((dx, accumulate)) = dx {
            let weight = Operand { rows: out, cols: inp, offset: w, stride: p, transposed: false };
            ops.gemm(
                t,
                (dy, Operand::act(n, out)),
                (&self.params, weight),
                if accumulate { 1.0 } else { 0.0 },
                (dx, Out { offset: 0, stride: n * inp }),
            )?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm(
        &self,
        x: &O::Buf,
        residual: Option<&O::Buf>,
        rows: usize,
        gamma: usize,
        beta: usize,
    ) -> Result<(O::Buf, O::Buf, O::Buf)> {
        let (ops, t, h) = (&self.ops, self.trials, self.config.hidden_size);
        let mut y = ops.zeros(t * rows * h)?;
        let mut xhat = ops.zeros(t * rows * h)?;
        let mut rstd = ops.zeros(t * rows)?;
        let sh = RowShape { rows, width: h, param: gamma, param2: beta };
        let eps = self.config.layer_norm_eps;
        ops.layernorm_forward(
            t,
            sh,
            eps,
            x,
            residual,
            &self.params,
            self.layout.len,
            &mut y,
            &mut xhat,
            &mut rstd,
        )?;
        Ok((y, xhat, rstd))
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &mut self,
        dy: &O::Buf,
        xhat: &O::Buf,
        rstd: &O::Buf,
        rows: usize,
        gamma: usize,
        beta: usize,
    ) -> Result<O::Buf> {
        let (t, h, p) = (self.trials, self.config.hidden_size, self.layout.len);
        let mut dx = self.ops.zeros(t * rows * h)?;
        let sh = RowShape { rows, width: h, param: gamma, param2: beta };
        self.ops.layernorm_backward(t, sh, dy, xhat, rstd, &self.params, p, &mut dx, &mut self.grads)?;
        Ok(dx)
    }

    fn dropout(
        &self,
        tick: &O::Tick,
        lt: &TickLayout,
        x: &mut O::Buf,
        n: usize,
        site: u32,
        p: f64,
    ) -> Result<()> {
        if p > 0.0 { self.ops.dropout(tick, lt, x, n, site, p) } else { Ok(()) }
    }

    /// The forward pass of every slot on the tick `lt` (training when `lt.dropout` is set, which
    /// also keeps what the backward needs).
    pub fn forward(&self, tick: &O::Tick, lt: &TickLayout) -> Result<ForwardState<O::Buf>> {
        ensure!(lt.trials == self.trials, "the tick has {} slots, the array {}", lt.trials, self.trials);
        let c = &self.config;
        let (ops, t, p) = (&self.ops, self.trials, self.layout.len);
        let (h, n, b, nl) = (c.hidden_size, lt.rows, lt.seqs, c.num_labels);
        let drop = lt.dropout;
        let hidden_p = drop.map_or(0.0, |d| d.hidden);

        let mut emb = ops.zeros(t * n * h)?;
        ops.embedding_forward(tick, lt, &self.params, p, &mut emb)?;
        let e = &self.layout.embeddings;
        let (mut x, emb_xhat, emb_rstd) =
            self.layernorm(&emb, None, n, e.ln_weight.start, e.ln_bias.start)?;
        self.dropout(tick, lt, &mut x, n * h, site_embeddings(), hidden_p)?;

        let mut inputs = Vec::new();
        let mut layers = Vec::new();
        for (l, lp) in self.layout.layers.iter().enumerate() {
            let last = l + 1 == self.layout.layers.len();
            let (out, cache) = self.layer_forward(tick, lt, lp, &x, last, l)?;
            inputs.push(std::mem::replace(&mut x, out));
            layers.push(cache);
        }
        let cls = x;

        let mut pooled =
            self.linear(&cls, b, h, h, self.layout.pooler_w.start, self.layout.pooler_b.start)?;
        ops.tanh_forward(&mut pooled, t * b * h)?;
        let mut pooled_dropped = ops.zeros(t * b * h)?;
        ops.copy(&pooled, 0, &mut pooled_dropped, 0, t * b * h)?;
        let classifier_p = drop.map_or(0.0, |d| d.classifier);
        self.dropout(
            tick,
            lt,
            &mut pooled_dropped,
            b * h,
            site_pooled(self.layout.layers.len()),
            classifier_p,
        )?;
        let (cw, cb) = (self.layout.classifier_w.start, self.layout.classifier_b.start);
        let logits = self.linear(&pooled_dropped, b, h, nl, cw, cb)?;
        inputs.push(cls);
        Ok(ForwardState {
            logits,
            emb_xhat,
            emb_rstd,
            inputs,
            layers,
            pooled: Some(pooled),
            pooled_dropped: Some(pooled_dropped),
        })
    }

    fn layer_forward(
        &self,
        tick: &O::Tick,
        lt: &TickLayout,
        lp: &LayerParams,
        x: &O::Buf,
        last: bool,
        l: usize,
    ) -> Result<(O::Buf, LayerCache<O::Buf>)> {
        let c = &self.config;
        let (ops, t) = (&self.ops, self.trials);
        let (h, inter, heads, n) = (c.hidden_size, c.intermediate_size, c.num_attention_heads, lt.rows);
        let hidden_p = lt.dropout.map_or(0.0, |d| d.hidden);
        let nq = if last { lt.seqs } else { n };
        let xq = if last {
            let mut g = ops.zeros(t * nq * h)?;
            ops.gather_cls(tick, lt, h, x, &mut g)?;
            Some(g)
        } else {
            None
        };
        let xq_ref = xq.as_ref().unwrap_or(x);
        let q = self.linear(xq_ref, nq, h, h, lp.query_w.start, lp.query_b.start)?;
        let k = self.linear(x, n, h, h, lp.key_w.start, lp.key_b.start)?;
        let v = self.linear(x, n, h, h, lp.value_w.start, lp.value_b.start)?;
        // Rows of no attention block keep these zeros.
        let mut ctx = ops.zeros(t * nq * h)?;
        let mut lse = ops.zeros(t * nq * heads)?;
        ops.attention_forward(tick, lt, last, h, &q, &k, &v, &mut ctx, &mut lse, site_attn_probs(l))?;

        let mut y = self.linear(&ctx, nq, h, h, lp.attn_out_w.start, lp.attn_out_b.start)?;
        self.dropout(tick, lt, &mut y, nq * h, site_attn_out(l), hidden_p)?;
        let (h1, ln1_xhat, ln1_rstd) =
            self.layernorm(&y, Some(xq_ref), nq, lp.attn_ln_weight.start, lp.attn_ln_bias.start)?;

        let mut pre = ops.zeros(t * nq * inter)?;
        ops.gemm(
            t,
            (&h1, Operand::act(nq, h)),
            (&self.params, Operand::weight_t(lp.inter_w.start, inter, h, self.layout.len)),
            0.0,
            (&mut pre, Out { offset: 0, stride: nq * inter }),
        )?;
        let mut act = ops.zeros(t * nq * inter)?;
        let sh = RowShape { rows: nq, width: inter, param: lp.inter_b.start, param2: 0 };
        ops.bias_gelu_forward(t, sh, &mut pre, &mut act, &self.params, self.layout.len)?;
        let mut z = self.linear(&act, nq, inter, h, lp.out_w.start, lp.out_b.start)?;
        self.dropout(tick, lt, &mut z, nq * h, site_ffn_out(l), hidden_p)?;
        let (out, ln2_xhat, ln2_rstd) =
            self.layernorm(&z, Some(&h1), nq, lp.out_ln_weight.start, lp.out_ln_bias.start)?;
        let cache =
            LayerCache { xq, q, k, v, ctx, lse, h1, ln1_xhat, ln1_rstd, pre, act, ln2_xhat, ln2_rstd };
        Ok((out, cache))
    }

    /// Per-slot loss sums (over the slot's real sequences) of a forward pass, and, when `dlogits`
    /// is wanted, the scaled and masked loss gradient.
    pub fn losses(
        &self,
        tick: &O::Tick,
        lt: &TickLayout,
        fwd: &ForwardState<O::Buf>,
        want_grad: bool,
    ) -> Result<(Vec<f64>, Option<O::Buf>)> {
        let (ops, t, b) = (&self.ops, self.trials, lt.seqs);
        let nl = self.config.num_labels;
        let mut losses = ops.zeros(t * b)?;
        let mut dlogits = if want_grad { Some(ops.zeros(t * b * nl)?) } else { None };
        ops.cross_entropy(tick, lt, nl, &fwd.logits, &mut losses, dlogits.as_mut())?;
        let host = ops.read(&losses, 0, t * b)?;
        let sums =
            (0..t).map(|i| host[i * b..i * b + lt.real_seqs[i]].iter().map(|v| *v as f64).sum()).collect();
        Ok((sums, dlogits))
    }

    /// Forward and backward of one micro-batch per slot, accumulating each slot's gradient;
    /// returns each slot's loss sum (idle slots: 0).
    pub fn forward_backward(&mut self, tick: &O::Tick, lt: &TickLayout) -> Result<Vec<f64>> {
        ensure!(lt.dropout.is_some(), "training needs the dropout settings (zero probabilities for none)");
        let fwd = self.forward(tick, lt)?;
        let (sums, dlogits) = self.losses(tick, lt, &fwd, true)?;
        let dlogits = dlogits.expect("asked for the gradient");
        self.backward(tick, lt, &fwd, &dlogits)?;
        Ok(sums)
    }

    fn backward(
        &mut self,
        tick: &O::Tick,
        lt: &TickLayout,
        fwd: &ForwardState<O::Buf>,
        dlogits: &O::Buf,
    ) -> Result<()> {
        let c = self.config.clone();
        let (t, h, nl, b, n) = (self.trials, c.hidden_size, c.num_labels, lt.seqs, lt.rows);
        let drop = lt.dropout.expect("training tick");
        let layers = self.layout.layers.len();
        let pooled = fwd.pooled.as_ref().expect("training forward");
        let pooled_dropped = fwd.pooled_dropped.as_ref().expect("training forward");

        let (cw, cb) = (self.layout.classifier_w.start, self.layout.classifier_b.start);
        let mut dpooled = self.ops.zeros(t * b * h)?;
        self.linear_backward(pooled_dropped, dlogits, b, h, nl, cw, Some(cb), Some((&mut dpooled, false)))?;
        self.dropout(tick, lt, &mut dpooled, b * h, site_pooled(layers), drop.classifier)?;
        self.ops.tanh_backward(pooled, &mut dpooled, t * b * h)?;
        let (pw, pb) = (self.layout.pooler_w.start, self.layout.pooler_b.start);
        let mut dx = self.ops.zeros(t * b * h)?;
        self.linear_backward(&fwd.inputs[layers], &dpooled, b, h, h, pw, Some(pb), Some((&mut dx, false)))?;

        for l in (0..layers).rev() {
            dx = self.layer_backward(tick, lt, l, &fwd.inputs[l], &fwd.layers[l], &dx)?;
        }

        self.dropout(tick, lt, &mut dx, n * h, site_embeddings(), drop.hidden)?;
        let e = self.layout.embeddings.clone();
        let demb = self.layernorm_backward(
            &dx,
            &fwd.emb_xhat,
            &fwd.emb_rstd,
            n,
            e.ln_weight.start,
            e.ln_bias.start,
        )?;
        let p = self.layout.len;
        self.ops.embedding_backward(tick, lt, &demb, &mut self.grads, p)
    }

    fn layer_backward(
        &mut self,
        tick: &O::Tick,
        lt: &TickLayout,
        l: usize,
        x: &O::Buf,
        lc: &LayerCache<O::Buf>,
        dout: &O::Buf,
    ) -> Result<O::Buf> {
        let c = self.config.clone();
        let lp = self.layout.layers[l].clone();
        let (t, h, inter, n) = (self.trials, c.hidden_size, c.intermediate_size, lt.rows);
        let last = l + 1 == c.num_hidden_layers;
        let nq = if last { lt.seqs } else { n };
        let hidden_p = lt.dropout.map_or(0.0, |d| d.hidden);
        let xq = lc.xq.as_ref().unwrap_or(x);

        let mut dz = self.layernorm_backward(
            dout,
            &lc.ln2_xhat,
            &lc.ln2_rstd,
            nq,
            lp.out_ln_weight.start,
            lp.out_ln_bias.start,
        )?;
        let mut dh1 = self.ops.zeros(t * nq * h)?;
        self.ops.copy(&dz, 0, &mut dh1, 0, t * nq * h)?;
        self.dropout(tick, lt, &mut dz, nq * h, site_ffn_out(l), hidden_p)?;
        let mut dact = self.ops.zeros(t * nq * inter)?;
        self.linear_backward(
            &lc.act,
            &dz,
            nq,
            inter,
            h,
            lp.out_w.start,
            Some(lp.out_b.start),
            Some((&mut dact, false)),
        )?;
        let mut dpre = self.ops.zeros(t * nq * inter)?;
        let sh = RowShape { rows: nq, width: inter, param: lp.inter_b.start, param2: 0 };
        let p = self.layout.len;
        self.ops.gelu_backward(t, sh, &lc.pre, &dact, &mut dpre, &mut self.grads, p)?;
        self.linear_backward(&lc.h1, &dpre, nq, h, inter, lp.inter_w.start, None, Some((&mut dh1, true)))?;

        let mut dy = self.layernorm_backward(
            &dh1,
            &lc.ln1_xhat,
            &lc.ln1_rstd,
            nq,
            lp.attn_ln_weight.start,
            lp.attn_ln_bias.start,
        )?;
        let mut dxq = self.ops.zeros(t * nq * h)?;
        self.ops.copy(&dy, 0, &mut dxq, 0, t * nq * h)?;
        self.dropout(tick, lt, &mut dy, nq * h, site_attn_out(l), hidden_p)?;
        let mut dctx = self.ops.zeros(t * nq * h)?;
        self.linear_backward(
            &lc.ctx,
            &dy,
            nq,
            h,
            h,
            lp.attn_out_w.start,
            Some(lp.attn_out_b.start),
            Some((&mut dctx, false)),
        )?;

        // Query rows of no attention block keep these zeros.
        let mut dq = self.ops.zeros(t * nq * h)?;
        let mut dk = self.ops.zeros(t * n * h)?;
        let mut dv = self.ops.zeros(t * n * h)?;
        self.ops.attention_backward(
            tick,
            lt,
            last,
            h,
            &lc.q,
            &lc.k,
            &lc.v,
            &lc.ctx,
            &lc.lse,
            &dctx,
            &mut dq,
            &mut dk,
            &mut dv,
            site_attn_probs(l),
        )?;

        self.linear_backward(
            xq,
            &dq,
            nq,
            h,
            h,
            lp.query_w.start,
            Some(lp.query_b.start),
            Some((&mut dxq, true)),
        )?;
        let mut dx = self.ops.zeros(t * n * h)?;
        self.linear_backward(x, &dk, n, h, h, lp.key_w.start, Some(lp.key_b.start), Some((&mut dx, false)))?;
        self.linear_backward(
            x,
            &dv,
            n,
            h,
            h,
            lp.value_w.start,
            Some(lp.value_b.start),
            Some((&mut dx, true)),
        )?;
        if last {
            self.ops.scatter_add_cls(tick, lt, h, &dxq, &mut dx)?;
        } else {
            self.ops.add(&mut dx, &dxq, t * n * h)?;
        }
        Ok(dx)
    }

    /// Logits `[T, seqs, C]` (host) and per-slot loss sums of an evaluation tick (no dropout).
    pub fn eval_logits(&self, tick: &O::Tick, lt: &TickLayout) -> Result<(Vec<f32>, Vec<f64>)> {
        ensure!(lt.dropout.is_none(), "evaluation runs without dropout");
        let fwd = self.forward(tick, lt)?;
        let (sums, _) = self.losses(tick, lt, &fwd, false)?;
        let logits = self.ops.read(&fwd.logits, 0, self.trials * lt.seqs * self.config.num_labels)?;
        Ok((logits, sums))
    }

    /// Clip + AdamW for the listed slots (zeroing their gradients); returns their norms.
    pub fn optimizer_step(&mut self, steps: &[SlotStep]) -> Result<Vec<f64>> {
        let p = self.layout.len;
        self.ops.optimizer_step(
            p,
            steps,
            &self.decay,
            &mut self.params,
            &mut self.grads,
            &mut self.m,
            &mut self.v,
        )
    }
}
