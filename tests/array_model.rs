//! The trial-array model (`trial_array::model`, written in device ops) run on the host ops
//! (`ops::host::HostOps`) against the CPU reference `cpu::bert`, slot by slot: several slots with different
//! micro-batches (different sequence and row counts, so the tick pads), dropout on, an idle slot;
//! losses, gradients, eval logits and optimizer steps must match. This checks the orchestration
//! the GPU backend runs (offsets, strides, padding, dummy sequences, accumulation); each kernel
//! is checked against its CPU twin separately (tests/gpu_kernels.rs, on a GPU).

mod common;

use hpo_gpu::config::BertConfig;
use hpo_gpu::cpu::adamw::{AdamState, AdamW, clip_grad_norm};
use hpo_gpu::cpu::bert::{self, Batch, Dropout};
use hpo_gpu::cpu::philox::DropoutRng;
use hpo_gpu::model::BertModel;
use hpo_gpu::ops::host::HostOps;
use hpo_gpu::ops::{ArrayOps, SlotInput, SlotOptimizerStep, TickLayout};
use hpo_gpu::trial_array::model::ArrayModel;
use rand::SeedableRng;

fn config() -> BertConfig {
    BertConfig::from_json_str(
        r#"{"model_type": "bert", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 32,
            "hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.3, "num_labels": 3}"#,
    )
    .unwrap()
}

fn batch(rng: &mut rand::rngs::StdRng, lens: &[usize]) -> Batch {
    common::random_batch(rng, lens, 40, 3)
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    common::rel_err_f32(a, b)
}

#[test]
fn padded_multi_slot_ticks_match_the_cpu_reference() {
    let c = config();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Slot 2 is idle; the others differ in sequence count and row count.
    let batches = [
        Some(batch(&mut rng, &[5, 9, 3])),
        Some(batch(&mut rng, &[12])),
        None,
        Some(batch(&mut rng, &[4, 4, 6, 2])),
    ];
    let models: Vec<BertModel> = (0..4).map(|i| BertModel::random_init(&c, 100 + i)).collect();
    let scales = [1.0 / 3.0, 0.5, 0.0, 0.25];
    let mut array = ArrayModel::new(HostOps::new(&c), &c, 4).unwrap();
    let p = array.param_len();
    for (i, m) in models.iter().enumerate() {
        array.ops.write(&mut array.params, i * p, &m.params).unwrap();
    }

    let dropout =
        |i: usize| Dropout::from_config(&c, DropoutRng { seed: 11 + i as u64, stream: i as u32, step: 3 });
    for tick_no in 0..2 {
        let slots: Vec<Option<SlotInput>> = batches
            .iter()
            .enumerate()
            .map(|(i, b)| {
                b.as_ref().map(|b| SlotInput { batch: b, loss_scale: scales[i], dropout: Some(dropout(i)) })
            })
            .collect();
        let lt = TickLayout::new(&slots, c.num_attention_heads, c.pad_token_id as u32).unwrap();
        assert!(lt.rows >= 12 && lt.seqs == 4, "padded to {} rows, {} sequences", lt.rows, lt.seqs);
        let tick = array.ops.tick(&lt).unwrap();
        let sums = array.forward_backward(&tick).unwrap();
        for (i, b) in batches.iter().enumerate() {
            let Some(b) = b else {
                assert_eq!(sums[i], 0.0, "an idle slot has no loss");
                continue;
            };
            // The reference accumulates the same micro-batch `tick_no + 1` times.
            let fwd = bert::forward(&c, &models[i].layout, &models[i].params, b, Some(dropout(i)));
            let want: f64 = fwd.losses.iter().map(|l| *l as f64).sum();
            assert!((sums[i] - want).abs() <= 1e-5 * want.abs(), "slot {i}: loss {} vs {want}", sums[i]);
            let mut g = vec![0.0f32; p];
            for _ in 0..=tick_no {
                bert::backward(&c, &models[i].layout, &models[i].params, b, &fwd, scales[i], &mut g);
            }
            let got = array.ops.read(&array.grads, i * p, p).unwrap();
            let e = rel(&got, &g);
            assert!(e <= 1e-5, "slot {i} tick {tick_no}: gradient relative error {e}");
        }
        let idle = array.ops.read(&array.grads, 2 * p, p).unwrap();
        assert!(idle.iter().all(|g| *g == 0.0), "the idle slot got a gradient");
    }

    // Evaluation: every slot on the same batch, no dropout.
    let eval = batch(&mut rng, &[6, 10, 3]);
    let slots: Vec<Option<SlotInput>> =
        (0..4).map(|_| Some(SlotInput { batch: &eval, loss_scale: 1.0, dropout: None })).collect();
    let lt = TickLayout::new(&slots, c.num_attention_heads, c.pad_token_id as u32).unwrap();
    let tick = array.ops.tick(&lt).unwrap();
    let (logits, sums) = array.eval_logits(&tick).unwrap();
    for (i, m) in models.iter().enumerate() {
        let fwd = bert::forward(&c, &m.layout, &m.params, &eval, None);
        let e = rel(&logits[i * 3 * 3..(i + 1) * 3 * 3], &fwd.logits);
        assert!(e <= 1e-5, "slot {i}: eval logits relative error {e}");
        let want: f64 = fwd.losses.iter().map(|l| *l as f64).sum();
        assert!((sums[i] - want).abs() <= 1e-5 * want.abs());
    }

    // One optimizer step for slots 0 and 3 with their own settings; slot 1 keeps its gradient.
    let steps = [
        SlotOptimizerStep {
            slot: 0,
            lr: 1e-3,
            adamw: AdamW { weight_decay: 0.1, ..AdamW::default() },
            max_grad_norm: 1.0,
        },
        SlotOptimizerStep {
            slot: 3,
            lr: 5e-4,
            adamw: AdamW { weight_decay: 0.0, ..AdamW::default() },
            max_grad_norm: 0.01,
        },
    ];
    let g1_before = array.ops.read(&array.grads, p, p).unwrap();
    let mut want = Vec::new();
    for s in &steps {
        let mut g = array.ops.read(&array.grads, s.slot * p, p).unwrap();
        let norm = clip_grad_norm(&mut g, s.max_grad_norm);
        let mut params = models[s.slot].params.clone();
        let mut state = AdamState::new(p);
        s.adamw.step(&mut params, &g, &models[s.slot].layout.decay_mask(), &mut state, s.lr);
        want.push((norm, params));
    }
    let norms = array.optimizer_step(&steps).unwrap();
    for (s, (norm, params)) in steps.iter().zip(&want) {
        let k = if s.slot == 0 { 0 } else { 1 };
        assert!((norms[k] - norm).abs() <= 1e-9 * norm, "slot {}: norm {} vs {norm}", s.slot, norms[k]);
        let got = array.ops.read(&array.params, s.slot * p, p).unwrap();
        assert_eq!(&got, params, "slot {} parameters after AdamW", s.slot);
        assert!(array.ops.read(&array.grads, s.slot * p, p).unwrap().iter().all(|g| *g == 0.0));
    }
    assert_eq!(
        array.ops.read(&array.grads, p, p).unwrap(),
        g1_before,
        "a slot that did not step keeps its gradient"
    );
}
