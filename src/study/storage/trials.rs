//! The trial lifecycle's writes: creating and starting trials, parameters, reports, attributes,
//! state changes, re-queueing a trial with Optuna's retry template, and the insert helpers they
//! share.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::heartbeat::upsert_heartbeat;
use super::rows::{TrialFilter, load_trials, value_to_stored};
use super::sql::{SqlValue, Tx, sql_params};
use super::{NewTrial, StartOutcome, Storage, VerifiedDistributions, refresh_cached};
use crate::distributions::Distribution;
use crate::pyjson;
use crate::trial::{FrozenTrial, TrialParam, TrialState, UtcDateTime};

/// A RUNNING trial without a heartbeat still counts towards a target for this long after it
/// started: an Optuna worker records its first heartbeat a moment after creating the trial, and in
/// that moment another worker must not take its place. Trials of `ask` that never get one (a user
/// telling by hand) stop counting after it.
pub const FRESH_RUNNING_MICROS: i64 = 10_000_000;

/// Picks a starting trial's parameters from it (a WAITING trial may carry some) and the study's
/// trials: (name, internal value, distribution) for each.
pub type ChooseParams<'a> =
    dyn FnMut(&FrozenTrial, &[FrozenTrial]) -> Result<Vec<(String, f64, Distribution)>> + 'a;

impl Storage {
    /// Creates a trial from a template in one transaction (Optuna's `create_new_trial`) and
    /// returns it as stored.
    pub fn create_trial(&mut self, study_id: i64, template: &NewTrial) -> Result<FrozenTrial> {
        let trial_id = self.write(|tx| {
            lock_study(tx, study_id)?;
            insert_trial(tx, study_id, template).map(|(trial_id, _)| trial_id)
        })?;
        self.trial(trial_id)
    }

    /// Starts a trial for a worker, in one transaction:
    /// 1. with `target = Some(n)`: if COMPLETE + PRUNED + (RUNNING trials that have a heartbeat
    ///    or started in the last [`FRESH_RUNNING_MICROS`]) already reach `n`, starts nothing;
    /// 2. otherwise takes the oldest WAITING trial (re-queued or enqueued) and makes it RUNNING,
    ///    or creates a new RUNNING trial;
    /// 3. with `heartbeat`, records the first heartbeat in the same transaction, so a worker that
    ///    dies at any point leaves a trial that becomes stale.
    pub fn start_trial(
        &mut self,
        study_id: i64,
        target: Option<u64>,
        heartbeat: bool,
    ) -> Result<StartOutcome> {
        self.start(study_id, target, heartbeat, None)
    }

    /// [`Storage::start_trial`], and in the same transaction the study's trials brought up to
    /// date (the new one included) and the parameters `choose` picks from them stored for the new
    /// trial: one commit and a few round trips for an `ask`. On SQLite the database, on PostgreSQL
    /// the study's row, stays locked while `choose` runs. `choose` may run again when the
    /// transaction is retried; an error from it starts no trial.
    pub fn start_trial_with_params(
        &mut self,
        study_id: i64,
        target: Option<u64>,
        heartbeat: bool,
        choose: &mut ChooseParams,
    ) -> Result<StartOutcome> {
        self.start(study_id, target, heartbeat, Some(choose))
    }

