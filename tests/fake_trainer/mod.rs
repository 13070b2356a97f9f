//! Fake trainers for the study-driver tests: no model, just epochs of made-up numbers, served to
//! the driver one trial at a time through the engine's protocol.
#![allow(dead_code)]

use anyhow::Result;
use hpo_gpu::trial::ParamSet;
use hpo_gpu::trial::protocol::{EpochMetrics, TrainResult, TrialEnd, TrialHost, Verdict};

/// An epoch whose objective (the eval accuracy) is `objective`, taking `seconds`.
pub fn epoch(epoch: u32, objective: f64, train_loss: f64, eval_loss: f64, seconds: f64) -> EpochMetrics {
    EpochMetrics {
        epoch: epoch as usize,
        train_loss,
        eval_loss,
        eval_accuracy: objective,
        learning_rate: 0.0,
        train_seconds: seconds,
        eval_seconds: 0.0,
        train_examples_per_second: 0.0,
        eval_examples_per_second: 0.0,
        train_tokens_per_second: 0.0,
    }
}

/// Serves `host` one trial at a time: `train(number, params, report)` reports each epoch and
/// returns the objective (it stops when `report` answers `Prune`); an error fails the trial.
pub fn one_at_a_time(
    host: &mut dyn TrialHost,
    mut train: impl FnMut(u64, &ParamSet, &mut dyn FnMut(&EpochMetrics) -> Result<Verdict>) -> Result<f64>,
) -> Result<()> {
    loop {
        let Some((number, params)) = host.next_trials(1, true)?.into_iter().next() else {
            return Ok(());
        };
        let (mut epochs, mut pruned) = (Vec::new(), false);
        let trained = train(number, &params, &mut |m| {
            epochs.push(m.clone());
            let verdict = host.on_epoch(number, m)?;
            pruned |= verdict == Verdict::Prune;
            Ok(verdict)
        });
        let end = match trained {
            Ok(objective) => {
                let result = TrainResult { best_epoch: epochs.len(), epochs, objective, pruned };
                TrialEnd::Finished { result, params: Vec::new() }
            }
            Err(e) => TrialEnd::Failed { reason: format!("{e:#}") },
        };
        host.on_end(number, end)?;
    }
}
