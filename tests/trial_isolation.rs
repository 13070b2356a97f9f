//! Issue 7: a trial whose loss becomes NaN is stored FAIL with the reason, and the study's other
//! trials come out bit-identical to a study that never had it.

mod common;

use std::path::Path;

use hpo_gpu::study::storage::Storage;
use hpo_gpu::trial::{FrozenTrial, TrialState};

/// (learning rate, batch size) of each enqueued trial. A learning rate of 1e10 drives the tiny
/// model's loss to NaN in its second optimizer step (10 or 1000 only make the loss large).
const HEALTHY: [(f64, i64); 3] = [(1e-3, 8), (3e-3, 16), (2e-4, 8)];
const DIVERGING: (f64, i64) = (1e10, 8);

fn run_study(dir: &Path, name: &str, trials: &[(f64, i64)]) -> Vec<FrozenTrial> {
    let (space, url) = common::enqueued_study(dir, name, trials);
    let healthy = trials.iter().filter(|t| **t != DIVERGING).count().to_string();
    let model = common::tiny_model(dir);
    let data = common::tiny_data(dir);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hpo-gpu"))
        .args(["search", "--model"])
        .arg(&model)
        .args(["--random-init", "--dataset"])
        .arg(&data)
        .args(["--train-samples", "0", "--eval-samples", "0", "--max-length", "24", "--epochs", "2"])
        .args(["--device", "cpu", "--pruner", "none", "--study-name", name, "--storage", &url])
        .args(["--n-trials", &healthy, "--space"])
        .arg(&space)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "search failed:\n{stderr}");
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.load_study(name).unwrap();
    storage.trials(study.study_id, None).unwrap()
}

/// Everything a trial's training produced, as bits: value, per-epoch objective and the epoch
/// attributes (losses, accuracy), without timings.
fn results(t: &FrozenTrial) -> Vec<(String, u64)> {
    let mut out = vec![("value".to_string(), t.value().expect("a value").to_bits())];
    out.extend(t.intermediate_values.iter().map(|(s, v)| (format!("step {s}"), v.to_bits())));
    for (k, v) in &t.user_attrs {
        if k.contains("seconds") || k.contains("runtime") {
            continue;
        }
        if let Some(x) = v.as_f64() {
            out.push((k.clone(), x.to_bits()));
        }
    }
    out
}

#[test]
fn a_diverging_trial_fails_alone_and_changes_no_other_result() {
    let dir = tempfile::tempdir().unwrap();
    let mut with: Vec<(f64, i64)> = HEALTHY.to_vec();
    with.insert(1, DIVERGING);
    let a = run_study(&dir.path().join("with"), "with", &with);
    let b = run_study(&dir.path().join("without"), "without", &HEALTHY);

    assert_eq!(a.len(), 4);
    let failed = &a[1];
    assert_eq!(failed.state, TrialState::Fail);
    let reason = failed.system_attrs.get("fail_reason").and_then(|v| v.as_str()).unwrap_or_default();
    assert!(reason.contains("training diverged: the loss is NaN at epoch 1"), "fail reason: {reason:?}");
    assert!(failed.values.is_none());

    let others: Vec<&FrozenTrial> = a.iter().filter(|t| t.number != 1).collect();
    assert_eq!(b.len(), others.len());
    for (x, y) in others.iter().zip(&b) {
        assert_eq!((x.state, y.state), (TrialState::Complete, TrialState::Complete));
        assert_eq!(x.params, y.params);
        let (rx, ry) = (results(x), results(y));
        assert!(rx.len() >= 3, "too little to compare: {rx:?}");
        assert_eq!(rx, ry, "trial {} differs from trial {} of the clean study", x.number, y.number);
    }
    // The healthy trials did not all reach the same result, so equality above means something.
    assert_ne!(results(&b[0]), results(&b[1]));
}
