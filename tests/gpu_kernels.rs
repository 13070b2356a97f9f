//! Every CUDA kernel against its CPU twin on fresh random inputs: relative error
//! ‖gpu − cpu‖/‖cpu‖ ≤ 1e-5 in fp32 and ≤ 1e-2 with bf16 storage. Outputs are poisoned with NaN
//! before each launch, so an element a kernel forgets to write fails the comparison; gradients
//! that kernels accumulate into start from random values and are compared as increments.
//!
//! Shapes cover sequence lengths 1, 7, 128 and 512, head sizes 32 and 64, the [CLS]-only last
//! layer, a padded sequence, and T = 1 and T = 3 trials with different data per trial.
//! Without a usable GPU every test prints "SKIPPED: <reason>" and passes — unless the test command
//! provides a device (HPO_GPU_REQUIRE_DEVICE=1: scripts/test.sh runs these on the virtual device).

mod common;

use common::{gpu_or_skip, rel_err};
use cudarc::driver::{CudaSlice, DeviceRepr};
use half::bf16;
use hpo_gpu::config::BertConfig;
use hpo_gpu::cpu::adamw::{self, AdamState, AdamW};
use hpo_gpu::cpu::bert::{self, Batch, Sequence};
use hpo_gpu::cpu::philox::DropoutRng;
use hpo_gpu::cuda::accuracy::argmax_accuracy;
use hpo_gpu::cuda::attention::{self, AttnDropout, AttnShape, DeviceAttnSeqs};
use hpo_gpu::cuda::bias::{self, BiasShape};
use hpo_gpu::cuda::context::Gpu;
use hpo_gpu::cuda::cross_entropy::{DeviceLabels, softmax_cross_entropy};
use hpo_gpu::cuda::dropout::{DeviceRng, DropoutShape, dropout};
use hpo_gpu::cuda::embedding::{self, DeviceTokens, positions_of};
use hpo_gpu::cuda::gelu;
use hpo_gpu::cuda::gemm::{Fp32Math, gemm_trials, set_fp32_math};
use hpo_gpu::cuda::launch::Act;
use hpo_gpu::cuda::layernorm::{self, LayerNormShape};
use hpo_gpu::cuda::optimizer::{GradNorm, TrialSteps, adamw};
use hpo_gpu::model::layout::ParamLayout;
use hpo_gpu::ops::{EmbeddingTables, Operand, Out};
use rand::{RngExt, SeedableRng, rngs::StdRng};

const FP32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

/// A fresh generator; the seed is printed so a failure can be replayed.
fn fresh_rng(test: &str) -> StdRng {
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    eprintln!("{test}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

fn uniform(r: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| lo + (hi - lo) * r.random::<f32>()).collect()
}

/// Rounds every value to what a bf16 buffer would hold.
fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect()
}

fn up<T: DeviceRepr>(g: &Gpu, v: &[T]) -> CudaSlice<T> {
    g.stream.clone_htod(v).expect("upload")
}

fn up_act<A: Act>(g: &Gpu, v: &[f32]) -> CudaSlice<A> {
    let a: Vec<A> = v.iter().map(|x| A::of_f32(*x)).collect();
    up(g, &a)
}

fn poisoned<A: Act>(g: &Gpu, n: usize) -> CudaSlice<A> {
    up_act::<A>(g, &vec![f32::NAN; n])
}

fn down<T: DeviceRepr + Default + Clone>(g: &Gpu, d: &CudaSlice<T>) -> Vec<T> {
    g.stream.clone_dtoh(d).expect("download")
}

fn down_act<A: Act>(g: &Gpu, d: &CudaSlice<A>) -> Vec<f32> {
    down(g, d).into_iter().map(|x: A| x.as_f32()).collect()
}

fn tol<A: Act>() -> f64 {
    if A::SUFFIX == "bf16" { BF16_TOL } else { FP32_TOL }
}

/// Asserts ‖gpu − cpu‖/‖cpu‖ ≤ tol (NaN anywhere fails: it is what an unwritten element holds).
fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths differ");
    if let Some(i) = gpu.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} of {} is {} (never written?)", gpu.len(), gpu[i]);
    }
    let g: Vec<f64> = gpu.iter().map(|x| *x as f64).collect();
    let c: Vec<f64> = cpu.iter().map(|x| *x as f64).collect();
    let e = rel_err(&g, &c);
    eprintln!("{what}: relative error {e:.3e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:e}");
}

fn increments(after: &[f32], before: &[f32]) -> Vec<f32> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

fn rngs(trials: usize, step: u32) -> Vec<DropoutRng> {
    (0..trials)
        .map(|t| DropoutRng { seed: 0x5eed_0000_0000_002a + t as u64, stream: t as u32, step })
        .collect()
}

fn small_config() -> BertConfig {
    BertConfig::from_json_str(
        r#"{"vocab_size": 97, "hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 256, "max_position_embeddings": 512, "type_vocab_size": 2,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-12,
            "pad_token_id": 0, "initializer_range": 0.02}"#,
    )
    .expect("config")
}

// ---------------------------------------------------------------------------------------------

