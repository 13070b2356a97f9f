//! Percentile pruning (Optuna's `PercentilePruner`): stop a trial whose best intermediate value is
//! outside the top `percentile` % of the completed trials' values at the same step.

use anyhow::{Result, bail};

use super::{PruneDecision, Pruner};
use crate::search::sampler::StudyView;
use crate::trial::{FrozenTrial, StudyDirection, TrialState};

#[derive(Clone, Debug)]
pub struct PercentilePruner {
    percentile: f64,
    n_startup_trials: usize,
    n_warmup_steps: i64,
    interval_steps: i64,
    n_min_trials: usize,
}

impl PercentilePruner {
    /// Validates like Optuna: percentile in [0, 100], interval >= 1, n_min_trials >= 1.
    pub fn new(
        percentile: f64,
        n_startup_trials: usize,
        n_warmup_steps: i64,
        interval_steps: i64,
        n_min_trials: usize,
    ) -> Result<Self> {
        if !(0.0..=100.0).contains(&percentile) {
            bail!("percentile must be between 0 and 100 inclusive, got {percentile}");
        }
        if n_warmup_steps < 0 {
            bail!("the number of warm-up steps cannot be negative, got {n_warmup_steps}");
        }
        if interval_steps < 1 {
            bail!("the pruning interval must be at least 1 step, got {interval_steps}");
        }
        if n_min_trials < 1 {
            bail!("n_min_trials must be at least 1, got {n_min_trials}");
        }
        Ok(PercentilePruner { percentile, n_startup_trials, n_warmup_steps, interval_steps, n_min_trials })
    }

    /// Optuna's defaults: 5 start-up trials, 0 warm-up steps, interval 1, n_min_trials 1.
    pub fn with_defaults(percentile: f64) -> Self {
        PercentilePruner {
            percentile: percentile.clamp(0.0, 100.0),
            n_startup_trials: 5,
            n_warmup_steps: 0,
            interval_steps: 1,
            n_min_trials: 1,
        }
    }
}

/// `np.nanpercentile(values, q)` with the default linear method.
pub fn nanpercentile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let index = (v.len() - 1) as f64 * (q / 100.0);
    let lo = index.floor();
    let t = index - lo;
    let lo = lo as usize;
    let hi = (lo + 1).min(v.len() - 1);
    let (a, b) = (v[lo], v[hi]);
    let diff = b - a;
    // numpy's _lerp, which subtracts from b when t >= 0.5 for monotonicity.
    if t >= 0.5 { b - diff * (1.0 - t) } else { a + diff * t }
}

/// Optuna's `_is_first_in_interval_step`.
fn is_first_in_interval_step(
    step: i64,
    trial: &FrozenTrial,
    n_warmup_steps: i64,
    interval_steps: i64,
) -> bool {
    let nearest_lower_pruning_step =
        (step - n_warmup_steps).div_euclid(interval_steps) * interval_steps + n_warmup_steps;
    let second_last_step = trial
        .intermediate_values
        .keys()
        .copied()
        .filter(|&s| s != step)
        .fold(-1, |acc, s| if s > acc { s } else { acc });
    second_last_step < nearest_lower_pruning_step
}

impl Pruner for PercentilePruner {
    fn name(&self) -> &str {
        "PercentilePruner"
    }

    fn prune(&mut self, study: &StudyView, trial: &FrozenTrial) -> Result<PruneDecision> {
        let completed: Vec<&FrozenTrial> =
            study.trials.iter().filter(|t| t.state == TrialState::Complete).collect();
        if completed.is_empty() || completed.len() < self.n_startup_trials {
            return Ok(PruneDecision::keep());
        }
        let Some(step) = trial.last_step() else { return Ok(PruneDecision::keep()) };
        if step < self.n_warmup_steps
            || !is_first_in_interval_step(step, trial, self.n_warmup_steps, self.interval_steps)
        {
            return Ok(PruneDecision::keep());
        }
        let values: Vec<f64> = trial.intermediate_values.values().copied().filter(|v| !v.is_nan()).collect();
        let best = match study.direction {
            StudyDirection::Maximize => values.iter().copied().fold(f64::NAN, f64::max),
            StudyDirection::Minimize => values.iter().copied().fold(f64::NAN, f64::min),
        };
        if best.is_nan() {
            return Ok(PruneDecision::prune());
        }
        let at_step: Vec<f64> =
            completed.iter().filter_map(|t| t.intermediate_values.get(&step).copied()).collect();
        if at_step.len() < self.n_min_trials {
            return Ok(PruneDecision::keep());
        }
        let q = match study.direction {
            StudyDirection::Maximize => 100.0 - self.percentile,
            StudyDirection::Minimize => self.percentile,
        };
        let p = nanpercentile(&at_step, q);
        if p.is_nan() {
            return Ok(PruneDecision::keep());
        }
        let prune = match study.direction {
            StudyDirection::Maximize => best < p,
            StudyDirection::Minimize => best > p,
        };
        Ok(PruneDecision { prune, system_attrs: Vec::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanpercentile_matches_numpy() {
        // np.nanpercentile([...], q) from numpy 2.4.
        assert_eq!(nanpercentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.5);
        assert_eq!(nanpercentile(&[0.3, f64::NAN, 0.1, 0.2], 25.0), 0.15000000000000002);
        assert_eq!(nanpercentile(&[0.3, 0.1, 0.2], 75.0), 0.25);
        assert!(nanpercentile(&[f64::NAN], 50.0).is_nan());
        assert!(PercentilePruner::new(101.0, 5, 0, 1, 1).is_err());
        assert!(PercentilePruner::new(50.0, 5, 0, 0, 1).is_err());
    }
}
