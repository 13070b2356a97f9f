//! Parameter distributions — Optuna's FloatDistribution, IntDistribution and
//! CategoricalDistribution — with their JSON form defined in one place.
//!
//! Values have two representations, as in Optuna: the *external* one the user sees
//! ([`ParamValue`]: `16`, `3e-5`, `"adamw"`) and the *internal* one stored in
//! `trial_params.param_value` and used by samplers (an `f64`; for categoricals, the index of the
//! choice). [`Distribution::to_json`] writes exactly the text of
//! `optuna.distributions.distribution_to_json`, and [`Distribution::from_json`] reads everything
//! `json_to_distribution` reads (including the deprecated `UniformDistribution` family and the
//! abbreviated `{"type": "float", ...}` form).

use std::fmt;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value};

use super::pyjson::{float_repr, string_literal};

/// A parameter value as the user sees it (Optuna's external representation), also the type of a
/// categorical choice.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl ParamValue {
    /// The value as a float, if it is numeric (booleans count as 0/1, as in Python).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            ParamValue::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            ParamValue::Int(i) => Some(*i as f64),
            ParamValue::Float(f) => Some(*f),
            ParamValue::None | ParamValue::Str(_) => None,
        }
    }

    /// The value as an integer, if it is an integer or an integral float.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            ParamValue::Int(i) => Some(*i),
            ParamValue::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(*f as i64),
            _ => None,
        }
    }

    /// The value as Python's `json.dumps` writes it.
    pub fn to_py_json(&self) -> String {
        match self {
            ParamValue::None => "null".to_string(),
            ParamValue::Bool(b) => b.to_string(),
            ParamValue::Int(i) => i.to_string(),
            ParamValue::Float(f) => float_repr(*f),
            ParamValue::Str(s) => string_literal(s),
        }
    }

    /// Converts to a serde_json value (non-finite floats become `null`).
    pub fn to_json_value(&self) -> Value {
        match self {
            ParamValue::None => Value::Null,
            ParamValue::Bool(b) => Value::Bool(*b),
            ParamValue::Int(i) => Value::from(*i),
            ParamValue::Float(f) => {
                serde_json::Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null)
            }
            ParamValue::Str(s) => Value::String(s.clone()),
        }
    }

    /// Reads a JSON scalar. Integer literals become `Int`, other numbers `Float`.
    pub fn from_json_value(v: &Value) -> Result<Self> {
        Ok(match v {
            Value::Null => ParamValue::None,
            Value::Bool(b) => ParamValue::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => ParamValue::Int(i),
                None => ParamValue::Float(n.as_f64().ok_or_else(|| anyhow!("number {n} out of range"))?),
            },
            Value::String(s) => ParamValue::Str(s.clone()),
            Value::Array(_) | Value::Object(_) => {
                bail!("expected null, a bool, a number or a string, got {v}")
            }
        })
    }

    /// Python's `==` between choice values: `True == 1 == 1.0`, NaN equals NaN (as Optuna's
    /// `_categorical_choice_equal`), strings and None only equal themselves.
    pub fn py_eq(&self, other: &ParamValue) -> bool {
        match (self, other) {
            (ParamValue::None, ParamValue::None) => true,
            (ParamValue::Str(a), ParamValue::Str(b)) => a == b,
            (a, b) => match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => x == y || (x.is_nan() && y.is_nan()),
                _ => false,
            },
        }
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::None => write!(f, "None"),
            ParamValue::Bool(b) => write!(f, "{}", if *b { "True" } else { "False" }),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{}", float_repr(*x)),
            ParamValue::Str(s) => write!(f, "{s}"),
        }
    }
}

/// A float range `[low, high]`, optionally log-scaled or discretised by `step`.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatDistribution {
    pub low: f64,
    pub high: f64,
    pub log: bool,
    pub step: Option<f64>,
}

/// An integer range `[low, high]` with a step, optionally log-scaled (then `step` is 1).
#[derive(Clone, Debug, PartialEq)]
pub struct IntDistribution {
    pub low: i64,
    pub high: i64,
    pub log: bool,
    pub step: i64,
}

/// A choice among values; the internal representation is the index.
#[derive(Clone, Debug, PartialEq)]
pub struct CategoricalDistribution {
    pub choices: Vec<ParamValue>,
}

/// One of Optuna's three distribution kinds.
#[derive(Clone, Debug, PartialEq)]
pub enum Distribution {
    Float(FloatDistribution),
    Int(IntDistribution),
    Categorical(CategoricalDistribution),
}