#[test]
fn embedding_matches_cpu() {
    let Some(g) = gpu_or_skip() else { return };
    let mut r = fresh_rng("embedding");
    let c = small_config();
    let layout = ParamLayout::new(&c);
    let (p, h) = (layout.len, c.hidden_size);
    for trials in [1usize, 3] {
        for lens in [vec![1usize], vec![7, 128], vec![512, 3]] {
            let batches: Vec<Batch> = (0..trials)
                .map(|_| {
                    let seqs: Vec<Vec<u32>> = lens
                        .iter()
                        .map(|l| (0..*l).map(|_| r.random_range(0..c.vocab_size as u32)).collect())
                        .collect();
                    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
                    let mut b = Batch::packed(&refs, &vec![0; lens.len()]);
                    b.token_type_ids = (0..b.rows()).map(|_| r.random_range(0..2u32)).collect();
                    b
                })
                .collect();
            let n = batches[0].rows();
            let params = uniform(&mut r, trials * p, -1.0, 1.0);
            let ids: Vec<u32> = batches.iter().flat_map(|b| b.input_ids.clone()).collect();
            let types: Vec<u32> = batches.iter().flat_map(|b| b.token_type_ids.clone()).collect();
            let pos: Vec<u32> = batches.iter().flat_map(|b| positions_of(&b.seqs, n)).collect();
            let tables = EmbeddingTables::from_layout(&layout, h);
            let tokens = DeviceTokens::upload(&g, &ids, &types, &pos, n, tables).expect("tokens");
            let dparams = up(&g, &params);

            let mut cpu = vec![0f32; trials * n * h];
            for t in 0..trials {
                let pt = &params[t * p..(t + 1) * p];
                bert::embedding_forward(pt, &layout, &batches[t], h, &mut cpu[t * n * h..(t + 1) * n * h]);
            }
            let mut out = poisoned::<f32>(&g, trials * n * h);
            embedding::embedding_forward(&g, &mut out, n * h, &dparams, p, &tokens, trials).expect("launch");
            assert_close(
                &format!("embedding_forward T={trials} lens={lens:?}"),
                &down(&g, &out),
                &cpu,
                FP32_TOL,
            );

            let d = uniform(&mut r, trials * n * h, -1.0, 1.0);
            let before = uniform(&mut r, trials * p, -1.0, 1.0);
            let mut cpu_g = before.clone();
            for t in 0..trials {
                let dt = &d[t * n * h..(t + 1) * n * h];
                bert::embedding_backward(
                    dt,
                    &layout,
                    &batches[t],
                    h,
                    c.pad_token_id,
                    &mut cpu_g[t * p..(t + 1) * p],
                );
            }
            let mut grads = up(&g, &before);
            let dd = up(&g, &d);
            embedding::embedding_backward(
                &g,
                &mut grads,
                p,
                &dd,
                n * h,
                &tokens,
                Some(c.pad_token_id),
                trials,
            )
            .expect("launch");
            assert_close(
                &format!("embedding_backward T={trials} lens={lens:?}"),
                &increments(&down(&g, &grads), &before),
                &increments(&cpu_g, &before),
                FP32_TOL,
            );
        }
    }
}

#[test]
fn embedding_rejects_out_of_range_tokens() {
    let Some(g) = gpu_or_skip() else { return };
    let c = small_config();
    let tables = EmbeddingTables::from_layout(&ParamLayout::new(&c), c.hidden_size);
    let err =
        DeviceTokens::upload(&g, &[5, 97], &[0, 0], &[0, 1], 2, tables).err().expect("id 97 is out of range");
    assert!(err.to_string().contains("token id 97"), "{err}");
}

// ---------------------------------------------------------------------------------------------

