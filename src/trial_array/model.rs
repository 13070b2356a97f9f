//! The BERT classifier for T trials at once, written in the device operations of `crate::ops`:
//! the same computation as `cpu::bert::{forward, backward}`, op for op, over `[T, …]` buffers.
//! Reading it next to `cpu/bert.rs` shows the correspondence line by line; `ops::host::HostOps` runs
//! it on the host, where the tests compare it with `cpu::bert`.
//!
//! Activations are allocated per call (simple and correct; reusing them across ticks is a speed
//! item for the GPU backend).

use anyhow::{Result, ensure};

use crate::config::BertConfig;
use crate::cpu::bert::{site_attn_out, site_attn_probs, site_embeddings, site_ffn_out, site_pooled};
use crate::model::layout::{LayerParams, ParamLayout};
use crate::ops::{ArrayOps, BiasShape, LayerNormShape, Operand, Out, SlotOptimizerStep, Tick};

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

/// The parameters, gradients and Adam moments of T slots, their update counts, and the model
/// over them.
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
    /// `[T]` AdamW updates each slot has had (its bias correction); `reset_slot` clears one.
    pub updates: Vec<u64>,
}

impl<O: ArrayOps> ArrayModel<O> {
    pub fn new(ops: O, config: &BertConfig, trials: usize) -> Result<Self> {
        let layout = ParamLayout::new(config);
        let p = layout.len;
        Ok(ArrayModel {
            params: ops.zeros(trials * p)?,
            grads: ops.zeros(trials * p)?,
            m: ops.zeros(trials * p)?,
            v: ops.zeros(trials * p)?,
            updates: vec![0; trials],
            ops,
            config: config.clone(),
            layout,
            trials,
        })
    }

    pub fn param_len(&self) -> usize {
        self.layout.len
    }

    /// A dense `[T, rows, width]` activation and its bias at `bias`.
    fn bias_shape(&self, rows: usize, width: usize, bias: usize) -> BiasShape {
        BiasShape::dense(self.trials, rows, width, self.layout.len, bias)
    }

    /// A dense `[T, rows, H]` LayerNorm with γ and β at `gamma` and `beta`.
    fn layernorm_shape(&self, rows: usize, gamma: usize, beta: usize) -> LayerNormShape {
        LayerNormShape::dense(self.trials, rows, self.config.hidden_size, self.layout.len, gamma, beta)
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
        ops.bias_add(self.bias_shape(n, out, b), &mut y, &self.params)?;
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
            ops.bias_backward(self.bias_shape(n, out, b), dy, &mut self.grads)?;
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
        let shape = self.layernorm_shape(rows, gamma, beta);
        let eps = self.config.layer_norm_eps;
        ops.layernorm_forward(shape, eps, x, residual, &self.params, &mut y, &mut xhat, &mut rstd)?;
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
        let (t, h) = (self.trials, self.config.hidden_size);
        let mut dx = self.ops.zeros(t * rows * h)?;
        let shape = self.layernorm_shape(rows, gamma, beta);
        self.ops.layernorm_backward(shape, dy, xhat, rstd, &self.params, &mut dx, &mut self.grads)?;
        Ok(dx)
    }

    fn dropout(
        &self,
        tick: &Tick<'_, O::DeviceTick>,
        x: &mut O::Buf,
        n: usize,
        site: u32,
        p: f64,
    ) -> Result<()> {
        if p > 0.0 { self.ops.dropout(tick, x, n, site, p) } else { Ok(()) }
    }

