//! CPU reference throughput: one training step (forward + backward) and one evaluation forward of
//! bert-tiny on a synthetic IMDB-shaped batch (16 sequences, 259 tokens on average, one of 512),
//! reported in examples/s by criterion.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hpo_gpu::config::BertConfig;
use hpo_gpu::cpu::bert::{self, Batch, Dropout};
use hpo_gpu::cpu::philox::DropoutRng;
use hpo_gpu::model::BertModel;

fn imdb_like_batch() -> Batch {
    let lens = [512usize, 180, 240, 512, 131, 300, 98, 512, 220, 160, 512, 75, 260, 190, 512, 200];
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| (0..l).map(|j| 1000 + ((i * 7919 + j * 104_729) % 29_000) as u32).collect())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let labels: Vec<usize> = (0..lens.len()).map(|i| i % 2).collect();
    Batch::packed(&refs, &labels)
}

fn bench(c: &mut Criterion) {
    hpo_gpu::tune_allocator();
    let config = BertConfig::from_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/bert-tiny/config.json"
    )))
    .expect("configs/bert-tiny/config.json");
    let model = BertModel::random_init(&config, 0);
    let batch = imdb_like_batch();
    let mut g = c.benchmark_group("bert_tiny_cpu");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(3))
        .warm_up_time(std::time::Duration::from_millis(500));
    g.throughput(Throughput::Elements(batch.seqs.len() as u64));
    let drop = Dropout::from_config(&config, DropoutRng { seed: 1, stream: 0, step: 0 });
    let mut grads = vec![0.0f32; model.layout.len];
    g.bench_function("train_step_16_examples", |b| {
        b.iter(|| {
            let fwd = bert::forward(&model.config, &model.layout, &model.params, &batch, Some(drop));
            bert::backward(&model.config, &model.layout, &model.params, &batch, &fwd, 1.0 / 16.0, &mut grads);
        })
    });
    g.bench_function("eval_forward_16_examples", |b| {
        b.iter(|| bert::forward(&model.config, &model.layout, &model.params, &batch, None).logits)
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