fn layernorm_case<A: Act>(g: &Gpu, r: &mut StdRng, trials: usize, n: usize, h: usize, with_residual: bool) {
    let tag = format!("layernorm_{} T={trials} n={n} h={h} residual={with_residual}", A::SUFFIX);
    let bf = A::SUFFIX == "bf16";
    let round = |v: Vec<f32>| if bf { bf16_round(&v) } else { v };
    let (gamma_off, beta_off) = (3, 3 + h);
    let p = 2 * h + 10;
    let mut params = uniform(r, trials * p, -0.5, 0.5);
    for t in 0..trials {
        for j in 0..h {
            params[t * p + gamma_off + j] += 1.0;
        }
    }
    let x = round(uniform(r, trials * n * h, -2.0, 2.0));
    let res = round(uniform(r, trials * n * h, -2.0, 2.0));
    let eps = 1e-12;
    let (mut y_cpu, mut xh_cpu, mut rs_cpu) =
        (vec![0f32; trials * n * h], vec![0f32; trials * n * h], vec![0f32; trials * n]);
    for t in 0..trials {
        let a = t * n * h..(t + 1) * n * h;
        let pt = &params[t * p..(t + 1) * p];
        bert::layernorm_forward(
            &x[a.clone()],
            with_residual.then(|| &res[a.clone()]),
            &pt[gamma_off..gamma_off + h],
            &pt[beta_off..beta_off + h],
            eps,
            h,
            &mut y_cpu[a.clone()],
            Some((&mut xh_cpu[a], &mut rs_cpu[t * n..(t + 1) * n])),
        );
    }
    let sh = LayerNormShape {
        trials,
        rows: n,
        hidden: h,
        act_stride: n * h,
        row_stride: n,
        param_stride: p,
        gamma: gamma_off,
        beta: beta_off,
    };
    let dparams = up(g, &params);
    let (dx_in, dres) = (up_act::<A>(g, &x), up_act::<A>(g, &res));
    let mut y = poisoned::<A>(g, trials * n * h);
    let mut xhat = poisoned::<f32>(g, trials * n * h);
    let mut rstd = poisoned::<f32>(g, trials * n);
    layernorm::layernorm_forward(
        g,
        &sh,
        eps,
        &dx_in,
        with_residual.then_some(&dres),
        &dparams,
        &mut y,
        &mut xhat,
        &mut rstd,
    )
    .expect("launch");
    let tl = tol::<A>();
    assert_close(&format!("{tag} forward y"), &down_act(g, &y), &y_cpu, tl);
    assert_close(&format!("{tag} forward xhat"), &down(g, &xhat), &xh_cpu, tl);
    assert_close(&format!("{tag} forward rstd"), &down(g, &rstd), &rs_cpu, tl);

    let dy = round(uniform(r, trials * n * h, -1.0, 1.0));
    let before = uniform(r, trials * p, -1.0, 1.0);
    let mut g_cpu = before.clone();
    let mut dx_cpu = vec![0f32; trials * n * h];
    for t in 0..trials {
        let a = t * n * h..(t + 1) * n * h;
        let pt = &params[t * p..(t + 1) * p];
        let gt = &mut g_cpu[t * p..(t + 1) * p];
        let (lo, hi) = gt.split_at_mut(beta_off);
        bert::layernorm_backward(
            &dy[a.clone()],
            &xh_cpu[a.clone()],
            &rs_cpu[t * n..(t + 1) * n],
            &pt[gamma_off..gamma_off + h],
            h,
            &mut dx_cpu[a],
            &mut lo[gamma_off..gamma_off + h],
            &mut hi[..h],
        );
    }
    let ddy = up_act::<A>(g, &dy);
    let (cxh, crs) = (up(g, &xh_cpu), up(g, &rs_cpu));
    let mut dx = poisoned::<A>(g, trials * n * h);
    let mut grads = up(g, &before);
    layernorm::layernorm_backward(g, &sh, &ddy, &cxh, &crs, &dparams, &mut dx, &mut grads).expect("launch");
    assert_close(&format!("{tag} backward dx"), &down_act(g, &dx), &dx_cpu, tl);
    // dγ, dβ accumulate in fp32 whatever the storage, from bf16-exact inputs: fp32 tolerance.
    assert_close(
        &format!("{tag} backward dγ dβ"),
        &increments(&down(g, &grads), &before),
        &increments(&g_cpu, &before),
        FP32_TOL,
    );
}

#[test]
fn layernorm_matches_cpu() {
    let Some(g) = gpu_or_skip() else { return };
    let mut r = fresh_rng("layernorm");
    for trials in [1, 3] {
        for n in [1, 7, 128] {
            for h in [128, 384] {
                layernorm_case::<f32>(&g, &mut r, trials, n, h, true);
            }
        }
    }
    layernorm_case::<f32>(&g, &mut r, 3, 7, 128, false);
    layernorm_case::<bf16>(&g, &mut r, 3, 128, 384, true);
    layernorm_case::<bf16>(&g, &mut r, 1, 7, 128, false);
}

// ---------------------------------------------------------------------------------------------

/// The CPU twin of the bias gradient: `linear_backward`'s db (its dw against a zero input is
/// discarded).
fn cpu_bias_grad(dy: &[f32], n: usize, m: usize, db: &mut [f32]) {
    let (x, w) = (vec![0f32; n], vec![0f32; m]);
    let mut dw = vec![0f32; m];
    bert::linear_backward(&x, &w, dy, n, 1, m, None, &mut dw, db);
}

fn bias_gelu_case<A: Act>(g: &Gpu, r: &mut StdRng, trials: usize, n: usize, m: usize) {
    let tag = format!("bias/gelu_{} T={trials} n={n} m={m}", A::SUFFIX);
    let bf = A::SUFFIX == "bf16";
    let round = |v: Vec<f32>| if bf { bf16_round(&v) } else { v };
    let tl = tol::<A>();
    let (off, p) = (7, m + 20);
    let params = uniform(r, trials * p, -1.0, 1.0);
    let sh = BiasShape { trials, rows: n, width: m, act_stride: n * m, param_stride: p, bias: off };
    let dparams = up(g, &params);
    let x = round(uniform(r, trials * n * m, -3.0, 3.0));

    // bias_add: y = x + b per row (linear_new with a zero weight adds just the bias).
    let mut pre_cpu = x.clone();
    for t in 0..trials {
        let b = &params[t * p + off..t * p + off + m];
        for row in pre_cpu[t * n * m..(t + 1) * n * m].chunks_exact_mut(m) {
            row.iter_mut().zip(b).for_each(|(v, bb)| *v += *bb);
        }
    }
    let mut y = up_act::<A>(g, &x);
    bias::bias_add(g, &sh, &mut y, &dparams).expect("launch");
    assert_close(&format!("{tag} bias_add"), &down_act(g, &y), &pre_cpu, tl);

    // bias + GELU: x becomes pre in place; act is poisoned.
    let mut act_cpu = vec![0f32; trials * n * m];
    bert::gelu_forward(&pre_cpu, &mut act_cpu);
    let mut xin = up_act::<A>(g, &x);
    let mut act = poisoned::<A>(g, trials * n * m);
    gelu::bias_gelu_forward(g, &sh, &mut xin, &dparams, &mut act).expect("launch");
    assert_close(&format!("{tag} bias_gelu pre"), &down_act(g, &xin), &pre_cpu, tl);
    assert_close(&format!("{tag} bias_gelu act"), &down_act(g, &act), &act_cpu, tl);

    // GELU backward with the bias gradient; bias backward alone.
    let pre_in = round(pre_cpu.clone());
    let dy = round(uniform(r, trials * n * m, -1.0, 1.0));
    let mut dx_cpu = vec![0f32; trials * n * m];
    bert::gelu_backward(&pre_in, &dy, &mut dx_cpu);
    let before = uniform(r, trials * p, -1.0, 1.0);
    let mut g_cpu = before.clone();
    let mut g_bias_cpu = before.clone();
    for t in 0..trials {
        let a = t * n * m..(t + 1) * n * m;
        let dxt = if bf { bf16_round(&dx_cpu[a.clone()]) } else { dx_cpu[a.clone()].to_vec() };
        cpu_bias_grad(&dxt, n, m, &mut g_cpu[t * p + off..t * p + off + m]);
        cpu_bias_grad(&dy[a], n, m, &mut g_bias_cpu[t * p + off..t * p + off + m]);
    }
    let (dpre, ddy) = (up_act::<A>(g, &pre_in), up_act::<A>(g, &dy));
    let mut dx = poisoned::<A>(g, trials * n * m);
    let mut grads = up(g, &before);
    gelu::gelu_backward(g, &sh, &dpre, &ddy, &mut dx, Some(&mut grads)).expect("launch");
    assert_close(&format!("{tag} gelu_backward dx"), &down_act(g, &dx), &dx_cpu, tl);
    assert_close(
        &format!("{tag} gelu_backward db"),
        &increments(&down(g, &grads), &before),
        &increments(&g_cpu, &before),
        tl,
    );
    let mut grads = up(g, &before);
    bias::bias_backward(g, &sh, &ddy, &mut grads).expect("launch");
    assert_close(
        &format!("{tag} bias_backward"),
        &increments(&down(g, &grads), &before),
        &increments(&g_bias_cpu, &before),
        FP32_TOL,
    );
}

