//! Storage in exactly Optuna 5.0's RDB schema, in an SQLite file or on a PostgreSQL server, so
//! `optuna.load_study`, Optuna's plots, optuna-dashboard and Optuna workers read and extend our
//! studies unchanged and we continue studies Python started.
//!
//! What "exactly" means here, checked against a database written by Optuna 5.0.0:
//! - the same `CREATE` statements (SQLAlchemy's DDL text, so `sqlite3 .schema` matches), with
//!   `version_info` = (1, 12, "5.0.0") and `alembic_version` = `v3.2.0.a`, so Optuna runs no
//!   migration;
//! - enums stored by name (`COMPLETE`, `MAXIMIZE`, `FINITE`/`INF_POS`/`INF_NEG`/`NAN`);
//! - `distribution_json` byte-identical to `distribution_to_json`; categorical `param_value` is the
//!   index of the choice; attributes are `json.dumps` text;
//! - datetimes are naive UTC text `YYYY-MM-DD HH:MM:SS.ffffff`;
//! - a trial's `number` is the count of the study's trials with a smaller `trial_id`, computed in
//!   the transaction that inserts it.
//!
//! Concurrency on SQLite: every write is one `BEGIN IMMEDIATE` transaction (the database write
//! lock is taken up front, so two processes never both read a count and then both insert), the
//! journal is WAL (with `synchronous=NORMAL`: durable across process crashes, and a power cut can
//! only lose the last commits), and a 30 s busy timeout plus a few retries let several worker
//! processes share one file. On PostgreSQL (Optuna's own way there): READ COMMITTED writes that
//! lock the study row while a trial is numbered or a queued trial taken and a trial's row while
//! it is updated, reads in one statement (trials and all their rows: one snapshot, one round trip)
//! or in REPEATABLE READ transactions, retries on serialization failures, and a reconnect when the
//! server goes away. An `ask` is one transaction: start the trial, bring the cached history up to
//! date, sample, store the parameters ([`Storage::start_trial_with_params`]).
//!
//! Heartbeats (`trial_heartbeats`) follow Optuna's RDBStorage: a RUNNING trial whose heartbeat is
//! older than the grace period is stale; [`Storage::fail_stale_trials`] marks it FAIL and, like
//! `RetryHeartbeatStaleTrialCallback`, re-queues its parameters as a WAITING trial carrying the
//! system attributes `failed_trial` and `retry_history`. RUNNING trials without any heartbeat
//! (from `ask`, or Python without heartbeats) are never considered stale, as in Optuna.
//!
//! Files: `sql.rs` runs a statement on either database, `database.rs` opens the database (URLs,
//! schema, transactions), `trials.rs` writes the trial lifecycle, `heartbeat.rs` fails and
//! re-queues stale trials, `rows.rs` decodes rows into trials; this file holds the types, the
//! study operations and the (cached) trial reads.

mod database;
mod heartbeat;
mod rows;
pub mod sql;
mod trials;

use std::collections::{BTreeMap, HashMap};

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

use super::StudyRef;
use crate::distributions::Distribution;
use crate::pyjson;
use crate::trial::{FrozenTrial, StudyDirection, TrialState, UtcDateTime};
use database::Connected;
use rows::{TrialFilter, attrs_of, load_trials, study_directions};

pub use database::{
    ALEMBIC_VERSION, BUSY_TIMEOUT, LIBRARY_VERSION, SCHEMA_VERSION, StorageLocation,
    check_database_directory, parse_storage_url, redact_url,
};
use sql::{Tx, sql_params};

/// What a new trial starts with (Optuna's "template trial" of `create_new_trial`).
#[derive(Clone, Debug)]
pub struct NewTrial {
    pub state: TrialState,
    pub values: Option<Vec<f64>>,
    pub datetime_start: Option<UtcDateTime>,
    pub datetime_complete: Option<UtcDateTime>,
    /// (name, internal value, distribution)
    pub params: Vec<(String, f64, Distribution)>,
    /// (key, JSON text as `json.dumps` writes it)
    pub user_attrs: Vec<(String, String)>,
    pub system_attrs: Vec<(String, String)>,
    pub intermediate_values: Vec<(i64, f64)>,
}

