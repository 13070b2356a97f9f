//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hpo_gpu::model::tensor::RawTensor;

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
