//! The protocol between whoever decides which trials run and when they stop (the study driver,
//! or `hpo-gpu train` for its one model) and whatever trains them (the engine: the trial-array
//! scheduler over a backend; fakes in tests). One set of types for every caller and device:
//!
//! - a [`TrialRunner`] trains trials it takes from a [`TrialHost`], up to as many at once as it
//!   has slots (one slot: one after another);
//! - after every epoch the host gets the trial's [`EpochMetrics`] and answers with a [`Verdict`];
//! - when a trial leaves its slot the host gets its [`TrialEnd`].

use anyhow::Result;
use serde::Serialize;

use crate::trial::ParamSet;

/// One epoch's numbers, as stored in `training_metrics.json` and reported to a study.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EpochMetrics {
    /// 1-based; a study stores the epoch's objective as the intermediate value of this step.
    pub epoch: usize,
    /// Mean of the optimizer steps' batch-mean losses (Trainer's logged `loss`).
    pub train_loss: f64,
    pub eval_loss: f64,
    pub eval_accuracy: f64,
    pub learning_rate: f64,
    pub train_seconds: f64,
    pub eval_seconds: f64,
    pub train_examples_per_second: f64,
    pub eval_examples_per_second: f64,
    /// Real (unpadded) tokens per second in training.
    pub train_tokens_per_second: f64,
}

impl EpochMetrics {
    /// The value a study optimises, per epoch: the eval accuracy (what Trainer reports to Optuna).
    pub fn objective(&self) -> f64 {
        self.eval_accuracy
    }

    /// Wall time of the epoch, training and evaluation.
    pub fn seconds(&self) -> f64 {
        self.train_seconds + self.eval_seconds
    }
}

/// The host's answer after an epoch: go on, or stop the trial here (a pruner's decision).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Prune,
}

/// What training a trial produced.
#[derive(Clone, Debug, Serialize)]
pub struct TrainResult {
    pub epochs: Vec<EpochMetrics>,
    /// 1-based epoch whose weights were kept.
    pub best_epoch: usize,
    /// The objective value (eval accuracy) per `TrainConfig::objective`.
    pub objective: f64,
    /// True when the host pruned the trial.
    pub pruned: bool,
}

/// How a trial left its slot.
#[derive(Clone, Debug)]
pub enum TrialEnd {
    /// Trained to its last epoch, or pruned (`result.pruned`); `params` are the kept (best)
    /// epoch's weights (empty where a runner trains no model).
    Finished { result: TrainResult, params: Vec<f32> },
    /// Diverged or could not start; the reason names the problem.
    Failed { reason: String },
    /// Dropped through no fault of its parameters (the trial array shrank after running out of
    /// device memory): a study runs its parameters again.
    Evicted { reason: String },
}

/// Where an epoch of a trial stands, after each optimizer step (for progress bars).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochProgress {
    pub epoch: usize,
    pub epochs: usize,
    /// Training examples of this epoch done so far, of `examples`.
    pub done: usize,
    pub examples: usize,
    /// The last optimizer step's batch-mean loss.
    pub loss: f64,
}

/// Where trials come from and where their progress goes.
pub trait TrialHost {
    /// Up to `free_slots` trials to start now, as (trial number, parameters); empty when none
    /// should start. `idle` is true when the runner trains nothing (a host may then wait for
    /// trials elsewhere before answering).
    fn next_trials(&mut self, free_slots: usize, idle: bool) -> Result<Vec<(u64, ParamSet)>>;
    /// After each epoch; [`Verdict::Prune`] stops the trial. An error fails that trial.
    fn on_epoch(&mut self, number: u64, metrics: &EpochMetrics) -> Result<Verdict>;
    /// The trial left its slot. An error stops the runner.
    fn on_end(&mut self, number: u64, end: TrialEnd) -> Result<()>;
    /// Progress within an epoch (for displays); ignored unless a host draws it.
    fn on_progress(&mut self, _number: u64, _progress: &EpochProgress) {}
}

/// Trains the trials a host hands out.
pub trait TrialRunner {
    /// Runs until `host.next_trials` gives nothing while the runner is idle.
    fn run_trials(&mut self, host: &mut dyn TrialHost) -> Result<()>;
}
