//! [`ArrayOps`] on the GPU: each op is one kernel launch (or one cuBLAS call) over every trial,
//! through the launchers beside this file. fp32 storage (the parity mode; `Fp32Math::Tf32` for
//! TF32 GEMMs). Host twin: `trial_array::ops_cpu::CpuOps`, which tests/array_model.rs checks
//! against `cpu::bert`; tests/gpu_array.rs checks this against `CpuOps` on a GPU.

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::CudaSlice;

use super::attention::{AttnDropout, AttnShape, DeviceAttnSeqs, attention_backward, attention_forward};
use super::bias::{BiasShape, bias_add, bias_backward};
use super::context::Gpu;
use super::cross_entropy::{DeviceLabels, softmax_cross_entropy};
use super::dropout::{DeviceRng, DropoutShape, dropout};
use super::embedding::{DeviceTokens, EmbeddingTables, embedding_backward, embedding_forward};
use super::gelu::{bias_gelu_forward, gelu_backward};
use super::gemm::gemm_trials;
use super::launch::{KernelArgs, addr, blocks, config, int, launched};
use super::layernorm::{LayerNormShape, layernorm_backward, layernorm_forward};
use super::optimizer::{GradNorm, TrialSteps, adamw};
use crate::cpu::adamw::AdamW;
use crate::model::layout::ParamLayout;
use crate::trial_array::ops::{ArrayOps, Operand, Out, RowShape, SlotStep, TickLayout};

/// The GPU ops for one architecture.
pub struct CudaOps {
    pub gpu: Gpu,
    tables: EmbeddingTables,
    pad_token_id: Option<usize>,
    head_dim: usize,
    /// Labels (the classifier's width).
    classes: usize,
    /// The decay mask `[P]` as the AdamW kernel reads it (1 = decayed).
    decay: CudaSlice<u8>,
}

/// A tick's layout on the device.
pub struct CudaTick {
    tokens: DeviceTokens,
    attn_full: DeviceAttnSeqs,
    attn_cls: DeviceAttnSeqs,
    labels: DeviceLabels,
    rng: DeviceRng,
    cls_rows: CudaSlice<u32>,
    real_seqs: CudaSlice<u32>,
    loss_scale: CudaSlice<f32>,
}

fn dev<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> anyhow::Error {
    move |e| anyhow!("{what}: {e:?}")
}

impl CudaOps {
    pub fn new(gpu: Gpu, config: &crate::config::BertConfig, layout: &ParamLayout) -> Result<Self> {
        let decay: Vec<u8> = layout.decay_mask().iter().map(|d| *d as u8).collect();
        let decay = gpu.stream.clone_htod(&decay).map_err(dev("uploading the decay mask"))?;
        Ok(CudaOps {
            tables: EmbeddingTables::from_layout(layout, config.hidden_size),
            pad_token_id: Some(config.pad_token_id),
            head_dim: config.head_size(),
            classes: config.num_labels,
            decay,
            gpu,
        })
    }

    fn ln_shape(trials: usize, sh: RowShape, param_stride: usize) -> LayerNormShape {
        LayerNormShape {
            trials,
            rows: sh.rows,
            hidden: sh.width,
            act_stride: sh.rows * sh.width,
            row_stride: sh.rows,
            param_stride,
            gamma: sh.param,
            beta: sh.param2,
        }
    }

    fn bias_shape(trials: usize, sh: RowShape, param_stride: usize) -> BiasShape {
        BiasShape {
            trials,
            rows: sh.rows,
            width: sh.width,
            act_stride: sh.rows * sh.width,
            param_stride,
            bias: sh.param,
        }
    }

    fn attn_shape(lt: &TickLayout, cls: bool, hidden: usize, head_dim: usize) -> AttnShape {
        let nq = if cls { lt.seqs } else { lt.rows };
        AttnShape {
            trials: lt.trials,
            head_dim,
            q_stride: nq * hidden,
            kv_stride: lt.rows * hidden,
            lse_stride: nq * lt.heads,
        }
    }