    /// The forward pass of every slot on `tick` (training when its layout has dropout settings,
    /// which also keeps what the backward needs).
    pub fn forward(&self, tick: &Tick<'_, O::DeviceTick>) -> Result<ForwardState<O::Buf>> {
        let layout = tick.layout;
        ensure!(
            layout.trials == self.trials,
            "the tick has {} slots, the array {}",
            layout.trials,
            self.trials
        );
        let c = &self.config;
        let (ops, t, p) = (&self.ops, self.trials, self.layout.len);
        let (h, n, b, classes) = (c.hidden_size, layout.rows, layout.seqs, c.num_labels);
        let drop = layout.dropout;
        let hidden_p = drop.map_or(0.0, |d| d.hidden);

        let mut emb = ops.zeros(t * n * h)?;
        ops.embedding_forward(tick, &self.params, p, &mut emb)?;
        let e = &self.layout.embeddings;
        let (mut x, emb_xhat, emb_rstd) =
            self.layernorm(&emb, None, n, e.ln_weight.start, e.ln_bias.start)?;
        self.dropout(tick, &mut x, n * h, site_embeddings(), hidden_p)?;

        let mut inputs = Vec::new();
        let mut layers = Vec::new();
        for (l, layer) in self.layout.layers.iter().enumerate() {
            let last = l + 1 == self.layout.layers.len();
            let (out, cache) = self.layer_forward(tick, layer, &x, last, l)?;
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
        self.dropout(tick, &mut pooled_dropped, b * h, site_pooled(self.layout.layers.len()), classifier_p)?;
        let (cw, cb) = (self.layout.classifier_w.start, self.layout.classifier_b.start);
        let logits = self.linear(&pooled_dropped, b, h, classes, cw, cb)?;
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
        tick: &Tick<'_, O::DeviceTick>,
        layer: &LayerParams,
        x: &O::Buf,
        last: bool,
        l: usize,
    ) -> Result<(O::Buf, LayerCache<O::Buf>)> {
        let c = &self.config;
        let (ops, t) = (&self.ops, self.trials);
        let layout = tick.layout;
        let (h, inter, heads, n) = (c.hidden_size, c.intermediate_size, c.num_attention_heads, layout.rows);
        let hidden_p = layout.dropout.map_or(0.0, |d| d.hidden);
        let q_rows = if last { layout.seqs } else { n };
        let xq = if last {
            let mut g = ops.zeros(t * q_rows * h)?;
            ops.gather_cls(tick, h, x, &mut g)?;
            Some(g)
        } else {
            None
        };
        let xq_ref = xq.as_ref().unwrap_or(x);
        let q = self.linear(xq_ref, q_rows, h, h, layer.query_w.start, layer.query_b.start)?;
        let k = self.linear(x, n, h, h, layer.key_w.start, layer.key_b.start)?;
        let v = self.linear(x, n, h, h, layer.value_w.start, layer.value_b.start)?;
        // Rows of no attention block keep these zeros.
        let mut ctx = ops.zeros(t * q_rows * h)?;
        let mut lse = ops.zeros(t * q_rows * heads)?;
        ops.attention_forward(tick, last, h, &q, &k, &v, &mut ctx, &mut lse, site_attn_probs(l))?;

        let mut y = self.linear(&ctx, q_rows, h, h, layer.attn_out_w.start, layer.attn_out_b.start)?;
        self.dropout(tick, &mut y, q_rows * h, site_attn_out(l), hidden_p)?;
        let (h1, ln1_xhat, ln1_rstd) =
            self.layernorm(&y, Some(xq_ref), q_rows, layer.attn_ln_weight.start, layer.attn_ln_bias.start)?;

        let mut pre = ops.zeros(t * q_rows * inter)?;
        ops.gemm(
            t,
            (&h1, Operand::act(q_rows, h)),
            (&self.params, Operand::weight_t(layer.inter_w.start, inter, h, self.layout.len)),
            0.0,
            (&mut pre, Out { offset: 0, stride: q_rows * inter }),
        )?;
        let mut act = ops.zeros(t * q_rows * inter)?;
        ops.bias_gelu_forward(
            self.bias_shape(q_rows, inter, layer.inter_b.start),
            &mut pre,
            &mut act,
            &self.params,
        )?;
        let mut z = self.linear(&act, q_rows, inter, h, layer.out_w.start, layer.out_b.start)?;
        self.dropout(tick, &mut z, q_rows * h, site_ffn_out(l), hidden_p)?;
        let (out, ln2_xhat, ln2_rstd) =
            self.layernorm(&z, Some(&h1), q_rows, layer.out_ln_weight.start, layer.out_ln_bias.start)?;
        let cache =
            LayerCache { xq, q, k, v, ctx, lse, h1, ln1_xhat, ln1_rstd, pre, act, ln2_xhat, ln2_rstd };
        Ok((out, cache))
    }

    /// Per-slot loss sums (over the slot's real sequences) of a forward pass, and, when `dlogits`
    /// is wanted, the scaled and masked loss gradient.
    pub fn losses(
        &self,
        tick: &Tick<'_, O::DeviceTick>,
        fwd: &ForwardState<O::Buf>,
        want_grad: bool,
    ) -> Result<(Vec<f64>, Option<O::Buf>)> {
        let (ops, t, b) = (&self.ops, self.trials, tick.layout.seqs);
        let classes = self.config.num_labels;
        let mut losses = ops.zeros(t * b)?;
        let mut dlogits = if want_grad { Some(ops.zeros(t * b * classes)?) } else { None };
        ops.cross_entropy(tick, classes, &fwd.logits, &mut losses, dlogits.as_mut())?;
        let host = ops.read(&losses, 0, t * b)?;
        let sums = (0..t)
            .map(|i| host[i * b..i * b + tick.layout.real_seqs[i]].iter().map(|v| *v as f64).sum())
            .collect();
        Ok((sums, dlogits))
    }

    /// Forward and backward of one micro-batch per slot, accumulating each slot's gradient;
    /// returns each slot's loss sum (idle slots: 0).
    pub fn forward_backward(&mut self, tick: &Tick<'_, O::DeviceTick>) -> Result<Vec<f64>> {
        ensure!(
            tick.layout.dropout.is_some(),
            "training needs the dropout settings (zero probabilities for none)"
        );
        let fwd = self.forward(tick)?;
        let (sums, dlogits) = self.losses(tick, &fwd, true)?;
        let dlogits = dlogits.expect("asked for the gradient");
        self.backward(tick, &fwd, &dlogits)?;
        Ok(sums)
    }

    fn backward(
        &mut self,
        tick: &Tick<'_, O::DeviceTick>,
        fwd: &ForwardState<O::Buf>,
        dlogits: &O::Buf,
    ) -> Result<()> {
        let c = self.config.clone();
        let layout = tick.layout;
        let (t, h, classes, b, n) = (self.trials, c.hidden_size, c.num_labels, layout.seqs, layout.rows);
        let drop = layout.dropout.expect("training tick");
        let layers = self.layout.layers.len();
        let pooled = fwd.pooled.as_ref().expect("training forward");
        let pooled_dropped = fwd.pooled_dropped.as_ref().expect("training forward");

        let (cw, cb) = (self.layout.classifier_w.start, self.layout.classifier_b.start);
        let mut dpooled = self.ops.zeros(t * b * h)?;
        self.linear_backward(
            pooled_dropped,
            dlogits,
            b,
            h,
            classes,
            cw,
            Some(cb),
            Some((&mut dpooled, false)),
        )?;
        self.dropout(tick, &mut dpooled, b * h, site_pooled(layers), drop.classifier)?;
        self.ops.tanh_backward(pooled, &mut dpooled, t * b * h)?;
        let (pw, pb) = (self.layout.pooler_w.start, self.layout.pooler_b.start);
        let mut dx = self.ops.zeros(t * b * h)?;
        self.linear_backward(&fwd.inputs[layers], &dpooled, b, h, h, pw, Some(pb), Some((&mut dx, false)))?;

        for l in (0..layers).rev() {
            dx = self.layer_backward(tick, l, &fwd.inputs[l], &fwd.layers[l], &dx)?;
        }

        self.dropout(tick, &mut dx, n * h, site_embeddings(), drop.hidden)?;
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
        self.ops.embedding_backward(tick, &demb, &mut self.grads, p)
    }

    fn layer_backward(
        &mut self,
        tick: &Tick<'_, O::DeviceTick>,
        l: usize,
        x: &O::Buf,
        cache: &LayerCache<O::Buf>,
        dout: &O::Buf,
    ) -> Result<O::Buf> {
        let c = self.config.clone();
        let layer = self.layout.layers[l].clone();
        let layout = tick.layout;
        let (t, h, inter, n) = (self.trials, c.hidden_size, c.intermediate_size, layout.rows);
        let last = l + 1 == c.num_hidden_layers;
        let q_rows = if last { layout.seqs } else { n };
        let hidden_p = layout.dropout.map_or(0.0, |d| d.hidden);
        let xq = cache.xq.as_ref().unwrap_or(x);

        let mut dz = self.layernorm_backward(
            dout,
            &cache.ln2_xhat,
            &cache.ln2_rstd,
            q_rows,
            layer.out_ln_weight.start,
            layer.out_ln_bias.start,
        )?;
        let mut dh1 = self.ops.zeros(t * q_rows * h)?;
        self.ops.copy(&dz, 0, &mut dh1, 0, t * q_rows * h)?;
        self.dropout(tick, &mut dz, q_rows * h, site_ffn_out(l), hidden_p)?;
        let mut dact = self.ops.zeros(t * q_rows * inter)?;
        self.linear_backward(
            &cache.act,
            &dz,
            q_rows,
            inter,
            h,
            layer.out_w.start,
            Some(layer.out_b.start),
            Some((&mut dact, false)),
        )?;
        let mut dpre = self.ops.zeros(t * q_rows * inter)?;
        let shape = self.bias_shape(q_rows, inter, layer.inter_b.start);
        self.ops.gelu_backward(shape, &cache.pre, &dact, &mut dpre, &mut self.grads)?;
        self.linear_backward(
            &cache.h1,
            &dpre,
            q_rows,
            h,
            inter,
            layer.inter_w.start,
            None,
            Some((&mut dh1, true)),
        )?;

        let mut dy = self.layernorm_backward(
            &dh1,
            &cache.ln1_xhat,
            &cache.ln1_rstd,
            q_rows,
            layer.attn_ln_weight.start,
            layer.attn_ln_bias.start,
        )?;
        let mut dxq = self.ops.zeros(t * q_rows * h)?;
        self.ops.copy(&dy, 0, &mut dxq, 0, t * q_rows * h)?;
        self.dropout(tick, &mut dy, q_rows * h, site_attn_out(l), hidden_p)?;
        let mut dctx = self.ops.zeros(t * q_rows * h)?;
        self.linear_backward(
            &cache.ctx,
            &dy,
            q_rows,
            h,
            h,
            layer.attn_out_w.start,
            Some(layer.attn_out_b.start),
            Some((&mut dctx, false)),
        )?;

        // Query rows of no attention block keep these zeros.
        let mut dq = self.ops.zeros(t * q_rows * h)?;
        let mut dk = self.ops.zeros(t * n * h)?;
        let mut dv = self.ops.zeros(t * n * h)?;
        self.ops.attention_backward(
            tick,
            last,
            h,
            &cache.q,
            &cache.k,
            &cache.v,
            &cache.ctx,
            &cache.lse,
            &dctx,
            &mut dq,
            &mut dk,
            &mut dv,
            site_attn_probs(l),
        )?;

        self.linear_backward(
            xq,
            &dq,
            q_rows,
            h,
            h,
            layer.query_w.start,
            Some(layer.query_b.start),
            Some((&mut dxq, true)),
        )?;
        let mut dx = self.ops.zeros(t * n * h)?;
        self.linear_backward(
            x,
            &dk,
            n,
            h,
            h,
            layer.key_w.start,
            Some(layer.key_b.start),
            Some((&mut dx, false)),
        )?;
        self.linear_backward(
            x,
            &dv,
            n,
            h,
            h,
            layer.value_w.start,
            Some(layer.value_b.start),
            Some((&mut dx, true)),
        )?;
        if last {
            self.ops.scatter_add_cls(tick, h, &dxq, &mut dx)?;
        } else {
            self.ops.add(&mut dx, &dxq, t * n * h)?;
        }
        Ok(dx)
    }

    /// Logits `[T, seqs, C]` (host) and per-slot loss sums of an evaluation tick (no dropout).
    pub fn eval_logits(&self, tick: &Tick<'_, O::DeviceTick>) -> Result<(Vec<f32>, Vec<f64>)> {
        ensure!(tick.layout.dropout.is_none(), "evaluation runs without dropout");
        let fwd = self.forward(tick)?;
        let (sums, _) = self.losses(tick, &fwd, false)?;
        let logits =
            self.ops.read(&fwd.logits, 0, self.trials * tick.layout.seqs * self.config.num_labels)?;
        Ok((logits, sums))
    }

    /// Clip + AdamW for the listed slots (zeroing their gradients), each as its next update;
    /// returns their norms. A slot whose norm is not finite is not counted as updated.
    pub fn optimizer_step(&mut self, steps: &[SlotOptimizerStep]) -> Result<Vec<f64>> {
        let p = self.layout.len;
        ensure!(
            steps.iter().all(|s| s.slot < self.trials),
            "optimizer step for a slot outside the array's {}",
            self.trials
        );
        let numbered: Vec<(SlotOptimizerStep, u64)> =
            steps.iter().map(|s| (*s, self.updates[s.slot] + 1)).collect();
        let norms = self.ops.optimizer_step(
            p,
            &numbered,
            &mut self.params,
            &mut self.grads,
            &mut self.m,
            &mut self.v,
        )?;
        for (s, norm) in steps.iter().zip(&norms) {
            if norm.is_finite() {
                self.updates[s.slot] += 1;
            }
        }
        Ok(norms)
    }

    /// Forgets slot `slot`'s update count (a new trial starts in it).
    pub fn reset_slot(&mut self, slot: usize) {
        self.updates[slot] = 0;
    }
}