    fn start(
        &mut self,
        study_id: i64,
        target: Option<u64>,
        heartbeat: bool,
        mut choose: Option<&mut ChooseParams>,
    ) -> Result<StartOutcome> {
        let mut cached = if choose.is_some() { self.cache.remove(&study_id) } else { None };
        let verified = std::mem::take(&mut self.verified_distributions);
        let started = self.write(|tx| {
            // On PostgreSQL, workers start trials of one study one at a time (the study row is
            // locked): the target count and the WAITING trial taken are then decided by one.
            lock_study(tx, study_id)?;
            if let Some(target) = target {
                let fresh = UtcDateTime { micros_since_epoch: UtcDateTime::now().micros_since_epoch - FRESH_RUNNING_MICROS };
                let counts = tx.row(
                    "SELECT \
                       (SELECT COUNT(*) FROM trials WHERE study_id = ?1 AND state IN ('COMPLETE', 'PRUNED')), \
                       (SELECT COUNT(*) FROM trials t WHERE t.study_id = ?1 AND t.state = 'RUNNING' AND \
                        (EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id) OR t.datetime_start > ?2))",
                    &sql_params![study_id, fresh.format()],
                )?;
                let (finished, running) = (counts.get::<i64>(0)? as u64, counts.get::<i64>(1)? as u64);
                if finished + running >= target {
                    return Ok(Err(StartOutcome::TargetReached { finished, running }));
                }
            }
            let now = UtcDateTime::now().format();
            let waiting: Option<i64> = tx
                .opt_row(
                    "SELECT trial_id FROM trials WHERE study_id = ?1 AND state = 'WAITING' ORDER BY trial_id LIMIT 1",
                    &sql_params![study_id],
                )?
                .map(|r| r.get(0))
                .transpose()?;
            let inserted = waiting.is_none();
            let trial = match waiting {
                Some(id) => {
                    tx.exec("UPDATE trials SET state = 'RUNNING', datetime_start = ?2 WHERE trial_id = ?1",
                        &sql_params![id, now],
                    )?;
                    let mut loaded = load_trials(tx, TrialFilter::Id(id))?.trials;
                    loaded.pop().ok_or_else(|| anyhow!("trial_id {id} vanished while starting it"))?
                }
                None => {
                    // A new trial is all in the template: no need to read it back.
                    let template = NewTrial::new(TrialState::Running);
                    let (trial_id, number) = insert_trial(tx, study_id, &template)?;
                    FrozenTrial {
                        trial_id,
                        number,
                        state: TrialState::Running,
                        values: None,
                        datetime_start: template.datetime_start,
                        datetime_complete: None,
                        params: Vec::new(),
                        user_attrs: BTreeMap::new(),
                        system_attrs: BTreeMap::new(),
                        intermediate_values: BTreeMap::new(),
                    }
                }
            };
            if heartbeat {
                upsert_heartbeat(tx, trial.trial_id)?;
            }
            let Some(choose) = choose.as_deref_mut() else { return Ok(Ok((trial, None))) };
            // A retried transaction starts from an empty cache (the first try consumed it).
            // A new trial's number is the count of the study's trials before it (the study is locked).
            let count = inserted.then(|| trial.number as i64 + 1);
            let trials = refresh_cached(tx, study_id, cached.take().unwrap_or_default(), count)?;
            let mut trial = trial;
            let new: Vec<_> = choose(&trial, &trials)?
                .into_iter()
                .filter(|(name, _, _)| trial.param(name).is_none())
                .collect();
            store_params(tx, study_id, trial.trial_id, &new, &verified)?;
            for (name, internal, distribution) in new {
                let value = distribution.to_external(internal)?;
                trial.params.push(TrialParam { name, internal, value, distribution });
            }
            Ok(Ok((trial, Some(trials))))
        });
        self.verified_distributions = verified;
        match started? {
            Ok((trial, trials)) => {
                self.remember_distributions(
                    study_id,
                    trial.params.iter().map(|p| (&p.name, &p.distribution)),
                );
                if let Some(trials) = trials {
                    self.cache.insert(study_id, trials);
                }
                Ok(StartOutcome::Started(trial))
            }
            Err(outcome) => {
                if let Some(trials) = cached {
                    self.cache.insert(study_id, trials);
                }
                Ok(outcome)
            }
        }
    }

