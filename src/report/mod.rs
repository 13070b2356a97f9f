//! Results people can look at: plots of a study (PNG and SVG), parameter importances (fANOVA and
//! PED-ANOVA, as Optuna computes them) and a self-contained HTML report.
//!
//! Everything reads a [`StudySnapshot`]: one consistent read of a study from any Optuna-schema
//! SQLite storage (written by `hpo-gpu search` or by Optuna itself).

pub mod html;
pub mod importance;
pub mod plots;

use anyhow::{Context, Result};

use crate::study::StudyRef;
use crate::study::storage::{Storage, best_of};
use crate::trial::{FrozenTrial, StudyDirection, TrialState, UtcDateTime};

use importance::{Evaluator, FanovaOptions, ParamImportance, PedAnovaOptions, param_importances};

/// A study and all its trials, read once.
#[derive(Clone, Debug)]
pub struct StudySnapshot {
    pub study: StudyRef,
    pub direction: StudyDirection,
    /// All trials, ordered by number.
    pub trials: Vec<FrozenTrial>,
    /// The storage URL it was read from (shown in the report).
    pub storage_url: String,
}

impl StudySnapshot {
    /// Reads study `study_name` from the storage at `storage_url`.
    pub fn load(storage_url: &str, study_name: &str) -> Result<Self> {
        let mut storage = Storage::open_existing(storage_url)?;
        let study = storage.load_study(study_name)?;
        Self::from_storage(&mut storage, study)
    }

    /// Reads `study`'s trials from an open storage.
    pub fn from_storage(storage: &mut Storage, study: StudyRef) -> Result<Self> {
        let direction = study.direction()?;
        let trials = storage
            .trials(study.study_id, None)
            .with_context(|| format!("reading the trials of study {:?}", study.name))?;
        Ok(StudySnapshot { study, direction, trials, storage_url: storage.url().to_string() })
    }

    /// The best COMPLETE trial.
    pub fn best_trial(&self) -> Option<&FrozenTrial> {
        best_of(&self.trials, self.direction)
    }

    pub fn count(&self, state: TrialState) -> usize {
        self.trials.iter().filter(|t| t.state == state).count()
    }

    /// Earliest start and latest completion over all trials.
    pub fn time_span(&self) -> Option<(UtcDateTime, UtcDateTime)> {
        let start = self.trials.iter().filter_map(|t| t.datetime_start).min()?;
        let end = self
            .trials
            .iter()
            .filter_map(|t| t.datetime_complete.or(t.datetime_start))
            .max()
            .unwrap_or(start);
        Some((start, end))
    }

    /// Parameter names in first-seen order (the search space's order for hpo-gpu studies).
    pub fn param_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for t in &self.trials {
            for p in &t.params {
                if !names.contains(&p.name) {
                    names.push(p.name.clone());
                }
            }
        }
        names
    }
}

/// One evaluator's normalised importances, or why it could not run.
pub type ImportanceResult = std::result::Result<Vec<ParamImportance>, String>;

/// Both evaluators' results for one study; an evaluator that could not run keeps its error
/// message, so a report still renders.
#[derive(Clone, Debug)]
pub struct Importances {
    pub ped_anova: ImportanceResult,
    pub fanova: ImportanceResult,
}

impl Importances {
    /// Runs PED-ANOVA (Optuna's default) and fANOVA with their Optuna defaults; `seed` seeds the
    /// fANOVA forest.
    pub fn compute(snapshot: &StudySnapshot, seed: u64) -> Self {
        let run = |ev: Evaluator| {
            param_importances(&snapshot.trials, snapshot.direction, &ev).map_err(|e| format!("{e:#}"))
        };
        Importances {
            ped_anova: run(Evaluator::PedAnova(PedAnovaOptions::default())),
            fanova: run(Evaluator::Fanova(FanovaOptions { seed, ..FanovaOptions::default() })),
        }
    }
}
