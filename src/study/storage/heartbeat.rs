//! Heartbeats and the trials of workers that are gone: recording a heartbeat, failing RUNNING
//! trials whose heartbeat went stale (or a stopping worker's own trials) and re-queueing their
//! parameters as Optuna's `RetryHeartbeatStaleTrialCallback` does.

use std::time::Duration;

use super::Storage;
use super::sql::{Tx, sql_params};
use super::trials::{insert_trial, lock_study, retry_template, trial_for_update, upsert_attr};
use crate::pyjson;
use crate::trial::UtcDateTime;
use anyhow::{Context, Result};

impl Storage {
    /// Records a heartbeat for a RUNNING trial (Optuna's `record_heartbeat`).
    pub fn record_heartbeat(&mut self, trial_id: i64) -> Result<()> {
        self.write(|tx| upsert_heartbeat(tx, trial_id))
    }

    /// Fails the study's RUNNING trials whose last heartbeat is older than `grace` and, unless a
    /// trial was already retried `max_retry` times, re-queues its parameters as a WAITING trial,
    /// as `fail_stale_trials` with `RetryHeartbeatStaleTrialCallback(max_retry)` does. The failed
    /// trial gets a `fail_reason` system attribute. Returns the failed trials' numbers.
    pub fn fail_stale_trials(
        &mut self,
        study_id: i64,
        grace: Duration,
        max_retry: Option<u32>,
    ) -> Result<Vec<u64>> {
        // Heartbeats are judged by the clock that wrote them: ours in UTC on SQLite (as Optuna's
        // CURRENT_TIMESTAMP there), the server's on PostgreSQL ([`upsert_heartbeat`]).
        let (running, now): (Vec<(i64, String)>, UtcDateTime) = self.read(|tx| {
            let now = heartbeat_clock(tx)?;
            let rows = tx.rows(
                "SELECT t.trial_id, h.heartbeat FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id \
                 WHERE t.study_id = ?1 AND t.state = 'RUNNING' ORDER BY t.trial_id",
                &sql_params![study_id],
            )?;
            let running = rows.iter().map(|r| Ok((r.get(0)?, r.get(1)?))).collect::<Result<_>>()?;
            Ok((running, now))
        })?;
        let mut failed = Vec::new();
        for (trial_id, beat) in running {
            let beat = UtcDateTime::parse(&beat)
                .with_context(|| format!("trial_heartbeats of trial_id {trial_id}"))?;
            if now.seconds_since(beat) <= grace.as_secs_f64() {
                continue;
            }
            let reason = format!(
                "stale heartbeat: last heartbeat at {}, more than {} s before {} (the database's clock)",
                beat.format(),
                grace.as_secs(),
                now.format()
            );
            failed.extend(self.fail_and_requeue(study_id, trial_id, &reason, max_retry)?);
        }
        Ok(failed)
    }

    /// Fails this worker's own RUNNING trials (`trial_ids`) with `reason` and re-queues their
    /// parameters as [`Storage::fail_stale_trials`] does, without waiting for them to go stale:
    /// for a worker that is stopping (SIGINT, SIGTERM). Trials that finished meanwhile are left
    /// as they are. Returns the failed trials' numbers.
    pub fn fail_running_trials(
        &mut self,
        study_id: i64,
        trial_ids: &[i64],
        reason: &str,
        max_retry: Option<u32>,
    ) -> Result<Vec<u64>> {
        let mut failed = Vec::new();
        for &trial_id in trial_ids {
            failed.extend(self.fail_and_requeue(study_id, trial_id, reason, max_retry)?);
        }
        Ok(failed)
    }

    /// FAIL with `reason` and a WAITING retry (unless retried `max_retry` times), in one
    /// transaction, if the trial is still RUNNING; its number then.
    fn fail_and_requeue(
        &mut self,
        study_id: i64,
        trial_id: i64,
        reason: &str,
        max_retry: Option<u32>,
    ) -> Result<Option<u64>> {
        let trial = self.trial(trial_id)?;
        let done = self.write(|tx| {
            // Another worker may have failed it, or its own worker finished it, since we looked.
            let state = trial_for_update(tx, trial_id)?.map(|(_, _, state)| state);
            if state != Some(crate::trial::TrialState::Running) {
                return Ok(false);
            }
            upsert_attr(
                tx,
                "trial_system_attributes",
                trial_id,
                "fail_reason",
                &pyjson::string_literal(reason),
            )?;
            tx.exec(
                "UPDATE trials SET state = 'FAIL', datetime_complete = ?2 WHERE trial_id = ?1",
                &sql_params![trial_id, UtcDateTime::now().format()],
            )?;
            if let Some(retry) = retry_template(&trial, max_retry) {
                lock_study(tx, study_id)?;
                insert_trial(tx, study_id, &retry)?;
            }
            Ok(true)
        })?;
        Ok(done.then_some(trial.number))
    }
}

