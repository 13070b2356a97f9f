//! Shared helpers for the study integration tests: a deterministic fake trainer and the Python
//! interpreter lookup for the Optuna interop tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use hpo_gpu::trial::ParamSet;
use hpo_gpu::trial::protocol::{EpochMetrics, TrialHost, TrialRunner, Verdict};

use crate::fake_trainer::{epoch as epoch_metrics, one_at_a_time};

/// The fake objective: peaks at learning_rate 3e-5, batch 32, weight_decay 0.1.
pub fn score(lr: f64, bs: i64, wd: f64) -> f64 {
    let l = (lr.log10() + 4.5).abs() / 1.5; // 0 at 3.16e-5
    let b = ((bs as f64).log2() - 5.0).abs() / 2.0;
    let w = (wd - 0.1).abs() / 0.2;
    0.5 + 0.45 * (1.0 - (l * l + b * b + w * w) / 3.0).max(0.0)
}

/// Trains nothing: reports `epochs` epochs of a deterministic function of the parameters.
/// weight_decay > 0.28 fails ("simulated CUDA out of memory"); batch 128 with learning rate
/// above 9e-5 ends with a NaN objective.
pub struct FakeRunner {
    pub epochs: u32,
    pub sleep: Duration,
    /// (trial number, epochs run) of every call.
    pub runs: Vec<(u64, u32)>,
    pub params_seen: Vec<(u64, ParamSet)>,
    /// Trial numbers that fail with "simulated failure".
    pub fail_trials: Vec<u64>,
}

impl FakeRunner {
    pub fn new(epochs: u32) -> Self {
        FakeRunner {
            epochs,
            sleep: Duration::ZERO,
            runs: Vec::new(),
            params_seen: Vec::new(),
            fail_trials: Vec::new(),
        }
    }
}

impl TrialRunner for FakeRunner {
    fn run_trials(&mut self, host: &mut dyn TrialHost) -> Result<()> {
        one_at_a_time(host, |number, params, report| self.run_trial(number, params, report))
    }
}

impl FakeRunner {
    fn run_trial(
        &mut self,
        trial_number: u64,
        params: &ParamSet,
        report: &mut dyn FnMut(&EpochMetrics) -> Result<Verdict>,
    ) -> Result<f64> {
        self.params_seen.push((trial_number, params.clone()));
        let lr = params.get_f64("learning_rate")?.unwrap_or(3e-5);
        let bs = params.get_i64("per_device_train_batch_size")?.unwrap_or(32);
        let wd = params.get_f64("weight_decay")?.unwrap_or(0.1);
        if self.fail_trials.contains(&trial_number) {
            self.runs.push((trial_number, 0));
            bail!("simulated failure in trial {trial_number}");
        }
        if wd > 0.28 {
            self.runs.push((trial_number, 0));
            bail!("simulated CUDA out of memory (weight_decay {wd})");
        }
        let s = score(lr, bs, wd);
        let mut last = 0.0;
        for epoch in 1..=self.epochs {
            std::thread::sleep(self.sleep);
            last = s * (f64::from(epoch) / f64::from(self.epochs)).sqrt();
            let r = epoch_metrics(epoch, last, 1.0 - last, 1.1 - last, 0.01 * f64::from(epoch));
            if report(&r)? == Verdict::Prune {
                self.runs.push((trial_number, epoch));
                return Ok(last);
            }
        }
        self.runs.push((trial_number, self.epochs));
        if bs == 128 && lr > 9e-5 {
            return Ok(f64::NAN);
        }
        Ok(last)
    }
}

/// The Python with Optuna for interop tests: `$HPO_GPU_PYTHON`, else the repository's `.venv`.
/// Returns None (after printing why) when it is missing or lacks optuna.
pub fn python() -> Option<PathBuf> {
    let path = std::env::var_os("HPO_GPU_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python")));
    if !path.exists() {
        eprintln!("SKIP: no Python at {} (set HPO_GPU_PYTHON to a Python with optuna)", path.display());
        return None;
    }
    match Command::new(&path).args(["-c", "import optuna"]).output() {
        Ok(o) if o.status.success() => Some(path),
        Ok(o) => {
            eprintln!(
                "SKIP: {} cannot import optuna: {}",
                path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("SKIP: cannot run {}: {e}", path.display());
            None
        }
    }
}

/// Runs a script from tests/interop with arguments; returns stdout, panicking with stderr on failure.
pub fn run_python(python: &PathBuf, script: &str, args: &[&str]) -> String {
    let script = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop")).join(script);
    let out = Command::new(python).arg(&script).args(args).output().expect("run python");
    assert!(
        out.status.success(),
        "{} failed:\nstdout:\n{}\nstderr:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