impl FloatDistribution {
    /// Validates like Optuna's constructor. When `step` does not divide `high - low` (in decimal,
    /// as Optuna computes it), `high` is lowered to the last step, as Optuna does (it warns).
    pub fn new(low: f64, high: f64, log: bool, step: Option<f64>) -> Result<Self> {
        if !low.is_finite() || !high.is_finite() {
            bail!("`low` and `high` must be finite, got low={}, high={}", float_repr(low), float_repr(high));
        }
        if log && step.is_some() {
            bail!("`step` is not supported when `log` is true");
        }
        if low > high {
            bail!("`low <= high` must hold, got low={}, high={}", float_repr(low), float_repr(high));
        }
        if log && low <= 0.0 {
            bail!("`low > 0` must hold for log=true, got low={}, high={}", float_repr(low), float_repr(high));
        }
        let mut high = high;
        if let Some(s) = step {
            if s.is_nan() || s <= 0.0 || s.is_infinite() {
                bail!("`step > 0` must hold, got step={}", float_repr(s));
            }
            high = adjust_discrete_uniform_high(low, high, s);
        }
        Ok(FloatDistribution { low, high, log, step })
    }

    fn single(&self) -> bool {
        match self.step {
            None => self.low == self.high,
            Some(step) => {
                self.low == self.high
                    || decimal_sub_lt(self.high, self.low, step).unwrap_or(self.high - self.low < step)
            }
        }
    }
}

impl IntDistribution {
    /// Validates like Optuna's constructor; `high` is lowered to the last step when `step` does
    /// not divide `high - low`.
    pub fn new(low: i64, high: i64, log: bool, step: i64) -> Result<Self> {
        if log && step != 1 {
            bail!("`step` must be 1 when `log` is true, got step={step}");
        }
        if low > high {
            bail!("`low <= high` must hold, got low={low}, high={high}");
        }
        if log && low < 1 {
            bail!("`low >= 1` must hold for log=true, got low={low}, high={high}");
        }
        if step <= 0 {
            bail!("`step > 0` must hold, got step={step}");
        }
        // In i128: `high - low` overflows i64 for ranges wider than half of it.
        let (low_wide, step_wide) = (i128::from(low), i128::from(step));
        let r = i128::from(high) - low_wide;
        // The lowered high lies in [low, high], so it fits back into an i64.
        let high = if r % step_wide != 0 { (r / step_wide * step_wide + low_wide) as i64 } else { high };
        Ok(IntDistribution { low, high, log, step })
    }
}

impl CategoricalDistribution {
    pub fn new(choices: Vec<ParamValue>) -> Result<Self> {
        if choices.is_empty() {
            bail!("`choices` must contain one or more elements");
        }
        Ok(CategoricalDistribution { choices })
    }
}

