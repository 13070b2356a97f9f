//! [`ArrayOps`] on the GPU: each op is one kernel launch (or one cuBLAS call) over every trial,
//! through the launchers beside this file. fp32 storage (the parity mode; `Fp32Math::Tf32` for
//! TF32 GEMMs). Host twin: `ops::host::HostOps`, which tests/array_model.rs checks against
//! `cpu::bert`; tests/gpu_array.rs checks this against `HostOps` on a GPU.

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::CudaSlice;

use super::attention::{AttnDropout, AttnShape, DeviceAttnSeqs, attention_backward, attention_forward};
use super::bias::{bias_add, bias_backward};
use super::context::Gpu;
use super::cross_entropy::{DeviceLabels, softmax_cross_entropy};
use super::dropout::{DeviceRng, DropoutShape, dropout};
use super::embedding::{DeviceTokens, embedding_backward, embedding_forward};
use super::gelu::{bias_gelu_forward, gelu_backward};
use super::gemm::gemm_trials;
use super::layernorm::{layernorm_backward, layernorm_forward};
use super::optimizer::{GradNorm, TrialSteps, adamw, clip_grads};
use super::rows::{
    RowSelection, add, gather_rows, scatter_add_rows, tanh_backward, tanh_forward, zero_rows_from,
};
use crate::cpu::adamw::AdamW;
use crate::model::layout::ParamLayout;
use crate::ops::{
    ArrayOps, BiasShape, EmbeddingTables, LayerNormShape, Operand, Out, SlotOptimizerStep, Tick, TickLayout,
};

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

/// What the device keeps of a tick's layout.
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

fn device_error<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> anyhow::Error {
    move |e| anyhow!("{what}: {e:?}")
}

/// The attention blocks of `tick` (the [CLS]-only ones with `cls`), its attention dropout at
/// `site`, and the shape of the launch over them.
fn attention_of<'a>(
    tick: &'a Tick<'_, CudaTick>,
    cls: bool,
    hidden: usize,
    head_dim: usize,
    site: u32,
) -> (&'a DeviceAttnSeqs, Option<AttnDropout>, AttnShape) {
    let layout = tick.layout;
    let seqs = if cls { &tick.device.attn_cls } else { &tick.device.attn_full };
    let dropout = layout.dropout.filter(|d| d.attention > 0.0).map(|d| AttnDropout { p: d.attention, site });
    let q_rows = if cls { layout.seqs } else { layout.rows };
    let shape = AttnShape {
        trials: layout.trials,
        head_dim,
        q_stride: q_rows * hidden,
        kv_stride: layout.rows * hidden,
        lse_stride: q_rows * layout.heads,
    };
    (seqs, dropout, shape)
}

/// The tick's [CLS] rows.
fn cls_rows<'a>(tick: &'a Tick<'_, CudaTick>, hidden: usize) -> RowSelection<'a> {
    let layout = tick.layout;
    RowSelection { rows: &tick.device.cls_rows, trials: layout.trials, seqs: layout.seqs, hidden }
}

impl CudaOps {
    pub fn new(gpu: Gpu, config: &crate::config::BertConfig, layout: &ParamLayout) -> Result<Self> {
        let decay: Vec<u8> = layout.decay_mask().iter().map(|d| *d as u8).collect();
        let decay = gpu.stream.clone_htod(&decay).map_err(device_error("uploading the decay mask"))?;
        Ok(CudaOps {
            tables: EmbeddingTables::from_layout(layout, config.hidden_size),
            pad_token_id: Some(config.pad_token_id),
            head_dim: config.head_size(),
            classes: config.num_labels,
            decay,
            gpu,
        })
    }
}

