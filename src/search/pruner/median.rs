//! Median stopping (Optuna's `MedianPruner`): the percentile pruner at 50 %.

use anyhow::Result;

use super::{PercentilePruner, PruneDecision, Pruner};
use crate::search::sampler::StudyView;
use crate::trial::FrozenTrial;

/// Prunes a trial whose best intermediate value so far is worse than the median of the
/// completed trials' values at the same step. Defaults: 5 start-up trials, no warm-up steps,
/// every step, at least 1 trial at the step.
#[derive(Clone, Debug)]
pub struct MedianPruner(PercentilePruner);

impl MedianPruner {
    pub fn new(
        n_startup_trials: usize,
        n_warmup_steps: i64,
        interval_steps: i64,
        n_min_trials: usize,
    ) -> Result<Self> {
        Ok(MedianPruner(PercentilePruner::new(
            50.0,
            n_startup_trials,
            n_warmup_steps,
            interval_steps,
            n_min_trials,
        )?))
    }
}

impl Default for MedianPruner {
    fn default() -> Self {
        MedianPruner(PercentilePruner::with_defaults(50.0))
    }
}

impl Pruner for MedianPruner {
    fn name(&self) -> &str {
        "MedianPruner"
    }

    fn prune(&mut self, study: &StudyView, trial: &FrozenTrial) -> Result<PruneDecision> {
        self.0.prune(study, trial)
    }
}