impl Distribution {
    /// Optuna's class name, e.g. `FloatDistribution`.
    pub fn class_name(&self) -> &'static str {
        match self {
            Distribution::Float(_) => "FloatDistribution",
            Distribution::Int(_) => "IntDistribution",
            Distribution::Categorical(_) => "CategoricalDistribution",
        }
    }

    /// True when the range holds exactly one value (samplers then skip the parameter).
    pub fn single(&self) -> bool {
        match self {
            Distribution::Float(d) => d.single(),
            Distribution::Int(d) => {
                d.low == d.high || (!d.log && i128::from(d.high) - i128::from(d.low) < i128::from(d.step))
            }
            Distribution::Categorical(d) => d.choices.len() == 1,
        }
    }

    /// The only value of a [`single`](Self::single) distribution, in external form.
    pub fn single_value(&self) -> ParamValue {
        match self {
            Distribution::Float(d) => ParamValue::Float(d.low),
            Distribution::Int(d) => ParamValue::Int(d.low),
            Distribution::Categorical(d) => d.choices[0].clone(),
        }
    }

    /// Optuna's `_contains` on an internal value.
    pub fn contains(&self, internal: f64) -> bool {
        match self {
            Distribution::Float(d) => match d.step {
                None => d.low <= internal && internal <= d.high,
                Some(step) => {
                    let k = (internal - d.low) / step;
                    d.low <= internal && internal <= d.high && (k - k.round_ties_even()).abs() < 1.0e-8
                }
            },
            Distribution::Int(d) => {
                d.low as f64 <= internal
                    && internal <= d.high as f64
                    && (internal - d.low as f64).rem_euclid(d.step as f64) == 0.0
            }
            Distribution::Categorical(d) => {
                let index = internal.trunc();
                index >= 0.0 && (index as usize) < d.choices.len()
            }
        }
    }

    /// External value → internal float (`to_internal_repr`).
    pub fn to_internal(&self, value: &ParamValue) -> Result<f64> {
        match self {
            Distribution::Float(FloatDistribution { log, .. })
            | Distribution::Int(IntDistribution { log, .. }) => {
                let x = value.as_f64().ok_or_else(|| anyhow!("'{value}' is not a number"))?;
                if x.is_nan() {
                    bail!("`{value}` is an invalid value");
                }
                if *log && x <= 0.0 {
                    bail!("`{value}` is invalid for a log distribution");
                }
                Ok(x)
            }
            Distribution::Categorical(d) => {
                d.choices.iter().position(|c| c.py_eq(value)).map(|i| i as f64).ok_or_else(|| {
                    anyhow!("'{value}' is not one of the choices [{}]", choices_display(&d.choices))
                })
            }
        }
    }

    /// Internal float → external value (`to_external_repr`).
    pub fn to_external(&self, internal: f64) -> Result<ParamValue> {
        match self {
            Distribution::Float(_) => Ok(ParamValue::Float(internal)),
            Distribution::Int(_) => {
                if !internal.is_finite() {
                    bail!("internal value {} is not a valid integer", float_repr(internal));
                }
                Ok(ParamValue::Int(internal.trunc() as i64))
            }
            Distribution::Categorical(d) => {
                let index = internal.trunc();
                if !(index >= 0.0 && (index as usize) < d.choices.len()) {
                    bail!(
                        "choice index {} out of range for {} choices",
                        float_repr(internal),
                        d.choices.len()
                    );
                }
                Ok(d.choices[index as usize].clone())
            }
        }
    }

    /// `optuna.distributions.distribution_to_json`, byte for byte.
    pub fn to_json(&self) -> String {
        let attributes = match self {
            // FloatDistribution.__dict__ order: step, low, high, log.
            Distribution::Float(d) => format!(
                "{{\"step\": {}, \"low\": {}, \"high\": {}, \"log\": {}}}",
                d.step.map(float_repr).unwrap_or_else(|| "null".to_string()),
                float_repr(d.low),
                float_repr(d.high),
                d.log
            ),
            // IntDistribution.__dict__ order: log, step, low, high.
            Distribution::Int(d) => {
                format!(
                    "{{\"log\": {}, \"step\": {}, \"low\": {}, \"high\": {}}}",
                    d.log, d.step, d.low, d.high
                )
            }
            Distribution::Categorical(d) => {
                let choices: Vec<String> = d.choices.iter().map(ParamValue::to_py_json).collect();
                format!("{{\"choices\": [{}]}}", choices.join(", "))
            }
        };
        format!("{{\"name\": \"{}\", \"attributes\": {}}}", self.class_name(), attributes)
    }

    /// `optuna.distributions.json_to_distribution`.
    pub fn from_json(text: &str) -> Result<Self> {
        let value = super::pyjson::loads(text)?;
        Self::from_json_value(&value).with_context(|| format!("distribution {text}"))
    }

    /// Reads a parsed distribution: `{"name": ..., "attributes": {...}}` or the abbreviated
    /// `{"type": "float"|"int"|"categorical", ...}` form.
    pub fn from_json_value(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| anyhow!("a distribution must be a JSON object"))?;
        if let Some(name) = obj.get("name") {
            let name = name.as_str().ok_or_else(|| anyhow!("\"name\" must be a string"))?;
            let attrs = match obj.get("attributes") {
                Some(Value::Object(a)) => a.clone(),
                Some(_) => bail!("\"attributes\" must be an object"),
                None => Map::new(),
            };
            return from_named(name, &attrs);
        }
        let kind = obj
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("a distribution needs \"name\" (Optuna's JSON form) or \"type\""))?;
        let mut attrs = obj.clone();
        attrs.remove("type");
        match kind {
            "float" => from_named("FloatDistribution", &attrs),
            "int" => from_named("IntDistribution", &attrs),
            "categorical" => from_named("CategoricalDistribution", &attrs),
            other => bail!("unknown distribution type {other:?} (expected float, int or categorical)"),
        }
    }
}

fn choices_display(choices: &[ParamValue]) -> String {
    choices.iter().map(ParamValue::to_py_json).collect::<Vec<_>>().join(", ")
}