impl ArrayOps for CudaOps {
    type Buf = CudaSlice<f32>;
    type DeviceTick = CudaTick;

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.gpu.stream.alloc_zeros::<f32>(n.max(1)).map_err(device_error("allocating device memory"))
    }
    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.gpu.stream.clone_htod(data).map_err(device_error("copying to the device"))
    }
    fn write(&self, dst: &mut CudaSlice<f32>, offset: usize, data: &[f32]) -> Result<()> {
        ensure!(offset + data.len() <= dst.len(), "write past the end of a device buffer");
        let mut view = dst.slice_mut(offset..offset + data.len());
        self.gpu.stream.memcpy_htod(data, &mut view).map_err(device_error("copying to the device"))
    }
    fn read(&self, src: &CudaSlice<f32>, offset: usize, n: usize) -> Result<Vec<f32>> {
        ensure!(offset + n <= src.len(), "read past the end of a device buffer");
        self.gpu
            .stream
            .clone_dtoh(&src.slice(offset..offset + n))
            .map_err(device_error("copying from the device"))
    }
    fn copy(
        &self,
        src: &CudaSlice<f32>,
        src_offset: usize,
        dst: &mut CudaSlice<f32>,
        dst_offset: usize,
        n: usize,
    ) -> Result<()> {
        ensure!(
            src_offset + n <= src.len() && dst_offset + n <= dst.len(),
            "device copy past the end of a buffer"
        );
        let mut view = dst.slice_mut(dst_offset..dst_offset + n);
        let source = src.slice(src_offset..src_offset + n);
        self.gpu.stream.memcpy_dtod(&source, &mut view).map_err(device_error("device-to-device copy"))
    }
    fn fill_zero(&self, buf: &mut CudaSlice<f32>, offset: usize, n: usize) -> Result<()> {
        ensure!(offset + n <= buf.len(), "clearing past the end of a device buffer");
        let mut view = buf.slice_mut(offset..offset + n);
        self.gpu.stream.memset_zeros(&mut view).map_err(device_error("clearing device memory"))
    }

    fn tick<'a>(&self, layout: &'a TickLayout) -> Result<Tick<'a, CudaTick>> {
        let gpu = &self.gpu;
        let heads = layout.heads;
        let upload_u32 = |v: &[u32]| gpu.stream.clone_htod(v).map_err(device_error("uploading a tick"));
        let real_seqs: Vec<u32> = layout.real_seqs.iter().map(|n| *n as u32).collect();
        let (ids, types, positions) = (&layout.ids, &layout.types, &layout.positions);
        let device = CudaTick {
            tokens: DeviceTokens::upload(gpu, ids, types, positions, layout.rows, self.tables)?,
            attn_full: DeviceAttnSeqs::upload(gpu, &layout.attn_full, layout.rows, layout.rows, heads)?,
            attn_cls: DeviceAttnSeqs::upload(gpu, &layout.attn_cls, layout.seqs, layout.rows, heads)?,
            labels: DeviceLabels::upload(gpu, &layout.labels, layout.seqs, self.classes)?,
            rng: DeviceRng::upload(gpu, &layout.rngs)?,
            cls_rows: upload_u32(&layout.cls_rows)?,
            real_seqs: upload_u32(&real_seqs)?,
            loss_scale: gpu
                .stream
                .clone_htod(&layout.loss_scale)
                .map_err(device_error("uploading loss scales"))?,
        };
        Ok(Tick { layout, device })
    }

    fn gemm(
        &self,
        trials: usize,
        a: (&CudaSlice<f32>, Operand),
        b: (&CudaSlice<f32>, Operand),
        beta: f32,
        c: (&mut CudaSlice<f32>, Out),
    ) -> Result<()> {
        gemm_trials(&self.gpu, trials, 1.0f32, a, b, beta, c)
    }

    fn embedding_forward(
        &self,
        tick: &Tick<'_, CudaTick>,
        params: &CudaSlice<f32>,
        param_stride: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (layout, tokens) = (tick.layout, &tick.device.tokens);
        let out_stride = layout.rows * self.tables.hidden;
        embedding_forward(&self.gpu, out, out_stride, params, param_stride, tokens, layout.trials)
    }
    fn embedding_backward(
        &self,
        tick: &Tick<'_, CudaTick>,
        d: &CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        param_stride: usize,
    ) -> Result<()> {
        let (layout, tokens) = (tick.layout, &tick.device.tokens);
        let d_stride = layout.rows * self.tables.hidden;
        let pad = self.pad_token_id;
        embedding_backward(&self.gpu, grads, param_stride, d, d_stride, tokens, pad, layout.trials)
    }

    fn layernorm_forward(
        &self,
        shape: LayerNormShape,
        eps: f64,
        x: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        params: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        xhat: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
    ) -> Result<()> {
        layernorm_forward(&self.gpu, &shape, eps, x, residual, params, y, xhat, rstd)
    }
    fn layernorm_backward(
        &self,
        shape: LayerNormShape,
        dy: &CudaSlice<f32>,
        xhat: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        layernorm_backward(&self.gpu, &shape, dy, xhat, rstd, params, dx, grads)
    }
    fn bias_add(&self, shape: BiasShape, y: &mut CudaSlice<f32>, params: &CudaSlice<f32>) -> Result<()> {
        bias_add(&self.gpu, &shape, y, params)
    }
    fn bias_backward(&self, shape: BiasShape, dy: &CudaSlice<f32>, grads: &mut CudaSlice<f32>) -> Result<()> {
        bias_backward(&self.gpu, &shape, dy, grads)
    }
    fn bias_gelu_forward(
        &self,
        shape: BiasShape,
        pre: &mut CudaSlice<f32>,
        act: &mut CudaSlice<f32>,
        params: &CudaSlice<f32>,
    ) -> Result<()> {
        bias_gelu_forward(&self.gpu, &shape, pre, params, act)
    }
    fn gelu_backward(
        &self,
        shape: BiasShape,
        pre: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        gelu_backward(&self.gpu, &shape, pre, dy, dx, Some(grads))
    }
    fn dropout(
        &self,
        tick: &Tick<'_, CudaTick>,
        x: &mut CudaSlice<f32>,
        n: usize,
        site: u32,
        p: f64,
    ) -> Result<()> {
        let shape = DropoutShape { trials: tick.layout.trials, n, stride: n, site, base: 0 };
        dropout(&self.gpu, &shape, p, &tick.device.rng, x, None)
    }

    fn attention_forward(
        &self,
        tick: &Tick<'_, CudaTick>,
        cls: bool,
        hidden: usize,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        ctx: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        site: u32,
    ) -> Result<()> {
        let (seqs, drop, shape) = attention_of(tick, cls, hidden, self.head_dim, site);
        attention_forward(&self.gpu, &shape, seqs, q, k, v, &tick.device.rng, drop, ctx, lse)
    }

    fn attention_backward(
        &self,
        tick: &Tick<'_, CudaTick>,
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
        let (seqs, drop, shape) = attention_of(tick, cls, hidden, self.head_dim, site);
        let mut delta = self.zeros(shape.trials * shape.lse_stride)?;
        let rng = &tick.device.rng;
        attention_backward(
            &self.gpu, &shape, seqs, q, k, v, ctx, lse, dctx, rng, drop, &mut delta, dq, dk, dv,
        )
    }

    fn gather_cls(
        &self,
        tick: &Tick<'_, CudaTick>,
        hidden: usize,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        gather_rows(&self.gpu, &cls_rows(tick, hidden), x, tick.layout.rows * hidden, out)
    }
    fn scatter_add_cls(
        &self,
        tick: &Tick<'_, CudaTick>,
        hidden: usize,
        d: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        scatter_add_rows(&self.gpu, &cls_rows(tick, hidden), d, dx, tick.layout.rows * hidden)
    }
    fn tanh_forward(&self, x: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        tanh_forward(&self.gpu, x, n)
    }
    fn tanh_backward(&self, y: &CudaSlice<f32>, d: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        tanh_backward(&self.gpu, y, d, n)
    }
    fn add(&self, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>, n: usize) -> Result<()> {
        add(&self.gpu, y, x, n)
    }

    fn cross_entropy(
        &self,
        tick: &Tick<'_, CudaTick>,
        classes: usize,
        logits: &CudaSlice<f32>,
        losses: &mut CudaSlice<f32>,
        dlogits: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let (layout, device) = (tick.layout, &tick.device);
        let (trials, seqs) = (layout.trials, layout.seqs);
        let mut dlogits = dlogits;
        let loss_scale = dlogits.is_some().then_some(&device.loss_scale);
        let (labels, losses) = (&device.labels, Some((losses, seqs)));
        let logit_stride = seqs * classes;
        softmax_cross_entropy(
            &self.gpu,
            trials,
            logits,
            logit_stride,
            labels,
            losses,
            dlogits.as_deref_mut(),
            loss_scale,
        )?;
        if let Some(d) = dlogits {
            zero_rows_from(&self.gpu, d, &device.real_seqs, trials, seqs, classes)?;
        }
        Ok(())
    }

    fn optimizer_step(
        &self,
        param_len: usize,
        steps: &[(SlotOptimizerStep, u64)],
        params: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        moment1: &mut CudaSlice<f32>,
        moment2: &mut CudaSlice<f32>,
    ) -> Result<Vec<f64>> {
        let p = param_len;
        ensure!(p > 0 && grads.len().is_multiple_of(p), "optimizer: gradients are not whole slots of {p}");
        let trials = grads.len() / p;
        ensure!(steps.iter().all(|(s, _)| s.slot < trials), "optimizer: a slot outside the {trials} slots");
        // Norms of every slot without clipping (a slot mid-accumulation must not be clipped).
        let mut norm = GradNorm::new(&self.gpu, trials)?;
        norm.run(&self.gpu, grads, p, p, None)?;
        let norms = self.gpu.stream.clone_dtoh(&norm.norm).map_err(device_error("reading gradient norms"))?;
        // Per-slot clip coefficients (1 for slots that do not step), then one clip launch.
        let mut coefficients = vec![1.0f32; trials];
        let mut out = Vec::with_capacity(steps.len());
        for (step, _) in steps {
            let n = norms[step.slot];
            out.push(n);
            let c = step.max_grad_norm / (n + 1e-6);
            if n.is_finite() && c < 1.0 {
                coefficients[step.slot] = c as f32;
            }
        }
        self.gpu
            .stream
            .memcpy_htod(&coefficients, &mut norm.clip_coef)
            .map_err(device_error("uploading clip coefficients"))?;
        clip_grads(&self.gpu, grads, &norm.clip_coef, p, p)?;
        // AdamW: one launch per distinct (β1, β2, ε); slots that do not step (or diverged) get
        // update number 0, which the kernel skips.
        let mut groups: Vec<AdamW> = Vec::new();
        for (step, _) in steps {
            let key = AdamW { weight_decay: 0.0, ..step.adamw };
            if !groups.iter().any(|g| (g.beta1, g.beta2, g.eps) == (key.beta1, key.beta2, key.eps)) {
                groups.push(key);
            }
        }
        for group in &groups {
            let mut settings =
                TrialSteps { lr: vec![0.0; trials], weight_decay: vec![0.0; trials], step: vec![0; trials] };
            for ((step, update), n) in steps.iter().zip(&out) {
                let adam = &step.adamw;
                if (adam.beta1, adam.beta2, adam.eps) == (group.beta1, group.beta2, group.eps)
                    && n.is_finite()
                {
                    settings.lr[step.slot] = step.lr;
                    settings.weight_decay[step.slot] = adam.weight_decay;
                    settings.step[step.slot] = u32::try_from(*update)
                        .map_err(|_| anyhow!("optimizer step {update} exceeds 32 bits"))?;
                }
            }
            adamw(&self.gpu, group, &settings, &self.decay, params, grads, moment1, moment2, p, p)?;
        }
        for (step, _) in steps {
            self.fill_zero(grads, step.slot * p, p)?;
        }
        Ok(out)
    }
}
