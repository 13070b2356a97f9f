//! From a trial's parameters to what a slot trains: the one place where a search's or a stored
//! trial's hyperparameters (transformers' names) become a training config, model settings and
//! data truncated to the trial's `max_length`. Used by `search` and by `train` (with or without
//! `--from-study`).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Result, bail};

use super::schedule::{ArrayTrial, TrialBuilder};
use crate::config::BertConfig;
use crate::cpu::bert::DropoutProbs;
use crate::data::batch::TokenizedSplit;
use crate::model::BertModel;
use crate::train::TrainConfig;
use crate::trial::ParamSet;

/// A trial's training settings after its parameters were applied.
#[derive(Clone, Debug)]
pub struct TrialSettings {
    pub cfg: TrainConfig,
    /// The model's config with the trial's dropout probabilities.
    pub config: BertConfig,
    /// Tokens per example (at most what the data was tokenized to).
    pub max_length: usize,
}

/// Applies a trial's parameters (transformers' names) to the base training config and the model's
/// dropout. `max_length_limit` is what the data was tokenized to.
pub fn apply_params(
    base: &TrainConfig,
    initial: &BertModel,
    params: &ParamSet,
    max_length_limit: usize,
) -> Result<TrialSettings> {
    let mut cfg = base.clone();
    let mut config = initial.config.clone();
    let mut max_length = max_length_limit;
    for (name, _) in params.iter() {
        let f =
            || -> Result<f64> { params.get_f64(name)?.ok_or_else(|| anyhow::anyhow!("{name} has no value")) };
        let int = || -> Result<i64> {
            let v = f()?;
            if v.fract() != 0.0 || v < 0.0 {
                bail!("parameter {name} = {v} must be a non-negative integer");
            }
            Ok(v as i64)
        };
        match name {
            "learning_rate" => cfg.learning_rate = f()?,
            "per_device_train_batch_size" => cfg.batch_size = int()? as usize,
            "weight_decay" => cfg.weight_decay = f()?,
            "num_train_epochs" => cfg.epochs = int()? as usize,
            "warmup_ratio" => cfg.warmup_ratio = f()?,
            "warmup_steps" => cfg.warmup_steps = int()? as u64,
            "max_grad_norm" => cfg.max_grad_norm = f()?,
            "adam_beta1" => cfg.adam_beta1 = f()?,
            "adam_beta2" => cfg.adam_beta2 = f()?,
            "adam_epsilon" => cfg.adam_epsilon = f()?,
            "seed" => cfg.seed = int()? as u64,
            "hidden_dropout_prob" => config.hidden_dropout_prob = f()?,
            "attention_probs_dropout_prob" => config.attention_probs_dropout_prob = f()?,
            "classifier_dropout" => config.classifier_dropout = Some(f()?),
            "max_length" => {
                let m = int()? as usize;
                if !(2..=max_length_limit).contains(&m) {
                    bail!(
                        "max_length {m} must be in [2, {max_length_limit}] (the data was tokenized to --max-length)"
                    );
                }
                max_length = m;
            }
            other => bail!("the trainer has no hyperparameter named {other:?}"),
        }
    }
    let dropout = DropoutProbs::from_config(&config);
    for (n, p) in [
        ("hidden_dropout_prob", dropout.hidden),
        ("attention_probs_dropout_prob", dropout.attention),
        ("classifier_dropout", dropout.classifier),
    ] {
        if !(0.0..1.0).contains(&p) {
            bail!("{n} = {p} is outside [0, 1)");
        }
    }
    cfg.validate()?;
    Ok(TrialSettings { cfg, config, max_length })
}

/// Truncates a tokenized split to `max_length` tokens, keeping the final [SEP] as the tokenizer's
/// truncation does.
pub fn truncate(split: &TokenizedSplit, max_length: usize) -> TokenizedSplit {
    let ids = split
        .ids
        .iter()
        .map(|s| {
            if s.len() <= max_length {
                s.clone()
            } else {
                let mut t = s[..max_length - 1].to_vec();
                t.push(*s.last().expect("non-empty sequence"));
                t
            }
        })
        .collect();
    TokenizedSplit { ids, labels: split.labels.clone() }
}

/// What every trial starts from: the data, the model (re-created for every trial from the same
/// weights, as Trainer's `model_init` does) and the settings the parameters do not cover.
pub struct TrialSetup {
    /// The model every trial starts from.
    pub initial: BertModel,
    /// Training settings the parameters do not cover.
    pub base: TrainConfig,
    /// What the data was tokenized to.
    max_length: usize,
    /// Train and eval splits per max length (a space may tune `max_length`).
    splits: HashMap<usize, (Arc<TokenizedSplit>, Arc<TokenizedSplit>)>,
}

impl TrialSetup {
    pub fn new(
        initial: BertModel,
        base: TrainConfig,
        train: TokenizedSplit,
        eval: TokenizedSplit,
        max_length: usize,
    ) -> Self {
        let splits = HashMap::from([(max_length, (Arc::new(train), Arc::new(eval)))]);
        TrialSetup { initial, base, max_length, splits }
    }

    /// The settings of a trial with `params`.
    pub fn settings(&self, params: &ParamSet) -> Result<TrialSettings> {
        apply_params(&self.base, &self.initial, params, self.max_length)
    }
}

impl TrialBuilder for TrialSetup {
    fn build(&mut self, _number: u64, params: &ParamSet) -> Result<ArrayTrial> {
        let TrialSettings { cfg, config, max_length } = self.settings(params)?;
        let full = self.splits[&self.max_length].clone();
        let (train, eval) = self
            .splits
            .entry(max_length)
            .or_insert_with(|| {
                (Arc::new(truncate(&full.0, max_length)), Arc::new(truncate(&full.1, max_length)))
            })
            .clone();
        Ok(ArrayTrial {
            cfg,
            initial_params: self.initial.params.clone(),
            dropout: DropoutProbs::from_config(&config),
            // One stream for every trial: a trial draws the same masks in any slot, alone or not.
            dropout_stream: 0,
            train,
            eval,
        })
    }
}
