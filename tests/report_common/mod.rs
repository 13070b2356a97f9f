//! Shared helpers for the report tests: studies with known structure written through the storage
//! API, a realistic demo study run by the real search driver, and the Python lookup for the
//! Optuna comparisons.
#![allow(dead_code)]

use std::time::Duration;

use anyhow::{Result, bail};
use hpo_gpu::distributions::{
    CategoricalDistribution, Distribution, FloatDistribution, IntDistribution, ParamValue,
};
use hpo_gpu::search::pruner::MedianPruner;
use hpo_gpu::search::sampler::TpeSampler;
use hpo_gpu::search::sampler::tpe::TpeOptions;
use hpo_gpu::search::space::SearchSpace;
use hpo_gpu::study::driver::{DriverOptions, NoProgress, run_study};
use hpo_gpu::trial::protocol::{EpochMetrics, TrialHost, TrialRunner, Verdict};

use crate::fake_trainer::{epoch as epoch_metrics, one_at_a_time};
use hpo_gpu::study::StudyRef;
use hpo_gpu::study::storage::sql::SqlValue;
use hpo_gpu::study::storage::{NewTrial, Storage};
use hpo_gpu::trial::{ParamSet, StudyDirection, TrialState, UtcDateTime};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

pub fn temp_db() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:///{}", dir.path().join("study.db").display());
    (dir, url)
}

/// The Python with Optuna and the interop script runner, shared with the study tests.
#[path = "../common_study/mod.rs"]
mod common_study;
#[allow(unused_imports)] // only the interop test binary uses them
pub use common_study::{python, run_python};

pub const BATCH_SIZES: [i64; 4] = [16, 32, 64, 128];

/// A study of `n` COMPLETE trials, uniformly random over learning_rate (log float), batch size
/// (categorical) and warmup_steps (int), whose value depends strongly on the learning rate,
/// weakly on the batch size and not at all on warmup_steps.
pub fn write_importance_study(storage: &mut Storage, name: &str, n: usize, seed: u64) -> StudyRef {
    let study = storage.create_study(name, StudyDirection::Maximize, false).unwrap();
    let lr_d = Distribution::Float(FloatDistribution::new(1e-6, 1e-4, true, None).unwrap());
    let bs_d = Distribution::Categorical(
        CategoricalDistribution::new(BATCH_SIZES.iter().map(|&b| ParamValue::Int(b)).collect()).unwrap(),
    );
    let ws_d = Distribution::Int(IntDistribution::new(0, 500, false, 1).unwrap());
    let mut rng = StdRng::seed_from_u64(seed);
    let t0 = UtcDateTime::parse("2026-11-28 09:00:00").unwrap();
    for i in 0..n {
        let lr = 10f64.powf(rng.random_range(-6.0..-4.0));
        let bi = rng.random_range(0..4usize);
        let ws = rng.random_range(0..=500i64);
        let value = 0.9 - 0.08 * (lr.log10() + 4.5).powi(2) - 0.012 * (bi as f64 - 1.0).abs();
        let mut t = NewTrial::new(TrialState::Complete);
        t.values = Some(vec![value]);
        t.datetime_start =
            Some(UtcDateTime { micros_since_epoch: t0.micros_since_epoch + i as i64 * 60_000_000 });
        t.datetime_complete = Some(UtcDateTime {
            micros_since_epoch: t0.micros_since_epoch + i as i64 * 60_000_000 + 55_000_000,
        });
        t.params = vec![
            ("learning_rate".into(), lr, lr_d.clone()),
            ("per_device_train_batch_size".into(), bi as f64, bs_d.clone()),
            ("warmup_steps".into(), ws as f64, ws_d.clone()),
        ];
        storage.create_trial(study.study_id, &t).unwrap();
    }
    study
}

/// A deterministic stand-in for fine-tuning all-MiniLM-L6-v2 on IMDB: eval accuracy peaks near
/// learning_rate 3.5e-5, depends a little on the batch size and hardly on weight decay; low
/// learning rates learn slowly over the epochs. Trial `fail_trial` fails with a simulated
/// out-of-memory error.
pub struct DemoRunner {
    pub epochs: u32,
    pub fail_trial: u64,
}

/// Noise in [-1, 1] from the trial number (fixed, so the demo study is reproducible).
fn jitter(n: u64, salt: u64) -> f64 {
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED69);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

