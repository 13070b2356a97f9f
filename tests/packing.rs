//! Unpadded execution is exact: packing a batch's real tokens end to end gives the same logits and
//! gradients as padding every sequence to 512 with the attention mask.

mod common;

use common::rel_err;
use hpo_gpu::config::BertConfig;
use hpo_gpu::cpu::bert::{self, Dropout};
use hpo_gpu::cpu::philox::DropoutRng;
use hpo_gpu::data::batch::TokenizedSplit;
use hpo_gpu::model::BertModel;
use rand::{RngExt, SeedableRng, rngs::StdRng};

#[test]
fn packed_batch_equals_batch_padded_to_512() {
    let mut config = BertConfig::from_file(&common::repo().join("configs/bert-tiny/config.json")).unwrap();
    config.hidden_dropout_prob = 0.0;
    config.attention_probs_dropout_prob = 0.0;
    let model = BertModel::random_init(&config, 3);
    // IMDB-like lengths: one truncated at 512, the rest shorter.
    let mut rng = StdRng::seed_from_u64(9);
    let mut split = TokenizedSplit::default();
    for (i, len) in [512usize, 259, 37, 130].into_iter().enumerate() {
        let mut ids: Vec<u32> = (0..len).map(|_| rng.random_range(999..30522u32)).collect();
        (ids[0], ids[len - 1]) = (101, 102);
        split.ids.push(ids);
        split.labels.push(i % 2);
    }
    let idx = [0, 1, 2, 3];
    let drop = Dropout::from_config(&model.config, DropoutRng { seed: 0, stream: 0, step: 0 });
    // In f64, so that what remains is the summation-order noise of a different row count.
    let params: Vec<f64> = model.params.iter().map(|v| *v as f64).collect();
    let run = |padded: bool| {
        let b = if padded { split.padded_batch(&idx, 512, 0) } else { split.packed_batch(&idx) };
        let fwd = bert::forward(&model.config, &model.layout, &params, &b, Some(drop));
        let mut g = vec![0.0f64; model.layout.len];
        bert::backward(&model.config, &model.layout, &params, &b, &fwd, 0.25, &mut g);
        (b.rows(), fwd.logits, g)
    };
    let (rows_packed, logits_packed, g_packed) = run(false);
    let (rows_padded, logits_padded, g_padded) = run(true);
    assert_eq!((rows_packed, rows_padded), (938, 2048), "packing removes the padding rows");
    let e = rel_err(&logits_packed, &logits_padded);
    assert!(e < 1e-12, "logits differ: {e:.3e}");
    for t in &model.layout.tensors {
        // key.bias has an analytically zero gradient (see tests/parity.rs): only noise to compare.
        let e = rel_err(&g_packed[t.range.clone()], &g_padded[t.range.clone()]);
        assert!(e < 1e-10 || t.name.ends_with("key.bias"), "{}: gradients differ by {e:.3e}", t.name);
    }
}
