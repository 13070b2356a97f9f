//! Search spaces: the recipe's default, a TOML or JSON file over the trainer's hyperparameters,
//! or Optuna's inline JSON (`optuna ask --search-space`).
//!
//! File format (TOML; JSON is the same structure):
//! ```toml
//! [learning_rate]
//! type = "float"          # float | int | categorical
//! low = 1e-6
//! high = 1e-4
//! log = true              # optional, default false
//! # step = 0.1            # optional (not with log)
//!
//! [per_device_train_batch_size]
//! type = "categorical"
//! choices = [16, 32, 64, 128]
//! ```
//! A JSON file may also give a parameter in Optuna's own form,
//! `{"name": "FloatDistribution", "attributes": {...}}`.
//! Parameters keep the file's order; they must be trainer hyperparameters ([`ALLOWED_PARAMS`]).

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value};

use crate::distributions::{CategoricalDistribution, Distribution, FloatDistribution, ParamValue};

/// The hyperparameters the trainer understands (Hugging Face `TrainingArguments` / model config
/// names), with whether each takes integer values.
pub const ALLOWED_PARAMS: &[(&str, ValueKind)] = &[
    ("learning_rate", ValueKind::Float),
    ("per_device_train_batch_size", ValueKind::Integer),
    ("weight_decay", ValueKind::Float),
    ("num_train_epochs", ValueKind::Integer),
    ("warmup_ratio", ValueKind::Float),
    ("warmup_steps", ValueKind::Integer),
    ("hidden_dropout_prob", ValueKind::Float),
    ("attention_probs_dropout_prob", ValueKind::Float),
    ("classifier_dropout", ValueKind::Float),
    ("seed", ValueKind::Integer),
    ("adam_beta1", ValueKind::Float),
    ("adam_beta2", ValueKind::Float),
    ("adam_epsilon", ValueKind::Float),
    ("max_grad_norm", ValueKind::Float),
    ("max_length", ValueKind::Integer),
];

/// Whether a hyperparameter takes integers (an int or integer-choice distribution) or floats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    Integer,
    Float,
}

/// An ordered set of named distributions.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchSpace {
    params: Vec<(String, Distribution)>,
}

impl SearchSpace {
    /// A space from (name, distribution) pairs, refusing duplicate names. Names are not checked
    /// (this is the `ask` path, where any program can be tuned).
    pub fn new(params: Vec<(String, Distribution)>) -> Result<Self> {
        for (i, (name, _)) in params.iter().enumerate() {
            if params[..i].iter().any(|(n, _)| n == name) {
                bail!("parameter {name:?} is defined twice");
            }
        }
        Ok(SearchSpace { params })
    }

    /// The recipe's space: `learning_rate` log-uniform [1e-6, 1e-4], `per_device_train_batch_size`
    /// in {16, 32, 64, 128}, `weight_decay` uniform [0, 0.3].
    pub fn recipe_default() -> Self {
        let float = |low, high, log| match FloatDistribution::new(low, high, log, None) {
            Ok(d) => Distribution::Float(d),
            Err(_) => unreachable!("constant bounds are valid"),
        };
        let batch = Distribution::Categorical(CategoricalDistribution {
            choices: [16, 32, 64, 128].into_iter().map(ParamValue::Int).collect(),
        });
        SearchSpace {
            params: vec![
                ("learning_rate".into(), float(1e-6, 1e-4, true)),
                ("per_device_train_batch_size".into(), batch),
                ("weight_decay".into(), float(0.0, 0.3, false)),
            ],
        }
    }