    /// A launch of one of kernels/rows.cu's element-wise kernels over `n` values.
    fn elementwise(
        &self,
        name: &str,
        y: &mut CudaSlice<f32>,
        x: Option<&CudaSlice<f32>>,
        n: usize,
    ) -> Result<()> {
        ensure!(n <= y.len() && x.is_none_or(|x| n <= x.len()), "{name}: {n} values exceed the buffers");
        if n == 0 {
            return Ok(());
        }
        let f = self.gpu.function("rows", name)?;
        let s = &self.gpu.stream;
        let (py, _g0) = addr(y, 0, s);
        let (px, _g1) = match x {
            Some(x) => {
                let (p, g) = addr(x, 0, s);
                (p, Some(g))
            }
            None => (0, None),
        };
        let nu = n as u64;
        let mut b = KernelArgs::new(&f);
        b.arg(&py);
        if x.is_some() {
            b.arg(&px);
        }
        b.arg(&nu);
        launched(name, unsafe { b.launch(s, config(blocks(n, 256), 1, 1, 256, 0)?) })
    }

    /// gather_rows / scatter_add_rows over the tick's [CLS] rows.
    #[allow(clippy::too_many_arguments)]
    fn cls_rows(
        &self,
        name: &str,
        tick: &CudaTick,
        lt: &TickLayout,
        h: usize,
        dst: &mut CudaSlice<f32>,
        src: &CudaSlice<f32>,
        dst_stride: usize,
        src_stride: usize,
    ) -> Result<()> {
        ensure!(
            dst.len() >= lt.trials * dst_stride && src.len() >= lt.trials * src_stride,
            "{name}: buffers too small for {} trials",
            lt.trials
        );
        let f = self.gpu.function("rows", name)?;
        let s = &self.gpu.stream;
        let (pd, _g0) = addr(dst, 0, s);
        let (ps, _g1) = addr(src, 0, s);
        let (pr, _g2) = addr(&tick.cls_rows, 0, s);
        let (b_, hi) = (int("sequences", lt.seqs)?, int("hidden", h)?);
        // gather: (out, x, rows, b, h, x_stride, out_stride); scatter: (dx, d, rows, b, h, dx_stride, d_stride)
        let (s1, s2) = if name.starts_with("gather") {
            (src_stride as u64, dst_stride as u64)
        } else {
            (dst_stride as u64, src_stride as u64)
        };
        let mut b = KernelArgs::new(&f);
        b.arg(&pd).arg(&ps).arg(&pr).arg(&b_).arg(&hi).arg(&s1).arg(&s2);
        launched(name, unsafe { b.launch(s, config(blocks(lt.seqs * h, 256), lt.trials, 1, 256, 0)?) })
    }
}