/// "Now" for heartbeats, as Optuna's RDBStorage has it (`func.now()`): on PostgreSQL the server's
/// clock in its time zone (`LOCALTIMESTAMP`, what `now()` becomes in a TIMESTAMP column), so that
/// hpo-gpu and Optuna workers judge each other's heartbeats alike on a server that is not on UTC;
/// on SQLite (`CURRENT_TIMESTAMP`, UTC) this process's UTC clock.
fn heartbeat_clock(tx: &mut Tx) -> Result<UtcDateTime> {
    if tx.is_postgres() {
        UtcDateTime::parse(&tx.row("SELECT LOCALTIMESTAMP", &[])?.get::<String>(0)?)
    } else {
        Ok(UtcDateTime::now())
    }
}

pub(super) fn upsert_heartbeat(tx: &mut Tx, trial_id: i64) -> Result<()> {
    let sql = "INSERT INTO trial_heartbeats (trial_id, heartbeat) VALUES (?1, ?2) \
               ON CONFLICT (trial_id) DO UPDATE SET heartbeat = excluded.heartbeat";
    if tx.is_postgres() {
        tx.exec(&sql.replace("?2", "LOCALTIMESTAMP"), &sql_params![trial_id])?;
    } else {
        tx.exec(sql, &sql_params![trial_id, UtcDateTime::now().format()])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::study::storage::StartOutcome;
    use crate::study::storage::tests::lr;
    use crate::trial::{StudyDirection, TrialState};

    #[test]
    fn stale_trials_fail_and_requeue_like_optuna() {
        let mut s = Storage::open("sqlite:///:memory:").unwrap();
        let study = s.create_study("s", StudyDirection::Maximize, false).unwrap();
        let StartOutcome::Started(t) = s.start_trial(study.study_id, None, true).unwrap() else { panic!() };
        s.set_trial_params(t.trial_id, &[("learning_rate".into(), 2e-5, lr())]).unwrap();
        s.set_trial_user_attr(t.trial_id, "u", "1").unwrap();
        // A trial without heartbeat is never stale.
        let StartOutcome::Started(no_beat) = s.start_trial(study.study_id, None, false).unwrap() else {
            panic!()
        };
        assert!(s.fail_stale_trials(study.study_id, Duration::from_secs(60), None).unwrap().is_empty());
        s.sqlite()
            .execute(
                "UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00' WHERE trial_id = ?1",
                [t.trial_id],
            )
            .unwrap();
        assert_eq!(s.fail_stale_trials(study.study_id, Duration::from_secs(60), None).unwrap(), vec![0]);
        let failed = s.trial(t.trial_id).unwrap();
        assert_eq!(failed.state, TrialState::Fail);
        assert!(failed.system_attrs["fail_reason"].as_str().unwrap().contains("stale heartbeat"));
        assert_eq!(s.trial(no_beat.trial_id).unwrap().state, TrialState::Running);
        let trials = s.trials(study.study_id, Some(&[TrialState::Waiting])).unwrap();
        assert_eq!(trials.len(), 1);
        let retry = &trials[0];
        assert_eq!(retry.number, 2);
        assert_eq!(retry.system_attrs["failed_trial"], serde_json::json!(0));
        assert_eq!(retry.system_attrs["retry_history"], serde_json::json!([0]));
        assert!(!retry.system_attrs.contains_key("fail_reason"));
        assert_eq!(retry.user_attrs["u"], serde_json::json!(1));
        assert_eq!(retry.params, failed.params);
        assert!(retry.datetime_start.is_none());
        // The re-queued trial is the next one started, and its retry stays traceable.
        let StartOutcome::Started(again) = s.start_trial(study.study_id, None, true).unwrap() else {
            panic!()
        };
        assert_eq!(again.number, 2);
        assert_eq!(again.state, TrialState::Running);
        s.sqlite()
            .execute(
                "UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00' WHERE trial_id = ?1",
                [again.trial_id],
            )
            .unwrap();
        // max_retry = 1: the second failure is not re-queued.
        assert_eq!(s.fail_stale_trials(study.study_id, Duration::from_secs(60), Some(1)).unwrap(), vec![2]);
        assert!(s.trials(study.study_id, Some(&[TrialState::Waiting])).unwrap().is_empty());
    }
}