    /// Reads a `.toml` or `.json` space file of trainer hyperparameters. Returns the space and
    /// warnings (e.g. a `high` lowered to the last step, which Optuna also only warns about).
    pub fn from_file(path: &Path) -> Result<(Self, Vec<String>)> {
        let origin = path.display().to_string();
        let bytes =
            std::fs::read(path).with_context(|| format!("{origin}: cannot read search space file"))?;
        let text = String::from_utf8(bytes).map_err(|e| anyhow!("{origin}: not UTF-8 text ({e})"))?;
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("toml") => Self::from_toml_str(&text, &origin),
            Some("json") => Self::from_json_str(&text, &origin),
            _ => bail!("{origin}: search space files must end in .toml or .json"),
        }
    }

    /// Parses the TOML form; `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<(Self, Vec<String>)> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| anyhow!("{origin}: invalid TOML: {}", toml_error_line(text, &e)))?;
        let value = serde_json::to_value(&table).map_err(|e| anyhow!("{origin}: {e}"))?;
        let Value::Object(map) = value else { bail!("{origin}: expected a table of parameters") };
        // toml::Table keeps key order only with its preserve_order feature; restore file order.
        let mut entries: Vec<(String, Value)> = map.into_iter().collect();
        entries.sort_by_key(|(k, _)| toml_key_position(text, k));
        Self::from_entries(entries, origin)
    }

    /// Parses the JSON form; `origin` names the source in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<(Self, Vec<String>)> {
        let value: Value = serde_json::from_str(text).map_err(|e| anyhow!("{origin}: invalid JSON: {e}"))?;
        let Value::Object(map) = value else { bail!("{origin}: expected an object of parameters") };
        let mut entries: Vec<(String, Value)> = map.into_iter().collect();
        entries.sort_by_key(|(k, _)| json_key_position(text, k));
        Self::from_entries(entries, origin)
    }

    /// Optuna's inline `--search-space` JSON: `{"x": {"name": "FloatDistribution", "attributes":
    /// {...}}, ...}`. Any parameter names are accepted.
    pub fn from_optuna_json(text: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| anyhow!("--search-space: invalid JSON: {e}"))?;
        let Value::Object(map) = value else {
            bail!("--search-space: expected a JSON object of distributions")
        };
        let mut entries: Vec<(String, Value)> = map.into_iter().collect();
        entries.sort_by_key(|(k, _)| json_key_position(text, k));
        let mut params = Vec::new();
        for (name, v) in entries {
            let d = Distribution::from_json_value(&v)
                .map_err(|e| anyhow!("--search-space: parameter {name:?}: {e:#}"))?;
            params.push((name, d));
        }
        Self::new(params)
    }

    fn from_entries(entries: Vec<(String, Value)>, origin: &str) -> Result<(Self, Vec<String>)> {
        if entries.is_empty() {
            bail!("{origin}: the search space defines no parameters");
        }
        let mut params = Vec::new();
        let mut warnings = Vec::new();
        for (name, v) in entries {
            let ctx = |e: anyhow::Error| anyhow!("{origin}: parameter {name:?}: {e:#}");
            let Some(&(_, kind)) = ALLOWED_PARAMS.iter().find(|(n, _)| *n == name) else {
                let allowed: Vec<&str> = ALLOWED_PARAMS.iter().map(|(n, _)| *n).collect();
                bail!(
                    "{origin}: unknown parameter {name:?}; the trainer's hyperparameters are: {}",
                    allowed.join(", ")
                );
            };
            let Value::Object(obj) = &v else { return Err(ctx(anyhow!("expected a table with `type`"))) };
            let dist = parse_param(obj).map_err(ctx)?;
            if let (Distribution::Float(d), Some(high)) = (&dist, obj.get("high").and_then(Value::as_f64))
                && d.high != high
            {
                warnings.push(format!(
                    "{origin}: parameter {name:?}: step {} does not divide [{}, {high}]; high lowered to {}",
                    d.step.unwrap_or(0.0),
                    d.low,
                    d.high
                ));
            }
            if let (Distribution::Int(d), Some(high)) = (&dist, obj.get("high").and_then(Value::as_i64))
                && d.high != high
            {
                warnings.push(format!(
                    "{origin}: parameter {name:?}: step {} does not divide [{}, {high}]; high lowered to {}",
                    d.step, d.low, d.high
                ));
            }
            check_kind_and_domain(&name, kind, &dist).map_err(ctx)?;
            params.push((name, dist));
        }
        Ok((SearchSpace { params }, warnings))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Distribution)> {
        self.params.iter().map(|(n, d)| (n.as_str(), d))
    }

    pub fn get(&self, name: &str) -> Option<&Distribution> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, d)| d)
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    pub fn as_slice(&self) -> &[(String, Distribution)] {
        &self.params
    }

    /// The space as Optuna's `--search-space` JSON (`distribution_to_json` per parameter).
    pub fn to_optuna_json(&self) -> String {
        let items: Vec<String> = self
            .params
            .iter()
            .map(|(n, d)| format!("{}: {}", crate::pyjson::string_literal(n), d.to_json()))
            .collect();
        format!("{{{}}}", items.join(", "))
    }
}

/// One parameter of a space file: `type` plus the distribution's fields, or Optuna's form.
fn parse_param(obj: &Map<String, Value>) -> Result<Distribution> {
    if obj.contains_key("name") {
        return Distribution::from_json_value(&Value::Object(obj.clone()));
    }
    let kind = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(v) => bail!("`type` must be a string, got {v}"),
        None => bail!("missing `type` (float, int or categorical)"),
    };
    if !["float", "int", "categorical"].contains(&kind) {
        bail!("unknown type {kind:?} (expected float, int or categorical)");
    }
    let allowed: &[&str] =
        if kind == "categorical" { &["type", "choices"] } else { &["type", "low", "high", "log", "step"] };
    if let Some(bad) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        bail!("unexpected field {bad:?} for type {kind:?} (allowed: {})", allowed[1..].join(", "));
    }
    Distribution::from_json_value(&Value::Object(obj.clone()))
}

