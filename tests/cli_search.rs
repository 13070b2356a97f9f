//! `hpo-gpu search` end to end on a tiny model and dataset: trials run and are stored with their
//! per-epoch values, a second run resumes the study to the new total, and Optuna reads the result.

mod common;

use std::process::Command;

use serde_json::Value;

use common::hpo_gpu as hpo;

#[test]
fn search_runs_resumes_and_optuna_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(tmp.path());
    let data = common::tiny_data(tmp.path());
    let db = tmp.path().join("optuna_trials.db");
    let storage = format!("sqlite:///{}", db.display());
    let search = |n: &str| {
        let o = hpo(&[
            "search",
            "--model",
            model.to_str().unwrap(),
            "--random-init",
            "--dataset",
            data.to_str().unwrap(),
            "--train-samples",
            "0",
            "--eval-samples",
            "0",
            "--max-length",
            "16",
            "--epochs",
            "2",
            "--storage",
            &storage,
            "--n-trials",
            n,
            "--sampler-seed",
            "7",
            "--device",
            "cpu",
        ]);
        assert!(o.status.success(), "search failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    assert!(search("2").contains("best trial"));
    search("3");
    let o = hpo(&["trials", "--storage", &storage, "--study-name", "transformers_optuna_study", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let trials: Value = serde_json::from_slice(&o.stdout).unwrap();
    let trials = trials.as_array().unwrap();
    assert_eq!(trials.len(), 3, "the second run resumes to 3 trials in total: {trials:?}");
    for (i, t) in trials.iter().enumerate() {
        assert_eq!(t["number"], i as u64);
        assert_eq!(t["state"], "COMPLETE");
        let p = &t["params"];
        let lr = p["learning_rate"].as_f64().unwrap();
        assert!((1e-6..=1e-4).contains(&lr), "recipe space: lr {lr}");
        assert!([16, 32, 64, 128].contains(&p["per_device_train_batch_size"].as_i64().unwrap()));
        let wd = p["weight_decay"].as_f64().unwrap();
        assert!((0.0..=0.3).contains(&wd));
        // The objective is the last epoch's eval accuracy, reported per epoch as intermediate values.
        let iv = t["intermediate_values"].as_object().unwrap();
        assert_eq!(iv.len(), 2, "{t}");
        let last = iv["2"].as_f64().unwrap();
        assert_eq!(t["value"].as_f64().unwrap(), last);
        assert!((0.0..=1.0).contains(&last));
    }
    // The recipe's final step: train with the best trial's hyperparameters.
    let best =
        trials.iter().max_by(|a, b| a["value"].as_f64().partial_cmp(&b["value"].as_f64()).unwrap()).unwrap();
    let out_dir = tmp.path().join("final_model");
    let o = hpo(&[
        "train",
        "--from-study",
        "transformers_optuna_study",
        "--storage",
        &storage,
        "--model",
        model.to_str().unwrap(),
        "--random-init",
        "--dataset",
        data.to_str().unwrap(),
        "--train-samples",
        "0",
        "--eval-samples",
        "0",
        "--max-length",
        "16",
        "--epochs",
        "2",
        "--output",
        out_dir.to_str().unwrap(),
        "--quiet",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "train --from-study failed: {}", String::from_utf8_lossy(&o.stderr));
    let metrics: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("training_metrics.json")).unwrap())
            .unwrap();
    let first_best = trials.iter().find(|t| t["value"] == best["value"]).unwrap();
    assert_eq!(metrics["study"]["trial_number"], first_best["number"]);
    assert_eq!(metrics["train_config"]["learning_rate"], first_best["params"]["learning_rate"]);
    assert_eq!(metrics["train_config"]["batch_size"], first_best["params"]["per_device_train_batch_size"]);
    let o = hpo(&["train", "--from-study", "nope", "--storage", &storage, "--quiet"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"), "{}", String::from_utf8_lossy(&o.stderr));

    // Plots and the HTML report work on the study the search wrote.
    let plots = tmp.path().join("plots");
    let o = hpo(&["plot", "--storage", &storage, "--out", plots.to_str().unwrap()]);
    assert!(o.status.success(), "plot failed: {}", String::from_utf8_lossy(&o.stderr));
    for f in ["optimization_history.png", "intermediate_values.svg", "slice.png"] {
        assert!(plots.join(f).metadata().is_ok_and(|m| m.len() > 1000), "{f} missing or empty");
    }
    let html = tmp.path().join("report.html");
    let o = hpo(&["report", "--storage", &storage, "--out", html.to_str().unwrap()]);
    assert!(o.status.success(), "report failed: {}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&html).unwrap();
    assert!(
        text.contains("transformers_optuna_study") && text.contains("<svg"),
        "report lacks the study or plots"
    );

    let Some(python) = common::python() else { return };
    let script = r#"
import json, sys, optuna
s = optuna.load_study(study_name="transformers_optuna_study", storage=sys.argv[1])
print(json.dumps({"n": len(s.trials), "best": s.best_trial.number, "value": s.best_value,
                  "steps": sorted(s.trials[0].intermediate_values)}))
"#;
    let o = Command::new(python).args(["-c", script, &storage]).output().unwrap();
    assert!(o.status.success(), "optuna could not read the study: {}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["n"], 3);
    assert_eq!(v["steps"], serde_json::json!([1, 2]));
    let best = trials.iter().map(|t| t["value"].as_f64().unwrap()).fold(f64::MIN, f64::max);
    assert_eq!(v["value"].as_f64().unwrap(), best);
}

/// Without a usable GPU, `--device cuda` is one clear error (before any data is read or any study
/// created) and `--device auto` falls back to the CPU, saying why. Which reason depends on the
/// build: without nvcc there are no kernels; with them (CI installs nvcc) there is no driver here.
#[test]
fn device_cuda_without_a_gpu_is_a_clear_error_and_auto_falls_back() {
    if hpo_gpu::cuda::availability().is_ok() {
        eprintln!("SKIPPED: this machine has a usable GPU");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(tmp.path());
    let data = common::tiny_data(tmp.path());
    let db = tmp.path().join("s.db");
    let storage = format!("sqlite:///{}", db.display());
    let reasons = [
        "this hpo-gpu was built without CUDA kernels (nvcc was not found at build time)",
        "libcuda.so was not found: no NVIDIA driver on this machine",
    ];
    let args = |device: &'static str| {
        vec![
            "search".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--random-init".into(),
            "--dataset".into(),
            data.display().to_string(),
            "--train-samples".into(),
            "16".into(),
            "--eval-samples".into(),
            "8".into(),
            "--max-length".into(),
            "16".into(),
            "--epochs".into(),
            "1".into(),
            "--n-trials".into(),
            "1".into(),
            "--storage".into(),
            storage.clone(),
            "--device".into(),
            device.into(),
        ]
    };
    let run = |a: Vec<String>| Command::new(env!("CARGO_BIN_EXE_hpo-gpu")).args(a).output().unwrap();
    let o = run(args("cuda"));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(reasons.iter().any(|r| err.trim() == format!("error: --device cuda: {r}")), "{err}");
    assert!(!db.exists(), "a refused --device cuda created the study database");
    let o = run(args("auto"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(reasons.iter().any(|r| err.contains(&format!("note: running on the CPU ({r})"))), "{err}");
    assert!(db.exists());
}
