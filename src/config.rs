//! Model configuration read from a Hugging Face `config.json`.
//!
//! Only the fields BERT needs are interpreted; the whole JSON object is kept so that an exported
//! model carries every key the user's checkpoint had (with `id2label` / `label2id` updated).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

/// More classes than this is taken as a data error (e.g. a numeric id column used as the label),
/// and it bounds the label-name table built for integer labels.
pub const MAX_CLASSES: usize = 65_536;

/// The architecture numbers of a BERT encoder plus classification head.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    /// Dropout before the classifier; `None` means `hidden_dropout_prob`, as in transformers.
    pub classifier_dropout: Option<f64>,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub pad_token_id: usize,
    pub num_labels: usize,
    /// Class names by id (`id2label`).
    pub label_names: Vec<String>,
    /// The original JSON object, kept for export.
    pub raw: serde_json::Map<String, Value>,
}

/// The serde view of config.json; defaults are transformers' `BertConfig` defaults.
#[derive(Deserialize)]
struct RawBertConfig {
    vocab_size: Option<usize>,
    #[serde(default = "d_hidden")]
    hidden_size: usize,
    #[serde(default = "d_layers")]
    num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    num_attention_heads: usize,
    #[serde(default = "d_inter")]
    intermediate_size: usize,
    #[serde(default = "d_act")]
    hidden_act: String,
    #[serde(default = "d_drop")]
    hidden_dropout_prob: f64,
    #[serde(default = "d_drop")]
    attention_probs_dropout_prob: f64,
    #[serde(default)]
    classifier_dropout: Option<f64>,
    #[serde(default = "d_pos")]
    max_position_embeddings: usize,
    #[serde(default = "d_types")]
    type_vocab_size: usize,
    #[serde(default = "d_init")]
    initializer_range: f64,
    #[serde(default = "d_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    pad_token_id: Option<usize>,
    #[serde(default)]
    position_embedding_type: Option<String>,
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    num_labels: Option<usize>,
    #[serde(default)]
    id2label: Option<BTreeMap<String, String>>,
}

fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_inter() -> usize {
    3072
}
fn d_act() -> String {
    "gelu".into()
}
fn d_drop() -> f64 {
    0.1
}
fn d_pos() -> usize {
    512
}
fn d_types() -> usize {
    2
}
fn d_init() -> f64 {
    0.02
}
fn d_eps() -> f64 {
    1e-12
}

/// More layers than this is taken as a corrupt config (BERT-large has 24).
const MAX_LAYERS: usize = 1024;
/// More parameters than this (16 GiB of f32; BERT-large has 0.34e9) is taken as a corrupt config,
/// refused before anything is allocated.
const MAX_PARAMETERS: u128 = 1 << 32;

/// Parameters of BertForSequenceClassification with these sizes, counted as the parameter layout
/// lays them out, in u128 so that no field values can overflow it.
fn parameter_count(c: &RawBertConfig, vocab_size: usize, num_labels: usize) -> u128 {
    let [h, i, v, p, t, l, n] = [
        c.hidden_size,
        c.intermediate_size,
        vocab_size,
        c.max_position_embeddings,
        c.type_vocab_size,
        c.num_hidden_layers,
        num_labels,
    ]
    .map(|x| x as u128);
    let embeddings = (v + p + t) * h + 2 * h;
    // Q, K, V, attention output (weight and bias each), two LayerNorms, the two MLP matrices.
    let layer = 4 * (h * h + h) + 4 * h + 2 * i * h + i + h;
    let pooler = h * h + h;
    let classifier = n * h + n;
    embeddings + l * layer + pooler + classifier
}

