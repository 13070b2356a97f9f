//! Hyperband (Optuna's `HyperbandPruner`): several successive-halving brackets with different
//! early-stopping rates; each trial is assigned to a bracket by a CRC32 hash of
//! `"{study_name}_{trial_number}"`, and samplers only see the trials of the same bracket.

use anyhow::{Result, bail};

use super::{PruneDecision, Pruner, SuccessiveHalvingPruner};
use crate::search::sampler::StudyView;
use crate::trial::{FrozenTrial, TrialState};

#[derive(Clone, Debug)]
pub struct HyperbandPruner {
    min_resource: i64,
    /// `None` = "auto": the largest last step of the complete trials, plus one.
    max_resource: Option<i64>,
    reduction_factor: i64,
    bootstrap_count: usize,
    brackets: Vec<SuccessiveHalvingPruner>,
    budgets: Vec<i64>,
    total_budget: i64,
}

impl Default for HyperbandPruner {
    /// Optuna's defaults: min_resource 1, max_resource "auto", reduction_factor 3.
    fn default() -> Self {
        HyperbandPruner {
            min_resource: 1,
            max_resource: None,
            reduction_factor: 3,
            bootstrap_count: 0,
            brackets: Vec::new(),
            budgets: Vec::new(),
            total_budget: 0,
        }
    }
}

impl HyperbandPruner {
    pub fn new(
        min_resource: i64,
        max_resource: Option<i64>,
        reduction_factor: i64,
        bootstrap_count: usize,
    ) -> Result<Self> {
        if min_resource < 1 {
            bail!("min_resource must be >= 1, got {min_resource}");
        }
        if let Some(m) = max_resource
            && m < min_resource
        {
            bail!("max_resource ({m}) must be >= min_resource ({min_resource})");
        }
        if reduction_factor < 2 {
            bail!("reduction_factor must be >= 2, got {reduction_factor}");
        }
        if bootstrap_count > 0 && max_resource.is_none() {
            bail!("bootstrap_count > 0 needs an explicit max_resource (not auto)");
        }
        Ok(HyperbandPruner {
            min_resource,
            max_resource,
            reduction_factor,
            bootstrap_count,
            ..Default::default()
        })
    }

    fn try_initialization(&mut self, study: &StudyView) -> Result<()> {
        let max_resource = match self.max_resource {
            Some(m) => m,
            None => {
                let Some(last) = study
                    .trials
                    .iter()
                    .filter(|t| t.state == TrialState::Complete)
                    .filter_map(FrozenTrial::last_step)
                    .max()
                else {
                    return Ok(());
                };
                self.max_resource = Some(last + 1);
                last + 1
            }
        };
        let ratio = max_resource as f64 / self.min_resource as f64;
        let n_brackets = (ratio.ln() / (self.reduction_factor as f64).ln()).floor() as i64 + 1;
        let n_brackets = n_brackets.max(1);
        for bracket_id in 0..n_brackets {
            let s = n_brackets - 1 - bracket_id;
            let budget = (n_brackets as f64 * (self.reduction_factor as f64).powi(s as i32) / (s + 1) as f64)
                .ceil() as i64;
            self.total_budget += budget;
            self.budgets.push(budget);
            self.brackets.push(SuccessiveHalvingPruner::new(
                Some(self.min_resource),
                self.reduction_factor,
                bracket_id,
                self.bootstrap_count,
            )?);
        }
        Ok(())
    }

    /// The bracket of trial `number` (0 before the pruner is initialised).
    pub fn bracket_id(&self, study_name: &str, number: u64) -> usize {
        if self.brackets.is_empty() || self.total_budget <= 0 {
            return 0;
        }
        let mut crc = flate2::Crc::new();
        crc.update(format!("{study_name}_{number}").as_bytes());
        let mut n = i64::from(crc.sum()) % self.total_budget;
        for (id, budget) in self.budgets.iter().enumerate() {
            n -= budget;
            if n < 0 {
                return id;
            }
        }
        self.budgets.len() - 1
    }

    fn bracket_trials(&self, study: &StudyView, bracket: usize) -> Vec<FrozenTrial> {
        study
            .trials
            .iter()
            .filter(|t| self.bracket_id(study.study_name, t.number) == bracket)
            .cloned()
            .collect()
    }
}

impl Pruner for HyperbandPruner {
    fn name(&self) -> &str {
        "HyperbandPruner"
    }

    fn prune(&mut self, study: &StudyView, trial: &FrozenTrial) -> Result<PruneDecision> {
        if self.brackets.is_empty() {
            self.try_initialization(study)?;
            if self.brackets.is_empty() {
                return Ok(PruneDecision::keep());
            }
        }
        let bracket = self.bracket_id(study.study_name, trial.number);
        let trials = self.bracket_trials(study, bracket);
        let view = StudyView { study_name: study.study_name, direction: study.direction, trials: &trials };
        self.brackets[bracket].prune(&view, trial)
    }

    fn filter_trials_for_sampler<'a>(
        &self,
        study: &StudyView<'a>,
        trial: &FrozenTrial,
    ) -> Option<Vec<FrozenTrial>> {
        if self.brackets.is_empty() {
            return None;
        }
        Some(self.bracket_trials(study, self.bracket_id(study.study_name, trial.number)))
    }
}