    /// Stores several parameters of a not-yet-finished trial in one transaction, checking each
    /// against the distribution the study already uses for that name.
    pub fn set_trial_params(&mut self, trial_id: i64, items: &[(String, f64, Distribution)]) -> Result<()> {
        let verified = std::mem::take(&mut self.verified_distributions);
        let stored = self.write(|tx| {
            let (study_id, _) = check_updatable(tx, trial_id)?;
            store_params(tx, study_id, trial_id, items, &verified)?;
            Ok(study_id)
        });
        self.verified_distributions = verified;
        let study_id = stored?;
        self.remember_distributions(study_id, items.iter().map(|(name, _, dist)| (name, dist)));
        Ok(())
    }

    /// Records distributions just stored (so checked) for `study_id`, for [`check_param`].
    fn remember_distributions<'a>(
        &mut self,
        study_id: i64,
        params: impl Iterator<Item = (&'a String, &'a Distribution)>,
    ) {
        let known = self.verified_distributions.entry(study_id).or_default();
        for (name, dist) in params {
            if !known.contains_key(name) {
                known.insert(name.clone(), dist.to_json());
            }
        }
    }

    /// Records one intermediate value and user attributes (JSON text) in one transaction.
    pub fn report(
        &mut self,
        trial_id: i64,
        step: i64,
        value: f64,
        user_attrs: &[(String, String)],
    ) -> Result<()> {
        self.write(|tx| {
            check_updatable(tx, trial_id)?;
            upsert_intermediate(tx, trial_id, step, value)?;
            for (k, v) in user_attrs {
                upsert_attr(tx, "trial_user_attributes", trial_id, k, v)?;
            }
            Ok(())
        })
    }

    /// Sets a user attribute from `json.dumps`-style text.
    pub fn set_trial_user_attr(&mut self, trial_id: i64, key: &str, json: &str) -> Result<()> {
        self.write(|tx| {
            check_updatable(tx, trial_id)?;
            upsert_attr(tx, "trial_user_attributes", trial_id, key, json)
        })
    }

    /// Sets a system attribute from `json.dumps`-style text.
    pub fn set_trial_system_attr(&mut self, trial_id: i64, key: &str, json: &str) -> Result<()> {
        self.write(|tx| {
            check_updatable(tx, trial_id)?;
            upsert_attr(tx, "trial_system_attributes", trial_id, key, json)
        })
    }

    /// Finishes (or moves) a trial: Optuna's `set_trial_state_values`. `system_attrs` (JSON
    /// text) are written in the same transaction, e.g. `fail_reason`. A NaN objective value is
    /// refused: Optuna stores such a trial as FAIL without values.
    pub fn set_trial_state(
        &mut self,
        trial_id: i64,
        state: TrialState,
        values: Option<&[f64]>,
        system_attrs: &[(String, String)],
    ) -> Result<()> {
        if let Some(vs) = values
            && vs.iter().any(|v| v.is_nan())
        {
            bail!("objective value NaN cannot be stored; tell the trial FAIL instead");
        }
        self.write(|tx| {
            // The update comes first: it locks the row and tells whether the trial could still
            // be changed, in one round trip.
            let now = UtcDateTime::now().format();
            let unfinished = "state NOT IN ('COMPLETE', 'PRUNED', 'FAIL')";
            let updated = if state == TrialState::Running {
                tx.exec(
                    &format!("UPDATE trials SET state = 'RUNNING', datetime_start = ?2 WHERE trial_id = ?1 AND {unfinished}"),
                    &sql_params![trial_id, now],
                )?
            } else if state.is_finished() {
                tx.exec(
                    &format!("UPDATE trials SET state = ?2, datetime_complete = ?3 WHERE trial_id = ?1 AND {unfinished}"),
                    &sql_params![trial_id, state.as_str(), now],
                )?
            } else {
                tx.exec(
                    &format!("UPDATE trials SET state = ?2 WHERE trial_id = ?1 AND {unfinished}"),
                    &sql_params![trial_id, state.as_str()],
                )?
            };
            if updated == 0 {
                let row = trial_for_update(tx, trial_id)?;
                if let Some((_, _, current)) = row
                    && current == state
                    && state.is_finished()
                    && stored_values(tx, trial_id)? == values.map(<[f64]>::to_vec).unwrap_or_default()
                {
                    // Already done: this is a write run again after the server went away with
                    // its reply, when the first run had committed.
                    return Ok(());
                }
                require_updatable(trial_id, row)?;
                bail!("trial_id {trial_id} could not be updated");
            }
            if let Some(vs) = values {
                for (objective, v) in vs.iter().enumerate() {
                    let (stored, kind) = value_to_stored(*v);
                    tx.exec("INSERT INTO trial_values (trial_id, objective, value, value_type) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (trial_id, objective) DO UPDATE SET value = excluded.value, value_type = excluded.value_type",
                        &sql_params![trial_id, objective as i64, stored, kind],
                    )?;
                }
            }
            for (k, v) in system_attrs {
                upsert_attr(tx, "trial_system_attributes", trial_id, k, v)?;
            }
            Ok(())
        })
    }

    /// Queues `trial`'s parameters again as a WAITING trial (with the `failed_trial` /
    /// `retry_history` attributes a stale-trial retry gets), for a trial that failed for reasons
    /// of its worker, not its parameters (e.g. evicted from a trial array that ran out of memory).
    pub fn requeue_trial(&mut self, study_id: i64, trial: &FrozenTrial) -> Result<()> {
        let Some(retry) = retry_template(trial, None) else { return Ok(()) };
        self.write(|tx| {
            lock_study(tx, study_id)?;
            insert_trial(tx, study_id, &retry).map(|_| ())
        })
    }
}