/// Builds a distribution from Optuna's class name and constructor keyword arguments.
fn from_named(name: &str, attrs: &Map<String, Value>) -> Result<Distribution> {
    let allowed: &[&str] = match name {
        "FloatDistribution" => &["low", "high", "log", "step"],
        "IntDistribution" | "IntUniformDistribution" | "IntLogUniformDistribution" => {
            if name == "IntDistribution" { &["low", "high", "log", "step"] } else { &["low", "high", "step"] }
        }
        "UniformDistribution" | "LogUniformDistribution" => &["low", "high"],
        "DiscreteUniformDistribution" => &["low", "high", "q"],
        "CategoricalDistribution" => &["choices"],
        other => bail!("unknown distribution class {other:?}"),
    };
    if let Some(bad) = attrs.keys().find(|k| !allowed.contains(&k.as_str())) {
        bail!("{name}: unexpected attribute {bad:?} (allowed: {})", allowed.join(", "));
    }
    let float = |key: &str| -> Result<f64> {
        let v = attrs.get(key).ok_or_else(|| anyhow!("{name}: missing attribute {key:?}"))?;
        v.as_f64().ok_or_else(|| anyhow!("{name}: attribute {key:?} must be a number, got {v}"))
    };
    let int = |key: &str| -> Result<i64> {
        let v = attrs.get(key).ok_or_else(|| anyhow!("{name}: missing attribute {key:?}"))?;
        ParamValue::from_json_value(v)
            .ok()
            .and_then(|p| p.as_i64())
            .ok_or_else(|| anyhow!("{name}: attribute {key:?} must be an integer, got {v}"))
    };
    let boolean = |key: &str| -> Result<bool> {
        match attrs.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => bail!("{name}: attribute {key:?} must be true or false, got {v}"),
        }
    };
    let d = match name {
        "FloatDistribution" => {
            let step = match attrs.get("step") {
                None | Some(Value::Null) => None,
                Some(_) => Some(float("step")?),
            };
            Distribution::Float(FloatDistribution::new(float("low")?, float("high")?, boolean("log")?, step)?)
        }
        "UniformDistribution" => {
            Distribution::Float(FloatDistribution::new(float("low")?, float("high")?, false, None)?)
        }
        "LogUniformDistribution" => {
            Distribution::Float(FloatDistribution::new(float("low")?, float("high")?, true, None)?)
        }
        "DiscreteUniformDistribution" => Distribution::Float(FloatDistribution::new(
            float("low")?,
            float("high")?,
            false,
            Some(float("q")?),
        )?),
        "IntDistribution" | "IntUniformDistribution" | "IntLogUniformDistribution" => {
            let step = match attrs.get("step") {
                None | Some(Value::Null) => 1,
                Some(_) => int("step")?,
            };
            let log = name == "IntLogUniformDistribution" || boolean("log")?;
            Distribution::Int(IntDistribution::new(int("low")?, int("high")?, log, step)?)
        }
        _ => {
            let choices = match attrs.get("choices") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(ParamValue::from_json_value)
                    .collect::<Result<Vec<_>>>()
                    .with_context(|| format!("{name}: invalid choice"))?,
                Some(v) => bail!("{name}: \"choices\" must be an array, got {v}"),
                None => bail!("{name}: missing attribute \"choices\""),
            };
            Distribution::Categorical(CategoricalDistribution::new(choices)?)
        }
    };
    Ok(d)
}

/// An exact decimal `mantissa * 10^exp`, built from a float's shortest repr, which is what Python's
/// `decimal.Decimal(str(x))` holds.
#[derive(Clone, Copy, Debug)]
struct Dec {
    mantissa: i128,
    exp: i32,
}

impl Dec {
    fn from_f64(x: f64) -> Option<Dec> {
        let sci = format!("{x:e}");
        let (m, e) = sci.split_once('e')?;
        let e: i32 = e.parse().ok()?;
        let negative = m.starts_with('-');
        let m = m.trim_start_matches('-');
        let frac_len = m.split_once('.').map(|(_, f)| f.len() as i32).unwrap_or(0);
        let digits: String = m.chars().filter(|c| *c != '.').collect();
        let mantissa: i128 = digits.parse().ok()?;
        Some(Dec { mantissa: if negative { -mantissa } else { mantissa }, exp: e - frac_len })
    }

    /// Rescales to exponent `exp` (≤ self.exp); None on overflow.
    fn at(self, exp: i32) -> Option<i128> {
        let shift = u32::try_from(self.exp - exp).ok()?;
        self.mantissa.checked_mul(10i128.checked_pow(shift)?)
    }
}

