//! Asynchronous successive halving (Optuna's `SuccessiveHalvingPruner`): at rung k (step
//! `min_resource * reduction_factor^(min_early_stopping_rate + k)`), a trial continues only if
//! its value is in the top 1/`reduction_factor` of the values recorded at that rung so far.
//! Rung values are stored as the trial system attributes `completed_rung_{k}`.

use anyhow::{Result, bail};

use super::{PruneDecision, Pruner};
use crate::search::sampler::StudyView;
use crate::trial::{FrozenTrial, StudyDirection, TrialState};

#[derive(Clone, Debug)]
pub struct SuccessiveHalvingPruner {
    /// `None` = "auto": estimated from the first completed trial's steps.
    min_resource: Option<i64>,
    reduction_factor: i64,
    min_early_stopping_rate: i64,
    bootstrap_count: usize,
}

impl Default for SuccessiveHalvingPruner {
    /// Optuna's defaults: min_resource "auto", reduction_factor 4, min_early_stopping_rate 0.
    fn default() -> Self {
        SuccessiveHalvingPruner {
            min_resource: None,
            reduction_factor: 4,
            min_early_stopping_rate: 0,
            bootstrap_count: 0,
        }
    }
}

impl SuccessiveHalvingPruner {
    pub fn new(
        min_resource: Option<i64>,
        reduction_factor: i64,
        min_early_stopping_rate: i64,
        bootstrap_count: usize,
    ) -> Result<Self> {
        if let Some(r) = min_resource
            && r < 1
        {
            bail!("min_resource must be >= 1 or auto, got {r}");
        }
        if reduction_factor < 2 {
            bail!("reduction_factor must be >= 2, got {reduction_factor}");
        }
        if min_early_stopping_rate < 0 {
            bail!("min_early_stopping_rate must be >= 0, got {min_early_stopping_rate}");
        }
        if bootstrap_count > 0 && min_resource.is_none() {
            bail!("bootstrap_count > 0 needs an explicit min_resource (not auto)");
        }
        Ok(SuccessiveHalvingPruner {
            min_resource,
            reduction_factor,
            min_early_stopping_rate,
            bootstrap_count,
        })
    }
}

pub(crate) fn completed_rung_key(rung: i64) -> String {
    format!("completed_rung_{rung}")
}

/// Optuna's `_estimate_min_resource`: max last step of complete trials / 100, at least 1.
fn estimate_min_resource(trials: &[FrozenTrial]) -> Option<i64> {
    let last =
        trials.iter().filter(|t| t.state == TrialState::Complete).filter_map(FrozenTrial::last_step).max()?;
    Some((last.div_euclid(100)).max(1))
}

fn is_promotable(
    value: f64,
    competing: &mut [f64],
    reduction_factor: i64,
    direction: StudyDirection,
) -> bool {
    let mut promotable_idx = (competing.len() as i64 / reduction_factor) - 1;
    if promotable_idx == -1 {
        // Optuna cannot pause trials: the first eta - 1 trials at a rung continue only if best.
        promotable_idx = 0;
    }
    competing.sort_by(f64::total_cmp);
    let idx = promotable_idx as usize;
    match direction {
        StudyDirection::Maximize => value >= competing[competing.len() - 1 - idx],
        StudyDirection::Minimize => value <= competing[idx],
    }
}

impl Pruner for SuccessiveHalvingPruner {
    fn name(&self) -> &str {
        "SuccessiveHalvingPruner"
    }

    fn prune(&mut self, study: &StudyView, trial: &FrozenTrial) -> Result<PruneDecision> {
        let Some(step) = trial.last_step() else { return Ok(PruneDecision::keep()) };
        let mut rung = 0i64;
        while trial.system_attrs.contains_key(&completed_rung_key(rung)) {
            rung += 1;
        }
        let value = trial.intermediate_values[&step];
        let mut decision = PruneDecision::keep();
        loop {
            let min_resource = match self.min_resource {
                Some(r) => r,
                None => match estimate_min_resource(study.trials) {
                    Some(r) => {
                        self.min_resource = Some(r);
                        r
                    }
                    None => return Ok(decision),
                },
            };
            let exponent = u32::try_from(self.min_early_stopping_rate + rung).unwrap_or(u32::MAX);
            let rung_promotion_step =
                self.reduction_factor.checked_pow(exponent).and_then(|p| p.checked_mul(min_resource));
            match rung_promotion_step {
                Some(s) if step >= s => {}
                _ => return Ok(decision),
            }
            if value.is_nan() {
                decision.prune = true;
                return Ok(decision);
            }
            let key = completed_rung_key(rung);
            decision.system_attrs.push((key.clone(), value));
            // The snapshot of trials, as in Optuna (fetched once per call); `trial` itself has
            // no value for this rung yet.
            let mut competing: Vec<f64> = study
                .trials
                .iter()
                .filter_map(|t| t.system_attrs.get(&key).and_then(|v| v.as_f64()))
                .collect();
            competing.push(value);
            if competing.len() <= self.bootstrap_count
                || !is_promotable(value, &mut competing, self.reduction_factor, study.direction)
            {
                decision.prune = true;
                return Ok(decision);
            }
            rung += 1;
        }
    }
}