/// The WAITING copy `RetryHeartbeatStaleTrialCallback` adds for a stale trial, or None when
/// `max_retry` is exhausted.
pub(super) fn retry_template(trial: &FrozenTrial, max_retry: Option<u32>) -> Option<NewTrial> {
    let mut system: BTreeMap<String, Value> = BTreeMap::new();
    system.insert("failed_trial".into(), Value::from(trial.number));
    system.insert("retry_history".into(), Value::Array(vec![]));
    for (k, v) in &trial.system_attrs {
        system.insert(k.clone(), v.clone());
    }
    system.remove("fail_reason");
    let history = match system.get_mut("retry_history") {
        Some(Value::Array(h)) => h,
        _ => {
            system.insert("retry_history".into(), Value::Array(vec![]));
            match system.get_mut("retry_history") {
                Some(Value::Array(h)) => h,
                _ => return None,
            }
        }
    };
    history.push(Value::from(trial.number));
    if let Some(max) = max_retry
        && (max as usize) < history.len()
    {
        return None;
    }
    // Optuna's order: failed_trial, retry_history, then the trial's own attributes.
    let mut system_attrs = vec![
        ("failed_trial".to_string(), pyjson::dumps(&system["failed_trial"])),
        ("retry_history".to_string(), pyjson::dumps(&system["retry_history"])),
    ];
    for (k, v) in &system {
        if k != "failed_trial" && k != "retry_history" {
            system_attrs.push((k.clone(), pyjson::dumps(v)));
        }
    }
    Some(NewTrial {
        state: TrialState::Waiting,
        values: None,
        datetime_start: None,
        datetime_complete: None,
        params: trial.params.iter().map(|p| (p.name.clone(), p.internal, p.distribution.clone())).collect(),
        user_attrs: trial.user_attrs.iter().map(|(k, v)| (k.clone(), pyjson::dumps(v))).collect(),
        system_attrs,
        intermediate_values: Vec::new(),
    })
}

/// Locks a study's row until the transaction ends, on PostgreSQL (Optuna's `with_for_update` in
/// `create_new_trial`): trial numbers and the start of queued trials are decided one worker at a
/// time. SQLite's `BEGIN IMMEDIATE` already holds the whole database.
pub(super) fn lock_study(tx: &mut Tx, study_id: i64) -> Result<()> {
    if tx.is_postgres() {
        tx.exec("SELECT study_id FROM studies WHERE study_id = ?1 FOR UPDATE", &sql_params![study_id])?;
    }
    Ok(())
}

