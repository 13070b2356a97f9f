//! Pruners decide, after each reported intermediate value (for hpo-gpu: after each epoch), whether
//! a trial should stop early — Optuna's `prune(study, trial) -> bool`, with the same defaults.
//! A pruner sees the study's trials as stored just before the decision; the successive-halving
//! family also records rung values as trial system attributes (`completed_rung_{k}`), which it
//! returns for the caller to store.

pub mod hyperband;
pub mod median;
pub mod percentile;
pub mod successive_halving;

use anyhow::Result;

use crate::search::sampler::StudyView;
use crate::trial::FrozenTrial;

pub use hyperband::HyperbandPruner;
pub use median::MedianPruner;
pub use percentile::PercentilePruner;
pub use successive_halving::SuccessiveHalvingPruner;

/// A pruning decision plus the system attributes (key, value) to store on the trial.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PruneDecision {
    pub prune: bool,
    pub system_attrs: Vec<(String, f64)>,
}

impl PruneDecision {
    pub fn keep() -> Self {
        Self::default()
    }

    pub fn prune() -> Self {
        PruneDecision { prune: true, system_attrs: Vec::new() }
    }
}

/// Optuna's `BasePruner`.
pub trait Pruner: Send {
    fn name(&self) -> &str;

    /// Decides for `trial` (its intermediate values include the latest report). `study.trials`
    /// holds all trials of the study, `trial` among them.
    fn prune(&mut self, study: &StudyView, trial: &FrozenTrial) -> Result<PruneDecision>;

    /// The trials a sampler should see for `trial`: all of them, except for Hyperband, where
    /// only the trial's bracket counts (Optuna's `_filter_study`).
    fn filter_trials_for_sampler<'a>(
        &self,
        study: &StudyView<'a>,
        _trial: &FrozenTrial,
    ) -> Option<Vec<FrozenTrial>> {
        let _ = study;
        None
    }
}

/// Never prunes (Optuna's `NopPruner`).
#[derive(Clone, Copy, Debug, Default)]
pub struct NopPruner;

impl Pruner for NopPruner {
    fn name(&self) -> &str {
        "NopPruner"
    }

    fn prune(&mut self, _: &StudyView, _: &FrozenTrial) -> Result<PruneDecision> {
        Ok(PruneDecision::keep())
    }
}