/// Checks a distribution against what the trainer accepts for `name`.
fn check_kind_and_domain(name: &str, kind: ValueKind, dist: &Distribution) -> Result<()> {
    let values: Vec<f64> = match dist {
        Distribution::Float(d) => {
            if kind == ValueKind::Integer {
                bail!("{name} takes integers; use type = \"int\" or integer choices");
            }
            vec![d.low, d.high]
        }
        Distribution::Int(d) => vec![d.low as f64, d.high as f64],
        Distribution::Categorical(c) => c
            .choices
            .iter()
            .map(|v| match (kind, v) {
                (ValueKind::Integer, ParamValue::Int(i)) => Ok(*i as f64),
                (ValueKind::Integer, other) => {
                    bail!("{name} takes integers, got choice {}", other.to_py_json())
                }
                (ValueKind::Float, ParamValue::Int(_) | ParamValue::Float(_)) => {
                    Ok(v.as_f64().unwrap_or(f64::NAN))
                }
                (ValueKind::Float, other) => bail!("{name} takes numbers, got choice {}", other.to_py_json()),
            })
            .collect::<Result<_>>()?,
    };
    let (lo, hi, what): (f64, f64, &str) = match name {
        "learning_rate" | "adam_epsilon" => (f64::MIN_POSITIVE, f64::INFINITY, "> 0"),
        "per_device_train_batch_size" | "num_train_epochs" | "max_length" => (1.0, f64::INFINITY, ">= 1"),
        "weight_decay" | "warmup_steps" | "seed" | "max_grad_norm" => (0.0, f64::INFINITY, ">= 0"),
        "warmup_ratio" | "hidden_dropout_prob" | "attention_probs_dropout_prob" | "classifier_dropout" => {
            (0.0, 1.0, "in [0, 1]")
        }
        "adam_beta1" | "adam_beta2" => (0.0, 1.0 - f64::EPSILON, "in [0, 1)"),
        _ => (f64::NEG_INFINITY, f64::INFINITY, ""),
    };
    if let Some(bad) = values.iter().find(|v| !(**v >= lo && **v <= hi)) {
        bail!("{name} must be {what}, but the space reaches {}", crate::pyjson::float_repr(*bad));
    }
    Ok(())
}

/// Position of a top-level `[key]` table header (or `key =`) in TOML text, for file order.
fn toml_key_position(text: &str, key: &str) -> usize {
    let candidates = [format!("[{key}]"), format!("[\"{key}\"]"), format!("{key} ="), format!("{key}=")];
    candidates.iter().filter_map(|c| text.find(c.as_str())).min().unwrap_or(usize::MAX)
}

/// Position of a top-level `"key":` in JSON text, for file order.
fn json_key_position(text: &str, key: &str) -> usize {
    let quoted = format!("\"{key}\"");
    // The first occurrence followed by a colon is the key (values rarely repeat key names).
    let mut from = 0;
    while let Some(i) = text[from..].find(&quoted) {
        let at = from + i;
        if text[at + quoted.len()..].trim_start().starts_with(':') {
            return at;
        }
        from = at + quoted.len();
    }
    usize::MAX
}