impl ArrayOps for CudaOps {
    type Buf = CudaSlice<f32>;
    type Tick = CudaTick;

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.gpu.stream.alloc_zeros::<f32>(n.max(1)).map_err(dev("allocating device memory"))
    }
    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.gpu.stream.clone_htod(data).map_err(dev("copying to the device"))
    }
    fn write(&self, dst: &mut CudaSlice<f32>, offset: usize, data: &[f32]) -> Result<()> {
        ensure!(offset + data.len() <= dst.len(), "write past the end of a device buffer");
        let mut view = dst.slice_mut(offset..offset + data.len());
        self.gpu.stream.memcpy_htod(data, &mut view).map_err(dev("copying to the device"))
    }
    fn read(&self, src: &CudaSlice<f32>, offset: usize, n: usize) -> Result<Vec<f32>> {
        ensure!(offset + n <= src.len(), "read past the end of a device buffer");
        self.gpu.stream.clone_dtoh(&src.slice(offset..offset + n)).map_err(dev("copying from the device"))
    }
    fn copy(
        &self,
        src: &CudaSlice<f32>,
        so: usize,
        dst: &mut CudaSlice<f32>,
        d_o: usize,
        n: usize,
    ) -> Result<()> {
        ensure!(so + n <= src.len() && d_o + n <= dst.len(), "device copy past the end of a buffer");
        let mut view = dst.slice_mut(d_o..d_o + n);
        self.gpu.stream.memcpy_dtod(&src.slice(so..so + n), &mut view).map_err(dev("device-to-device copy"))
    }
    fn fill_zero(&self, buf: &mut CudaSlice<f32>, offset: usize, n: usize) -> Result<()> {
        ensure!(offset + n <= buf.len(), "clearing past the end of a device buffer");
        let mut view = buf.slice_mut(offset..offset + n);
        self.gpu.stream.memset_zeros(&mut view).map_err(dev("clearing device memory"))
    }

    fn tick(&self, lt: &TickLayout) -> Result<CudaTick> {
        let g = &self.gpu;
        let heads = lt.heads;
        let up_u32 = |v: &[u32]| g.stream.clone_htod(v).map_err(dev("uploading a tick"));
        let real: Vec<u32> = lt.real_seqs.iter().map(|n| *n as u32).collect();
        Ok(CudaTick {
            tokens: DeviceTokens::upload(g, &lt.ids, &lt.types, &lt.positions, lt.rows, self.tables)?,
            attn_full: DeviceAttnSeqs::upload(g, &lt.attn_full, lt.rows, lt.rows, heads)?,
            attn_cls: DeviceAttnSeqs::upload(g, &lt.attn_cls, lt.seqs, lt.rows, heads)?,
            labels: DeviceLabels::upload(g, &lt.labels, lt.seqs, self.classes)?,
            rng: DeviceRng::upload(g, &lt.rngs)?,
            cls_rows: up_u32(&lt.cls_rows)?,
            real_seqs: up_u32(&real)?,
            loss_scale: g.stream.clone_htod(&lt.loss_scale).map_err(dev("uploading loss scales"))?,
        })
    }

    fn gemm(
        &self,
        trials: usize,
        a: (&CudaSlice<f32>, Operand),
        b: (&CudaSlice<f32>, Operand),
        beta: f32,
        c: (&mut CudaSlice<f32>, Out),
    ) -> Result<()> {
        let (cb, co) = c;
        gemm_trials(&self.gpu, trials, 1.0f32, a, b, beta, cb, co.offset, co.stride)
    }

    fn embedding_forward(
        &self,
        tick: &CudaTick,
        lt: &TickLayout,
        params: &CudaSlice<f32>,
        ps: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        embedding_forward(&self.gpu, out, lt.rows * self.tables.hidden, params, ps, &tick.tokens, lt.trials)
    }
    fn embedding_backward(
        &self,
        tick: &CudaTick,
        lt: &TickLayout,
        d: &CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        ps: usize,
    ) -> Result<()> {
        let stride = lt.rows * self.tables.hidden;
        embedding_backward(&self.gpu, grads, ps, d, stride, &tick.tokens, self.pad_token_id, lt.trials)
    }

    fn layernorm_forward(
        &self,
        trials: usize,
        sh: RowShape,
        eps: f64,
        x: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        params: &CudaSlice<f32>,
        ps: usize,
        y: &mut CudaSlice<f32>,
        xhat: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
    ) -> Result<()> {
        layernorm_forward(&self.gpu, &Self::ln_shape(trials, sh, ps), eps, x, residual, params, y, xhat, rstd)
    }
    fn layernorm_backward(
        &self,
        trials: usize,
        sh: RowShape,
        dy: &CudaSlice<f32>,
        xhat: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        ps: usize,
        dx: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        layernorm_backward(&self.gpu, &Self::ln_shape(trials, sh, ps), dy, xhat, rstd, params, dx, grads)
    }
    fn bias_add(
        &self,
        trials: usize,
        sh: RowShape,
        y: &mut CudaSlice<f32>,
        params: &CudaSlice<f32>,
        ps: usize,
    ) -> Result<()> {
        bias_add(&self.gpu, &Self::bias_shape(trials, sh, ps), y, params)
    }
    fn bias_backward(
        &self,
        trials: usize,
        sh: RowShape,
        dy: &CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        ps: usize,
    ) -> Result<()> {
        bias_backward(&self.gpu, &Self::bias_shape(trials, sh, ps), dy, grads)
    }
    fn bias_gelu_forward(
        &self,
        trials: usize,
        sh: RowShape,
        pre: &mut CudaSlice<f32>,
        act: &mut CudaSlice<f32>,
        params: &CudaSlice<f32>,
        ps: usize,
    ) -> Result<()> {
        bias_gelu_forward(&self.gpu, &Self::bias_shape(trials, sh, ps), pre, params, act)
    }
    fn gelu_backward(
        &self,
        trials: usize,
        sh: RowShape,
        pre: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        ps: usize,
    ) -> Result<()> {
        gelu_backward(&self.gpu, &Self::bias_shape(trials, sh, ps), pre, dy, dx, Some(grads))
    }
    fn dropout(
        &self,
        tick: &CudaTick,
        lt: &TickLayout,
        x: &mut CudaSlice<f32>,
        n: usize,
        site: u32,
        p: f64,
    ) -> Result<()> {
        let sh = DropoutShape { trials: lt.trials, n, stride: n, site, base: 0 };
        dropout(&self.gpu, &sh, p, &tick.rng, x, None)
    }

    fn attention_forward(
        &self,
        tick: &CudaTick,
        lt: &TickLayout,
        cls: bool,
        hidden: usize,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        ctx: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        site: u32,
    ) -> Result<()> {
        let seqs = if cls { &tick.attn_cls } else { &tick.attn_full };
        let drop = lt.dropout.filter(|d| d.attention > 0.0).map(|d| AttnDropout { p: d.attention, site });
        let sh = Self::attn_shape(lt, cls, hidden, self.head_dim);
        attention_forward(&self.gpu, &sh, seqs, q, k, v, &tick.rng, drop, ctx, lse)
    }

    fn attention_backward(
        &self,
        tick: &CudaTick,
        lt: &TickLayout,
        cls: bool,
        hidden: usize,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        ctx: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        dctx: &CudaSlice<f32>,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
        site: u32,
    ) -> Result<()> {
        let seqs = if cls { &tick.attn_cls } else { &tick.attn_full };
        let drop = lt.dropout.filter(|d| d.attention > 0.0).map(|d| AttnDropout { p: d.attention, site });
        let sh = Self::attn_shape(lt, cls, hidden, self.head_dim);
        let mut delta = self.zeros(lt.trials * sh.lse_stride)?;
        attention_backward(
            &self.gpu, &sh, seqs, q, k, v, ctx, lse, dctx, &tick.rng, drop, &mut delta, dq, dk, dv,
        )
    }

    fn gather_cls(
        &self,
        tick: &CudaTick,
        lt: &TickLayout,
        h: usize,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.cls_rows("gather_rows_f32", tick, lt, h, out, x, lt.seqs * h, lt.rows * h)
    }
    fn scatter_add_cls(
        &self,
        tick: &CudaTick,
        lt: &TickLayout,
        h: usize,
        d: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.cls_rows("scatter_add_rows_f32", tick, lt, h, dx, d, lt.rows * h, lt.seqs * h)
    }
    fn tanh_forward(&self, x: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        self.elementwise("tanh_forward_f32", x, None, n)
    }
    fn tanh_backward(&self, y: &CudaSlice<f32>, d: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        self.elementwise("tanh_backward_f32", d, Some(y), n)
    }
    fn add(&self, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>, n: usize) -> Result<()> {
        self.elementwise("add_f32", y, Some(x), n)
    }

    fn cross_entropy(
        &self,
        tick: &CudaTick,
        lt: &TickLayout,
        c: usize,
        logits: &CudaSlice<f32>,
        losses: &mut CudaSlice<f32>,
        dlogits: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let (t, b) = (lt.trials, lt.seqs);
        let want_grad = dlogits.is_some();
        let mut dl = dlogits;
        softmax_cross_entropy(
            &self.gpu,
            t,
            logits,
            b * c,
            &tick.labels,
            Some((losses, b)),
            dl.as_deref_mut(),
            want_grad.then_some(&tick.loss_scale),
        )?;
        if let Some(d) = dl {
            let f = self.gpu.function("rows", "zero_rows_from_f32")?;
            let s = &self.gpu.stream;
            let (pd, _g0) = addr(d, 0, s);
            let (pv, _g1) = addr(&tick.real_seqs, 0, s);
            let (bi, ci, stride) = (int("sequences", b)?, int("classes", c)?, (b * c) as u64);
            let mut l = KernelArgs::new(&f);
            l.arg(&pd).arg(&pv).arg(&bi).arg(&ci).arg(&stride);
            launched("zero_rows_from_f32", unsafe {
                l.launch(s, config(blocks(b * c, 256), t, 1, 256, 0)?)
            })?;
        }
        Ok(())
    }

    fn optimizer_step(
        &self,
        p: usize,
        steps: &[SlotStep],
        _decay: &CudaSlice<f32>,
        params: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
    ) -> Result<Vec<f64>> {
        ensure!(p > 0 && grads.len().is_multiple_of(p), "optimizer: gradients are not whole slots of {p}");
        let trials = grads.len() / p;
        ensure!(steps.iter().all(|s| s.slot < trials), "optimizer: a slot outside the {trials} slots");
        // Norms of every slot without clipping (a slot mid-accumulation must not be clipped).
        let mut norm = GradNorm::new(&self.gpu, trials)?;
        norm.run(&self.gpu, grads, p, p, None)?;
        let norms = self.gpu.stream.clone_dtoh(&norm.norm).map_err(dev("reading gradient norms"))?;
        // Per-slot clip coefficients (1 for slots that do not step), then one clip launch.
        let mut coef = vec![1.0f32; trials];
        let mut out = Vec::with_capacity(steps.len());
        for s in steps {
            let n = norms[s.slot];
            out.push(n);
            let c = s.max_grad_norm / (n + 1e-6);
            if n.is_finite() && c < 1.0 {
                coef[s.slot] = c as f32;
            }
        }
        self.gpu
            .stream
            .memcpy_htod(&coef, &mut norm.clip_coef)
            .map_err(dev("uploading clip coefficients"))?;
        {
            let f = self.gpu.function("optimizer", "clip_grads")?;
            let s = &self.gpu.stream;
            let (pg, _g0) = addr(grads, 0, s);
            let (pc, _g1) = addr(&norm.clip_coef, 0, s);
            let (pu, su) = (p as u64, p as u64);
            let mut b = KernelArgs::new(&f);
            b.arg(&pg).arg(&pc).arg(&pu).arg(&su);
            launched("clip_grads", unsafe { b.launch(s, config(blocks(p, 256), trials, 1, 256, 0)?) })?;
        }
        // AdamW: one launch per distinct (β1, β2, ε); slots that do not step (or diverged) get
        // step 0, which the kernel skips.
        let mut groups: Vec<AdamW> = Vec::new();
        for s in steps {
            let key = AdamW { weight_decay: 0.0, ..s.adamw };
            if !groups.iter().any(|g| (g.beta1, g.beta2, g.eps) == (key.beta1, key.beta2, key.eps)) {
                groups.push(key);
            }
        }
        for g in &groups {
            let mut ts =
                TrialSteps { lr: vec![0.0; trials], weight_decay: vec![0.0; trials], step: vec![0; trials] };
            for (s, n) in steps.iter().zip(&out) {
                if (s.adamw.beta1, s.adamw.beta2, s.adamw.eps) == (g.beta1, g.beta2, g.eps) && n.is_finite() {
                    ts.lr[s.slot] = s.lr;
                    ts.weight_decay[s.slot] = s.adamw.weight_decay;
                    ts.step[s.slot] = u32::try_from(s.step)
                        .map_err(|_| anyhow!("optimizer step {} exceeds 32 bits", s.step))?;
                }
            }
            adamw(&self.gpu, g, &ts, &self.decay, params, grads, m, v, p, p)?;
        }
        for s in steps {
            self.fill_zero(grads, s.slot * p, p)?;
        }
        Ok(out)
    }
}

