//! Trial-array train-step throughput on the GPU: one tick (forward + backward of a 16-example
//! micro-batch in every slot, then an optimizer step for every slot) of bert-tiny with T = 1, 8,
//! 32 and 128 slots, in real (unpadded) tokens per second, with the model FLOPs those tokens cost
//! (6 · non-embedding parameters per token, plus attention) as TFLOP/s. The micro-batches are
//! IMDB-shaped (259 tokens on average, a few of 512), different per slot.
//! Without a usable GPU it prints why and exits 0.

use criterion::{Criterion, Throughput};
use hpo_gpu::config::BertConfig;
use hpo_gpu::cpu::adamw::AdamW;
use hpo_gpu::cpu::bert::{Batch, Dropout};
use hpo_gpu::cpu::philox::DropoutRng;
use hpo_gpu::cuda::array_ops::CudaOps;
use hpo_gpu::cuda::context::Gpu;
use hpo_gpu::model::BertModel;
use hpo_gpu::model::layout::ParamLayout;
use hpo_gpu::ops::{ArrayOps, SlotInput, SlotOptimizerStep, TickLayout};
use hpo_gpu::trial_array::model::ArrayModel;

const LENS: [usize; 16] = [512, 180, 240, 512, 131, 300, 98, 512, 220, 160, 512, 75, 260, 190, 512, 200];

fn batch(slot: usize) -> Batch {
    // Rotate the lengths per slot so slots differ, as they do in a real tick.
    let lens: Vec<usize> = (0..16).map(|i| LENS[(i + slot) % 16]).collect();
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| (0..l).map(|j| 1000 + ((i * 7919 + j * 104_729 + slot) % 29_000) as u32).collect())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let labels: Vec<usize> = (0..16).map(|i| i % 2).collect();
    Batch::packed(&refs, &labels)
}

fn main() {
    if let Err(why) = hpo_gpu::cuda::availability() {
        println!("SKIPPED: train_step needs a GPU: {why}");
        return;
    }
    let config = BertConfig::from_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/bert-tiny/config.json"
    )))
    .expect("configs/bert-tiny/config.json");
    let layout = ParamLayout::new(&config);
    let p = layout.len;
    let h = config.hidden_size;
    // Model FLOPs per token for training: 6 per non-embedding weight, plus attention's
    // 2·2·L·H per token and layer (scores and context) times 3 for the backward.
    let embedding =
        layout.embeddings.word.len() + layout.embeddings.position.len() + layout.embeddings.token_type.len();
    let tokens_per_slot: usize = LENS.iter().sum();
    let mean_len = tokens_per_slot as f64 / 16.0;
    let flops_per_token =
        6.0 * (p - embedding) as f64 + 12.0 * config.num_hidden_layers as f64 * mean_len * h as f64;
    let mut c = Criterion::default().configure_from_args();
    for trials in [1usize, 8, 32, 128] {
        let gpu = match Gpu::new() {
            Ok(g) => g,
            Err(e) => {
                println!("SKIPPED: {e}");
                return;
            }
        };
        let ops = CudaOps::new(gpu, &config, &layout).expect("CUDA ops");
        let mut model = match ArrayModel::new(ops, &config, trials) {
            Ok(m) => m,
            Err(e) => {
                println!("T = {trials}: {e}");
                break;
            }
        };
        let init = BertModel::random_init(&config, 0).params;
        for t in 0..trials {
            model.ops.write(&mut model.params, t * p, &init).expect("upload");
        }
        let batches: Vec<Batch> = (0..trials).map(batch).collect();
        let slots: Vec<Option<SlotInput>> = batches
            .iter()
            .enumerate()
            .map(|(t, b)| {
                let rng = DropoutRng { seed: 1, stream: t as u32, step: 0 };
                Some(SlotInput {
                    batch: b,
                    loss_scale: 1.0 / 16.0,
                    dropout: Some(Dropout::from_config(&config, rng)),
                })
            })
            .collect();
        let lt =
            TickLayout::new(&slots, config.num_attention_heads, config.pad_token_id as u32).expect("tick");
        let tick = model.ops.tick(&lt).expect("tick upload");
        let tokens = (trials * tokens_per_slot) as u64;
        println!(
            "T = {trials}: {tokens} real tokens per tick, {:.1} GFLOP per tick (model FLOPs of real tokens)",
            tokens as f64 * flops_per_token / 1e9
        );
        let mut g = c.benchmark_group("train_step_bert_tiny");
        g.sample_size(10);
        g.throughput(Throughput::Elements(tokens));
        g.bench_function(format!("T{trials}"), |b| {
            b.iter(|| {
                model.forward_backward(&tick).expect("forward/backward");
                let steps: Vec<SlotOptimizerStep> = (0..trials)
                    .map(|slot| SlotOptimizerStep {
                        slot,
                        lr: 1e-5,
                        adamw: AdamW::default(),
                        max_grad_norm: 1.0,
                    })
                    .collect();
                model.optimizer_step(&steps).expect("optimizer");
            })
        });
        g.finish();
    }
    c.final_summary();
}