impl TrialRunner for DemoRunner {
    fn run_trials(&mut self, host: &mut dyn TrialHost) -> Result<()> {
        one_at_a_time(host, |number, params, report| self.run_trial(number, params, report))
    }
}

impl DemoRunner {
    fn run_trial(
        &mut self,
        number: u64,
        params: &ParamSet,
        report: &mut dyn FnMut(&EpochMetrics) -> Result<Verdict>,
    ) -> Result<f64> {
        let lr = params.get_f64("learning_rate")?.unwrap_or(3e-5);
        let bs = params.get_i64("per_device_train_batch_size")?.unwrap_or(32);
        let wd = params.get_f64("weight_decay")?.unwrap_or(0.0);
        if number == self.fail_trial {
            bail!(
                "simulated CUDA out of memory: tried to allocate 1.50 GiB during epoch 1 \
                 (per_device_train_batch_size={bs})"
            );
        }
        let l = lr.log10();
        let final_acc = 0.905
            - 0.075 * (l + 4.45).powi(2)
            - 0.006 * ((bs as f64).log2() - 5.0).abs()
            - 0.02 * (wd - 0.08).powi(2)
            + 0.003 * jitter(number, 1);
        let gap = 0.012 + 0.02 * (-4.5 - l).max(0.0);
        let epoch_seconds = match bs {
            16 => 142.0,
            32 => 118.0,
            64 => 104.0,
            _ => 98.0,
        };
        let mut acc = 0.0;
        for epoch in 1..=self.epochs {
            acc = final_acc - f64::from(self.epochs - epoch) * gap;
            let r = epoch_metrics(
                epoch,
                acc,
                (0.62 - 0.11 * f64::from(epoch) - (acc - 0.8) * 0.6).max(0.05),
                0.22 + 2.2 * (0.93 - acc),
                epoch_seconds * (1.0 + 0.03 * jitter(number, 10 + u64::from(epoch))),
            );
            if report(&r)? == Verdict::Prune {
                return Ok(acc);
            }
        }
        Ok(acc)
    }
}

/// Runs the real search driver (TPE, median pruner) with [`DemoRunner`] on the recipe's space:
/// 30 trials of 3 epochs, some pruned, trial 11 failed. The trials then get timestamps as if each
/// took its reported epoch times, so durations in the report look like a real run.
pub fn write_demo_study(url: &str, name: &str) -> Result<StudyRef> {
    let mut storage = Storage::open(url)?;
    let study = storage.create_study(name, StudyDirection::Maximize, false)?;
    let space = SearchSpace::recipe_default();
    let mut sampler = TpeSampler::new(TpeOptions { seed: Some(42), ..TpeOptions::default() });
    let mut pruner = MedianPruner::default();
    let opts = DriverOptions {
        heartbeat_interval: Duration::from_millis(200),
        grace_period: Duration::from_secs(30),
        poll_interval: Duration::from_millis(50),
        max_consecutive_failures: 3,
        seed: Some(42),
        ..DriverOptions::new(30)
    };
    let mut runner = DemoRunner { epochs: 3, fail_trial: 11 };
    run_study(&mut storage, &study, &space, &mut sampler, &mut pruner, &opts, &mut runner, &mut NoProgress)?;

    let trials = storage.trials(study.study_id, None)?;
    let mut clock = UtcDateTime::parse("2026-11-28 08:00:00")?.micros_since_epoch;
    let mut times = Vec::new();
    for t in &trials {
        let epochs: f64 = t
            .user_attrs
            .iter()
            .filter(|(k, _)| k.ends_with("_runtime"))
            .filter_map(|(_, v)| v.as_f64())
            .sum();
        // Model load and evaluation set-up before the first epoch.
        let seconds = 9.0 + epochs + if t.state == TrialState::Fail { 21.0 } else { 0.0 };
        let start = clock + 2_000_000;
        let end = start + (seconds * 1e6) as i64;
        times.push((
            t.trial_id,
            UtcDateTime { micros_since_epoch: start },
            UtcDateTime { micros_since_epoch: end },
        ));
        clock = end;
    }
    storage.write(|tx| {
        for (id, start, end) in &times {
            tx.exec(
                "UPDATE trials SET datetime_start = ?1, datetime_complete = ?2 WHERE trial_id = ?3",
                &[SqlValue::from(start.format()), SqlValue::from(end.format()), SqlValue::from(*id)],
            )?;
        }
        Ok(())
    })?;
    Ok(study)
}
