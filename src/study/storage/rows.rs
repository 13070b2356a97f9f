//! Decoding rows: trials into [`FrozenTrial`]s (one query per table), study directions, attribute
//! maps, and Optuna's column encodings of values (`FINITE`/`INF_POS`/`INF_NEG`/`NAN`, both ways)
//! and datetimes.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::sql::{Tx, sql_params};
use crate::distributions::Distribution;
use crate::pyjson;
use crate::trial::{FrozenTrial, StudyDirection, TrialParam, TrialState, UtcDateTime};

pub(super) fn value_to_stored(v: f64) -> (Option<f64>, &'static str) {
    if v.is_nan() {
        (None, "NAN")
    } else if v == f64::INFINITY {
        (None, "INF_POS")
    } else if v == f64::NEG_INFINITY {
        (None, "INF_NEG")
    } else {
        (Some(v), "FINITE")
    }
}

pub(super) fn stored_to_value(v: Option<f64>, kind: &str) -> Result<f64> {
    match (kind, v) {
        ("FINITE", Some(x)) => Ok(x),
        ("INF_POS", _) => Ok(f64::INFINITY),
        ("INF_NEG", _) => Ok(f64::NEG_INFINITY),
        ("NAN", _) => Ok(f64::NAN),
        ("FINITE", None) => bail!("a FINITE value is NULL"),
        (other, _) => bail!("unknown value type {other:?}"),
    }
}

fn parse_datetime(text: Option<String>) -> Result<Option<UtcDateTime>> {
    text.map(|t| UtcDateTime::parse(&t)).transpose()
}

pub(super) fn study_directions(tx: &mut Tx, study_id: i64) -> Result<Vec<StudyDirection>> {
    tx.rows(
        "SELECT direction FROM study_directions WHERE study_id = ?1 ORDER BY objective",
        &sql_params![study_id],
    )?
    .iter()
    .map(|r| StudyDirection::parse(&r.get::<String>(0)?))
    .collect()
}

pub(super) fn attrs_of(tx: &mut Tx, sql: &str, id: i64) -> Result<BTreeMap<String, Value>> {
    tx.rows(sql, &sql_params![id])?
        .iter()
        .map(|r| {
            let (k, v): (String, Option<String>) = (r.get(0)?, r.get(1)?);
            let value =
                pyjson::loads(v.as_deref().unwrap_or("null")).with_context(|| format!("attribute {k:?}"))?;
            Ok((k, value))
        })
        .collect()
}

pub(super) enum TrialFilter {
    Id(i64),
    Study(i64),
    /// The study's trials with `trial_id > after`, plus those listed (JSON array of ids).
    Refresh {
        study_id: i64,
        after: i64,
        ids_json: String,
    },
}