#[test]
fn bias_and_gelu_match_cpu() {
    let Some(g) = gpu_or_skip() else { return };
    let mut r = fresh_rng("bias_gelu");
    for trials in [1, 3] {
        for n in [1, 7, 128] {
            for m in [512, 1536] {
                bias_gelu_case::<f32>(&g, &mut r, trials, n, m);
            }
        }
    }
    bias_gelu_case::<bf16>(&g, &mut r, 3, 128, 512);
}

// ---------------------------------------------------------------------------------------------

#[test]
fn dropout_matches_cpu_bit_for_bit() {
    let Some(g) = gpu_or_skip() else { return };
    let mut r = fresh_rng("dropout");
    for trials in [1usize, 3] {
        let gens = rngs(trials, 7);
        let drng = DeviceRng::upload(&g, &gens).expect("rng");
        for n in [1usize, 7, 1000, 4099] {
            for base in [0usize, 13] {
                for p in [0.0, 0.1, 0.5] {
                    let x = uniform(&mut r, trials * n, -1.0, 1.0);
                    let mut cpu = x.clone();
                    for t in 0..trials {
                        gens[t].apply(p, 5, base, &mut cpu[t * n..(t + 1) * n]);
                    }
                    let sh = DropoutShape { trials, n, stride: n, site: 5, base };
                    let mut dx = up(&g, &x);
                    let mut out = poisoned::<f32>(&g, trials * n);
                    dropout(&g, &sh, p, &drng, &mut dx, Some(&mut out)).expect("launch");
                    let got = down(&g, &out);
                    let same = got.iter().zip(&cpu).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "dropout T={trials} n={n} base={base} p={p}: GPU mask or scale differs from the CPU's"
                    );
                    // In place gives the same.
                    dropout(&g, &sh, p, &drng, &mut dx, None).expect("launch");
                    assert_eq!(down(&g, &dx), cpu, "in-place dropout T={trials} n={n} p={p}");
                }
            }
        }
        // bf16 storage: same mask, values rounded.
        let n = 4099;
        let x = bf16_round(&uniform(&mut r, trials * n, -1.0, 1.0));
        let mut cpu = x.clone();
        for t in 0..trials {
            gens[t].apply(0.1, 9, 0, &mut cpu[t * n..(t + 1) * n]);
        }
        let mut dx = up_act::<bf16>(&g, &x);
        let mut out = poisoned::<bf16>(&g, trials * n);
        let sh = DropoutShape { trials, n, stride: n, site: 9, base: 0 };
        dropout(&g, &sh, 0.1, &drng, &mut dx, Some(&mut out)).expect("launch");
        let got = down_act(&g, &out);
        assert!(got.iter().zip(&cpu).all(|(a, b)| (*a == 0.0) == (*b == 0.0)), "bf16 dropout mask differs");
        assert_close(&format!("dropout_bf16 T={trials}"), &got, &cpu, BF16_TOL);
    }
}

// ---------------------------------------------------------------------------------------------

struct AttnCase {
    head_dim: usize,
    heads: usize,
    /// (rows, valid keys) per sequence.
    seqs: Vec<(usize, usize)>,
    trials: usize,
    dropout: bool,
    cls_only: bool,
    /// Trial t packs the sequences rotated by t: a different layout per trial, same row count.
    per_trial_layout: bool,
}