/// The three values on a common decimal scale.
fn common_scale(a: f64, b: f64, c: f64) -> Option<(i128, i128, i128, i32)> {
    let (da, db, dc) = (Dec::from_f64(a)?, Dec::from_f64(b)?, Dec::from_f64(c)?);
    let exp = da.exp.min(db.exp).min(dc.exp);
    Some((da.at(exp)?, db.at(exp)?, dc.at(exp)?, exp))
}

/// `(high - low) < step` in decimal arithmetic (Optuna's `single()` for stepped floats).
fn decimal_sub_lt(high: f64, low: f64, step: f64) -> Option<bool> {
    let (h, l, s, _) = common_scale(high, low, step)?;
    Some(h - l < s)
}

/// Optuna's `_adjust_discrete_uniform_high`: decimal arithmetic on the shortest reprs, so that
/// `[0, 0.3]` with step 0.1 is divisible although it is not in binary floating point.
fn adjust_discrete_uniform_high(low: f64, high: f64, step: f64) -> f64 {
    match common_scale(high, low, step) {
        Some((h, l, s, exp)) => {
            let r = h - l;
            if r % s == 0 {
                high
            } else {
                let adjusted = (r / s) * s + l;
                format!("{adjusted}e{exp}").parse().unwrap_or(high)
            }
        }
        // The values span more than 38 decimal digits; fall back to binary arithmetic.
        None => {
            let k = ((high - low) / step).floor();
            let adjusted = k * step + low;
            if adjusted < high { adjusted } else { high }
        }
    }
}

