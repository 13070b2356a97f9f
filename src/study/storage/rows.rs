//! Decoding rows: trials into [`FrozenTrial`]s (one statement for all tables), study directions, attribute
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
    /// The study's trials with `trial_id > after`, plus those listed (the ones the cache holds
    /// unfinished); with `count`, the rows also carry the study's trial count.
    Refresh {
        study_id: i64,
        after: i64,
        unfinished: Vec<i64>,
        count: bool,
    },
}

/// What [`load_trials`] read: the trials, and the study's trial count if it was asked for.
pub(super) struct LoadedTrials {
    pub trials: Vec<FrozenTrial>,
    pub study_trial_count: Option<i64>,
}

/// Which table a row of [`load_trials`]' statement comes from (its first column).
const TRIAL_ROW: i64 = 0;
const PARAM_ROW: i64 = 1;
const VALUE_ROW: i64 = 2;
const INTERMEDIATE_ROW: i64 = 3;
const USER_ATTR_ROW: i64 = 4;
const SYSTEM_ATTR_ROW: i64 = 5;
const COUNT_ROW: i64 = 6;

/// Loads trials in one statement: the trials' rows and their params, values, intermediate values
/// and attributes as one `UNION ALL` (columns: kind, trial_id, order, name, integer, number, text,
/// start, complete). One statement is one round trip and, on PostgreSQL, one snapshot even
/// outside a transaction.
pub(super) fn load_trials(tx: &mut Tx, filter: TrialFilter) -> Result<LoadedTrials> {
    let postgres = tx.is_postgres();
    let (cond, params, count) = match filter {
        TrialFilter::Id(id) => ("t.trial_id = ?1", sql_params![id].to_vec(), false),
        TrialFilter::Study(id) => ("t.study_id = ?1", sql_params![id].to_vec(), false),
        TrialFilter::Refresh { study_id, after, unfinished, count } => {
            let ids = unfinished.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
            if postgres {
                // `= ANY(array)` keeps both branches on the primary key (a bitmap OR).
                (
                    "t.study_id = ?1 AND (t.trial_id > ?2 OR t.trial_id = ANY(CAST(CAST(?3 AS TEXT) AS BIGINT[])))",
                    sql_params![study_id, after, format!("{{{ids}}}")].to_vec(),
                    count,
                )
            } else {
                (
                    // `+` keeps SQLite off the study_id index: the rowid range and lookups touch
                    // only the few rows that can have changed instead of scanning the whole study.
                    // `(SELECT ?2)` rather than `?2`: with a bare parameter, SQLite (built with
                    // STAT4) re-plans the statement every time a new value is bound.
                    "+t.study_id = ?1 AND (t.trial_id > (SELECT ?2) OR t.trial_id IN (SELECT value FROM json_each(?3)))",
                    sql_params![study_id, after, format!("[{ids}]")].to_vec(),
                    count,
                )
            }
        }
    };
    // The selected trial ids are found once (`ids`), and every table is read through
    // `IN (SELECT trial_id FROM ids)` rather than a join: SQLite then looks rows up through the
    // (trial_id, ...) unique index for just the selected trials, where a join would scan the
    // whole table; PostgreSQL plans and runs the selection once instead of once per table.
    let of_trials = "x.trial_id IN (SELECT trial_id FROM ids)";
    let count_arm = if count {
        format!(
            " UNION ALL SELECT {COUNT_ROW}, COUNT(*), 0, NULL, NULL, NULL, NULL, NULL, NULL FROM trials WHERE study_id = ?1"
        )
    } else {
        String::new()
    };
    let sql = format!(
        "WITH ids AS (SELECT t.trial_id FROM trials t WHERE {cond}) \
         SELECT {TRIAL_ROW} AS kind, t.trial_id, t.trial_id AS ord, CAST(t.state AS TEXT), CAST(t.number AS BIGINT), \
           CAST(NULL AS DOUBLE PRECISION), CAST(NULL AS TEXT), t.datetime_start, t.datetime_complete \
           FROM trials t WHERE t.trial_id IN (SELECT trial_id FROM ids) \
         UNION ALL SELECT {PARAM_ROW}, x.trial_id, x.param_id, x.param_name, NULL, x.param_value, x.distribution_json, NULL, NULL \
           FROM trial_params x WHERE {of_trials} \
         UNION ALL SELECT {VALUE_ROW}, x.trial_id, x.trial_value_id, CAST(x.value_type AS TEXT), CAST(x.objective AS BIGINT), x.value, NULL, NULL, NULL \
           FROM trial_values x WHERE {of_trials} \
         UNION ALL SELECT {INTERMEDIATE_ROW}, x.trial_id, x.trial_intermediate_value_id, CAST(x.intermediate_value_type AS TEXT), \
           CAST(x.step AS BIGINT), x.intermediate_value, NULL, NULL, NULL \
           FROM trial_intermediate_values x WHERE {of_trials} \
         UNION ALL SELECT {USER_ATTR_ROW}, x.trial_id, x.trial_user_attribute_id, x.\"key\", NULL, NULL, x.value_json, NULL, NULL \
           FROM trial_user_attributes x WHERE {of_trials} \
         UNION ALL SELECT {SYSTEM_ATTR_ROW}, x.trial_id, x.trial_system_attribute_id, x.\"key\", NULL, NULL, x.value_json, NULL, NULL \
           FROM trial_system_attributes x WHERE {of_trials}{count_arm} \
         ORDER BY 1, 3"
    );
    let mut trials: Vec<FrozenTrial> = Vec::new();
    let mut index: HashMap<i64, usize> = HashMap::new();
    let mut study_trial_count = None;
    let mut dist_cache: HashMap<String, Distribution> = HashMap::new();
    for r in tx.rows(&sql, &params)? {
        let kind: i64 = r.get(0)?;
        let trial_id: i64 = r.get(1)?;
        if kind == TRIAL_ROW {
            let number: Option<i64> = r.get(4)?;
            let ctx = || format!("trial_id {trial_id}");
            index.insert(trial_id, trials.len());
            trials.push(FrozenTrial {
                trial_id,
                number: number
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(|| anyhow!("trial_id {trial_id} has no valid number"))?,
                state: TrialState::parse(&r.get::<String>(3)?).with_context(ctx)?,
                values: None,
                datetime_start: parse_datetime(r.get(7)?).with_context(ctx)?,
                datetime_complete: parse_datetime(r.get(8)?).with_context(ctx)?,
                params: Vec::new(),
                user_attrs: BTreeMap::new(),
                system_attrs: BTreeMap::new(),
                intermediate_values: BTreeMap::new(),
            });
            continue;
        }
        if kind == COUNT_ROW {
            study_trial_count = Some(trial_id);
            continue;
        }
        // Rows come ordered by kind, so every trial is indexed before its first child row.
        let Some(&i) = index.get(&trial_id) else { continue };
        let trial = &mut trials[i];
        match kind {
            PARAM_ROW => {
                let name: String = r.get(3)?;
                let internal: f64 = r.get(5)?;
                let json: String = r.get(6)?;
                let ctx = || format!("trial_id {trial_id}: parameter {name:?}");
                let distribution = match dist_cache.get(&json) {
                    Some(d) => d.clone(),
                    None => {
                        let d = Distribution::from_json(&json).with_context(ctx)?;
                        dist_cache.insert(json, d.clone());
                        d
                    }
                };
                let value = distribution.to_external(internal).with_context(ctx)?;
                trial.params.push(TrialParam { name, internal, value, distribution });
            }
            VALUE_ROW => {
                let objective: i64 = r.get(4)?;
                let v = stored_to_value(r.get(5)?, &r.get::<String>(3)?)
                    .with_context(|| format!("trial_values of trial_id {trial_id}"))?;
                let values = trial.values.get_or_insert_with(Vec::new);
                let objective =
                    usize::try_from(objective).map_err(|_| anyhow!("negative objective index"))?;
                if values.len() <= objective {
                    values.resize(objective + 1, 0.0);
                }
                values[objective] = v;
            }
            INTERMEDIATE_ROW => {
                let step: i64 = r.get(4)?;
                let v = stored_to_value(r.get(5)?, &r.get::<String>(3)?)
                    .with_context(|| format!("trial_intermediate_values of trial_id {trial_id}"))?;
                trial.intermediate_values.insert(step, v);
            }
            USER_ATTR_ROW | SYSTEM_ATTR_ROW => {
                let key: String = r.get(3)?;
                let json: Option<String> = r.get(6)?;
                let table =
                    if kind == USER_ATTR_ROW { "trial_user_attributes" } else { "trial_system_attributes" };
                let value = pyjson::loads(json.as_deref().unwrap_or("null"))
                    .with_context(|| format!("{table} {key:?} of trial_id {trial_id}"))?;
                let map = if kind == USER_ATTR_ROW { &mut trial.user_attrs } else { &mut trial.system_attrs };
                map.insert(key, value);
            }
            other => bail!("unexpected row kind {other} while loading trials"),
        }
    }
    Ok(LoadedTrials { trials, study_trial_count })
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