fn attention_case<A: Act>(g: &Gpu, r: &mut StdRng, c: &AttnCase) {
    let tag = format!(
        "attention_{} D={} heads={} seqs={:?} T={} dropout={} cls_only={} per_trial_layout={}",
        A::SUFFIX,
        c.head_dim,
        c.heads,
        c.seqs,
        c.trials,
        c.dropout,
        c.cls_only,
        c.per_trial_layout
    );
    let bf = A::SUFFIX == "bf16";
    let round = |v: Vec<f32>| if bf { bf16_round(&v) } else { v };
    let tl = tol::<A>();
    let (t_n, heads) = (c.trials, c.heads);
    let h = heads * c.head_dim;
    let layouts: Vec<(Vec<bert::AttnSeq>, usize)> = (0..t_n)
        .map(|t| {
            let mut order = c.seqs.clone();
            if c.per_trial_layout {
                let shift = t % order.len();
                order.rotate_left(shift);
            }
            let mut seqs = Vec::new();
            let mut start = 0;
            for &(len, valid) in &order {
                seqs.push(Sequence { start, len, valid });
                start += len;
            }
            bert::attention_layout(&seqs, heads, c.cls_only)
        })
        .collect();
    let n: usize = c.seqs.iter().map(|s| s.0).sum();
    let nq = if c.cls_only { c.seqs.len() } else { n };
    let q = round(uniform(r, t_n * nq * h, -1.0, 1.0));
    let k = round(uniform(r, t_n * n * h, -1.0, 1.0));
    let v = round(uniform(r, t_n * n * h, -1.0, 1.0));
    let dctx = round(uniform(r, t_n * nq * h, -1.0, 1.0));
    let gens = rngs(t_n, 3);
    let (p_drop, site) = (0.1, 4u32);

    let mut ctx_cpu = vec![0f32; t_n * nq * h];
    let (mut dq_cpu, mut dk_cpu, mut dv_cpu) =
        (vec![0f32; t_n * nq * h], vec![0f32; t_n * n * h], vec![0f32; t_n * n * h]);
    for t in 0..t_n {
        let (qa, ka) = (t * nq * h..(t + 1) * nq * h, t * n * h..(t + 1) * n * h);
        let drop = c.dropout.then_some(bert::AttentionDropout { rng: &gens[t], p: p_drop, site, first: 0 });
        let (layout, nprobs) = &layouts[t];
        let mut probs = vec![0f32; *nprobs];
        let qkv = bert::Qkv::separate(&q[qa.clone()], &k[ka.clone()], &v[ka.clone()], h);
        bert::attention_forward(qkv, layout, heads, h, Some(&mut probs), &mut ctx_cpu[qa.clone()], drop);
        let (dqt, dkt, dvt) = (&mut dq_cpu[qa.clone()], &mut dk_cpu[ka.clone()], &mut dv_cpu[ka]);
        let grads = bert::QkvGrads::separate(dqt, dkt, dvt, h);
        bert::attention_backward(qkv, &probs, &dctx[qa], layout, heads, h, grads, drop);
    }

    let device_layouts: Vec<Vec<bert::AttnSeq>> = if c.per_trial_layout {
        layouts.iter().map(|l| l.0.clone()).collect()
    } else {
        vec![layouts[0].0.clone()]
    };
    let dseqs = DeviceAttnSeqs::upload(g, &device_layouts, nq, n, heads).expect("layout");
    let drng = DeviceRng::upload(g, &gens).expect("rng");
    let sh = AttnShape {
        trials: t_n,
        head_dim: c.head_dim,
        q_stride: nq * h,
        kv_stride: n * h,
        lse_stride: nq * heads,
    };
    let drop = c.dropout.then_some(AttnDropout { p: p_drop, site });
    let (dq_in, dk_in, dv_in) = (up_act::<A>(g, &q), up_act::<A>(g, &k), up_act::<A>(g, &v));
    let mut ctx = poisoned::<A>(g, t_n * nq * h);
    // Only rows that are some sequence's query rows get a logsumexp (the [CLS] layout uses all).
    let mut lse = poisoned::<f32>(g, t_n * nq * heads);
    attention::attention_forward(g, &sh, &dseqs, &dq_in, &dk_in, &dv_in, &drng, drop, &mut ctx, &mut lse)
        .expect("launch");
    assert_close(&format!("{tag} ctx"), &down_act(g, &ctx), &ctx_cpu, tl);

    let ddctx = up_act::<A>(g, &dctx);
    let mut delta = poisoned::<f32>(g, t_n * nq * heads);
    let mut dq = poisoned::<A>(g, t_n * nq * h);
    let mut dk = poisoned::<A>(g, t_n * n * h);
    let mut dv = poisoned::<A>(g, t_n * n * h);
    attention::attention_backward(
        g, &sh, &dseqs, &dq_in, &dk_in, &dv_in, &ctx, &lse, &ddctx, &drng, drop, &mut delta, &mut dq,
        &mut dk, &mut dv,
    )
    .expect("launch");
    assert_close(&format!("{tag} dq"), &down_act(g, &dq), &dq_cpu, tl);
    assert_close(&format!("{tag} dk"), &down_act(g, &dk), &dk_cpu, tl);
    assert_close(&format!("{tag} dv"), &down_act(g, &dv), &dv_cpu, tl);
}

