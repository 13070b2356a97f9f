//! The training loop: epochs over a seeded example order, optimizer steps with Trainer's
//! semantics (mean loss over the batch, clip to global norm, AdamW, linear schedule), evaluation
//! after every epoch, and the best epoch's weights kept.
//!
//! Trainer semantics reproduced by default: the trial objective is the **last**
//! evaluation's accuracy, and "load best model at end" without `metric_for_best_model` keeps the
//! epoch with the **lowest eval loss**. `Objective::BestEpoch` and `BestBy::Accuracy` are the
//! alternatives.

use std::time::Instant;

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::config::BertConfig;
use crate::cpu::adamw::{AdamState, AdamW, clip_grad_norm, linear_schedule};
use crate::cpu::bert::{self, Dropout};
use crate::cpu::philox::DropoutRng;
use crate::data::batch::{TokenizedSplit, chunk_by_attention_budget};
use crate::model::BertModel;
use crate::model::layout::ParamLayout;

/// Values of the attention-probability buffers one forward/backward chunk may hold (≈1 GiB of
/// f32 over all layers for the largest models we run on CPU).
const ATTENTION_BUDGET_VALUES: usize = 1 << 25;

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

/// One epoch's numbers, as stored in `training_metrics.json` and reported to a study.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// Mean of the optimizer steps' batch-mean losses (Trainer's logged `loss`).
    pub train_loss: f64,
    pub eval_loss: f64,
    pub eval_accuracy: f64,
    pub learning_rate: f64,
    pub train_seconds: f64,
    pub eval_seconds: f64,
    pub train_examples_per_second: f64,
    pub eval_examples_per_second: f64,
    /// Real (unpadded) tokens per second in training.
    pub train_tokens_per_second: f64,
}

/// What a caller decides after an epoch (a pruner may stop a trial early).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Stop,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainResult {
    pub epochs: Vec<EpochMetrics>,
    /// 1-based epoch whose weights were kept.
    pub best_epoch: usize,
    /// The objective value (eval accuracy) per `TrainConfig::objective`.
    pub objective: f64,
    /// True when `on_epoch` stopped training early.
    pub stopped_early: bool,
}

/// Progress display hooks (the CLI draws a bar; tests pass `NoProgress`).
pub trait Progress {
    fn start(&self, _what: &str, _total_examples: u64) {}
    fn advance(&self, _examples: u64, _loss: f64) {}
    fn finish(&self) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

/// Trains `model` in place; on return it holds the best epoch's weights.
pub fn train(
    model: &mut BertModel,
    train: &TokenizedSplit,
    eval: &TokenizedSplit,
    cfg: &TrainConfig,
    progress: &dyn Progress,
    on_epoch: &mut dyn FnMut(&EpochMetrics) -> Result<Verdict>,
) -> Result<TrainResult> {
    cfg.validate()?;
    if train.is_empty() || eval.is_empty() {
        bail!("training needs a non-empty train and eval split");
    }
    let StepPlan { steps_per_epoch, total_steps, warmup } = StepPlan::new(cfg, train.len());
    let opt = cfg.optimizer();
    let decay = model.layout.decay_mask();
    let mut state = AdamState::new(model.layout.len);
    let mut grads = vec![0.0f32; model.layout.len];
    let heads = model.config.num_attention_heads * model.config.num_hidden_layers;
    let mut epoch_order = EpochOrder::new(train.len(), cfg.seed);
    let mut forward_passes: u32 = 0;
    let mut result = TrainResult { epochs: Vec::new(), best_epoch: 0, objective: 0.0, stopped_early: false };
    let mut best: Option<(f64, Vec<f32>)> = None;

    for epoch in 1..=cfg.epochs {
        let order = epoch_order.next_epoch();
        progress.start(&format!("epoch {epoch}/{}", cfg.epochs), train.len() as u64);
        let t0 = Instant::now();
        let mut loss_sum = 0.0;
        let mut lr = cfg.learning_rate;
        for (s, batch_idx) in order.chunks(cfg.batch_size).enumerate() {
            grads.fill(0.0);
            let scale = 1.0 / batch_idx.len() as f32;
            let mut batch_loss = 0.0f64;
            for chunk in chunk_by_attention_budget(train, batch_idx, heads, ATTENTION_BUDGET_VALUES) {
                let batch = train.packed_batch(&chunk);
                let rng = DropoutRng { seed: cfg.seed, stream: 0, step: forward_passes };
                forward_passes = forward_passes.wrapping_add(1);
                let fwd = bert::forward(
                    &model.config,
                    &model.layout,
                    &model.params,
                    &batch,
                    Some(Dropout::from_config(&model.config, rng)),
                );
                batch_loss += fwd.losses.iter().map(|l| *l as f64).sum::<f64>();
                bert::backward(&model.config, &model.layout, &model.params, &batch, &fwd, scale, &mut grads);
            }
            let batch_loss = batch_loss / batch_idx.len() as f64;
            let step = (epoch as u64 - 1) * steps_per_epoch + s as u64;
            if !batch_loss.is_finite() {
                bail!(
                    "training diverged: the loss is {batch_loss} at epoch {epoch}, optimizer step {}",
                    step + 1
                );
            }
            loss_sum += batch_loss;
            clip_grad_norm(&mut grads, cfg.max_grad_norm);
            lr = linear_schedule(cfg.learning_rate, step, total_steps, warmup);
            opt.step(&mut model.params, &grads, &decay, &mut state, lr);
            progress.advance(batch_idx.len() as u64, batch_loss);
        }
        let train_seconds = t0.elapsed().as_secs_f64();
        progress.finish();
        let t1 = Instant::now();
        let (eval_loss, eval_accuracy) = evaluate(model, eval, cfg.eval_batch_size)?;
        let eval_seconds = t1.elapsed().as_secs_f64();
        let m = EpochMetrics {
            epoch,
            train_loss: loss_sum / steps_per_epoch as f64,
            eval_loss,
            eval_accuracy,
            learning_rate: lr,
            train_seconds,
            eval_seconds,
            train_examples_per_second: train.len() as f64 / train_seconds,
            eval_examples_per_second: eval.len() as f64 / eval_seconds,
            train_tokens_per_second: train.tokens() as f64 / train_seconds,
        };
        let score = cfg.best_by.score(eval_loss, eval_accuracy);
        if best.as_ref().is_none_or(|(b, _)| score > *b) {
            best = Some((score, model.params.clone()));
            result.best_epoch = epoch;
        }
        result.epochs.push(m.clone());
        if on_epoch(&m)? == Verdict::Stop {
            result.stopped_early = true;
            break;
        }
    }
    if let Some((_, params)) = best {
        model.params = params;
    }
    result.objective = cfg.objective.value(&result.epochs, result.best_epoch);
    Ok(result)
}

/// Mean cross-entropy over examples and accuracy of `model` on `split` (no dropout).
pub fn evaluate(model: &BertModel, split: &TokenizedSplit, batch_size: usize) -> Result<(f64, f64)> {
    evaluate_params(&model.config, &model.layout, &model.params, split, batch_size)
}

/// [`evaluate`] for a bare parameter buffer (one slot of a trial array).
pub fn evaluate_params(
    config: &BertConfig,
    layout: &ParamLayout,
    params: &[f32],
    split: &TokenizedSplit,
    batch_size: usize,
) -> Result<(f64, f64)> {
    let (logits, losses) = predict_params(config, layout, params, split, batch_size.max(32))?;
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
