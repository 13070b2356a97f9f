//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hpo_gpu::model::tensor::RawTensor;

pub mod postgres_errors;
pub mod running;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/data` beside the repository, or None (with the reason printed) when absent.
pub fn shared_data() -> Option<PathBuf> {
    let p = repo().join("../shared/data");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is absent (the real data lives beside the repo)", p.display());
        None
    }
}

/// Whether the test command provides a CUDA device (a GPU, or in CI the virtual device of
/// vcuda/): then a GPU test that finds none fails instead of skipping.
pub fn device_required() -> bool {
    std::env::var_os("HPO_GPU_REQUIRE_DEVICE").is_some_and(|v| v == "1")
}

/// The GPU with every kernel loaded, or None after printing why the calling test skips (a failure
/// when [`device_required`]).
pub fn gpu_or_skip() -> Option<hpo_gpu::cuda::context::Gpu> {
    match hpo_gpu::cuda::context::Gpu::new() {
        Ok(g) => {
            eprintln!("running on {}", g.name);
            Some(g)
        }
        Err(why) if device_required() => {
            panic!("HPO_GPU_REQUIRE_DEVICE=1 but no usable CUDA device: {why:#}")
        }
        Err(why) => {
            eprintln!("SKIPPED: {why:#}");
            None
        }
    }
}

pub fn tensors(path: &Path) -> HashMap<String, RawTensor> {
    hpo_gpu::model::safetensors_io::load_safetensors(path).expect("fixture loads").into_iter().collect()
}

pub fn f32s(t: &RawTensor) -> Vec<f32> {
    t.to_f32().expect("float tensor")
}

pub fn i64s(t: &RawTensor) -> Vec<i64> {
    t.data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// ‖a − b‖ / ‖b‖ (or ‖a − b‖ when b is all zeros).
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if norm == 0.0 { diff } else { diff / norm }
}

/// Python interpreter with torch/transformers/optuna: $HPO_GPU_PYTHON, else the repo's .venv.
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("HPO_GPU_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: no Python environment at {} (scripts/test.sh creates it)", p.display());
        None
    }
}

const WORDS: [&str; 12] =
    ["good", "great", "fine", "superb", "lovely", "nice", "bad", "awful", "poor", "dull", "boring", "weak"];

/// A small BERT folder: vocab.txt, tokenizer_config.json and config.json (random init).
pub fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("tiny-bert");
    std::fs::create_dir_all(&m).unwrap();
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "."]
        .iter()
        .map(|s| s.to_string())
        .collect();
    vocab.extend(WORDS.iter().map(|s| s.to_string()));
    std::fs::write(m.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    std::fs::write(m.join("tokenizer_config.json"), r#"{"do_lower_case": true}"#).unwrap();
    std::fs::write(
        m.join("config.json"),
        r#"{"model_type": "bert", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}"#,
    )
    .unwrap();
    m
}

/// train.jsonl / test.jsonl: sentiment from the words used (first six positive).
pub fn tiny_data(dir: &Path) -> PathBuf {
    let d = dir.join("data");
    std::fs::create_dir_all(&d).unwrap();
    for (split, n) in [("train", 64), ("test", 32)] {
        let mut lines = Vec::new();
        for i in 0..n {
            let label = (i * 7 + 3) % 2;
            let w1 = WORDS[(i * 5) % 6 + if label == 1 { 0 } else { 6 }];
            let w2 = WORDS[(i * 11 + 1) % 6 + if label == 1 { 0 } else { 6 }];
            let label_name = if label == 1 { "pos" } else { "neg" };
            lines.push(format!(r#"{{"text": "The movie was {w1}, {w2}.", "label": "{label_name}"}}"#));
        }
        std::fs::write(d.join(format!("{split}.jsonl")), lines.join("\n") + "\n").unwrap();
    }
    d
}

/// Runs the `hpo-gpu` binary built for these tests.
pub fn hpo_gpu(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hpo-gpu")).args(args).output().expect("run hpo-gpu")
}

/// ‖a − b‖ / ‖b‖ of f32 vectors, in f64.
pub fn rel_err_f32(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    if norm == 0.0 { diff } else { diff / norm }
}

/// A packed batch of random sequences of the given lengths ([CLS] = 2 … [SEP] = 3, other ids in
/// 5..vocab) with random labels below `classes`.
pub fn random_batch(
    rng: &mut rand::rngs::StdRng,
    lens: &[usize],
    vocab: u32,
    classes: usize,
) -> hpo_gpu::cpu::bert::Batch {
    use rand::RngExt;
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| {
            let mut s = vec![2u32];
            s.extend((1..n.saturating_sub(1)).map(|_| rng.random_range(5..vocab)));
            if n > 1 {
                s.push(3);
            }
            s
        })
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let labels: Vec<usize> = lens.iter().map(|_| rng.random_range(0..classes)).collect();
    hpo_gpu::cpu::bert::Batch::packed(&refs, &labels)
}

/// A parquet file whose footer starts with unknown fields, each a thrift map of 2^31 − 1
/// boolean → boolean entries: 6 bytes that the parquet crate (60.1) skips one zero-byte entry at a
/// time, ~4·10^9 steps per map (measured: 17 s for one map, 59 s for four, so a 1 KB footer of such
/// maps would hang a search for about an hour).
pub fn parquet_with_stalling_footer(maps: usize) -> Vec<u8> {
    // Compact protocol: 0x0B = map field with its id in the next (zig-zag) byte, 0x28 = id 20;
    // 0x1B = map field, id + 1; then the entry count as a varint and 0x11 = key and value bool.
    const HUGE_BOOL_MAP: [u8; 6] = [0xFF, 0xFF, 0xFF, 0xFF, 0x07, 0x11];
    let mut footer = vec![0x0B, 0x28];
    footer.extend(HUGE_BOOL_MAP);
    for _ in 1..maps {
        footer.push(0x1B);
        footer.extend(HUGE_BOOL_MAP);
    }
    footer.push(0x00);
    let mut file = b"PAR1".to_vec();
    file.extend(&footer);
    file.extend((footer.len() as u32).to_le_bytes());
    file.extend(b"PAR1");
    file
}

/// A study `name` in `dir/<name>.db` holding `trials` ((learning rate, batch size) each) as
/// WAITING trials with fixed parameters, and a search-space file whose learning-rate range
/// admits them (up to 1e12: a diverging trial included). Returns (space file, storage URL).
pub fn enqueued_study(dir: &Path, name: &str, trials: &[(f64, i64)]) -> (PathBuf, String) {
    use hpo_gpu::study::storage::{NewTrial, Storage};
    use hpo_gpu::trial::{StudyDirection, TrialState};
    std::fs::create_dir_all(dir).unwrap();
    let space = dir.join("space.toml");
    std::fs::write(
        &space,
        "[learning_rate]\ntype = \"float\"\nlow = 1e-5\nhigh = 1e12\nlog = true\n\n\
         [per_device_train_batch_size]\ntype = \"categorical\"\nchoices = [8, 16]\n",
    )
    .unwrap();
    let url = format!("sqlite:///{}", dir.join(format!("{name}.db")).display());
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.create_study(name, StudyDirection::Maximize, false).unwrap();
    for (lr, bs) in trials {
        let mut t = NewTrial::new(TrialState::Waiting);
        let fixed = format!("{{\"learning_rate\": {lr:e}, \"per_device_train_batch_size\": {bs}}}");
        t.system_attrs.push(("fixed_params".into(), fixed));
        storage.create_trial(study.study_id, &t).unwrap();
    }
    (space, url)
}
