//! Studies: Optuna-compatible SQLite storage, the trial lifecycle (ask, report, tell, heartbeats,
//! stale-trial recovery), the search driver and the ask/tell/inspect command-line pieces.
//!
//! A trial's record ([`crate::trial::FrozenTrial`]) lives below this module, in `trial`, as
//! Optuna keeps `optuna/trial/`: samplers and pruners read it without depending on studies.

pub mod driver;
pub mod interrupt;
pub mod storage;

use anyhow::{Result, bail};

use crate::trial::StudyDirection;

/// A study as stored: id, unique name and direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StudyRef {
    pub study_id: i64,
    pub name: String,
    /// One direction per objective; hpo-gpu creates single-objective studies.
    pub directions: Vec<StudyDirection>,
}

impl StudyRef {
    /// The direction of a single-objective study.
    pub fn direction(&self) -> Result<StudyDirection> {
        match self.directions.as_slice() {
            [d] => Ok(*d),
            ds => bail!(
                "study {:?} has {} objectives; hpo-gpu handles single-objective studies only",
                self.name,
                ds.len()
            ),
        }
    }
}