fn attention_cases() -> Vec<AttnCase> {
    let full = |l: &[usize]| l.iter().map(|x| (*x, *x)).collect::<Vec<_>>();
    let case = |head_dim, heads, seqs, trials, dropout, cls_only| AttnCase {
        head_dim,
        heads,
        seqs,
        trials,
        dropout,
        cls_only,
        per_trial_layout: false,
    };
    vec![
        // bert-tiny: D = 64, 2 heads
        case(64, 2, full(&[1]), 1, false, false),
        case(64, 2, full(&[7, 1, 128]), 3, true, false),
        case(64, 2, full(&[512]), 1, true, false),
        case(64, 2, full(&[7, 512, 3]), 3, true, true),
        // a padded sequence: keys past `valid` are masked and get zero gradients
        case(64, 2, vec![(10, 6), (7, 7)], 3, true, false),
        // MiniLM: D = 32, 12 heads
        case(32, 12, full(&[128, 7]), 1, false, false),
        case(32, 12, full(&[512, 1]), 3, true, false),
        case(32, 12, full(&[7, 128]), 3, true, true),
        // each trial with its own batch layout (slots at different places in their epochs)
        AttnCase { per_trial_layout: true, ..case(64, 2, full(&[7, 1, 128, 512]), 3, true, false) },
        AttnCase { per_trial_layout: true, ..case(32, 12, full(&[7, 1, 128]), 3, true, true) },
    ]
}

#[test]
fn attention_matches_cpu() {
    let Some(g) = gpu_or_skip() else { return };
    let mut r = fresh_rng("attention");
    for c in attention_cases() {
        attention_case::<f32>(&g, &mut r, &c);
    }
}

#[test]
fn attention_bf16_matches_cpu() {
    let Some(g) = gpu_or_skip() else { return };
    let mut r = fresh_rng("attention_bf16");
    let full = |l: &[usize]| l.iter().map(|x| (*x, *x)).collect::<Vec<_>>();
    for (head_dim, heads) in [(64, 2), (32, 12)] {
        let c = AttnCase {
            head_dim,
            heads,
            seqs: full(&[128, 7, 512]),
            trials: 3,
            dropout: true,
            cls_only: false,
            per_trial_layout: false,
        };
        attention_case::<bf16>(&g, &mut r, &c);
    }
}

#[test]
fn attention_rejects_unsupported_head_size_and_bad_blocks() {
    let Some(g) = gpu_or_skip() else { return };
    let seqs = [Sequence { start: 0, len: 4, valid: 4 }];
    let (layout, _) = bert::attention_layout(&seqs, 1, false);
    let err = DeviceAttnSeqs::upload(&g, std::slice::from_ref(&layout), 3, 4, 1)
        .err()
        .expect("4 query rows do not fit 3");
    assert!(err.to_string().contains("outside 3 query"), "{err}");
    let dseqs = DeviceAttnSeqs::upload(&g, &[layout], 4, 4, 1).expect("layout");
    let drng = DeviceRng::upload(&g, &rngs(1, 0)).expect("rng");
    let buf = up(&g, &vec![0f32; 4 * 48]);
    let (mut ctx, mut lse) = (up(&g, &vec![0f32; 4 * 48]), up(&g, &[0f32; 4]));
    let sh = AttnShape { trials: 1, head_dim: 48, q_stride: 0, kv_stride: 0, lse_stride: 0 };
    let err =
        attention::attention_forward(&g, &sh, &dseqs, &buf, &buf, &buf, &drng, None, &mut ctx, &mut lse)
            .expect_err("D = 48 has no kernel");
    assert!(err.to_string().contains("head sizes 32 and 64"), "{err}");
}

// ---------------------------------------------------------------------------------------------

#[test]
fn cross_entropy_and_accuracy_match_cpu() {
    let Some(g) = gpu_or_skip() else { return };
    let mut r = fresh_rng("cross_entropy");
    for trials in [1usize, 3] {
        for b in [1usize, 16, 128] {
            for c in [2usize, 5] {
                let tag = format!("T={trials} b={b} c={c}");
                let mut logits = uniform(&mut r, trials * b * c, -5.0, 5.0);
                // A tied row: the first maximum wins, on both sides.
                logits[..c].iter_mut().for_each(|x| *x = 1.5);
                let labels: Vec<usize> = (0..trials * b).map(|_| r.random_range(0..c)).collect();
                let scale: Vec<f32> = (0..trials).map(|t| (t + 1) as f32 / b as f32).collect();
                let (mut loss_cpu, mut d_cpu) = (Vec::new(), vec![0f32; trials * b * c]);
                let (mut correct_cpu, mut preds_cpu) = (vec![0u32; trials], Vec::new());
                for t in 0..trials {
                    let lt = &logits[t * b * c..(t + 1) * b * c];
                    let yt = &labels[t * b..(t + 1) * b];
                    loss_cpu.extend(bert::cross_entropy(lt, yt, c));
                    // The dlogits step of bert::backward, as written there.
                    for ((row, d), &y) in
                        lt.chunks_exact(c).zip(d_cpu[t * b * c..].chunks_exact_mut(c)).zip(yt)
                    {
                        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let sum: f32 = row.iter().map(|v| (*v - max).exp()).sum();
                        for j in 0..c {
                            d[j] = (row[j] - max).exp() / sum * scale[t];
                        }
                        d[y] -= scale[t];
                    }
                    for (row, &y) in lt.chunks_exact(c).zip(yt) {
                        let a = hpo_gpu::train::argmax(row);
                        preds_cpu.push(a as u32);
                        correct_cpu[t] += (a == y) as u32;
                    }
                }
                let dlog = up(&g, &logits);
                let dlabels = DeviceLabels::upload(&g, &labels, b, c).expect("labels");
                let dscale = up(&g, &scale);
                let mut losses = poisoned::<f32>(&g, trials * b);
                let mut dlogits = poisoned::<f32>(&g, trials * b * c);
                softmax_cross_entropy(
                    &g,
                    trials,
                    &dlog,
                    b * c,
                    &dlabels,
                    Some((&mut losses, b)),
                    Some(&mut dlogits),
                    Some(&dscale),
                )
                .expect("launch");
                assert_close(&format!("cross_entropy losses {tag}"), &down(&g, &losses), &loss_cpu, FP32_TOL);
                assert_close(&format!("cross_entropy dlogits {tag}"), &down(&g, &dlogits), &d_cpu, FP32_TOL);

                let mut preds = up(&g, &vec![u32::MAX; trials * b]);
                let mut correct = up(&g, &vec![u32::MAX; trials]);
                argmax_accuracy(&g, trials, &dlog, b * c, &dlabels, Some(&mut preds), &mut correct)
                    .expect("launch");
                assert_eq!(down(&g, &preds), preds_cpu, "argmax {tag}");
                assert_eq!(down(&g, &correct), correct_cpu, "correct counts {tag}");
            }
        }
    }
    let err = DeviceLabels::upload(&g, &[0, 2], 2, 2).err().expect("label 2 of 2 classes");
    assert!(err.to_string().contains("label 2"), "{err}");
}