/// A trial's (study_id, number, state), its row locked until the transaction ends on PostgreSQL
/// (so a `tell` and another worker failing the trial as stale cannot both go ahead).
pub(super) fn trial_for_update(tx: &mut Tx, trial_id: i64) -> Result<Option<(i64, i64, TrialState)>> {
    let sql = if tx.is_postgres() {
        "SELECT study_id, number, state FROM trials WHERE trial_id = ?1 FOR UPDATE"
    } else {
        "SELECT study_id, number, state FROM trials WHERE trial_id = ?1"
    };
    let Some(r) = tx.opt_row(sql, &sql_params![trial_id])? else { return Ok(None) };
    Ok(Some((r.get(0)?, r.get::<Option<i64>>(1)?.unwrap_or(-1), TrialState::parse(&r.get::<String>(2)?)?)))
}

/// A trial's objective values as stored, in objective order.
fn stored_values(tx: &mut Tx, trial_id: i64) -> Result<Vec<f64>> {
    tx.rows(
        "SELECT value, value_type FROM trial_values WHERE trial_id = ?1 ORDER BY objective",
        &sql_params![trial_id],
    )?
    .iter()
    .map(|r| super::rows::stored_to_value(r.get(0)?, &r.get::<String>(1)?))
    .collect()
}

/// (study_id, state) of a trial that may still be written to.
fn check_updatable(tx: &mut Tx, trial_id: i64) -> Result<(i64, TrialState)> {
    require_updatable(trial_id, trial_for_update(tx, trial_id)?)
}

/// (study_id, state) of the trial whose row [`trial_for_update`] read, if it may still be written.
fn require_updatable(trial_id: i64, row: Option<(i64, i64, TrialState)>) -> Result<(i64, TrialState)> {
    let Some((study_id, number, state)) = row else { bail!("no trial with trial_id {trial_id}") };
    if state.is_finished() {
        bail!("trial {number} is already finished with state {state} and cannot be updated");
    }
    Ok((study_id, state))
}

/// Inserts a trial and numbers it; the caller has locked the study ([`lock_study`]), so the count
/// that numbers it cannot race another worker's.
pub(super) fn insert_trial(tx: &mut Tx, study_id: i64, t: &NewTrial) -> Result<(i64, u64)> {
    // The number is Optuna's count_past_trials (the study's trials with a smaller trial_id),
    // computed in the statement that inserts: with the study locked, every trial of the study
    // already has a smaller trial_id, so the count is unique and gap-free.
    let row = tx.row(
        "INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete) \
         VALUES ((SELECT COUNT(*) FROM trials WHERE study_id = ?1), ?1, ?2, ?3, ?4) RETURNING trial_id, number",
        &sql_params![
            study_id,
            t.state.as_str(),
            t.datetime_start.map(UtcDateTime::format),
            t.datetime_complete.map(UtcDateTime::format)
        ],
    )?;
    let (trial_id, number): (i64, i64) = (row.get(0)?, row.get(1)?);
    if let Some(values) = &t.values {
        for (objective, v) in values.iter().enumerate() {
            let (stored, kind) = value_to_stored(*v);
            tx.exec(
                "INSERT INTO trial_values (trial_id, objective, value, value_type) VALUES (?1, ?2, ?3, ?4)",
                &sql_params![trial_id, objective as i64, stored, kind],
            )?;
        }
    }
    store_params(tx, study_id, trial_id, &t.params, &HashMap::new())?;
    for (k, v) in &t.user_attrs {
        upsert_attr(tx, "trial_user_attributes", trial_id, k, v)?;
    }
    for (k, v) in &t.system_attrs {
        upsert_attr(tx, "trial_system_attributes", trial_id, k, v)?;
    }
    for (step, v) in &t.intermediate_values {
        upsert_intermediate(tx, trial_id, *step, *v)?;
    }
    Ok((trial_id, u64::try_from(number)?))
}