/// The trial array on device 0 for models of `config`: T = `wanted` slots, or fewer when the free
/// device memory holds fewer (or an allocation of T slots fails) (each slot: 5·P fp32 values plus one micro-batch's activations of
/// `micro_batch` sequences up to `max_len` tokens, with 15% headroom).
pub fn cuda_array_backend(
    config: &crate::config::BertConfig,
    micro_batch: usize,
    max_len: usize,
    wanted: usize,
) -> Result<crate::trial_array::device::DeviceArrayBackend<CudaOps>> {
    let mut gpu = Gpu::new()?;
    let layout = ParamLayout::new(config);
    let (free, _total) = gpu.ctx.mem_get_info().map_err(dev("reading free device memory"))?;
    let per_slot = crate::trial_array::bytes_per_slot(config, layout.len, micro_batch, max_len);
    let mut slots = crate::trial_array::slots_that_fit(wanted.max(1), free as u64, per_slot, 0.15)?;
    // Free memory can shrink between the query and the allocation (another process on the GPU):
    // out of memory here means fewer slots, as it does during the study.
    loop {
        let name = format!("{} ({slots} slots)", gpu.name);
        let ops = CudaOps::new(gpu, config, &layout)?;
        match crate::trial_array::device::DeviceArrayBackend::new(ops, config, slots, &name) {
            Ok(backend) => return Ok(backend),
            Err(crate::trial_array::ArrayError::OutOfMemory(why)) if slots > 1 => {
                eprintln!(
                    "note: {slots} trial-array slots do not fit in device memory ({why}); trying {}",
                    slots - 1
                );
                slots -= 1;
                gpu = Gpu::new()?;
            }
            Err(e) => return Err(anyhow!("{e}")),
        }
    }
}
