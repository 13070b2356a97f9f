//! `hpo-gpu search`: the recipe's study. Samples hyperparameters (study engine in `study`/`search`),
//! trains each trial with the CPU reference (re-creating the model from the same checkpoint and
//! seed for every trial, as Trainer's `model_init` does) and stores everything in Optuna's schema.

use std::io::Write;

use anyhow::{Result, bail};

use crate::cli::HyperArgs;
use crate::cuda::{Device, resolve_device};
use crate::data::batch::TokenizedSplit;
use crate::model::BertModel;
use crate::pipeline::{ModelDataArgs, Prepared, initial_model, prepare};
use crate::study::ParamSet;
use crate::study::cli::SearchStudyArgs;
use crate::study::driver::{EpochReport, LineProgress, TrialRunner, Verdict as StudyVerdict, run_study};
use crate::train::{EpochMetrics, NoProgress, TrainConfig, Verdict, train};

/// `hpo-gpu search`: run (or continue) a hyperparameter study.
#[derive(Clone, Debug, clap::Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub data: ModelDataArgs,
    /// Values of the hyperparameters the search space does not cover.
    #[command(flatten)]
    pub hyper: HyperArgs,
    #[command(flatten)]
    pub study: SearchStudyArgs,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
}

/// Trains trials with the CPU reference.
pub struct CpuTrialRunner<'a> {
    pub prepared: &'a Prepared,
    /// The model every trial starts from.
    pub initial: BertModel,
    pub base: TrainConfig,
}

/// Truncates a tokenized split to `max_length` tokens, keeping the final [SEP] as the tokenizer's
/// truncation does.
fn truncate(split: &TokenizedSplit, max_length: usize) -> TokenizedSplit {
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

/// Applies a trial's parameters (transformers' names) to the base training config and model
/// config. Returns the training config, the model and the max length to use.
pub fn apply_params(
    base: &TrainConfig,
    initial: &BertModel,
    params: &ParamSet,
    max_length_limit: usize,
) -> Result<(TrainConfig, BertModel, usize)> {
    let mut cfg = base.clone();
    let mut model = initial.clone();
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
            "hidden_dropout_prob" => model.config.hidden_dropout_prob = f()?,
            "attention_probs_dropout_prob" => model.config.attention_probs_dropout_prob = f()?,
            "classifier_dropout" => model.config.classifier_dropout = Some(f()?),
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
    for (n, p) in [
        ("hidden_dropout_prob", model.config.hidden_dropout_prob),
        ("attention_probs_dropout_prob", model.config.attention_probs_dropout_prob),
        ("classifier_dropout", model.config.classifier_dropout_prob()),
    ] {
        if !(0.0..1.0).contains(&p) {
            bail!("{n} = {p} is outside [0, 1)");
        }
    }
    cfg.validate()?;
    Ok((cfg, model, max_length))
}

impl TrialRunner for CpuTrialRunner<'_> {
    fn run_trial(
        &mut self,
        _trial_number: u64,
        params: &ParamSet,
        report: &mut dyn FnMut(&EpochReport) -> Result<StudyVerdict>,
    ) -> Result<f64> {
        let (cfg, mut model, max_length) =
            apply_params(&self.base, &self.initial, params, self.prepared.tokenizer.max_length)?;
        let (train_split, eval_split);
        let (tr, ev) = if max_length < self.prepared.tokenizer.max_length {
            train_split = truncate(&self.prepared.train, max_length);
            eval_split = truncate(&self.prepared.eval, max_length);
            (&train_split, &eval_split)
        } else {
            (&self.prepared.train, &self.prepared.eval)
        };
        let mut on_epoch = |m: &EpochMetrics| -> Result<Verdict> {
            let r = EpochReport {
                epoch: m.epoch as u32,
                objective: m.eval_accuracy,
                train_loss: m.train_loss,
                eval_loss: m.eval_loss,
                eval_accuracy: m.eval_accuracy,
                seconds: m.train_seconds + m.eval_seconds,
            };
            Ok(match report(&r)? {
                StudyVerdict::Continue => Verdict::Continue,
                StudyVerdict::Prune => Verdict::Stop,
            })
        };
        let result = train(&mut model, tr, ev, &cfg, &NoProgress, &mut on_epoch)?;
        Ok(result.objective)
    }
}

pub fn run_search(args: &SearchArgs, out: &mut dyn Write) -> Result<()> {
    resolve_device(args.device)?;
    let base = args.hyper.train_config();
    base.validate()?;
    args.study.check()?;
    // Data and weights before the database: bad input must not leave a new, empty study behind.
    let mut prepared = prepare(&args.data)?;
    args.hyper.apply_dropout(&mut prepared.config)?;
    let (initial, report) = initial_model(&args.data, &prepared, base.seed)?;
    let mut study = args.study.prepare()?;
    for w in &study.warnings {
        eprintln!("note: {w}");
    }
    if !report.initialised.is_empty() {
        eprintln!("note: newly initialised (not in the checkpoint): {}", report.initialised.join(", "));
    }
    eprintln!(
        "study {:?} in {}: {} train / {} eval examples; {} trials wanted",
        args.study.study_name,
        args.study.storage,
        prepared.train.len(),
        prepared.eval.len(),
        args.study.n_trials
    );
    let mut runner = CpuTrialRunner { prepared: &prepared, initial, base };
    let mut progress = LineProgress { out: std::io::stderr(), n_trials: args.study.n_trials };
    let outcome = run_study(
        &mut study.storage,
        &study.study,
        &study.space,
        study.sampler.as_mut(),
        study.pruner.as_mut(),
        &study.options,
        &mut runner,
        &mut progress,
    )?;
    match &outcome.best {
        Some(best) => writeln!(
            out,
            "best trial {}: value {} params {}",
            best.number,
            best.value().map(|v| format!("{v:.4}")).unwrap_or_default(),
            best.param_set().to_py_json()
        )?,
        None => writeln!(out, "no completed trial yet")?,
    }
    Ok(())
}