/// Checks a parameter before it is stored: its value lies in its distribution, and the
/// distribution is compatible with the one the study already stores for that name (Optuna's
/// `check_distribution_compatibility`). `verified` holds the (study, name) → distribution JSON
/// already checked on this connection: a study's first stored distribution of a name never
/// changes, so each is looked up once.
fn check_param(
    tx: &mut Tx,
    study_id: i64,
    (name, internal, dist): &(String, f64, Distribution),
    verified: &VerifiedDistributions,
) -> Result<()> {
    if !dist.contains(*internal) {
        bail!("parameter {name:?}: value {internal} is outside {}", dist.to_json());
    }
    let known = verified.get(&study_id).and_then(|names| names.get(name));
    if known.is_some_and(|json| *json == dist.to_json()) {
        return Ok(());
    }
    let previous: Option<String> = tx
        .opt_row(
            "SELECT p.distribution_json FROM trial_params p JOIN trials t ON t.trial_id = p.trial_id \
             WHERE t.study_id = ?1 AND p.param_name = ?2 LIMIT 1",
            &sql_params![study_id, name.as_str()],
        )?
        .map(|r| r.get(0))
        .transpose()?;
    if let Some(prev) = previous {
        let prev =
            Distribution::from_json(&prev).with_context(|| format!("stored distribution of {name:?}"))?;
        crate::distributions::check_distribution_compatibility(name, &prev, dist)?;
    }
    Ok(())
}

/// Checks parameters ([`check_param`]) and stores them for one trial ([`insert_params`]).
fn store_params(
    tx: &mut Tx,
    study_id: i64,
    trial_id: i64,
    items: &[(String, f64, Distribution)],
    verified: &VerifiedDistributions,
) -> Result<()> {
    for param in items {
        check_param(tx, study_id, param, verified)?;
    }
    insert_params(tx, trial_id, items)
}

/// Stores checked parameters of one trial with one statement. A parameter set before keeps its
/// value: the same value again is a write run again after a lost reply; another is an error.
fn insert_params(tx: &mut Tx, trial_id: i64, items: &[(String, f64, Distribution)]) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let rows: Vec<String> =
        (0..items.len()).map(|i| format!("(?1, ?{}, ?{}, ?{})", 3 * i + 2, 3 * i + 3, 3 * i + 4)).collect();
    let sql = format!(
        "INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json) VALUES {} \
         ON CONFLICT (trial_id, param_name) DO NOTHING",
        rows.join(", ")
    );
    let mut params = vec![SqlValue::from(trial_id)];
    for (name, internal, dist) in items {
        params.extend([SqlValue::from(name), SqlValue::from(*internal), SqlValue::from(dist.to_json())]);
    }
    let inserted = tx.exec(&sql, &params).context("storing parameters")?;
    if inserted as usize == items.len() {
        return Ok(());
    }
    for (name, internal, _) in items {
        let stored: f64 = tx
            .row(
                "SELECT param_value FROM trial_params WHERE trial_id = ?1 AND param_name = ?2",
                &sql_params![trial_id, name.as_str()],
            )?
            .get(0)?;
        if stored != *internal {
            bail!("parameter {name:?} is already set to {stored}, cannot set it to {internal}");
        }
    }
    Ok(())
}

pub(super) fn upsert_attr(tx: &mut Tx, table: &str, trial_id: i64, key: &str, json: &str) -> Result<()> {
    if key.len() > 512 {
        bail!("attribute key {key:?} is longer than 512 bytes");
    }
    let sql = format!(
        "INSERT INTO {table} (trial_id, \"key\", value_json) VALUES (?1, ?2, ?3) \
         ON CONFLICT (trial_id, \"key\") DO UPDATE SET value_json = excluded.value_json"
    );
    tx.exec(&sql, &sql_params![trial_id, key, json])?;
    Ok(())
}

