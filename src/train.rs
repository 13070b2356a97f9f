//! What a training run is, independent of the device: its settings ([`TrainConfig`], a subset of
//! transformers' `TrainingArguments`), its optimizer steps ([`StepPlan`]: mean loss over the
//! batch, clip to global norm, AdamW, linear schedule), its seeded example order
//! ([`EpochOrder`]), which epoch is kept and what is reported ([`BestBy`], [`Objective`]), and
//! evaluation on the CPU reference. The training loop itself is the trial-array scheduler
//! (`trial_array::schedule`), for one model as for many.
//!
//! Trainer semantics reproduced by default: the trial objective is the **last**
//! evaluation's accuracy, and "load best model at end" without `metric_for_best_model` keeps the
//! epoch with the **lowest eval loss**. `Objective::BestEpoch` and `BestBy::Accuracy` are the
//! alternatives.

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::config::BertConfig;
use crate::cpu::adamw::AdamW;
use crate::cpu::bert;
use crate::data::batch::TokenizedSplit;
use crate::model::BertModel;
use crate::model::layout::ParamLayout;
use crate::trial::protocol::EpochMetrics;

/// Evaluation runs at least this many examples per forward pass: the eval batch size changes
/// only summation order, and tiny passes waste time.
pub const MIN_EVAL_BATCH: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BestBy {
    /// Lowest eval loss (Trainer's default without `metric_for_best_model`).
    Loss,
    /// Highest eval accuracy.
    Accuracy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// The last epoch's eval accuracy (what Trainer reports to Optuna).
    LastEpoch,
    /// The kept (best) epoch's eval accuracy.
    BestEpoch,
}

impl BestBy {
    /// Higher is better: the epoch with the highest score is kept (the first of equals).
    pub fn score(self, eval_loss: f64, eval_accuracy: f64) -> f64 {
        match self {
            BestBy::Loss => -eval_loss,
            BestBy::Accuracy => eval_accuracy,
        }
    }
}

impl Objective {
    /// The objective of a run with these epochs whose kept epoch is `best_epoch` (1-based).
    pub fn value(self, epochs: &[EpochMetrics], best_epoch: usize) -> f64 {
        let last = epochs.last().map(|m| m.eval_accuracy).unwrap_or(0.0);
        match self {
            Objective::LastEpoch => last,
            Objective::BestEpoch => {
                epochs.get(best_epoch.wrapping_sub(1)).map(|m| m.eval_accuracy).unwrap_or(last)
            }
        }
    }
}

/// Optimizer steps of a run: Trainer steps once per batch, the last short batch of an epoch
/// included, and warms up over `warmup_steps` or `ceil(warmup_ratio · total)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub warmup: u64,
}

impl StepPlan {
    pub fn new(cfg: &TrainConfig, train_examples: usize) -> Self {
        let steps_per_epoch = train_examples.div_ceil(cfg.batch_size) as u64;
        let total_steps = steps_per_epoch * cfg.epochs as u64;
        let warmup = if cfg.warmup_steps > 0 {
            cfg.warmup_steps
        } else {
            (cfg.warmup_ratio * total_steps as f64).ceil() as u64
        };
        StepPlan { steps_per_epoch, total_steps, warmup }
    }
}

/// The example order of successive epochs: one seeded permutation, reshuffled in place each
/// epoch (so epoch e's order depends on all earlier ones, as a persistent sampler's does).
#[derive(Debug)]
pub struct EpochOrder {
    order: Vec<usize>,
    rng: rand::rngs::StdRng,
}

impl EpochOrder {
    pub fn new(examples: usize, seed: u64) -> Self {
        EpochOrder { order: (0..examples).collect(), rng: rand::rngs::StdRng::seed_from_u64(seed) }
    }

    /// The next epoch's order.
    pub fn next_epoch(&mut self) -> &[usize] {
        self.order.shuffle(&mut self.rng);
        &self.order
    }
}

/// The training hyperparameters (a subset of transformers' `TrainingArguments`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub weight_decay: f64,
    pub epochs: usize,
    pub warmup_ratio: f64,
    pub warmup_steps: u64,
    pub max_grad_norm: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub seed: u64,
    pub best_by: BestBy,
    pub objective: Objective,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            learning_rate: 5e-5,
            batch_size: 8,
            eval_batch_size: 8,
            weight_decay: 0.0,
            epochs: 3,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            seed: 42,
            best_by: BestBy::Loss,
            objective: Objective::LastEpoch,
        }
    }
}

impl TrainConfig {
    /// Rejects values Trainer would reject or that cannot train.
    pub fn validate(&self) -> Result<()> {
        let pos = |name: &str, v: f64| -> Result<()> {
            if !(v > 0.0 && v.is_finite()) {
                bail!("--{name} must be a positive number, got {v}");
            }
            Ok(())
        };
        pos("learning-rate", self.learning_rate)?;
        pos("adam-epsilon", self.adam_epsilon)?;
        pos("max-grad-norm", self.max_grad_norm)?;
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if self.eval_batch_size == 0 {
            bail!("--eval-batch-size must be at least 1");
        }
        if self.epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.weight_decay) {
            bail!("--weight-decay must be in [0, 1], got {}", self.weight_decay);
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            bail!("--warmup-ratio must be in [0, 1), got {}", self.warmup_ratio);
        }
        for (n, b) in [("adam-beta1", self.adam_beta1), ("adam-beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("--{n} must be in [0, 1), got {b}");
            }
        }
        Ok(())
    }

    pub(crate) fn optimizer(&self) -> AdamW {
        AdamW {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_epsilon,
            weight_decay: self.weight_decay,
        }
    }
}

/// Mean cross-entropy over examples and accuracy of a parameter buffer (one slot of a trial
/// array) on `split` (no dropout).
pub fn evaluate_params(
    config: &BertConfig,
    layout: &ParamLayout,
    params: &[f32],
    split: &TokenizedSplit,
    batch_size: usize,
) -> Result<(f64, f64)> {
    let (logits, losses) = predict_params(config, layout, params, split, batch_size.max(MIN_EVAL_BATCH))?;
    let nl = config.num_labels;
    let correct = logits.chunks_exact(nl).zip(&split.labels).filter(|(row, y)| argmax(row) == **y).count();
    let loss = losses.iter().sum::<f64>() / split.len().max(1) as f64;
    Ok((loss, correct as f64 / split.len().max(1) as f64))
}

/// Logits (n × labels) and per-example losses of `split`.
pub fn predict(model: &BertModel, split: &TokenizedSplit, batch_size: usize) -> Result<(Vec<f32>, Vec<f64>)> {
    predict_params(&model.config, &model.layout, &model.params, split, batch_size)
}

fn predict_params(
    config: &BertConfig,
    layout: &ParamLayout,
    params: &[f32],
    split: &TokenizedSplit,
    batch_size: usize,
) -> Result<(Vec<f32>, Vec<f64>)> {
    let mut logits = Vec::with_capacity(split.len() * config.num_labels);
    let mut losses = Vec::with_capacity(split.len());
    let idx: Vec<usize> = (0..split.len()).collect();
    for chunk in idx.chunks(batch_size) {
        let batch = split.packed_batch(chunk);
        let fwd = bert::forward(config, layout, params, &batch, None);
        if fwd.logits.iter().any(|v| !v.is_finite()) {
            bail!("the model produced non-finite logits");
        }
        logits.extend_from_slice(&fwd.logits);
        losses.extend(fwd.losses.iter().map(|l| *l as f64));
    }
    Ok((logits, losses))
}

pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}
