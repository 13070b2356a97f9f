//! BERT parameters: the named-tensor layout shared by both backends, initialisation, loading from
//! Hugging Face checkpoints, and export in the Hugging Face format.

pub mod files;
pub mod layout;
mod pickle;
pub mod safetensors_io;
pub mod tensor;
pub mod torch_bin;

use std::collections::HashMap;

use anyhow::{Result, bail};
use rand::{RngExt, SeedableRng};

use crate::config::BertConfig;
use layout::ParamLayout;
use tensor::RawTensor;

/// A BERT sequence classifier held as one flat f32 parameter buffer.
#[derive(Clone, Debug)]
pub struct BertModel {
    pub config: BertConfig,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
}

/// What loading a checkpoint did besides copying tensors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Tensors the checkpoint lacked and that were freshly initialised (classifier, pooler).
    pub initialised: Vec<String>,
    /// Checkpoint tensors that are not part of the classifier (pre-training heads, buffers).
    pub ignored: Vec<String>,
}

/// Standard normal samples by Box–Muller (seeded, platform independent).
fn normal(rng: &mut rand::rngs::StdRng, std: f64, out: &mut [f32]) {
    for chunk in out.chunks_mut(2) {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = std::f64::consts::TAU * u2;
        chunk[0] = (r * t.cos()) as f32;
        if chunk.len() > 1 {
            chunk[1] = (r * t.sin()) as f32;
        }
    }
}

impl BertModel {
    /// A freshly initialised model as transformers' `_init_weights` makes one: linear and
    /// embedding weights N(0, initializer_range), biases 0, the padding row 0, LayerNorm 1 / 0.
    pub fn random_init(config: &BertConfig, seed: u64) -> Self {
        let layout = ParamLayout::new(config);
        let mut params = vec![0.0f32; layout.len];
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for t in &layout.tensors {
            let p = &mut params[t.range.clone()];
            if t.name.contains("LayerNorm.weight") {
                p.fill(1.0);
            } else if t.shape.len() == 2 {
                normal(&mut rng, config.initializer_range, p);
            }
        }
        let word = &layout.embeddings.word;
        let pad = config.pad_token_id;
        if pad < config.vocab_size {
            let h = config.hidden_size;
            params[word.start + pad * h..word.start + (pad + 1) * h].fill(0.0);
        }
        BertModel { config: config.clone(), layout, params }
    }

    /// Builds the model from checkpoint tensors (`origin` names the file in errors). Names are
    /// accepted with or without the `bert.` prefix and with legacy LayerNorm `gamma`/`beta`;
    /// pre-training heads and buffers are ignored; a missing classifier (and pooler) is created
    /// N(0, initializer_range) with zero bias from `seed`, as `from_pretrained(num_labels=…)` does.
    pub fn from_tensors(
        config: &BertConfig,
        tensors: Vec<(String, RawTensor)>,
        origin: &str,
        seed: u64,
    ) -> Result<(Self, LoadReport)> {
        let mut model = BertModel::random_init(config, seed);
        let mut report = LoadReport::default();
        let mut by_name: HashMap<String, (String, RawTensor)> = HashMap::new();
        for (name, t) in tensors {
            let canonical = canonical_name(&name);
            if model.layout.find(&canonical).is_none() {
                report.ignored.push(name);
                continue;
            }
            if let Some((first, _)) = by_name.get(&canonical) {
                bail!("{origin}: tensors {first:?} and {name:?} both map to {canonical:?}");
            }
            by_name.insert(canonical, (name, t));
        }
        let mut missing = Vec::new();
        for spec in model.layout.tensors.clone() {
            match by_name.remove(&spec.name) {
                Some((orig, t)) => {
                    if t.shape != spec.shape {
                        bail!(
                            "{origin}: tensor {orig:?} has shape {:?}, but config.json implies {:?}",
                            t.shape,
                            spec.shape
                        );
                    }
                    let values = t.to_f32().map_err(|e| anyhow::anyhow!("{origin}: tensor {orig:?}: {e}"))?;
                    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
                        bail!("{origin}: tensor {orig:?} holds a non-finite value at element {bad}");
                    }
                    model.params[spec.range.clone()].copy_from_slice(&values);
                }
                None => missing.push(spec.name.clone()),
            }
        }
        for name in missing {
            if name.starts_with("classifier.") || name.starts_with("bert.pooler.") {
                report.initialised.push(name);
            } else {
                bail!("{origin}: the checkpoint has no tensor {name:?} (nor its name without \"bert.\")");
            }
        }
        Ok((model, report))
    }

    /// (name, shape, values) of every tensor, in state-dict order.
    pub fn named_tensors(&self) -> impl Iterator<Item = (&str, &[usize], &[f32])> {
        self.layout
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice(), &self.params[t.range.clone()]))
    }
}

/// Maps a checkpoint tensor name to the layout's: adds the `bert.` prefix where the checkpoint
/// is a bare `BertModel`, and renames legacy LayerNorm `gamma`/`beta`.
pub fn canonical_name(name: &str) -> String {
    let mut n = name.to_string();
    if let Some(stem) = n.strip_suffix(".gamma") {
        n = format!("{stem}.weight");
    } else if let Some(stem) = n.strip_suffix(".beta") {
        n = format!("{stem}.bias");
    }
    if n.starts_with("embeddings.") || n.starts_with("encoder.") || n.starts_with("pooler.") {
        n = format!("bert.{n}");
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names() {
        assert_eq!(canonical_name("embeddings.LayerNorm.gamma"), "bert.embeddings.LayerNorm.weight");
        assert_eq!(
            canonical_name("bert.encoder.layer.0.output.LayerNorm.beta"),
            "bert.encoder.layer.0.output.LayerNorm.bias"
        );
        assert_eq!(canonical_name("classifier.weight"), "classifier.weight");
        assert_eq!(canonical_name("cls.predictions.bias"), "cls.predictions.bias");
    }
}