fn upsert_intermediate(tx: &mut Tx, trial_id: i64, step: i64, value: f64) -> Result<()> {
    let (stored, kind) = value_to_stored(value);
    tx.exec("INSERT INTO trial_intermediate_values (trial_id, step, intermediate_value, intermediate_value_type) \
         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (trial_id, step) DO UPDATE SET \
         intermediate_value = excluded.intermediate_value, intermediate_value_type = excluded.intermediate_value_type",
        &sql_params![trial_id, step, stored, kind],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributions::{CategoricalDistribution, ParamValue};
    use crate::study::storage::tests::{batch, lr};
    use crate::trial::StudyDirection;

    #[test]
    fn trial_lifecycle_and_encodings() {
        let mut s = Storage::open("sqlite:///:memory:").unwrap();
        let study = s.create_study("s", StudyDirection::Maximize, false).unwrap();
        let StartOutcome::Started(t) = s.start_trial(study.study_id, None, true).unwrap() else { panic!() };
        assert_eq!((t.number, t.state), (0, TrialState::Running));
        s.set_trial_params(t.trial_id, &[("learning_rate".into(), 3e-5, lr()), ("bs".into(), 1.0, batch())])
            .unwrap();
        s.report(t.trial_id, 1, 0.5, &[("epoch_1_eval_loss".into(), "NaN".into())]).unwrap();
        s.report(t.trial_id, 2, f64::NAN, &[]).unwrap();
        s.report(t.trial_id, 3, f64::NEG_INFINITY, &[]).unwrap();
        s.set_trial_state(t.trial_id, TrialState::Complete, Some(&[f64::INFINITY]), &[]).unwrap();
        let t = s.trial(t.trial_id).unwrap();
        assert_eq!(t.state, TrialState::Complete);
        assert_eq!(t.values, Some(vec![f64::INFINITY]));
        assert_eq!(t.param("bs").unwrap().value, ParamValue::Int(32));
        assert_eq!(t.intermediate_values[&1], 0.5);
        assert!(t.intermediate_values[&2].is_nan());
        assert_eq!(t.intermediate_values[&3], f64::NEG_INFINITY);
        assert_eq!(t.user_attrs["epoch_1_eval_loss"], Value::Null);
        assert!(t.datetime_complete.is_some());
        // Raw encodings as Optuna writes them.
        let kinds: Vec<String> = s
            .sqlite()
            .prepare("SELECT intermediate_value_type FROM trial_intermediate_values ORDER BY step")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(kinds, ["FINITE", "NAN", "INF_NEG"]);
        let (pv, vt): (f64, String) = s
            .sqlite()
            .query_row("SELECT p.param_value, v.value_type FROM trial_params p, trial_values v WHERE p.param_name='bs'", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((pv, vt.as_str()), (1.0, "INF_POS"));
        // Finished trials are immutable; NaN objectives are refused.
        let err = s.report(t.trial_id, 4, 1.0, &[]).unwrap_err().to_string();
        assert!(err.contains("trial 0 is already finished with state COMPLETE"), "{err}");
        let StartOutcome::Started(t2) = s.start_trial(study.study_id, None, false).unwrap() else { panic!() };
        assert_eq!(t2.number, 1);
        assert!(s.set_trial_state(t2.trial_id, TrialState::Complete, Some(&[f64::NAN]), &[]).is_err());
        // A parameter may not change distribution kind or categorical choices within a study.
        let err = s.set_trial_params(t2.trial_id, &[("bs".into(), 3e-5, lr())]).unwrap_err().to_string();
        assert!(err.contains("cannot switch to a FloatDistribution"), "{err}");
        let other =
            Distribution::Categorical(CategoricalDistribution::new(vec![ParamValue::Int(8)]).unwrap());
        let err = s.set_trial_params(t2.trial_id, &[("bs".into(), 0.0, other)]).unwrap_err().to_string();
        assert!(err.contains("dynamic value space"), "{err}");
        let err =
            s.set_trial_params(t2.trial_id, &[("learning_rate".into(), 0.5, lr())]).unwrap_err().to_string();
        assert!(err.contains("outside"), "{err}");
    }

    #[test]
    fn an_ask_starts_reads_and_stores_its_params_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:///{}", dir.path().join("ask.db").display());
        let (mut a, mut b) = (Storage::open(&url).unwrap(), Storage::open(&url).unwrap());
        let study = a.create_study("s", StudyDirection::Maximize, false).unwrap();
        a.study_trials(study.study_id).unwrap(); // `a` caches the empty study
        // Another worker finishes a trial and enqueues one with a fixed batch size.
        let StartOutcome::Started(done) = b.start_trial(study.study_id, None, false).unwrap() else {
            panic!()
        };
        b.set_trial_state(done.trial_id, TrialState::Complete, Some(&[0.7]), &[]).unwrap();
        let mut queued = NewTrial::new(TrialState::Waiting);
        queued.params.push(("bs".into(), 2.0, batch()));
        b.create_trial(study.study_id, &queued).unwrap();

        // The queued trial is taken; the sampler sees the other worker's trial and the started one,
        // and only its parameters that the trial lacks are stored.
        let mut seen = Vec::new();
        let mut choose = |t: &FrozenTrial, trials: &[FrozenTrial]| {
            seen = trials.iter().map(|x| (x.number, x.state)).collect();
            assert_eq!(t.param("bs").unwrap().value, ParamValue::Int(64));
            Ok(vec![("learning_rate".to_string(), 3e-5, lr()), ("bs".to_string(), 0.0, batch())])
        };
        let StartOutcome::Started(t) =
            a.start_trial_with_params(study.study_id, None, false, &mut choose).unwrap()
        else {
            panic!()
        };
        assert_eq!(seen, [(0, TrialState::Complete), (1, TrialState::Running)]);
        assert_eq!((t.number, t.params.len()), (1, 2));
        let stored = b.trial(t.trial_id).unwrap();
        assert_eq!(stored.param("bs").unwrap().value, ParamValue::Int(64));
        assert_eq!(stored.param("learning_rate").unwrap().internal, 3e-5);

        // A sampler error rolls the start back: no trial is left RUNNING without parameters.
        let err = a
            .start_trial_with_params(study.study_id, None, false, &mut |_, _| anyhow::bail!("no proposal"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("no proposal"), "{err:#}");
        assert_eq!(b.trial_counts(study.study_id).unwrap().running, 1);
        // The next ask numbers on without a gap, from a history that holds both trials.
        let StartOutcome::Started(next) = a
            .start_trial_with_params(study.study_id, None, false, &mut |_, trials| {
                assert_eq!(trials.len(), 3);
                Ok(vec![("learning_rate".to_string(), 1e-5, lr())])
            })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(next.number, 2);

        // Telling a finished trial again with the same outcome is a no-op (a write retried after a
        // lost reply); with another outcome it is refused.
        a.set_trial_state(next.trial_id, TrialState::Complete, Some(&[0.5]), &[]).unwrap();
        a.set_trial_state(next.trial_id, TrialState::Complete, Some(&[0.5]), &[]).unwrap();
        let err = a.set_trial_state(next.trial_id, TrialState::Fail, None, &[]).unwrap_err().to_string();
        assert!(err.contains("trial 2 is already finished with state COMPLETE"), "{err}");
        let err = a.set_trial_state(999, TrialState::Fail, None, &[]).unwrap_err().to_string();
        assert!(err.contains("no trial with trial_id 999"), "{err}");
    }
}