/// Loads trials with one query per table (not one per trial), grouping rows by trial_id.
pub(super) fn load_trials(tx: &mut Tx, filter: TrialFilter) -> Result<Vec<FrozenTrial>> {
    let (cond, params) = match filter {
        TrialFilter::Id(id) => ("t.trial_id = ?1", sql_params![id].to_vec()),
        TrialFilter::Study(id) => ("t.study_id = ?1", sql_params![id].to_vec()),
        TrialFilter::Refresh { study_id, after, ids_json } if tx.is_postgres() => (
            "t.study_id = ?1 AND (t.trial_id > ?2 OR t.trial_id IN \
             (SELECT CAST(value AS INTEGER) FROM json_array_elements_text(CAST(?3 AS json))))",
            sql_params![study_id, after, ids_json].to_vec(),
        ),
        TrialFilter::Refresh { study_id, after, ids_json } => (
            // `+` keeps SQLite off the study_id index: the rowid range and lookups touch only the
            // few rows that can have changed instead of scanning the whole study.
            // `(SELECT ?2)` rather than `?2`: with a bare parameter, SQLite (built with STAT4)
            // re-plans the statement every time a new value is bound.
            "+t.study_id = ?1 AND (t.trial_id > (SELECT ?2) OR t.trial_id IN (SELECT value FROM json_each(?3)))",
            sql_params![study_id, after, ids_json].to_vec(),
        ),
    };
    let mut trials = Vec::new();
    let mut index: HashMap<i64, usize> = HashMap::new();
    let sql = format!(
        "SELECT t.trial_id, t.number, t.state, t.datetime_start, t.datetime_complete FROM trials t \
         WHERE {cond} ORDER BY t.trial_id"
    );
    for r in tx.rows(&sql, &params)? {
        let trial_id: i64 = r.get(0)?;
        let number: Option<i64> = r.get(1)?;
        let state: String = r.get(2)?;
        let ctx = || format!("trial_id {trial_id}");
        let trial = FrozenTrial {
            trial_id,
            number: number
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| anyhow!("trial_id {trial_id} has no valid number"))?,
            state: TrialState::parse(&state).with_context(ctx)?,
            values: None,
            datetime_start: parse_datetime(r.get(3)?).with_context(ctx)?,
            datetime_complete: parse_datetime(r.get(4)?).with_context(ctx)?,
            params: Vec::new(),
            user_attrs: BTreeMap::new(),
            system_attrs: BTreeMap::new(),
            intermediate_values: BTreeMap::new(),
        };
        index.insert(trial_id, trials.len());
        trials.push(trial);
    }
    if trials.is_empty() {
        return Ok(trials);
    }
    // `IN (subquery)` rather than a join: SQLite then looks rows up through the (trial_id, ...)
    // unique index for just the selected trials, where a join would scan the whole table.
    let join = |table: &str, cols: &str, order: &str| {
        format!(
            "SELECT x.trial_id, {cols} FROM {table} x \
             WHERE x.trial_id IN (SELECT t.trial_id FROM trials t WHERE {cond}) ORDER BY {order}"
        )
    };
    let mut dist_cache: HashMap<String, Distribution> = HashMap::new();
    let sql = join("trial_params", "x.param_name, x.param_value, x.distribution_json", "x.param_id");
    for r in tx.rows(&sql, &params)? {
        let trial_id: i64 = r.get(0)?;
        let name: String = r.get(1)?;
        let internal: f64 = r.get(2)?;
        let json: String = r.get(3)?;
        let dist = match dist_cache.get(&json) {
            Some(d) => d.clone(),
            None => {
                let d = Distribution::from_json(&json)
                    .with_context(|| format!("trial_id {trial_id}: parameter {name:?}"))?;
                dist_cache.insert(json, d.clone());
                d
            }
        };
        let value =
            dist.to_external(internal).with_context(|| format!("trial_id {trial_id}: parameter {name:?}"))?;
        if let Some(&i) = index.get(&trial_id) {
            trials[i].params.push(TrialParam { name, internal, value, distribution: dist });
        }
    }
    let sql = join("trial_values", "x.objective, x.value, x.value_type", "x.trial_id, x.objective");
    for r in tx.rows(&sql, &params)? {
        let trial_id: i64 = r.get(0)?;
        let objective: i64 = r.get(1)?;
        let v = stored_to_value(r.get(2)?, &r.get::<String>(3)?)
            .with_context(|| format!("trial_values of trial_id {trial_id}"))?;
        if let Some(&i) = index.get(&trial_id) {
            let values = trials[i].values.get_or_insert_with(Vec::new);
            let objective = usize::try_from(objective).map_err(|_| anyhow!("negative objective index"))?;
            if values.len() <= objective {
                values.resize(objective + 1, 0.0);
            }
            values[objective] = v;
        }
    }
    let sql = join(
        "trial_intermediate_values",
        "x.step, x.intermediate_value, x.intermediate_value_type",
        "x.trial_intermediate_value_id",
    );
    for r in tx.rows(&sql, &params)? {
        let trial_id: i64 = r.get(0)?;
        let step: i64 = r.get(1)?;
        let v = stored_to_value(r.get(2)?, &r.get::<String>(3)?)
            .with_context(|| format!("trial_intermediate_values of trial_id {trial_id}"))?;
        if let Some(&i) = index.get(&trial_id) {
            trials[i].intermediate_values.insert(step, v);
        }
    }
    for (table, id, system) in [
        ("trial_user_attributes", "x.trial_user_attribute_id", false),
        ("trial_system_attributes", "x.trial_system_attribute_id", true),
    ] {
        for r in tx.rows(&join(table, "x.\"key\", x.value_json", id), &params)? {
            let trial_id: i64 = r.get(0)?;
            let key: String = r.get(1)?;
            let json: Option<String> = r.get(2)?;
            let value = pyjson::loads(json.as_deref().unwrap_or("null"))
                .with_context(|| format!("{table} {key:?} of trial_id {trial_id}"))?;
            if let Some(&i) = index.get(&trial_id) {
                let map = if system { &mut trials[i].system_attrs } else { &mut trials[i].user_attrs };
                map.insert(key, value);
            }
        }
    }
    Ok(trials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::study::storage::tests::lr;
    use crate::study::storage::{NewTrial, Storage};

    #[test]
    fn corrupt_rows_name_the_trial_and_column() {
        let mut s = Storage::open("sqlite:///:memory:").unwrap();
        let study = s.create_study("s", StudyDirection::Maximize, false).unwrap();
        let mut t = NewTrial::new(TrialState::Complete);
        t.values = Some(vec![1.0]);
        t.params.push(("lr".into(), 2e-5, lr()));
        let trial = s.create_trial(study.study_id, &t).unwrap();
        s.sqlite().execute("UPDATE trial_params SET distribution_json = '{\"name\": \"Flo'", []).unwrap();
        let err = format!("{:#}", s.trials(study.study_id, None).unwrap_err());
        assert!(
            err.contains("trial_id 1") && err.contains("\"lr\"") && err.contains("invalid JSON"),
            "{err}"
        );
        s.sqlite().execute("UPDATE trial_params SET distribution_json = ?1", [lr().to_json()]).unwrap();
        s.sqlite().execute("UPDATE trials SET state = 'PAUSED'", []).unwrap();
        let err = format!("{:#}", s.trial(trial.trial_id).unwrap_err());
        assert!(err.contains("unknown trial state \"PAUSED\""), "{err}");
        s.sqlite().execute("UPDATE trials SET state = 'COMPLETE', datetime_start = 'noon'", []).unwrap();
        let err = format!("{:#}", s.trial(trial.trial_id).unwrap_err());
        assert!(err.contains("invalid datetime \"noon\""), "{err}");
        s.sqlite().execute("UPDATE trials SET datetime_start = NULL", []).unwrap();
        s.sqlite().execute("UPDATE trial_values SET value = NULL", []).unwrap();
        let err = format!("{:#}", s.trial(trial.trial_id).unwrap_err());
        assert!(err.contains("FINITE value is NULL"), "{err}");
    }
}
