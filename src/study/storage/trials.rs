//! The trial lifecycle's writes: creating and starting trials, parameters, reports, attributes,
//! state changes, re-queueing a trial with Optuna's retry template, and the insert helpers they
//! share.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::heartbeat::upsert_heartbeat;
use super::rows::value_to_stored;
use super::sql::{Tx, sql_params};
use super::{NewTrial, StartOutcome, Storage};
use crate::distributions::Distribution;
use crate::pyjson;
use crate::trial::{FrozenTrial, TrialState, UtcDateTime};

/// A RUNNING trial without a heartbeat still counts towards a target for this long after it
/// started: an Optuna worker records its first heartbeat a moment after creating the trial, and in
/// that moment another worker must not take its place. Trials of `ask` that never get one (a user
/// telling by hand) stop counting after it.
pub const FRESH_RUNNING_MICROS: i64 = 10_000_000;

impl Storage {
    /// Creates a trial from a template in one transaction (Optuna's `create_new_trial`) and
    /// returns it as stored.
    pub fn create_trial(&mut self, study_id: i64, template: &NewTrial) -> Result<FrozenTrial> {
        let trial_id = self.write(|tx| {
            lock_study(tx, study_id)?;
            insert_trial(tx, study_id, template)
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
            let trial_id = match waiting {
                Some(id) => {
                    tx.exec("UPDATE trials SET state = 'RUNNING', datetime_start = ?2 WHERE trial_id = ?1",
                        &sql_params![id, now],
                    )?;
                    id
                }
                None => insert_trial(tx, study_id, &NewTrial::new(TrialState::Running))?,
            };
            if heartbeat {
                upsert_heartbeat(tx, trial_id)?;
            }
            Ok(Ok(trial_id))
        })?;
        match started {
            Ok(trial_id) => Ok(StartOutcome::Started(self.trial(trial_id)?)),
            Err(outcome) => Ok(outcome),
        }
    }

    /// Stores several parameters of a not-yet-finished trial in one transaction, checking each
    /// against the distribution the study already uses for that name.
    pub fn set_trial_params(&mut self, trial_id: i64, items: &[(String, f64, Distribution)]) -> Result<()> {
        self.write(|tx| {
            let (study_id, _) = check_updatable(tx, trial_id)?;
            for (name, internal, dist) in items {
                insert_param(tx, study_id, trial_id, name, *internal, dist)?;
            }
            Ok(())
        })
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
            let row = trial_for_update(tx, trial_id)?;
            if let Some((_, _, current)) = row
                && current == state
                && state.is_finished()
                && stored_values(tx, trial_id)? == values.map(<[f64]>::to_vec).unwrap_or_default()
            {
                // Already done: this is a write run again after the server went away with its
                // reply, when the first run had committed.
                return Ok(());
            }
            require_updatable(trial_id, row)?;
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
            let now = UtcDateTime::now().format();
            if state == TrialState::Running {
                tx.exec("UPDATE trials SET state = 'RUNNING', datetime_start = ?2 WHERE trial_id = ?1",
                    &sql_params![trial_id, now],
                )?;
            } else if state.is_finished() {
                tx.exec("UPDATE trials SET state = ?2, datetime_complete = ?3 WHERE trial_id = ?1",
                    &sql_params![trial_id, state.as_str(), now],
                )?;
            } else {
                tx.exec("UPDATE trials SET state = ?2 WHERE trial_id = ?1", &sql_params![trial_id, state.as_str()])?;
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
pub(super) fn insert_trial(tx: &mut Tx, study_id: i64, t: &NewTrial) -> Result<i64> {
    let trial_id: i64 = tx
        .row(
        "INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete) VALUES (NULL, ?1, ?2, ?3, ?4) \
         RETURNING trial_id",
        &sql_params![
            study_id,
            t.state.as_str(),
            t.datetime_start.map(UtcDateTime::format),
            t.datetime_complete.map(UtcDateTime::format)
        ],
    )?
    .get(0)?;
    if let Some(values) = &t.values {
        for (objective, v) in values.iter().enumerate() {
            let (stored, kind) = value_to_stored(*v);
            tx.exec(
                "INSERT INTO trial_values (trial_id, objective, value, value_type) VALUES (?1, ?2, ?3, ?4)",
                &sql_params![trial_id, objective as i64, stored, kind],
            )?;
        }
    }
    for (name, internal, dist) in &t.params {
        insert_param(tx, study_id, trial_id, name, *internal, dist)?;
    }
    for (k, v) in &t.user_attrs {
        upsert_attr(tx, "trial_user_attributes", trial_id, k, v)?;
    }
    for (k, v) in &t.system_attrs {
        upsert_attr(tx, "trial_system_attributes", trial_id, k, v)?;
    }
    for (step, v) in &t.intermediate_values {
        upsert_intermediate(tx, trial_id, *step, *v)?;
    }
    // Optuna's count_past_trials, inside the write transaction: unique and gap-free.
    let number: i64 = tx
        .row(
            "SELECT COUNT(trial_id) FROM trials WHERE study_id = ?1 AND trial_id < ?2",
            &sql_params![study_id, trial_id],
        )?
        .get(0)?;
    tx.exec("UPDATE trials SET number = ?2 WHERE trial_id = ?1", &sql_params![trial_id, number])?;
    Ok(trial_id)
}

fn insert_param(
    tx: &mut Tx,
    study_id: i64,
    trial_id: i64,
    name: &str,
    internal: f64,
    dist: &Distribution,
) -> Result<()> {
    if !dist.contains(internal) {
        bail!("parameter {name:?}: value {internal} is outside {}", dist.to_json());
    }
    let previous: Option<String> = tx
        .opt_row(
            "SELECT p.distribution_json FROM trial_params p JOIN trials t ON t.trial_id = p.trial_id \
             WHERE t.study_id = ?1 AND p.param_name = ?2 LIMIT 1",
            &sql_params![study_id, name],
        )?
        .map(|r| r.get(0))
        .transpose()?;
    if let Some(prev) = previous {
        let prev =
            Distribution::from_json(&prev).with_context(|| format!("stored distribution of {name:?}"))?;
        crate::distributions::check_distribution_compatibility(name, &prev, dist)?;
    }
    let inserted = tx
        .exec(
            "INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (trial_id, param_name) DO NOTHING",
            &sql_params![trial_id, name, internal, dist.to_json()],
        )
        .with_context(|| format!("storing parameter {name:?}"))?;
    if inserted == 0 {
        // Set before: the same value again is a write run again after a lost reply; another is an error.
        let stored: f64 = tx
            .row(
                "SELECT param_value FROM trial_params WHERE trial_id = ?1 AND param_name = ?2",
                &sql_params![trial_id, name],
            )?
            .get(0)?;
        if stored != internal {
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
}