/// A TOML parse error on one line: "line L, column C: message" (the parser's own `Display` is a
/// multi-line snippet with a caret).
fn toml_error_line(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim();
    let Some(start) = e.span().map(|s| s.start.min(text.len())) else { return message.to_string() };
    let before = text.get(..start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributions::IntDistribution;

    #[test]
    fn recipe_default_is_the_recipes_space() {
        let s = SearchSpace::recipe_default();
        assert_eq!(
            s.to_optuna_json(),
            concat!(
                r#"{"learning_rate": {"name": "FloatDistribution", "attributes": {"step": null, "low": 1e-06, "high": 0.0001, "log": true}}, "#,
                r#""per_device_train_batch_size": {"name": "CategoricalDistribution", "attributes": {"choices": [16, 32, 64, 128]}}, "#,
                r#""weight_decay": {"name": "FloatDistribution", "attributes": {"step": null, "low": 0.0, "high": 0.3, "log": false}}}"#
            )
        );
        assert_eq!(SearchSpace::from_optuna_json(&s.to_optuna_json()).unwrap(), s);
    }

    #[test]
    fn toml_and_json_files_keep_order() {
        let toml = "[weight_decay]\ntype = \"float\"\nlow = 0.0\nhigh = 0.3\n\n[learning_rate]\ntype=\"float\"\nlow=1e-6\nhigh=1e-4\nlog=true\n\n[num_train_epochs]\ntype = \"int\"\nlow = 1\nhigh = 5\n";
        let (s, w) = SearchSpace::from_toml_str(toml, "space.toml").unwrap();
        assert!(w.is_empty());
        let names: Vec<&str> = s.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["weight_decay", "learning_rate", "num_train_epochs"]);
        assert_eq!(
            s.get("num_train_epochs"),
            Some(&Distribution::Int(IntDistribution { low: 1, high: 5, log: false, step: 1 }))
        );
        let json = r#"{"seed": {"type": "categorical", "choices": [1, 2]},
                       "warmup_ratio": {"name": "FloatDistribution", "attributes": {"low": 0, "high": 0.2, "step": 0.05}}}"#;
        let (s, _) = SearchSpace::from_json_str(json, "space.json").unwrap();
        assert_eq!(s.iter().map(|(n, _)| n).collect::<Vec<_>>(), ["seed", "warmup_ratio"]);
        let (_, w) =
            SearchSpace::from_toml_str("[warmup_steps]\ntype=\"int\"\nlow=0\nhigh=10\nstep=3\n", "s.toml")
                .unwrap();
        assert!(w[0].contains("high lowered to 9"), "{w:?}");
    }

    #[test]
    fn invalid_spaces_name_the_file_and_parameter() {
        let cases = [
            (
                "[learning_rate]\ntype=\"float\"\nlow=1e-4\nhigh=1e-6\n",
                "parameter \"learning_rate\": `low <= high`",
            ),
            (
                "[learning_rate]\ntype=\"float\"\nlow=0.0\nhigh=1e-4\nlog=true\n",
                "`low > 0` must hold for log=true",
            ),
            (
                "[weight_decay]\ntype=\"float\"\nlow=0.1\nhigh=0.3\nlog=true\nstep=0.1\n",
                "`step` is not supported",
            ),
            ("[per_device_train_batch_size]\ntype=\"categorical\"\nchoices=[]\n", "one or more elements"),
            (
                "[lr]\ntype=\"float\"\nlow=0.1\nhigh=0.3\n",
                "unknown parameter \"lr\"; the trainer's hyperparameters are: learning_rate,",
            ),
            ("[weight_decay]\ntype=\"gauss\"\n", "unknown type \"gauss\""),
            ("[weight_decay]\nlow=0\n", "missing `type`"),
            ("[weight_decay]\ntype=\"float\"\nlow=0\nhigh=1\nlogg=true\n", "unexpected field \"logg\""),
            ("[per_device_train_batch_size]\ntype=\"float\"\nlow=8\nhigh=64\n", "takes integers"),
            (
                "[per_device_train_batch_size]\ntype=\"categorical\"\nchoices=[16, \"big\"]\n",
                "takes integers, got choice \"big\"",
            ),
            (
                "[hidden_dropout_prob]\ntype=\"float\"\nlow=0\nhigh=1.5\n",
                "must be in [0, 1], but the space reaches 1.5",
            ),
            ("[weight_decay]\ntype=\"float\"\nlow=0\nhigh=1\nstep=0\n", "`step > 0`"),
            ("weight_decay = 3\n", "expected a table"),
            ("[weight_decay\n", "invalid TOML"),
            ("", "defines no parameters"),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", SearchSpace::from_toml_str(text, "bad.toml").unwrap_err());
            assert!(err.starts_with("bad.toml: ") && err.contains(want), "{text:?}: {err}");
        }
        let err = SearchSpace::from_json_str("{\"learning_rate\": ", "bad.json").unwrap_err().to_string();
        assert!(err.contains("bad.json: invalid JSON"), "{err}");
        let err = SearchSpace::from_optuna_json(
            r#"{"x": {"name": "FloatDistribution", "attributes": {"low": 1, "high": 0}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--search-space: parameter \"x\"") && err.contains("`low <= high`"), "{err}");
    }

    #[test]
    fn space_files_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("space.yaml");
        std::fs::write(&p, "x: 1").unwrap();
        assert!(SearchSpace::from_file(&p).unwrap_err().to_string().contains("must end in .toml or .json"));
        let p = dir.path().join("space.toml");
        std::fs::write(&p, [0xff, 0xfe, 0x00]).unwrap();
        assert!(SearchSpace::from_file(&p).unwrap_err().to_string().contains("not UTF-8"));
        let missing = dir.path().join("nope.toml");
        assert!(
            SearchSpace::from_file(&missing)
                .unwrap_err()
                .to_string()
                .contains("cannot read search space file")
        );
    }
}
