//! The model card (README.md) for an uploaded model folder: YAML front matter the Hub reads
//! (license, base_model, datasets, tags, metrics) and a body with the base model, dataset, study,
//! best hyperparameters and accuracy, taken from the folder's `training_metrics.json` and
//! `config.json` (both optional; whatever is missing is left out).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde_json::{Map, Value};

use crate::pyjson::float_repr;

/// The hyperparameters shown in the card, in this order, when the metrics name them.
const HYPERPARAMETERS: &[(&str, &[&str])] = &[
    ("learning_rate", &["learning_rate"]),
    ("per_device_train_batch_size", &["per_device_train_batch_size", "batch_size"]),
    ("weight_decay", &["weight_decay"]),
    ("num_train_epochs", &["num_train_epochs", "epochs"]),
    ("warmup_ratio", &["warmup_ratio"]),
    ("warmup_steps", &["warmup_steps"]),
    ("seed", &["seed"]),
];

/// Reads `dir/name` as JSON; `Ok(None)` when the file does not exist.
pub fn read_json(dir: &Path, name: &str) -> Result<Option<Value>> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("{}: cannot read: {e}", path.display())),
    };
    let text = String::from_utf8(bytes).map_err(|e| anyhow!("{}: not UTF-8 ({e})", path.display()))?;
    let value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: line {}: invalid JSON: {e}", path.display(), e.line()))?;
    Ok(Some(value))
}

/// A string that YAML reads back verbatim (a JSON string is a YAML double-quoted scalar).
fn yaml_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A Markdown table cell: pipes and line breaks would break the table.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// True for `name` or `owner/name` Hub ids (a local path is not one).
fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        // Integers as written; floats as Python prints them (3.154e-05), as users see them in Optuna.
        Value::Number(n) if n.is_f64() => n.as_f64().map(float_repr),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// What the card says, gathered from the folder.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CardFacts {
    pub base_model: Option<String>,
    pub dataset: Option<String>,
    pub study_name: Option<String>,
    pub best_trial: Option<u64>,
    pub hyperparameters: Vec<(String, String)>,
    pub accuracy: Option<f64>,
    pub eval_examples: Option<u64>,
    pub labels: Vec<String>,
    pub epochs: Vec<EpochRow>,
}

/// One epoch of `training_metrics.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochRow {
    pub epoch: u64,
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
}

impl CardFacts {
    /// Reads `training_metrics.json` and `config.json` from `dir`. The metrics may name the study
    /// as `"study": "name"` or `"study": {"name"|"study_name": ..., "best_trial"|"trial_number":
    /// ..., "params"|"best_params": {...}}`; hyperparameters come from the study's parameters, else
    /// from `train_config`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let metrics = read_json(dir, "training_metrics.json")?.unwrap_or(Value::Null);
        let config = read_json(dir, "config.json")?.unwrap_or(Value::Null);
        let mut f = CardFacts {
            base_model: metrics
                .get("model")
                .and_then(text_of)
                .or_else(|| config.get("_name_or_path").and_then(text_of)),
            dataset: metrics.get("dataset").and_then(text_of),
            eval_examples: metrics.get("eval_examples").and_then(Value::as_u64),
            ..CardFacts::default()
        };
        let empty = Map::new();
        let study = metrics.get("study");
        let study_obj = study.and_then(Value::as_object).unwrap_or(&empty);
        f.study_name = match study {
            Some(Value::String(s)) => Some(s.clone()),
            _ => ["name", "study_name"].iter().find_map(|k| study_obj.get(*k).and_then(text_of)),
        };
        f.best_trial =
            ["best_trial", "trial_number", "number"].iter().find_map(|k| study_obj.get(*k)?.as_u64());
        let params = ["params", "best_params"].iter().find_map(|k| study_obj.get(*k)?.as_object());
        let train_config = metrics.get("train_config").and_then(Value::as_object).unwrap_or(&empty);
        match params {
            Some(p) => {
                f.hyperparameters = p.iter().filter_map(|(k, v)| Some((k.clone(), text_of(v)?))).collect();
                // Fill in what the search did not tune, from the training run itself.
                for (name, keys) in HYPERPARAMETERS {
                    if f.hyperparameters.iter().any(|(k, _)| k == name) {
                        continue;
                    }
                    if let Some(v) = keys.iter().find_map(|k| train_config.get(*k).and_then(text_of)) {
                        f.hyperparameters.push((name.to_string(), v));
                    }
                }
            }
            None => {
                for (name, keys) in HYPERPARAMETERS {
                    if let Some(v) = keys.iter().find_map(|k| train_config.get(*k).and_then(text_of)) {
                        f.hyperparameters.push((name.to_string(), v));
                    }
                }
            }
        }
        let epochs = metrics.get("epochs").and_then(Value::as_array).cloned().unwrap_or_default();
        for e in &epochs {
            let n = e.get("epoch").and_then(Value::as_u64).unwrap_or(0);
            let g = |k: &str| e.get(k).and_then(Value::as_f64);
            f.epochs.push(EpochRow {
                epoch: n,
                train_loss: g("train_loss"),
                eval_loss: g("eval_loss"),
                eval_accuracy: g("eval_accuracy"),
            });
        }
        let best_epoch = metrics.get("best_epoch").and_then(Value::as_u64);
        f.accuracy = metrics.get("objective").and_then(Value::as_f64).or_else(|| {
            let pick = f.epochs.iter().find(|e| Some(e.epoch) == best_epoch).or(f.epochs.last());
            pick.and_then(|e| e.eval_accuracy)
        });
        if let Some(labels) = config.get("id2label").and_then(Value::as_object) {
            let mut v: Vec<(u64, String)> =
                labels.iter().filter_map(|(k, l)| Some((k.parse::<u64>().ok()?, text_of(l)?))).collect();
            v.sort();
            f.labels = v.into_iter().map(|(_, l)| l).collect();
        }
        Ok(f)
    }
}

