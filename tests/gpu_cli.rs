//! `hpo-gpu search --device cuda` and `train --device cuda` end to end, against the same commands
//! on the CPU: the same trials (parameters equal, losses within GPU tolerance), a diverging trial
//! failing alone, out-of-memory shrinking the trial array while the study goes on, Ctrl-C, and
//! the self-check that keeps a broken GPU from running a study.
//!
//! They need a CUDA device: a GPU, or the virtual device of vcuda/ (scripts/test.sh runs this file
//! with it and HPO_GPU_REQUIRE_DEVICE=1, so there they cannot skip). Shapes are small — the
//! virtual device runs every kernel thread as a fiber on the host.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hpo_gpu::study::storage::Storage;
use hpo_gpu::trial::{FrozenTrial, TrialState};

use common::running::{stop_after_start, with_default_signals};

/// Relative tolerance between the GPU and the CPU for losses and parameters (fp32, other
/// summation orders), as tests/gpu_array.rs.
const TOL: f64 = 1e-4;

/// The tiny model with a GPU-sized head: the attention kernels take head sizes 32 and 64.
fn gpu_model(dir: &Path) -> PathBuf {
    let m = common::tiny_model(dir);
    std::fs::write(
        m.join("config.json"),
        r#"{"model_type": "bert", "vocab_size": 32, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}"#,
    )
    .unwrap();
    m
}

fn device_or_skip() -> bool {
    common::gpu_or_skip().is_some()
}

fn hpo(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hpo-gpu"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run hpo-gpu")
}

/// (learning rate, batch size) of the enqueued trials; 1e10 makes the loss NaN (tests/trial_isolation.rs).
const TRIALS: [(f64, i64); 4] = [(1e-3, 8), (1e10, 8), (3e-3, 16), (2e-4, 8)];

/// A study in `dir` holding `enqueued` as WAITING trials with fixed parameters, and the search
/// command that runs them on `device` (its learning-rate space allows the diverging value).
fn enqueued_search(dir: &Path, enqueued: &[(f64, i64)], device: &str, slots: &str) -> (Command, String) {
    let (space, url) = common::enqueued_study(dir, "s", enqueued);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hpo-gpu"));
    with_default_signals(&mut cmd);
    cmd.args(["search", "--model"])
        .arg(gpu_model(dir))
        .args(["--random-init", "--dataset"])
        .arg(common::tiny_data(dir))
        .args(["--train-samples", "0", "--eval-samples", "0", "--max-length", "24", "--epochs", "2"])
        .args(["--device", device, "--slots", slots, "--pruner", "none", "--study-name", "s"])
        .args(["--storage", &url, "--n-trials", "3", "--space"])
        .arg(&space);
    (cmd, url)
}

fn trials(url: &str) -> Vec<FrozenTrial> {
    let mut storage = Storage::open(url).unwrap();
    let study = storage.load_study("s").unwrap();
    storage.trials(study.study_id, None).unwrap()
}

/// A trial's training results: (name, value) for the value, each epoch's objective and every
/// numeric user attribute except timings.
fn results(t: &FrozenTrial) -> Vec<(String, f64)> {
    let mut out = vec![("value".to_string(), t.value().expect("a value"))];
    out.extend(t.intermediate_values.iter().map(|(s, v)| (format!("step {s}"), *v)));
    for (k, v) in &t.user_attrs {
        if !(k.contains("seconds") || k.contains("runtime"))
            && let Some(x) = v.as_f64()
        {
            out.push((k.clone(), x));
        }
    }
    out
}