impl BertConfig {
    /// Reads and validates `config.json`. `num_labels` overrides the file's label count (the
    /// `num_labels=2` of `from_pretrained`); label names come from `id2label` when it has that
    /// many entries, else `LABEL_0..`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_json_bytes(&bytes, &path.display().to_string())
    }

    /// Same, from the file's bytes; `origin` names the source in error messages.
    pub fn from_json_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{origin}: not UTF-8: {e}"))?;
        Self::from_json_str(text).with_context(|| format!("{origin}: invalid model config"))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("invalid JSON")?;
        let Value::Object(raw) = value.clone() else { bail!("expected a JSON object") };
        let c: RawBertConfig = serde_json::from_value(value).context("unexpected field type")?;
        if let Some(t) = &c.model_type
            && !matches!(t.as_str(), "bert")
        {
            bail!("model_type is {t:?}; only BERT models (model_type \"bert\") are supported");
        }
        if c.hidden_act != "gelu" {
            bail!("hidden_act is {:?}; only \"gelu\" (exact erf GELU, BERT's) is supported", c.hidden_act);
        }
        if let Some(p) = &c.position_embedding_type
            && p != "absolute"
        {
            bail!("position_embedding_type is {p:?}; only \"absolute\" is supported");
        }
        let Some(vocab_size) = c.vocab_size else { bail!("missing vocab_size") };
        for (name, v) in [
            ("vocab_size", vocab_size),
            ("hidden_size", c.hidden_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("intermediate_size", c.intermediate_size),
            ("max_position_embeddings", c.max_position_embeddings),
            ("type_vocab_size", c.type_vocab_size),
        ] {
            if v == 0 {
                bail!("{name} must be positive");
            }
            if v > 1 << 24 {
                bail!("{name} = {v} is implausibly large");
            }
        }
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size,
                c.num_attention_heads
            );
        }
        for (name, p) in [
            ("hidden_dropout_prob", Some(c.hidden_dropout_prob)),
            ("attention_probs_dropout_prob", Some(c.attention_probs_dropout_prob)),
            ("classifier_dropout", c.classifier_dropout),
        ] {
            if let Some(p) = p
                && !(0.0..1.0).contains(&p)
            {
                bail!("{name} = {p} is outside [0, 1)");
            }
        }
        if !(c.layer_norm_eps > 0.0 && c.layer_norm_eps.is_finite()) {
            bail!("layer_norm_eps must be positive");
        }
        let mut label_names = Vec::new();
        if let Some(map) = &c.id2label {
            let mut pairs = Vec::new();
            for (k, v) in map {
                let id: usize = k.parse().with_context(|| format!("id2label key {k:?} is not an integer"))?;
                pairs.push((id, v.clone()));
            }
            pairs.sort();
            if pairs.iter().enumerate().all(|(i, (id, _))| *id == i) {
                label_names = pairs.into_iter().map(|(_, v)| v).collect();
            }
        }
        let num_labels = c.num_labels.unwrap_or(if label_names.is_empty() { 2 } else { label_names.len() });
        if num_labels < 2 {
            bail!("num_labels must be at least 2 for classification");
        }
        // Bounds what the label names and the classifier allocate (a hostile file could claim 2^60).
        if num_labels > MAX_CLASSES {
            bail!("num_labels = {num_labels} is more than the {MAX_CLASSES} classes supported");
        }
        if c.num_hidden_layers > MAX_LAYERS {
            bail!("num_hidden_layers = {} is more than the {MAX_LAYERS} supported", c.num_hidden_layers);
        }
        let params = parameter_count(&c, vocab_size, num_labels);
        if params > MAX_PARAMETERS {
            bail!(
                "the model would have {params} parameters ({} GiB as f32), over the {MAX_PARAMETERS} supported",
                (params * 4) >> 30
            );
        }
        if label_names.len() != num_labels {
            label_names = (0..num_labels).map(|i| format!("LABEL_{i}")).collect();
        }
        Ok(BertConfig {
            vocab_size,
            hidden_size: c.hidden_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            intermediate_size: c.intermediate_size,
            max_position_embeddings: c.max_position_embeddings,
            type_vocab_size: c.type_vocab_size,
            hidden_dropout_prob: c.hidden_dropout_prob,
            attention_probs_dropout_prob: c.attention_probs_dropout_prob,
            classifier_dropout: c.classifier_dropout,
            initializer_range: c.initializer_range,
            layer_norm_eps: c.layer_norm_eps,
            pad_token_id: c.pad_token_id.unwrap_or(0),
            num_labels,
            label_names,
            raw,
        })
    }

    /// Sets the classification labels (as `from_pretrained(..., num_labels=n)` plus the dataset's
    /// class names do).
    pub fn set_labels(&mut self, names: &[String]) {
        self.num_labels = names.len();
        self.label_names = names.to_vec();
    }

    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn classifier_dropout_prob(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }

    /// The config.json an exported classification model carries: the original keys, with the
    /// architecture, labels and the dropout values actually used.
    pub fn to_export_json(&self) -> Value {
        let mut m = self.raw.clone();
        m.insert("architectures".into(), Value::from(vec!["BertForSequenceClassification"]));
        m.insert("model_type".into(), Value::from("bert"));
        let id2label: serde_json::Map<String, Value> = self
            .label_names
            .iter()
            .enumerate()
            .map(|(i, n)| (i.to_string(), Value::from(n.clone())))
            .collect();
        let label2id: serde_json::Map<String, Value> =
            self.label_names.iter().enumerate().map(|(i, n)| (n.clone(), Value::from(i))).collect();
        m.insert("id2label".into(), Value::Object(id2label));
        m.insert("label2id".into(), Value::Object(label2id));
        m.insert("num_labels".into(), Value::from(self.num_labels));
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
            ("pad_token_id", self.pad_token_id),
        ] {
            m.insert(k.into(), Value::from(v));
        }
        m.insert("hidden_dropout_prob".into(), Value::from(self.hidden_dropout_prob));
        m.insert("attention_probs_dropout_prob".into(), Value::from(self.attention_probs_dropout_prob));
        m.insert("layer_norm_eps".into(), Value::from(self.layer_norm_eps));
        m.insert("hidden_act".into(), Value::from("gelu"));
        m.insert("problem_type".into(), Value::from("single_label_classification"));
        Value::Object(m)
    }
}