impl NewTrial {
    /// An empty trial in `state`, started now unless it is WAITING.
    pub fn new(state: TrialState) -> Self {
        NewTrial {
            state,
            values: None,
            datetime_start: (state != TrialState::Waiting).then(UtcDateTime::now),
            datetime_complete: state.is_finished().then(UtcDateTime::now),
            params: Vec::new(),
            user_attrs: Vec::new(),
            system_attrs: Vec::new(),
            intermediate_values: Vec::new(),
        }
    }
}

/// Result of [`Storage::start_trial`].
#[derive(Clone, Debug)]
pub enum StartOutcome {
    /// A RUNNING trial: a popped WAITING trial (with its stored params) or a new one.
    Started(FrozenTrial),
    /// `finished + live running >= target`: nothing to start now.
    TargetReached { finished: u64, running: u64 },
}

/// Per-state trial counts of a study.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrialCounts {
    pub running: u64,
    pub waiting: u64,
    pub complete: u64,
    pub pruned: u64,
    pub fail: u64,
}

impl TrialCounts {
    pub fn finished_ok(&self) -> u64 {
        self.complete + self.pruned
    }
}

/// A connection to one Optuna-schema database (an SQLite file or a PostgreSQL server).
pub struct Storage {
    conn: Connected,
    location: StorageLocation,
    /// The storage URL as given, its password hidden (shown in messages).
    url: String,
    /// Trials per study as last read. Finished trials never change (they cannot be updated),
    /// so a refresh only reads new trials and the ones that were unfinished (Optuna's RDB
    /// storage caches the same way).
    cache: HashMap<i64, Vec<FrozenTrial>>,
    /// Distributions checked against the study's stored ones: once per connection, not on every
    /// `set_trial_params`.
    verified_distributions: VerifiedDistributions,
}

/// study_id → parameter name → the distribution JSON checked for it.
type VerifiedDistributions = HashMap<i64, HashMap<String, String>>;