/// Losses within `TOL`; accuracies (the value, the per-epoch objective, `*accuracy*`) within
/// one eval example of 32, since an example whose two logits nearly tie may fall either way.
fn assert_close(gpu: &FrozenTrial, cpu: &FrozenTrial) {
    let (g, c) = (results(gpu), results(cpu));
    assert_eq!(g.iter().map(|r| &r.0).collect::<Vec<_>>(), c.iter().map(|r| &r.0).collect::<Vec<_>>());
    assert!(g.len() >= 5, "too little to compare: {g:?}");
    for ((name, x), (_, y)) in g.iter().zip(&c) {
        let accuracy = name == "value" || name.starts_with("step") || name.contains("accuracy");
        let ok = if accuracy { (x - y).abs() <= 1.0 / 32.0 + 1e-12 } else { (x - y).abs() <= TOL * y.abs() };
        assert!(ok, "trial {}: {name} is {x} on the GPU and {y} on the CPU", gpu.number);
    }
}

#[test]
fn search_on_the_gpu_stores_the_cpus_trials_and_a_diverging_trial_fails_alone() {
    if !device_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut stored = Vec::new();
    for device in ["cpu", "cuda"] {
        let (mut cmd, url) = enqueued_search(&tmp.path().join(device), &TRIALS, device, "4");
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "search --device {device} failed:\n{stderr}");
        if device == "cuda" {
            assert!(stderr.contains("trial array on ") && !stderr.contains("on the CPU"), "{stderr}");
        }
        stored.push(trials(&url));
    }
    let (cpu, gpu) = (&stored[0], &stored[1]);
    assert_eq!(gpu.len(), 4);
    for (g, c) in gpu.iter().zip(cpu) {
        assert_eq!(g.params, c.params);
        assert_eq!(g.state, c.state, "trial {}", g.number);
        if g.number == 1 {
            assert_eq!(g.state, TrialState::Fail);
            let reason = g.system_attrs.get("fail_reason").and_then(|v| v.as_str()).unwrap_or_default();
            assert!(reason.contains("training diverged: the loss is NaN"), "fail reason: {reason:?}");
        } else {
            assert_eq!(g.state, TrialState::Complete);
            assert_close(g, c);
        }
    }
    // The healthy trials reached different results, so closeness above means something.
    assert_ne!(results(&cpu[0]), results(&cpu[2]));
}

#[test]
fn train_on_the_gpu_matches_the_cpu() {
    if !device_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (gpu_model(tmp.path()), common::tiny_data(tmp.path()));
    let mut exported = Vec::new();
    for device in ["cpu", "cuda"] {
        let output = tmp.path().join(format!("model-{device}"));
        let o = hpo(
            &[
                "train",
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
                "24",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--learning-rate",
                "1e-3",
                "--weight-decay",
                "0.01",
                "--device",
                device,
                "--output",
                output.to_str().unwrap(),
            ],
            &[],
        );
        assert!(o.status.success(), "train --device {device}: {}", String::from_utf8_lossy(&o.stderr));
        let metrics: serde_json::Value =
            serde_json::from_slice(&std::fs::read(output.join("training_metrics.json")).unwrap()).unwrap();
        assert_eq!(metrics["device"], device);
        exported.push((metrics, common::tensors(&output.join("model.safetensors"))));
    }
    let ((cpu_metrics, cpu_params), (gpu_metrics, gpu_params)) = (&exported[0], &exported[1]);
    assert_eq!(gpu_metrics["best_epoch"], cpu_metrics["best_epoch"]);
    let epochs = |m: &serde_json::Value| m["epochs"].as_array().unwrap().clone();
    for (g, c) in epochs(gpu_metrics).iter().zip(&epochs(cpu_metrics)) {
        for key in ["train_loss", "eval_loss"] {
            let (x, y) = (g[key].as_f64().unwrap(), c[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= TOL * y.abs(),
                "epoch {}: {key} {x} on the GPU, {y} on the CPU",
                g["epoch"]
            );
        }
    }
    assert_eq!(gpu_params.len(), cpu_params.len());
    for (name, c) in cpu_params {
        let (c, g) = (common::f32s(c), common::f32s(&gpu_params[name]));
        if name.ends_with("attention.self.key.bias") {
            // Its gradient is analytically zero (softmax ignores a shift): both sides hold ~1e-10
            // noise that Adam turns into ±lr steps, so it can only be bounded by 16 steps of 1e-3.
            let most = g.iter().zip(&c).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(most <= 2.0 * 16.0 * 1e-3, "{name}: moved {most} apart");
            continue;
        }
        let e = common::rel_err_f32(&g, &c);
        assert!(e <= TOL, "{name}: the GPU-trained tensor differs by {e:.2e}");
    }
}

#[test]
fn out_of_memory_shrinks_the_trial_array_and_the_study_goes_on() {
    if !device_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (mut cmd, url) = enqueued_search(tmp.path(), &TRIALS, "cuda", "4");
    // The virtual device claims 8 GiB (so four slots look affordable) but gives 7 MiB: room for
    // four slots' parameters and moments (1.2 MB each), not for their training activations too.
    cmd.env("VCUDA_REPORTED_MEMORY_BYTES", (8u64 << 30).to_string())
        .env("VCUDA_MEMORY_BYTES", (7u64 << 20).to_string());
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("trial array on vcuda virtual device (kernels run on the host) (4 slots)"),
        "{stderr}"
    );
    assert!(stderr.contains("evicted from the trial array, which shrank from 3 to 2 slots"), "{stderr}");
    let all = trials(&url);
    let complete = all.iter().filter(|t| t.state == TrialState::Complete).count();
    assert_eq!(
        complete,
        3,
        "the study still finished its 3 trials: {:?}",
        all.iter().map(|t| t.state).collect::<Vec<_>>()
    );
}

