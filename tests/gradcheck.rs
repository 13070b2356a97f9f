//! f64 finite-difference checks of every backward op of the CPU reference, and of the whole
//! model (embeddings → layers → pooler → classifier → cross-entropy) with dropout on.

mod common;

use common::rel_err;
use hpo_gpu::config::BertConfig;
use hpo_gpu::cpu::bert::{self, AttnSeq, Batch, Dropout, Qkv, QkvGrads, QkvLayout, Sequence};
use hpo_gpu::cpu::philox::DropoutRng;
use hpo_gpu::model::layout::ParamLayout;
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect()
}

/// Central differences of `f` at every element of `x` (or the first `limit` picked indices).
fn numeric_grad(x: &mut [f64], idx: &[usize], f: &mut dyn FnMut(&[f64]) -> f64) -> Vec<f64> {
    let eps = 1e-6;
    idx.iter()
        .map(|&i| {
            let orig = x[i];
            x[i] = orig + eps;
            let up = f(x);
            x[i] = orig - eps;
            let down = f(x);
            x[i] = orig;
            (up - down) / (2.0 * eps)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn all(n: usize) -> Vec<usize> {
    (0..n).collect()
}

fn assert_close(name: &str, analytic: &[f64], numeric: &[f64]) {
    let e = rel_err(analytic, numeric);
    assert!(e < 1e-6, "{name}: analytic vs finite differences relative error {e:.3e}");
}

#[test]
fn linear_backward_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(1);
    let (n, k, m) = (5, 7, 3);
    let (mut x, mut w, mut b, dy) =
        (randn(&mut rng, n * k), randn(&mut rng, m * k), randn(&mut rng, m), randn(&mut rng, n * m));
    let mut dx = vec![0.0; n * k];
    let (mut dw, mut db) = (vec![0.0; m * k], vec![0.0; m]);
    bert::linear_backward(&x, &w, &dy, n, k, m, Some((&mut dx, false)), &mut dw, &mut db);
    let loss = |x: &[f64], w: &[f64], b: &[f64]| dot(&bert::linear_new(x, w, b, n, k, m), &dy);
    let (w0, b0) = (w.clone(), b.clone());
    assert_close("dx", &dx, &numeric_grad(&mut x, &all(n * k), &mut |x| loss(x, &w0, &b0)));
    let x0 = x.clone();
    assert_close("dw", &dw, &numeric_grad(&mut w, &all(m * k), &mut |w| loss(&x0, w, &b0)));
    assert_close("db", &db, &numeric_grad(&mut b, &all(m), &mut |b| loss(&x0, &w0, b)));
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(2);
    let (n, h) = (4, 6);
    let (mut x, mut g, mut b, dy) =
        (randn(&mut rng, n * h), randn(&mut rng, h), randn(&mut rng, h), randn(&mut rng, n * h));
    let run = |x: &[f64], g: &[f64], b: &[f64]| {
        let (mut y, mut xh, mut rs) = (vec![0.0; n * h], vec![0.0; n * h], vec![0.0; n]);
        bert::layernorm_forward(x, None, g, b, 1e-12, h, &mut y, Some((&mut xh, &mut rs)));
        (y, xh, rs)
    };
    let (_, xh, rs) = run(&x, &g, &b);
    let (mut dx, mut dg, mut db) = (vec![0.0; n * h], vec![0.0; h], vec![0.0; h]);
    bert::layernorm_backward(&dy, &xh, &rs, &g, h, &mut dx, &mut dg, &mut db);
    let (g0, b0) = (g.clone(), b.clone());
    assert_close("dx", &dx, &numeric_grad(&mut x, &all(n * h), &mut |x| dot(&run(x, &g0, &b0).0, &dy)));
    let x0 = x.clone();
    assert_close("dgamma", &dg, &numeric_grad(&mut g, &all(h), &mut |g| dot(&run(&x0, g, &b0).0, &dy)));
    assert_close("dbeta", &db, &numeric_grad(&mut b, &all(h), &mut |b| dot(&run(&x0, &g0, b).0, &dy)));
}

#[test]
fn gelu_backward_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut x: Vec<f64> = randn(&mut rng, 50).iter().map(|v| v * 4.0).collect();
    let dy = randn(&mut rng, 50);
    let mut dx = vec![0.0; 50];
    bert::gelu_backward(&x, &dy, &mut dx);
    let num = numeric_grad(&mut x, &all(50), &mut |x| {
        let mut y = vec![0.0; 50];
        bert::gelu_forward(x, &mut y);
        dot(&y, &dy)
    });
    assert_close("gelu", &dx, &num);
    // Exact GELU, not the tanh approximation: gelu(1) = 0.5·(1 + erf(1/√2)).
    assert!((bert::gelu(1.0f64) - 0.841_344_746_068_542_9).abs() < 1e-15);
}

#[test]
fn attention_backward_matches_finite_differences_with_padding_cls_and_dropout() {
    let mut rng = StdRng::seed_from_u64(4);
    let (heads, h) = (2, 6);
    // Sequence 0: 5 rows, all valid; sequence 1: 4 rows, 3 valid (one padded key).
    let seqs = [Sequence { start: 0, len: 5, valid: 5 }, Sequence { start: 5, len: 4, valid: 3 }];
    let n = 9;
    let drop = DropoutRng { seed: 7, stream: 0, step: 3 };
    for cls_only in [false, true] {
        let (layout, np): (Vec<AttnSeq>, usize) = bert::attention_layout(&seqs, heads, cls_only);
        let nq = if cls_only { 2 } else { n };
        // Q, K and V in one buffer, as the model's one product lays them out (strided rows).
        let at =
            if cls_only { QkvLayout::keys_then_queries(n, nq, h) } else { QkvLayout::side_by_side(n, h) };
        let mut qkv = randn(&mut rng, at.buffer_len());
        let dctx = randn(&mut rng, nq * h);
        let dropout = Some(bert::AttentionDropout { rng: &drop, p: 0.2, site: 1, first: 0 });
        let run = |qkv: &[f64]| {
            let (mut p, mut c) = (vec![0.0; np], vec![0.0; nq * h]);
            bert::attention_forward(Qkv::within(qkv, at), &layout, heads, h, Some(&mut p), &mut c, dropout);
            (p, c)
        };
        let (probs, _) = run(&qkv);
        let mut dqkv = vec![f64::NAN; at.buffer_len()];
        let grads = QkvGrads::within(&mut dqkv, at);
        bert::attention_backward(Qkv::within(&qkv, at), &probs, &dctx, &layout, heads, h, grads, dropout);
        let numeric = numeric_grad(&mut qkv, &all(at.buffer_len()), &mut |qkv| dot(&run(qkv).1, &dctx));
        assert_close(if cls_only { "d[k | v], then dq" } else { "d[q | k | v]" }, &dqkv, &numeric);
        // The padded key (row 8) receives no gradient.
        let kv_stride = if cls_only { 2 * h } else { 3 * h };
        let key_col = if cls_only { 0 } else { h };
        assert!(dqkv[8 * kv_stride + key_col..9 * kv_stride].iter().all(|g| *g == 0.0));
    }
}

fn tiny_config() -> BertConfig {
    BertConfig::from_json_str(
        r#"{"model_type": "bert", "vocab_size": 23, "hidden_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 12, "max_position_embeddings": 16,
            "type_vocab_size": 2, "num_labels": 3, "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1}"#,
    )
    .unwrap()
}

#[test]
fn whole_model_backward_matches_finite_differences() {
    let c = tiny_config();
    let layout = ParamLayout::new(&c);
    let mut rng = StdRng::seed_from_u64(5);
    let mut p: Vec<f64> = randn(&mut rng, layout.len).iter().map(|v| v * 0.5).collect();
    // Token 0 is [PAD]: it occurs in the padded sequence and must get no gradient.
    let batch = Batch {
        input_ids: vec![1, 5, 7, 2, 1, 9, 2, 0, 0, 1, 4, 4, 11, 3, 2],
        token_type_ids: vec![0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1],
        seqs: vec![
            Sequence { start: 0, len: 4, valid: 4 },
            Sequence { start: 4, len: 5, valid: 3 },
            Sequence { start: 9, len: 6, valid: 6 },
        ],
        labels: vec![2, 0, 1],
    };
    let drop = Dropout::from_config(&c, DropoutRng { seed: 11, stream: 2, step: 5 });
    let loss = |p: &[f64]| bert::forward(&c, &layout, p, &batch, Some(drop)).mean_loss();
    let fwd = bert::forward(&c, &layout, &p, &batch, Some(drop));
    let mut grads = vec![0.0; layout.len];
    bert::backward(&c, &layout, &p, &batch, &fwd, 1.0 / 3.0, &mut grads);
    // Every tensor: up to 12 elements each.
    let mut idx = Vec::new();
    for t in &layout.tensors {
        let n = t.range.len();
        for j in 0..n.min(12) {
            idx.push(t.range.start + (j * 7919) % n);
        }
    }
    let num = numeric_grad(&mut p, &idx, &mut |p| loss(p));
    let ana: Vec<f64> = idx.iter().map(|&i| grads[i]).collect();
    let e = rel_err(&ana, &num);
    assert!(e < 1e-6, "whole-model gradient relative error {e:.3e}");
    let pad_row = &grads[layout.embeddings.word.start..layout.embeddings.word.start + 8];
    assert!(pad_row.iter().all(|g| *g == 0.0), "the [PAD] embedding row gets no gradient");
    assert!(grads.iter().any(|g| *g != 0.0));
}