/// Builds the model card for `dir` uploaded as `repo_id`.
pub fn model_card(dir: &Path, repo_id: &str, license: &str) -> Result<String> {
    let f = CardFacts::from_dir(dir).context("building the model card")?;
    Ok(render(&f, repo_id, license))
}

/// Renders the card from facts.
pub fn render(f: &CardFacts, repo_id: &str, license: &str) -> String {
    let mut s = String::from("---\n");
    let _ = writeln!(s, "license: {}", yaml_str(license));
    let _ = writeln!(s, "library_name: transformers");
    let _ = writeln!(s, "pipeline_tag: text-classification");
    if let Some(b) = f.base_model.as_deref().filter(|b| is_hub_id(b)) {
        let _ = writeln!(s, "base_model: {}", yaml_str(b));
    }
    if let Some(d) = f.dataset.as_deref().filter(|d| is_hub_id(d)) {
        let _ = writeln!(s, "datasets:\n- {}", yaml_str(d));
    }
    s.push_str("tags:\n- text-classification\n- bert\n- hpo-gpu\n- optuna\n- hyperparameter-search\n");
    s.push_str("metrics:\n- accuracy\n---\n\n");

    let name = repo_id.rsplit('/').next().unwrap_or(repo_id);
    let _ = writeln!(s, "# {name}\n");
    let base = f.base_model.as_deref().unwrap_or("a BERT-family model");
    let base_md = if is_hub_id(base) && f.base_model.is_some() {
        format!("[{base}](https://huggingface.co/{base})")
    } else {
        format!("`{base}`")
    };
    let dataset = match f.dataset.as_deref() {
        Some(d) if is_hub_id(d) => format!(" on [{d}](https://huggingface.co/datasets/{d})"),
        Some(d) => format!(" on `{d}`"),
        None => String::new(),
    };
    let labels =
        if f.labels.is_empty() { String::new() } else { format!(" (labels: {})", f.labels.join(", ")) };
    let _ = writeln!(s, "A text classifier fine-tuned from {base_md}{dataset}{labels}.");
    s.push_str(
        "Its hyperparameters were chosen by a hyperparameter search with hpo-gpu, which stores its \
         study in Optuna's format.\n\n",
    );

    s.push_str("## Hyperparameter search\n\n");
    match &f.study_name {
        Some(name) => {
            let _ = write!(s, "- Study: `{}`", name.replace('`', "'"));
            if let Some(t) = f.best_trial {
                let _ = write!(s, " (best trial #{t})");
            }
            s.push('\n');
        }
        None => s.push_str("- Study: not recorded in training_metrics.json\n"),
    }
    if !f.hyperparameters.is_empty() {
        s.push_str("\n### Best hyperparameters\n\n| Hyperparameter | Value |\n|---|---|\n");
        for (k, v) in &f.hyperparameters {
            let _ = writeln!(s, "| {} | {} |", cell(k), cell(v));
        }
    }

    s.push_str("\n## Results\n\n");
    match f.accuracy {
        Some(a) => {
            let _ = write!(s, "- Accuracy: **{a:.4}**");
            if let Some(n) = f.eval_examples {
                let _ = write!(s, " on {n} evaluation examples");
            }
            s.push('\n');
        }
        None => s.push_str("- Accuracy: not recorded\n"),
    }
    if !f.epochs.is_empty() {
        s.push_str("\n| Epoch | Train loss | Eval loss | Eval accuracy |\n|---|---|---|---|\n");
        let num = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "—".into());
        for e in &f.epochs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                e.epoch,
                num(e.train_loss),
                num(e.eval_loss),
                num(e.eval_accuracy)
            );
        }
    }
    let _ = write!(
        s,
        "\n## Usage\n\n```python\nfrom transformers import pipeline\n\nclassifier = pipeline(\"text-classification\", \
         model={})\nprint(classifier(\"This movie was wonderful.\"))\n```\n",
        Value::String(repo_id.to_string())
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(is_hub_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(is_hub_id("imdb"));
        assert!(!is_hub_id("/data/imdb.jsonl.gz"));
        assert!(!is_hub_id("../shared/data/imdb"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id(""));
    }

    #[test]
    fn front_matter_values_are_quoted() {
        let f = CardFacts { base_model: Some("org/model".into()), ..CardFacts::default() };
        let card = render(&f, "me/x", "apache-2.0\nevil: 1");
        assert!(card.starts_with("---\nlicense: \"apache-2.0\\nevil: 1\"\n"), "{card}");
        assert!(card.contains("base_model: \"org/model\"\n"));
        assert!(!card.contains("datasets:"));
    }
}