/// Optuna's `check_distribution_compatibility`: whether a parameter stored with `old` may be
/// sampled from `new` in the same study.
pub fn check_distribution_compatibility(name: &str, old: &Distribution, new: &Distribution) -> Result<()> {
    match (old, new) {
        (Distribution::Float(a), Distribution::Float(b)) if a.log != b.log => {}
        (Distribution::Int(a), Distribution::Int(b)) if a.log != b.log => {}
        (Distribution::Float(_), Distribution::Float(_)) | (Distribution::Int(_), Distribution::Int(_)) => {
            return Ok(());
        }
        (Distribution::Categorical(a), Distribution::Categorical(b)) => {
            if a.choices.len() == b.choices.len() && a.choices.iter().zip(&b.choices).all(|(x, y)| x.py_eq(y))
            {
                return Ok(());
            }
            bail!(
                "parameter {name:?}: the study already uses choices {} and cannot change them to {} \
                 (CategoricalDistribution does not support a dynamic value space)",
                old.to_json(),
                new.to_json()
            );
        }
        _ => bail!(
            "parameter {name:?}: the study already uses a {} and cannot switch to a {}",
            old.class_name(),
            new.class_name()
        ),
    }
    bail!("parameter {name:?}: the study already uses {} and cannot change its log setting", old.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(low: f64, high: f64, log: bool, step: Option<f64>) -> Distribution {
        Distribution::Float(FloatDistribution::new(low, high, log, step).unwrap())
    }

    #[test]
    fn json_matches_optuna_bytes() {
        // Strings copied from a database written by Optuna 5.0.0.
        assert_eq!(
            f(1e-6, 1e-4, true, None).to_json(),
            r#"{"name": "FloatDistribution", "attributes": {"step": null, "low": 1e-06, "high": 0.0001, "log": true}}"#
        );
        assert_eq!(
            f(0.0, 0.3, false, None).to_json(),
            r#"{"name": "FloatDistribution", "attributes": {"step": null, "low": 0.0, "high": 0.3, "log": false}}"#
        );
        let int = Distribution::Int(IntDistribution::new(1, 9, false, 2).unwrap());
        assert_eq!(
            int.to_json(),
            r#"{"name": "IntDistribution", "attributes": {"log": false, "step": 2, "low": 1, "high": 9}}"#
        );
        let cat = Distribution::Categorical(
            CategoricalDistribution::new(vec![
                ParamValue::None,
                ParamValue::Bool(true),
                ParamValue::Float(1.5),
                ParamValue::Str("s".into()),
                ParamValue::Int(3),
            ])
            .unwrap(),
        );
        assert_eq!(
            cat.to_json(),
            r#"{"name": "CategoricalDistribution", "attributes": {"choices": [null, true, 1.5, "s", 3]}}"#
        );
        for d in [f(1e-6, 1e-4, true, None), int, cat] {
            assert_eq!(Distribution::from_json(&d.to_json()).unwrap(), d);
        }
    }

    #[test]
    fn reads_inline_and_deprecated_forms() {
        let d =
            Distribution::from_json(r#"{"name": "FloatDistribution", "attributes": {"low": 0, "high": 1}}"#)
                .unwrap();
        assert_eq!(d, f(0.0, 1.0, false, None));
        let d = Distribution::from_json(
            r#"{"name": "LogUniformDistribution", "attributes": {"low": 0.1, "high": 1}}"#,
        )
        .unwrap();
        assert_eq!(d, f(0.1, 1.0, true, None));
        let d = Distribution::from_json(r#"{"type": "int", "low": 1, "high": 10, "step": 3}"#).unwrap();
        assert_eq!(d, Distribution::Int(IntDistribution { low: 1, high: 10, log: false, step: 3 }));
        let d = Distribution::from_json(r#"{"type": "categorical", "choices": [16, 32]}"#).unwrap();
        assert_eq!(d.to_external(1.0).unwrap(), ParamValue::Int(32));
    }

    #[test]
    fn invalid_distributions_give_clear_errors() {
        let cases = [
            (r#"{"name": "FloatDistribution", "attributes": {"low": 2, "high": 1}}"#, "`low <= high`"),
            (
                r#"{"name": "FloatDistribution", "attributes": {"low": 0, "high": 1, "log": true}}"#,
                "`low > 0`",
            ),
            (
                r#"{"name": "FloatDistribution", "attributes": {"low": 1, "high": 2, "log": true, "step": 0.5}}"#,
                "`step`",
            ),
            (r#"{"name": "IntDistribution", "attributes": {"low": 1, "high": 2, "step": 0}}"#, "`step > 0`"),
            (r#"{"name": "CategoricalDistribution", "attributes": {"choices": []}}"#, "one or more"),
            (r#"{"name": "CategoricalDistribution", "attributes": {"choices": [[1]]}}"#, "invalid choice"),
            (r#"{"name": "Gaussian", "attributes": {}}"#, "unknown distribution class"),
            (
                r#"{"name": "FloatDistribution", "attributes": {"low": 0, "hi": 1}}"#,
                "unexpected attribute \"hi\"",
            ),
            (r#"{"name": "IntDistribution", "attributes": {"low": 0.5, "high": 1}}"#, "must be an integer"),
            (r#"[1, 2]"#, "JSON object"),
            (r#"{"name": "FloatDist"#, "invalid JSON"),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", Distribution::from_json(text).unwrap_err());
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn step_adjustment_follows_optuna_decimal_rule() {
        // Optuna: FloatDistribution(0, 0.3, step=0.1).high == 0.3 (divisible in decimal).
        assert_eq!(FloatDistribution::new(0.0, 0.3, false, Some(0.1)).unwrap().high, 0.3);
        // Optuna: FloatDistribution(0, 1, step=0.3).high == float(Decimal("0.9")) == 0.9.
        assert_eq!(FloatDistribution::new(0.0, 1.0, false, Some(0.3)).unwrap().high, 0.9);
        assert_eq!(IntDistribution::new(1, 10, false, 2).unwrap().high, 9);
        assert!(Distribution::Float(FloatDistribution::new(0.0, 0.05, false, Some(0.1)).unwrap()).single());
    }

    #[test]
    fn internal_external_round_trip() {
        let cat = Distribution::Categorical(
            CategoricalDistribution::new(vec![
                ParamValue::Int(16),
                ParamValue::Int(32),
                ParamValue::Str("a".into()),
            ])
            .unwrap(),
        );
        assert_eq!(cat.to_internal(&ParamValue::Int(32)).unwrap(), 1.0);
        assert_eq!(cat.to_internal(&ParamValue::Float(32.0)).unwrap(), 1.0);
        assert!(
            cat.to_internal(&ParamValue::Int(64)).unwrap_err().to_string().contains("not one of the choices")
        );
        assert_eq!(cat.to_external(2.0).unwrap(), ParamValue::Str("a".into()));
        assert!(cat.to_external(3.0).is_err());
        let int = Distribution::Int(IntDistribution::new(1, 9, false, 2).unwrap());
        assert!(int.contains(5.0) && !int.contains(4.0) && !int.contains(11.0));
        assert_eq!(int.to_external(5.0).unwrap(), ParamValue::Int(5));
        let logf = f(1e-6, 1e-4, true, None);
        assert!(logf.to_internal(&ParamValue::Float(-1.0)).is_err());
        assert!(logf.to_internal(&ParamValue::Str("x".into())).is_err());
    }
}
