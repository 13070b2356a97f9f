//! `--precision bf16` against fp32 on one model and batch: the forward's logits and the backward's
//! gradients with the linear layers' operands in bf16 stay within bf16's rounding of fp32's. Its
//! own test binary: bf16 is switched on for the whole process.
//!
//! Skips (saying why) where oneDNN or the CPU's bf16 instructions are missing, unless
//! `HPO_GPU_REQUIRE_BF16=1` (the test command sets it on CPUs with AMX or AVX512_BF16).

use hpo_gpu::config::BertConfig;
use hpo_gpu::cpu::bert::{self, Batch, Dropout};
use hpo_gpu::cpu::onednn;
use hpo_gpu::cpu::philox::DropoutRng;
use hpo_gpu::model::BertModel;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn bf16_logits_and_gradients_follow_fp32() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/bert-tiny/config.json");
    let config = BertConfig::from_file(std::path::Path::new(path)).expect("configs/bert-tiny/config.json");
    let model = BertModel::random_init(&config, 3);
    // IMDB-like lengths, several 256-row blocks, a padded tail and token counts off every multiple.
    let lens = [512usize, 180, 240, 37, 131, 300, 98, 77];
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| (0..l).map(|j| 1000 + ((i * 7919 + j * 104_729) % 29_000) as u32).collect())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let labels: Vec<usize> = (0..lens.len()).map(|i| i % 2).collect();
    let batch = Batch::packed(&refs, &labels);
    let drop = Dropout::from_config(&config, DropoutRng { seed: 5, stream: 0, step: 0 });
    let step = || {
        let fwd = bert::forward(&model.config, &model.layout, &model.params, &batch, Some(drop));
        let mut grads = vec![0.0f32; model.layout.len];
        bert::backward(&model.config, &model.layout, &model.params, &batch, &fwd, 1.0 / 8.0, &mut grads);
        (fwd.logits, grads)
    };
    let (logits32, grads32) = step();
    match onednn::enable_bf16() {
        Ok(what) => eprintln!("bf16 by {what}"),
        Err(why) if std::env::var("HPO_GPU_REQUIRE_BF16").as_deref() == Ok("1") => {
            panic!("HPO_GPU_REQUIRE_BF16=1 but {why}")
        }
        Err(why) => return eprintln!("SKIPPED: {why}"),
    }
    let (logits16, grads16) = step();
    // Blocks run on several threads at once; each must compute alone.
    for _ in 0..3 {
        let (again_logits, again_grads) = step();
        assert!(again_logits == logits16 && again_grads == grads16, "bf16 steps differ from run to run");
    }
    assert_ne!(grads16, grads32, "bf16 gave fp32's gradients bit for bit");
    // Random-init logits are small sums with much cancellation: compare them to their spread.
    let spread = logits32.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    for (i, (a, b)) in logits16.iter().zip(&logits32).enumerate() {
        assert!((a - b).abs() <= 0.1 * spread, "logit {i}: bf16 {a}, fp32 {b} (largest |logit| {spread})");
    }
    for t in &model.layout.tensors {
        let (a, b) = (&grads16[t.range.clone()], &grads32[t.range.clone()]);
        // A key bias adds the same amount to every score of a query's row, which softmax ignores:
        // its true gradient is zero and both precisions compute only rounding noise.
        if b.iter().all(|x| *x == 0.0) || t.name.ends_with("key.bias") {
            continue;
        }
        let c = cosine(a, b);
        assert!(c > 0.95, "{}: gradient cosine {c}", t.name);
    }
    let whole = cosine(&grads16, &grads32);
    assert!(whole > 0.995, "gradient cosine {whole}");
    onednn::disable_bf16();
}