#[test]
fn ctrl_c_stops_a_gpu_search_and_queues_its_trials_again() {
    if !device_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (mut cmd, url) = enqueued_search(tmp.path(), &[TRIALS[0], TRIALS[2]], "cuda", "2");
    cmd.args(["--epochs", "1000"]);
    let (code, stderr) = stop_after_start(cmd, 2, libc::SIGINT);
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains("SIGINT (Ctrl-C): stopped; running trials [0, 1] stored FAIL and queued again"),
        "{stderr}"
    );
    let after = trials(&url);
    let interrupted = after
        .iter()
        .filter(|t| t.state == TrialState::Fail)
        .filter(|t| {
            t.system_attrs["fail_reason"]
                == serde_json::json!("interrupted: the worker received SIGINT (Ctrl-C)")
        })
        .count();
    assert_eq!(interrupted, 2, "{after:?}");
    assert!(after.iter().all(|t| t.state != TrialState::Running));
}

/// Run by scripts/vcuda-broken.sh with HPO_GPU_BROKEN_DEVICE_LIB = a virtual device built from a
/// broken layernorm.cu: `--device cuda` stops with the self-check's line before any study exists,
/// and `--device auto` says why and runs the study on the CPU. Skips without that variable.
#[test]
fn self_check_catches_a_broken_kernel() {
    let Some(broken) = std::env::var_os("HPO_GPU_BROKEN_DEVICE_LIB") else {
        eprintln!("SKIPPED: HPO_GPU_BROKEN_DEVICE_LIB is not set (scripts/vcuda-broken.sh sets it)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let lib = broken.to_string_lossy().to_string();
    for device in ["cuda", "auto"] {
        let dir = tmp.path().join(device);
        let (mut cmd, url) = enqueued_search(&dir, &TRIALS, device, "1");
        cmd.env("LD_LIBRARY_PATH", &lib);
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if device == "cuda" {
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            let line = stderr.trim();
            assert!(line.starts_with("error: --device cuda: GPU self-check failed on vcuda"), "{stderr}");
            assert_eq!(trials(&url).iter().filter(|t| t.state != TrialState::Waiting).count(), 0);
        } else {
            assert!(out.status.success(), "{stderr}");
            assert!(stderr.contains("note: running on the CPU: GPU self-check failed on vcuda"), "{stderr}");
            assert!(
                stderr.contains("trial array on cpu: 1 slot,"),
                "auto must not use the GPU array: {stderr}"
            );
            assert_eq!(trials(&url).iter().filter(|t| t.state == TrialState::Complete).count(), 3);
        }
    }
    eprintln!("self-check caught the broken kernel");
}
