//! Trials as every part of the program sees them, as Optuna keeps `optuna/trial/`: the immutable
//! record of a stored trial ([`FrozenTrial`]: state, parameters, values, attributes) that samplers,
//! pruners, the study driver and the CLI read, and the protocol between whoever decides which
//! trials run and the engine that trains them ([`protocol`]).

pub mod protocol;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

use crate::distributions::{Distribution, ParamValue};
use crate::pyjson;

/// Optuna's `TrialState`, stored by name (`RUNNING`, `COMPLETE`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrialState {
    Running,
    Complete,
    Pruned,
    Fail,
    Waiting,
}

impl TrialState {
    /// The enum name Optuna stores in `trials.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            TrialState::Running => "RUNNING",
            TrialState::Complete => "COMPLETE",
            TrialState::Pruned => "PRUNED",
            TrialState::Fail => "FAIL",
            TrialState::Waiting => "WAITING",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "RUNNING" => TrialState::Running,
            "COMPLETE" => TrialState::Complete,
            "PRUNED" => TrialState::Pruned,
            "FAIL" => TrialState::Fail,
            "WAITING" => TrialState::Waiting,
            other => bail!("unknown trial state {other:?}"),
        })
    }

    /// COMPLETE, PRUNED and FAIL are final; a finished trial can no longer be updated.
    pub fn is_finished(self) -> bool {
        matches!(self, TrialState::Complete | TrialState::Pruned | TrialState::Fail)
    }
}

impl fmt::Display for TrialState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Optuna's `StudyDirection` (`MINIMIZE` / `MAXIMIZE` in `study_directions.direction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StudyDirection {
    Minimize,
    Maximize,
}

impl StudyDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            StudyDirection::Minimize => "MINIMIZE",
            StudyDirection::Maximize => "MAXIMIZE",
        }
    }

    /// Reads the stored name; `NOT_SET` (Optuna's placeholder) is refused.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "MINIMIZE" => Ok(StudyDirection::Minimize),
            "MAXIMIZE" => Ok(StudyDirection::Maximize),
            _ => bail!("unknown study direction {s:?} (expected minimize or maximize)"),
        }
    }

    /// True when `a` is strictly better than `b` in this direction.
    pub fn better(self, a: f64, b: f64) -> bool {
        match self {
            StudyDirection::Minimize => a < b,
            StudyDirection::Maximize => a > b,
        }
    }
}

impl fmt::Display for StudyDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A naive UTC timestamp with microsecond resolution, stored as SQLAlchemy stores `DateTime` in
/// SQLite: `2026-11-28 07:48:42.046435`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcDateTime {
    pub micros_since_epoch: i64,
}

impl UtcDateTime {
    pub fn now() -> Self {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        UtcDateTime { micros_since_epoch: since.as_micros() as i64 }
    }

    /// `YYYY-MM-DD HH:MM:SS.ffffff`.
    pub fn format(self) -> String {
        let secs = self.micros_since_epoch.div_euclid(1_000_000);
        let micros = self.micros_since_epoch.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{micros:06}", sod / 3600, sod / 60 % 60, sod % 60)
    }

    /// Reads `YYYY-MM-DD[ HH:MM:SS[.ffffff]]` (a `T` separator is accepted too).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || anyhow!("invalid datetime {text:?} (expected YYYY-MM-DD HH:MM:SS[.ffffff])");
        let (date, time) = match text.split_once([' ', 'T']) {
            Some((d, t)) => (d, Some(t)),
            None => (text, None),
        };
        let mut dp = date.splitn(3, '-').map(|p| p.parse::<i64>());
        let (y, m, d) = match (dp.next(), dp.next(), dp.next()) {
            (Some(Ok(y)), Some(Ok(m)), Some(Ok(d))) if (1..=12).contains(&m) && (1..=31).contains(&d) => {
                (y, m, d)
            }
            _ => return Err(bad()),
        };
        let (mut h, mut mi, mut s, mut us) = (0i64, 0i64, 0i64, 0i64);
        if let Some(time) = time {
            let (hms, frac) = match time.split_once('.') {
                Some((a, b)) => (a, Some(b)),
                None => (time, None),
            };
            let parts: Vec<&str> = hms.split(':').collect();
            if parts.len() != 3 {
                return Err(bad());
            }
            let p = |x: &str| x.parse::<i64>().map_err(|_| bad());
            (h, mi, s) = (p(parts[0])?, p(parts[1])?, p(parts[2])?);
            if h > 23 || mi > 59 || s > 60 {
                return Err(bad());
            }
            if let Some(frac) = frac {
                if frac.is_empty() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                us = p(frac)? * 10i64.pow(6 - frac.len() as u32);
            }
        }
        let days = days_from_civil(y, m, d);
        Ok(UtcDateTime { micros_since_epoch: ((days * 86_400 + h * 3600 + mi * 60 + s) * 1_000_000) + us })
    }

    /// Seconds from `earlier` to `self` (negative if `earlier` is later).
    pub fn seconds_since(self, earlier: UtcDateTime) -> f64 {
        (self.micros_since_epoch - earlier.micros_since_epoch) as f64 / 1e6
    }
}

impl fmt::Display for UtcDateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.format())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