impl Storage {
    /// The SQLite connection, for tests that look at or damage the file directly.
    #[cfg(test)]
    pub(super) fn sqlite(&self) -> &rusqlite::Connection {
        match &self.conn {
            Connected::Sqlite(c) => c,
            Connected::Postgres(..) => panic!("not an SQLite storage"),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn location(&self) -> &StorageLocation {
        &self.location
    }

    // ----- studies -----

    /// Creates a study, or with `load_if_exists` loads it (refusing a different direction).
    pub fn create_study(
        &mut self,
        name: &str,
        direction: StudyDirection,
        load_if_exists: bool,
    ) -> Result<StudyRef> {
        if name.is_empty() || name.len() > 512 {
            bail!("study name must be 1 to 512 bytes, got {} bytes", name.len());
        }
        let created = self.write(|tx| {
            if tx.opt_row("SELECT study_id FROM studies WHERE study_name = ?1", &sql_params![name])?.is_some()
            {
                return Ok(false);
            }
            let study_id: i64 = tx
                .row("INSERT INTO studies (study_name) VALUES (?1) RETURNING study_id", &sql_params![name])?
                .get(0)?;
            tx.exec(
                "INSERT INTO study_directions (direction, study_id, objective) VALUES (?1, ?2, 0)",
                &sql_params![direction.as_str(), study_id],
            )?;
            Ok(true)
        })?;
        let study = self.load_study(name)?;
        if !created {
            if !load_if_exists {
                bail!(
                    "a study named {name:?} already exists in {} (load it instead of creating it)",
                    self.url
                );
            }
            if study.directions != [direction] {
                bail!(
                    "study {name:?} in {} has direction {}, not {direction}",
                    self.url,
                    study.directions.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
        }
        Ok(study)
    }

    /// Loads a study by name; the error lists the studies that exist.
    pub fn load_study(&mut self, name: &str) -> Result<StudyRef> {
        let url = self.url.clone();
        self.read(|tx| {
            let id = tx.opt_row("SELECT study_id FROM studies WHERE study_name = ?1", &sql_params![name])?;
            let Some(study_id) = id.map(|r| r.get::<i64>(0)).transpose()? else {
                let names: Vec<String> = tx
                    .rows("SELECT study_name FROM studies ORDER BY study_id", &[])?
                    .iter()
                    .map(|r| r.get(0))
                    .collect::<Result<_>>()?;
                if names.is_empty() {
                    bail!("no study named {name:?} in {url} (the storage has no studies)");
                }
                bail!("no study named {name:?} in {url} (studies: {})", names.join(", "));
            };
            Ok(StudyRef { study_id, name: name.to_string(), directions: study_directions(tx, study_id)? })
        })
    }

    /// All studies, in creation order.
    pub fn studies(&mut self) -> Result<Vec<StudyRef>> {
        self.read(|tx| {
            let rows: Vec<(i64, String)> = tx
                .rows("SELECT study_id, study_name FROM studies ORDER BY study_id", &[])?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?)))
                .collect::<Result<_>>()?;
            rows.into_iter()
                .map(|(study_id, name)| {
                    Ok(StudyRef { study_id, name, directions: study_directions(tx, study_id)? })
                })
                .collect()
        })
    }

    /// Sets a study user attribute (`json.dumps(value)` text).
    pub fn set_study_user_attr(&mut self, study_id: i64, key: &str, value: &Value) -> Result<()> {
        let json = pyjson::dumps(value);
        self.write(|tx| {
            tx.exec(
                "INSERT INTO study_user_attributes (study_id, \"key\", value_json) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (study_id, \"key\") DO UPDATE SET value_json = excluded.value_json",
                &sql_params![study_id, key, &json],
            )?;
            Ok(())
        })
    }

    pub fn study_user_attrs(&mut self, study_id: i64) -> Result<BTreeMap<String, Value>> {
        self.read(|tx| {
            attrs_of(
                tx,
                "SELECT \"key\", value_json FROM study_user_attributes WHERE study_id = ?1",
                study_id,
            )
        })
    }

    pub fn study_system_attrs(&mut self, study_id: i64) -> Result<BTreeMap<String, Value>> {
        self.read(|tx| {
            attrs_of(
                tx,
                "SELECT \"key\", value_json FROM study_system_attributes WHERE study_id = ?1",
                study_id,
            )
        })
    }

    // ----- trials: reads -----

    /// One trial by its database id.
    pub fn trial(&mut self, trial_id: i64) -> Result<FrozenTrial> {
        let mut trials = self.read_statement(|tx| load_trials(tx, TrialFilter::Id(trial_id)))?.trials;
        trials.pop().ok_or_else(|| anyhow!("no trial with trial_id {trial_id}"))
    }

    /// One trial by its number within a study.
    pub fn trial_by_number(&mut self, study: &StudyRef, number: u64) -> Result<FrozenTrial> {
        let id: Option<i64> = self.read(|tx| {
            tx.opt_row(
                "SELECT trial_id FROM trials WHERE study_id = ?1 AND number = ?2",
                &sql_params![study.study_id, number as i64],
            )?
            .map(|r| r.get(0))
            .transpose()
        })?;
        match id {
            Some(id) => self.trial(id),
            None => bail!("study {:?} has no trial number {number}", study.name),
        }
    }

    /// All trials of a study ordered by `trial_id` (= by number), optionally only some states.
    pub fn trials(&mut self, study_id: i64, states: Option<&[TrialState]>) -> Result<Vec<FrozenTrial>> {
        let all = self.study_trials(study_id)?;
        Ok(match states {
            Some(states) => all.iter().filter(|t| states.contains(&t.state)).cloned().collect(),
            None => all.to_vec(),
        })
    }

    /// All trials of a study ordered by `trial_id`, borrowed from the cache after bringing it up
    /// to date: only trials added since the last read and those that were unfinished are read.
    pub fn study_trials(&mut self, study_id: i64) -> Result<&[FrozenTrial]> {
        // A retried read starts from an empty cache (the first try consumed it).
        let mut cached = self.cache.remove(&study_id);
        let trials =
            self.read_statement(|tx| refresh_cached(tx, study_id, cached.take().unwrap_or_default(), None))?;
        Ok(self.cache.entry(study_id).or_insert(trials))
    }

    pub fn trial_counts(&mut self, study_id: i64) -> Result<TrialCounts> {
        self.read(|tx| {
            let mut counts = TrialCounts::default();
            let rows = tx.rows(
                "SELECT state, COUNT(*) FROM trials WHERE study_id = ?1 GROUP BY state",
                &sql_params![study_id],
            )?;
            for row in rows {
                let (state, n): (String, i64) = (row.get(0)?, row.get(1)?);
                let n = n as u64;
                match TrialState::parse(&state)? {
                    TrialState::Running => counts.running = n,
                    TrialState::Waiting => counts.waiting = n,
                    TrialState::Complete => counts.complete = n,
                    TrialState::Pruned => counts.pruned = n,
                    TrialState::Fail => counts.fail = n,
                }
            }
            Ok(counts)
        })
    }

    /// The best COMPLETE trial (Optuna's `best_trial`: by value, infinities included; the first
    /// by trial_id among equals). `None` when no trial is complete.
    pub fn best_trial(&mut self, study: &StudyRef) -> Result<Option<FrozenTrial>> {
        let direction = study.direction()?;
        Ok(best_of(self.study_trials(study.study_id)?, direction).cloned())
    }
}

/// `cached` (a study's trials as last read, by trial_id) brought up to date: only trials added
/// since and those that were unfinished are read, in one statement. If the study then holds
/// another number of trials than were read (`study_trial_count` when the caller knows it, counted
/// in the same statement otherwise), trials were deleted behind our back (e.g. `optuna
/// delete-study`) and everything is read again.
pub(super) fn refresh_cached(
    tx: &mut Tx,
    study_id: i64,
    cached: Vec<FrozenTrial>,
    study_trial_count: Option<i64>,
) -> Result<Vec<FrozenTrial>> {
    let after = cached.iter().map(|t| t.trial_id).max().unwrap_or(0);
    let unfinished: Vec<i64> = cached.iter().filter(|t| !t.state.is_finished()).map(|t| t.trial_id).collect();
    let count = study_trial_count.is_none();
    let fresh = load_trials(tx, TrialFilter::Refresh { study_id, after, unfinished, count })?;
    let mut trials: Vec<FrozenTrial> = cached.into_iter().filter(|t| t.state.is_finished()).collect();
    trials.extend(fresh.trials);
    trials.sort_unstable_by_key(|t| t.trial_id);
    if Some(trials.len() as i64) != study_trial_count.or(fresh.study_trial_count) {
        trials = load_trials(tx, TrialFilter::Study(study_id))?.trials;
    }
    Ok(trials)
}

pub fn best_of(trials: &[FrozenTrial], direction: StudyDirection) -> Option<&FrozenTrial> {
    let mut best: Option<(&FrozenTrial, f64)> = None;
    for t in trials.iter().filter(|t| t.state == TrialState::Complete) {
        let Some(v) = t.value() else { continue };
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if !direction.better(v, b) => {}
            _ => best = Some((t, v)),
        }
    }
    best.map(|(t, _)| t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributions::{CategoricalDistribution, FloatDistribution, ParamValue};

    // Distributions shared by the tests of the submodules.
    pub(super) fn lr() -> Distribution {
        Distribution::Float(FloatDistribution::new(1e-6, 1e-4, true, None).unwrap())
    }

    pub(super) fn batch() -> Distribution {
        Distribution::Categorical(
            CategoricalDistribution::new(vec![ParamValue::Int(16), ParamValue::Int(32), ParamValue::Int(64)])
                .unwrap(),
        )
    }

    #[test]
    fn study_create_load_and_directions() {
        let mut s = Storage::open("sqlite:///:memory:").unwrap();
        let a = s.create_study("a", StudyDirection::Maximize, false).unwrap();
        assert_eq!(a.directions, vec![StudyDirection::Maximize]);
        assert!(
            s.create_study("a", StudyDirection::Maximize, false)
                .unwrap_err()
                .to_string()
                .contains("already exists")
        );
        assert_eq!(s.create_study("a", StudyDirection::Maximize, true).unwrap(), a);
        assert!(
            s.create_study("a", StudyDirection::Minimize, true)
                .unwrap_err()
                .to_string()
                .contains("direction MAXIMIZE")
        );
        let err = s.load_study("b").unwrap_err().to_string();
        assert!(err.contains("no study named \"b\"") && err.contains("studies: a"), "{err}");
        s.set_study_user_attr(a.study_id, "k", &serde_json::json!([1, 2.5])).unwrap();
        assert_eq!(s.study_user_attrs(a.study_id).unwrap()["k"], serde_json::json!([1, 2.5]));
    }

    #[test]
    fn best_trial_and_target_cap() {
        let mut s = Storage::open("sqlite:///:memory:").unwrap();
        let study = s.create_study("s", StudyDirection::Minimize, false).unwrap();
        assert!(s.best_trial(&study).unwrap().is_none());
        for (i, v) in [3.0, 1.0, 2.0, 1.0].into_iter().enumerate() {
            let mut t = NewTrial::new(TrialState::Complete);
            t.values = Some(vec![v]);
            assert_eq!(s.create_trial(study.study_id, &t).unwrap().number, i as u64);
        }
        assert_eq!(s.best_trial(&study).unwrap().unwrap().number, 1);
        // 4 finished, target 5: one may start (with heartbeat), then the target counts it.
        assert!(matches!(s.start_trial(study.study_id, Some(5), true).unwrap(), StartOutcome::Started(_)));
        assert!(matches!(
            s.start_trial(study.study_id, Some(5), true).unwrap(),
            StartOutcome::TargetReached { finished: 4, running: 1 }
        ));
        let c = s.trial_counts(study.study_id).unwrap();
        assert_eq!((c.complete, c.running, c.finished_ok()), (4, 1, 4));
    }

    #[test]
    fn cached_reads_see_other_connections_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut a = Storage::open_path(&path).unwrap();
        let mut b = Storage::open_path(&path).unwrap();
        let study = a.create_study("s", StudyDirection::Minimize, false).unwrap();
        let mut done = NewTrial::new(TrialState::Complete);
        done.values = Some(vec![1.0]);
        a.create_trial(study.study_id, &done).unwrap();
        let StartOutcome::Started(run) = a.start_trial(study.study_id, None, false).unwrap() else {
            panic!()
        };
        assert_eq!(a.study_trials(study.study_id).unwrap().len(), 2);
        // B finishes A's running trial and adds one; A's next read has both changes.
        b.report(run.trial_id, 1, 0.5, &[]).unwrap();
        b.set_trial_state(run.trial_id, TrialState::Complete, Some(&[0.5]), &[]).unwrap();
        b.create_trial(study.study_id, &done).unwrap();
        let seen = a.study_trials(study.study_id).unwrap();
        assert_eq!(
            seen.iter().map(|t| (t.number, t.state)).collect::<Vec<_>>(),
            vec![(0, TrialState::Complete), (1, TrialState::Complete), (2, TrialState::Complete)]
        );
        assert_eq!(seen[1].intermediate_values[&1], 0.5);
        // A deletion elsewhere (as `optuna delete-study` does) is noticed too.
        b.sqlite().execute("DELETE FROM trial_values WHERE trial_id = 1", []).unwrap();
        b.sqlite().execute("DELETE FROM trials WHERE trial_id = 1", []).unwrap();
        let seen = a.study_trials(study.study_id).unwrap();
        assert_eq!(seen.iter().map(|t| t.trial_id).collect::<Vec<_>>(), vec![2, 3]);
    }
}
