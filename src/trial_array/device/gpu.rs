//! The trial array on the GPU: [`cuda_array_backend`] builds it on device 0 with as many slots as
//! fit, and [`tick_matches_host`] is the GPU's self-check before the first trial: one tiny
//! training tick (forward, backward and an AdamW step, dropout on, two slots with different
//! sequence lengths) of a 2-layer BERT with the study's head size, on the GPU and on the host ops
//! (`ops::host::HostOps`, checked against the CPU reference by tests/array_model.rs), compared. A
//! driver, card or build that computes something else is caught here, in about a second, rather
//! than after a study.

use anyhow::{Result, anyhow};
use rand::{RngExt, SeedableRng, rngs::StdRng};

use super::DeviceArrayBackend;
use crate::config::BertConfig;
use crate::cpu::adamw::AdamW;
use crate::cpu::bert::{Batch, Dropout};
use crate::cpu::philox::DropoutRng;
use crate::cuda::array_ops::CudaOps;
use crate::cuda::context::Gpu;
use crate::model::BertModel;
use crate::model::layout::ParamLayout;
use crate::ops::host::HostOps;
use crate::ops::{ArrayOps, SlotInput, SlotOptimizerStep, TickLayout};
use crate::trial_array::model::ArrayModel;
use crate::trial_array::{ArrayError, bytes_per_slot, slots_that_fit};

/// The trial array on device 0 for models of `config`: T = `wanted` slots, or fewer when the free
/// device memory holds fewer (or an allocation of T slots fails) (each slot: 5·P fp32 values plus
/// one micro-batch's activations of `micro_batch` sequences up to `max_len` tokens, with 15%
/// headroom).
pub fn cuda_array_backend(
    config: &BertConfig,
    micro_batch: usize,
    max_len: usize,
    wanted: usize,
) -> Result<DeviceArrayBackend<CudaOps>> {
    let mut gpu = Gpu::new()?;
    let layout = ParamLayout::new(config);
    let (free, _total) = gpu.ctx.mem_get_info().map_err(|e| anyhow!("reading free device memory: {e:?}"))?;
    let per_slot = bytes_per_slot(config, layout.len, micro_batch, max_len);
    let mut slots = slots_that_fit(wanted.max(1), free as u64, per_slot, 0.15)?;
    // Free memory can shrink between the query and the allocation (another process on the GPU):
    // out of memory here means fewer slots, as it does during the study.
    loop {
        let name = format!("{} ({slots} slots)", gpu.name);
        let ops = CudaOps::new(gpu, config, &layout)?;
        match DeviceArrayBackend::new(ops, config, slots, &name) {
            Ok(backend) => return Ok(backend),
            Err(ArrayError::OutOfMemory(why)) if slots > 1 => {
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

/// Relative difference allowed between the GPU and the host (fp32 with different summation
/// orders: the GPU array tests hold 1e-4 over ten ticks).
const TOLERANCE: f64 = 1e-4;

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

/// Ok when one tick on `gpu` matches the host ops; Err says what differed. `head_dim` is the
/// study model's head size (the attention kernels are instantiated per head size).
pub fn tick_matches_host(gpu: Gpu, head_dim: usize) -> Result<()> {
    let heads = 2;
    let hidden = heads * head_dim;
    let config = BertConfig::from_json_str(&format!(
        r#"{{"model_type": "bert", "vocab_size": 50, "hidden_size": {hidden}, "num_hidden_layers": 2,
            "num_attention_heads": {heads}, "intermediate_size": {}, "max_position_embeddings": 64,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}}"#,
        hidden * 4
    ))?;
    let layout = ParamLayout::new(&config);
    let p = layout.len;
    let name = gpu.name.clone();
    let mut host = ArrayModel::new(HostOps::new(&config), &config, 2)?;
    let mut dev = ArrayModel::new(CudaOps::new(gpu, &config, &layout)?, &config, 2)?;
    for slot in 0..2 {
        let m = BertModel::random_init(&config, 11 + slot as u64);
        host.ops.write(&mut host.params, slot * p, &m.params)?;
        dev.ops.write(&mut dev.params, slot * p, &m.params)?;
    }
    let mut rng = StdRng::seed_from_u64(7);
    let batches: Vec<Batch> = [&[9usize, 3, 17][..], &[1, 12]]
        .iter()
        .map(|lens| {
            let seqs: Vec<Vec<u32>> = lens
                .iter()
                .map(|&n| {
                    let mut s = vec![2u32];
                    s.extend((1..n).map(|_| rng.random_range(5..50u32)));
                    s
                })
                .collect();
            let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
            let labels: Vec<usize> = lens.iter().map(|_| rng.random_range(0..2)).collect();
            Batch::packed(&refs, &labels)
        })
        .collect();
    let slots: Vec<Option<SlotInput>> = batches
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let rng = DropoutRng { seed: 5, stream: i as u32, step: 0 };
            Some(SlotInput {
                batch: b,
                loss_scale: 1.0 / b.seqs.len() as f32,
                dropout: Some(Dropout::from_config(&config, rng)),
            })
        })
        .collect();
    let layout = TickLayout::new(&slots, heads, config.pad_token_id as u32)?;
    let (host_tick, dev_tick) = (host.ops.tick(&layout)?, dev.ops.tick(&layout)?);
    let host_loss = host.forward_backward(&host_tick)?;
    let dev_loss = dev.forward_backward(&dev_tick)?;
    for (slot, (d, h)) in dev_loss.iter().zip(&host_loss).enumerate() {
        anyhow::ensure!(
            relative(*d, *h) <= TOLERANCE,
            "GPU self-check failed on {name}: slot {slot}'s loss is {d} on the GPU and {h} on the CPU"
        );
    }
    let steps: Vec<SlotOptimizerStep> = (0..2)
        .map(|slot| SlotOptimizerStep {
            slot,
            lr: 1e-3,
            adamw: AdamW { weight_decay: 0.01, ..AdamW::default() },
            max_grad_norm: 1.0,
        })
        .collect();
    let host_norms = host.optimizer_step(&steps)?;
    let dev_norms = dev.optimizer_step(&steps)?;
    for (slot, (d, h)) in dev_norms.iter().zip(&host_norms).enumerate() {
        anyhow::ensure!(
            relative(*d, *h) <= TOLERANCE,
            "GPU self-check failed on {name}: slot {slot}'s gradient norm is {d} on the GPU and {h} on the CPU"
        );
    }
    for slot in 0..2 {
        let (d, h) = (dev.ops.read(&dev.params, slot * p, p)?, host.ops.read(&host.params, slot * p, p)?);
        let diff: f64 = d.iter().zip(&h).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = h.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
        let e = if diff.is_nan() { f64::INFINITY } else { diff / norm.max(1e-30) };
        anyhow::ensure!(
            e <= TOLERANCE,
            "GPU self-check failed on {name}: slot {slot}'s parameters after one step differ by {e:.1e} (relative) from the CPU's"
        );
    }
    Ok(())
}