/// A trial's parameters by name, in the order they were suggested (the space's order).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamSet {
    entries: Vec<(String, ParamValue)>,
}

impl ParamSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name`, replacing an existing value.
    pub fn insert(&mut self, name: &str, value: ParamValue) {
        match self.entries.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((name.to_string(), value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The numeric value of `name`, or an error naming the parameter.
    pub fn get_f64(&self, name: &str) -> Result<Option<f64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| anyhow!("parameter {name} = {v} is not a number")),
        }
    }

    /// The integer value of `name`, or an error naming the parameter.
    pub fn get_i64(&self, name: &str) -> Result<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => {
                v.as_i64().map(Some).ok_or_else(|| anyhow!("parameter {name} = {v} is not an integer"))
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &ParamValue)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `{"name": value, ...}` as Python's `json.dumps` writes it.
    pub fn to_py_json(&self) -> String {
        let items: Vec<String> = self
            .entries
            .iter()
            .map(|(n, v)| format!("{}: {}", pyjson::string_literal(n), v.to_py_json()))
            .collect();
        format!("{{{}}}", items.join(", "))
    }
}

/// One stored parameter of a trial: both representations plus its distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct TrialParam {
    pub name: String,
    /// `trial_params.param_value`: the float, or the index of a categorical choice.
    pub internal: f64,
    pub value: ParamValue,
    pub distribution: Distribution,
}

/// The immutable record of one trial, as Optuna's `FrozenTrial`.
#[derive(Clone, Debug, PartialEq)]
pub struct FrozenTrial {
    /// `trials.trial_id`: unique across the whole database.
    pub trial_id: i64,
    /// `trials.number`: 0, 1, 2, ... within the study.
    pub number: u64,
    pub state: TrialState,
    /// Objective values (one per study direction); `None` until told.
    pub values: Option<Vec<f64>>,
    pub datetime_start: Option<UtcDateTime>,
    pub datetime_complete: Option<UtcDateTime>,
    /// Parameters in the order they were stored.
    pub params: Vec<TrialParam>,
    pub user_attrs: BTreeMap<String, Value>,
    pub system_attrs: BTreeMap<String, Value>,
    /// Intermediate values by step (for hpo-gpu studies, step = epoch number, from 1).
    pub intermediate_values: BTreeMap<i64, f64>,
}

impl FrozenTrial {
    /// The single objective value.
    pub fn value(&self) -> Option<f64> {
        self.values.as_ref().and_then(|v| v.first().copied())
    }

    /// The largest step with an intermediate value.
    pub fn last_step(&self) -> Option<i64> {
        self.intermediate_values.keys().next_back().copied()
    }

    pub fn param(&self, name: &str) -> Option<&TrialParam> {
        self.params.iter().find(|p| p.name == name)
    }

    /// [`param`](Self::param), trying position `hint` first (trials of one space store their
    /// parameters in the same order, so samplers scanning thousands of trials pass the position
    /// they found last time).
    pub fn param_hinted(&self, name: &str, hint: usize) -> Option<&TrialParam> {
        match self.params.get(hint) {
            Some(p) if p.name == name => Some(p),
            _ => self.param(name),
        }
    }

    pub fn param_set(&self) -> ParamSet {
        let mut set = ParamSet::new();
        for p in &self.params {
            set.insert(&p.name, p.value.clone());
        }
        set
    }

    /// Wall time from start to completion, when both are known.
    pub fn duration_seconds(&self) -> Option<f64> {
        Some(self.datetime_complete?.seconds_since(self.datetime_start?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetime_round_trips_sqlalchemy_format() {
        let t = UtcDateTime::parse("2026-11-28 07:48:42.046435").unwrap();
        assert_eq!(t.format(), "2026-11-28 07:48:42.046435");
        // SQLite's CURRENT_TIMESTAMP (no fraction), used by Optuna's heartbeat default.
        let h = UtcDateTime::parse("2026-11-28 07:48:42").unwrap();
        assert_eq!(h.format(), "2026-11-28 07:48:42.000000");
        assert!((t.seconds_since(h) - 0.046435).abs() < 1e-9);
        assert_eq!(UtcDateTime::parse("1970-01-01 00:00:00").unwrap().micros_since_epoch, 0);
        assert_eq!(
            UtcDateTime::parse("2000-02-29 12:00:00.5").unwrap().format(),
            "2000-02-29 12:00:00.500000"
        );
        for bad in ["", "2026-13-01 00:00:00", "2026-11-28 7:48", "2026-11-28 07:48:42.1234567", "yesterday"]
        {
            assert!(UtcDateTime::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn param_set_keeps_order_and_writes_python_json() {
        let mut p = ParamSet::new();
        p.insert("learning_rate", ParamValue::Float(1e-5));
        p.insert("per_device_train_batch_size", ParamValue::Int(32));
        p.insert("learning_rate", ParamValue::Float(2e-5));
        assert_eq!(p.to_py_json(), r#"{"learning_rate": 2e-05, "per_device_train_batch_size": 32}"#);
        assert_eq!(p.get_i64("per_device_train_batch_size").unwrap(), Some(32));
        assert_eq!(p.get_f64("missing").unwrap(), None);
    }
}