// ---------------------------------------------------------------------------------------------

#[test]
fn grad_norm_and_clipping_match_cpu() {
    let Some(g) = gpu_or_skip() else { return };
    let mut r = fresh_rng("grad_norm");
    let trials = 3;
    for p in [1usize, 1000, 1_000_003] {
        // Trial 0's norm stays under 1 (no clipping), the others exceed it.
        let mut grads = uniform(&mut r, trials * p, -1.0, 1.0);
        let small = 0.5 / (p as f32).sqrt();
        grads[..p].iter_mut().for_each(|x| *x *= small);
        let mut cpu = grads.clone();
        let norms_cpu: Vec<f64> =
            (0..trials).map(|t| adamw::clip_grad_norm(&mut cpu[t * p..(t + 1) * p], 1.0)).collect();
        let mut dg = up(&g, &grads);
        let mut work = GradNorm::new(&g, trials).expect("scratch");
        work.run(&g, &mut dg, p, p, Some(1.0)).expect("launch");
        let norms = down(&g, &work.norm);
        for t in 0..trials {
            let e = (norms[t] - norms_cpu[t]).abs() / norms_cpu[t];
            assert!(
                e <= 1e-12,
                "P={p} trial {t}: norm {} vs CPU {} (relative {e:e})",
                norms[t],
                norms_cpu[t]
            );
        }
        assert_close(&format!("clip_grad_norm P={p}"), &down(&g, &dg), &cpu, FP32_TOL);
        // Without max_norm only the norm is computed.
        let mut dg = up(&g, &grads);
        work.run(&g, &mut dg, p, p, None).expect("launch");
        assert_eq!(down(&g, &dg), grads, "P={p}: no clipping asked, gradients must be untouched");
    }
}

#[test]
fn adamw_matches_cpu() {
    let Some(g) = gpu_or_skip() else { return };
    let mut r = fresh_rng("adamw");
    let trials = 3;
    for p in [1usize, 4099, 100_000] {
        let params = uniform(&mut r, trials * p, -1.0, 1.0);
        let grads = uniform(&mut r, trials * p, -0.1, 0.1);
        let m = uniform(&mut r, trials * p, -0.01, 0.01);
        let v = uniform(&mut r, trials * p, 0.0, 1e-3);
        let decay: Vec<bool> = (0..p).map(|_| r.random::<bool>()).collect();
        // Trial 2 does not step this time (step 0): it must stay untouched.
        let steps = TrialSteps {
            lr: vec![1e-3, 5e-5, 2e-4],
            weight_decay: vec![0.0, 0.01, 0.3],
            step: vec![1, 5, 0],
        };
        let (mut p_cpu, mut m_cpu, mut v_cpu) = (params.clone(), m.clone(), v.clone());
        for t in 0..trials {
            if steps.step[t] == 0 {
                continue;
            }
            let a = t * p..(t + 1) * p;
            let opt = AdamW { weight_decay: steps.weight_decay[t], ..Default::default() };
            let mut st = AdamState {
                m: m_cpu[a.clone()].to_vec(),
                v: v_cpu[a.clone()].to_vec(),
                step: steps.step[t] as u64 - 1,
            };
            opt.step(&mut p_cpu[a.clone()], &grads[a.clone()], &decay, &mut st, steps.lr[t]);
            m_cpu[a.clone()].copy_from_slice(&st.m);
            v_cpu[a].copy_from_slice(&st.v);
        }
        let (mut dp, dgr, mut dm, mut dv) = (up(&g, &params), up(&g, &grads), up(&g, &m), up(&g, &v));
        let dmask = up(&g, &decay.iter().map(|d| *d as u8).collect::<Vec<u8>>());
        adamw(&g, &AdamW::default(), &steps, &dmask, &mut dp, &dgr, &mut dm, &mut dv, p, p).expect("launch");
        let (gp, gm, gv) = (down(&g, &dp), down(&g, &dm), down(&g, &dv));
        let exact = gp == p_cpu && gm == m_cpu && gv == v_cpu;
        eprintln!("adamw P={p}: bit-for-bit equal to the CPU: {exact}");
        assert_close(
            &format!("adamw params P={p}"),
            &increments(&gp, &params),
            &increments(&p_cpu, &params),
            FP32_TOL,
        );
        assert_close(&format!("adamw m P={p}"), &gm, &m_cpu, FP32_TOL);
        assert_close(&format!("adamw v P={p}"), &gv, &v_cpu, FP32_TOL);
        assert_eq!(&gp[2 * p..], &params[2 * p..], "trial 2 (step 0) must not move");
    }
}

// ---------------------------------------------------------------------------------------------

/// y = x·Wᵀ, dW = dyᵀ·x and dx = dy·W for T trials through `gemm_trials`, against the CPU's
/// `linear_new` / `linear_backward`.
#[allow(clippy::too_many_arguments)]
fn gemm_case<T: Act>(
    g: &Gpu,
    r: &mut StdRng,
    trials: usize,
    n: usize,
    k: usize,
    m: usize,
    tol: f64,
    tag: &str,
) where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let bf = T::SUFFIX == "bf16";
    let round = |v: Vec<f32>| if bf { bf16_round(&v) } else { v };
    let (w_off, p) = (5, m * k + 9);
    let x = round(uniform(r, trials * n * k, -1.0, 1.0));
    let params = round(uniform(r, trials * p, -1.0, 1.0));
    let dy = round(uniform(r, trials * n * m, -1.0, 1.0));
    let (mut y_cpu, mut dw_cpu, mut dx_cpu) =
        (vec![0f32; trials * n * m], vec![0f32; trials * m * k], vec![0f32; trials * n * k]);
    let zeros = vec![0f32; m];
    for t in 0..trials {
        let xt = &x[t * n * k..(t + 1) * n * k];
        let w = &params[t * p + w_off..t * p + w_off + m * k];
        let dyt = &dy[t * n * m..(t + 1) * n * m];
        y_cpu[t * n * m..(t + 1) * n * m].copy_from_slice(&bert::linear_new(xt, w, &zeros, n, k, m));
        let mut db = vec![0f32; m];
        let dxt = &mut dx_cpu[t * n * k..(t + 1) * n * k];
        bert::linear_backward(
            xt,
            w,
            dyt,
            n,
            k,
            m,
            Some((dxt, false)),
            &mut dw_cpu[t * m * k..(t + 1) * m * k],
            &mut db,
        );
    }
    let (dx_in, dw_in, ddy) = (up_act::<T>(g, &x), up_act::<T>(g, &params), up_act::<T>(g, &dy));
    let (one, zero) = (T::of_f32(1.0), T::of_f32(0.0));
    let xs = Operand { rows: n, cols: k, offset: 0, stride: n * k, transposed: false };
    let ws = |transposed| Operand { rows: m, cols: k, offset: w_off, stride: p, transposed };
    let dys = |transposed| Operand { rows: n, cols: m, offset: 0, stride: n * m, transposed };

    let mut y = poisoned::<T>(g, trials * n * m);
    gemm_trials(
        g,
        trials,
        one,
        (&dx_in, xs),
        (&dw_in, ws(true)),
        zero,
        (&mut y, Out { offset: 0, stride: n * m }),
    )
    .expect("gemm");
    assert_close(&format!("{tag} y = x·Wᵀ T={trials} n={n} k={k} m={m}"), &down_act(g, &y), &y_cpu, tol);
    let mut dw = poisoned::<T>(g, trials * m * k);
    gemm_trials(
        g,
        trials,
        one,
        (&ddy, dys(true)),
        (&dx_in, xs),
        zero,
        (&mut dw, Out { offset: 0, stride: m * k }),
    )
    .expect("gemm");
    assert_close(&format!("{tag} dW = dyᵀ·x T={trials} n={n} k={k} m={m}"), &down_act(g, &dw), &dw_cpu, tol);
    let mut dx = poisoned::<T>(g, trials * n * k);
    gemm_trials(
        g,
        trials,
        one,
        (&ddy, dys(false)),
        (&dw_in, ws(false)),
        zero,
        (&mut dx, Out { offset: 0, stride: n * k }),
    )
    .expect("gemm");
    assert_close(&format!("{tag} dx = dy·W T={trials} n={n} k={k} m={m}"), &down_act(g, &dx), &dx_cpu, tol);
}

#[test]
fn gemm_over_trials_matches_cpu() {
    let Some(g) = gpu_or_skip() else { return };
    let mut r = fresh_rng("gemm");
    set_fp32_math(&g, Fp32Math::Exact).expect("math mode");
    for trials in [1, 3] {
        for n in [1, 7, 128] {
            for (k, m) in [(128, 384), (384, 1536)] {
                gemm_case::<f32>(&g, &mut r, trials, n, k, m, FP32_TOL, "sgemm");
            }
        }
    }
    set_fp32_math(&g, Fp32Math::Tf32).expect("math mode");
    gemm_case::<f32>(&g, &mut r, 3, 128, 384, 1536, BF16_TOL, "sgemm tf32");
    set_fp32_math(&g, Fp32Math::Exact).expect("math mode");
    gemm_case::<bf16>(&g, &mut r, 3, 128, 384, 1536, BF16_TOL, "bf16 gemm");
}

#[test]
fn without_a_gpu_the_context_says_why() {
    // Runs everywhere: on a machine without a usable GPU, Gpu::new must fail with a reason, never
    // panic; with one, it must load every kernel module.
    match Gpu::new() {
        Ok(g) => assert!(!g.name.is_empty()),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("built without CUDA kernels")
                    || msg.contains("libcuda")
                    || msg.contains("CUDA device"),
                "unexpected reason: {msg}"
            );
        }
    }
}
