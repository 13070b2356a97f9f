//! `hpo-gpu search`: the recipe's study. Samples hyperparameters (study engine in `study`/`search`),
//! trains each trial with the CPU reference (re-creating the model from the same checkpoint and
//! seed for every trial, as Trainer's `model_init` does) and stores everything in Optuna's schema.
//! With `--slots T` (T > 1) trials train T at once in a trial array (`trial_array`) through
//! `run_study_array`; on the CPU backend today, the GPU backend plugs in behind the same trait.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use anyhow::{Result, bail};

use crate::cli::HyperArgs;
use crate::data::batch::TokenizedSplit;
use crate::device::{Device, checked_device, resolve_device};
use crate::model::BertModel;
use crate::pipeline::{ModelDataArgs, Prepared, initial_model, prepare};
use crate::search::distributions::Distribution;
use crate::search::space::SearchSpace;
use crate::study::ParamSet;
use crate::study::cli::SearchStudyArgs;
use crate::study::driver::{
    ConcurrentTrialRunner, EpochReport, LineProgress, TrialHost, TrialOutcome, TrialRunner,
    Verdict as StudyVerdict, run_study, run_study_array,
};
use crate::train::{EpochMetrics, NoProgress, TrainConfig, Verdict, train};
use crate::trial_array::cpu::CpuArrayBackend;
use crate::trial_array::schedule::{ArrayHost, ArrayOptions, ArrayTrial, DropoutProbs, TrialEnd, run_array};
use crate::trial_array::{ArrayBackend, micro_batch_size};

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
    /// Trials trained at once in a trial array (1: one after another, as the recipe does).
    #[arg(long, default_value_t = 1)]
    pub slots: usize,
    /// Examples per trial per trial-array tick; must divide every batch size the search can
    /// choose (default: the gcd of 16 and those batch sizes).
    #[arg(long)]
    pub micro_batch: Option<usize>,
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

/// What a study stores of an epoch: the objective is the epoch's eval accuracy.
fn epoch_report(m: &EpochMetrics) -> EpochReport {
    EpochReport {
        epoch: m.epoch as u32,
        objective: m.eval_accuracy,
        train_loss: m.train_loss,
        eval_loss: m.eval_loss,
        eval_accuracy: m.eval_accuracy,
        seconds: m.train_seconds + m.eval_seconds,
    }
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
            Ok(match report(&epoch_report(m))? {
                StudyVerdict::Continue => Verdict::Continue,
                StudyVerdict::Prune => Verdict::Stop,
            })
        };
        let result = train(&mut model, tr, ev, &cfg, &NoProgress, &mut on_epoch)?;
        Ok(result.objective)
    }
}

/// What every trial of a search starts from.
pub struct TrialBase<'a> {
    pub prepared: &'a Prepared,
    /// The model every trial starts from.
    pub initial: BertModel,
    /// Training settings the search space does not cover.
    pub base: TrainConfig,
}

/// Trains a study's trials many at once in a trial array (`--slots`), on any [`ArrayBackend`].
pub struct ArrayTrialRunner<'a> {
    pub trials: TrialBase<'a>,
    pub backend: Box<dyn ArrayBackend + 'a>,
    pub options: ArrayOptions,
}

/// Adapts the study driver's [`TrialHost`] to the scheduler's [`ArrayHost`].
struct StudyArrayHost<'r, 'h> {
    runner: &'r TrialBase<'r>,
    host: &'h mut dyn TrialHost,
    /// Train and eval splits per max length (a space may tune `max_length`).
    splits: HashMap<usize, (Arc<TokenizedSplit>, Arc<TokenizedSplit>)>,
}

impl StudyArrayHost<'_, '_> {
    fn trial(&mut self, number: u64, params: &ParamSet) -> Result<ArrayTrial> {
        let r = self.runner;
        let limit = r.prepared.tokenizer.max_length;
        let (cfg, model, max_length) = apply_params(&r.base, &r.initial, params, limit)?;
        let (train, eval) = self
            .splits
            .entry(max_length)
            .or_insert_with(|| {
                if max_length < limit {
                    (
                        Arc::new(truncate(&r.prepared.train, max_length)),
                        Arc::new(truncate(&r.prepared.eval, max_length)),
                    )
                } else {
                    (Arc::new(r.prepared.train.clone()), Arc::new(r.prepared.eval.clone()))
                }
            })
            .clone();
        Ok(ArrayTrial {
            key: number,
            cfg,
            dropout: DropoutProbs::from_config(&model.config),
            initial_params: model.params,
            // train()'s stream: a trial draws the same dropout masks in the array as alone.
            dropout_stream: 0,
            train,
            eval,
        })
    }
}

impl ArrayHost for StudyArrayHost<'_, '_> {
    fn next_trials(&mut self, free_slots: usize, array_idle: bool) -> Result<Vec<ArrayTrial>> {
        let mut out = Vec::new();
        for (number, params) in self.host.next_trials(free_slots, array_idle)? {
            match self.trial(number, &params) {
                Ok(t) => out.push(t),
                Err(e) => self.host.finish(number, TrialOutcome::Failed(format!("{e:#}")))?,
            }
        }
        Ok(out)
    }

    fn on_epoch(&mut self, key: u64, m: &EpochMetrics) -> Result<Verdict> {
        Ok(match self.host.report(key, &epoch_report(m))? {
            StudyVerdict::Continue => Verdict::Continue,
            StudyVerdict::Prune => Verdict::Stop,
        })
    }

    fn on_end(&mut self, key: u64, end: TrialEnd) -> Result<()> {
        let outcome = match end {
            TrialEnd::Finished { result, .. } => TrialOutcome::Value(result.objective),
            TrialEnd::Failed { reason } => TrialOutcome::Failed(reason),
            TrialEnd::Evicted { reason } => TrialOutcome::Evicted(reason),
        };
        self.host.finish(key, outcome)
    }
}

impl ConcurrentTrialRunner for ArrayTrialRunner<'_> {
    fn run_trials(&mut self, host: &mut dyn TrialHost) -> Result<()> {
        let ArrayTrialRunner { trials, backend, options } = self;
        let mut adapter = StudyArrayHost { runner: trials, host, splits: HashMap::new() };
        run_array(backend.as_mut(), &mut adapter, options)?;
        Ok(())
    }
}

/// The batch sizes a search over `space` (or `base` when the space does not tune it) can use.
pub fn space_batch_sizes(space: &SearchSpace, base: &TrainConfig) -> Result<Vec<usize>> {
    let name = "per_device_train_batch_size";
    let as_size = |v: f64| -> Result<usize> {
        if v.fract() != 0.0 || v < 1.0 {
            bail!("{name} choice {v} is not a positive integer");
        }
        Ok(v as usize)
    };
    match space.get(name) {
        None => Ok(vec![base.batch_size]),
        Some(Distribution::Categorical(c)) => c
            .choices
            .iter()
            .map(|v| as_size(v.as_f64().ok_or_else(|| anyhow::anyhow!("{name} choice {v} is not a number"))?))
            .collect(),
        // Every value low, low+step, ... : their gcd is gcd(low, step).
        Some(Distribution::Int(d)) if !d.log && d.high > d.low => {
            Ok(vec![as_size(d.low as f64)?, as_size(d.step as f64)?])
        }
        Some(Distribution::Int(d)) => (d.low..=d.high).map(|v| as_size(v as f64)).collect(),
        Some(Distribution::Float(_)) => bail!("{name} must be an int or categorical parameter, not a float"),
    }
}

pub fn run_search(args: &SearchArgs, out: &mut dyn Write) -> Result<()> {
    let device = resolve_device(args.device)?;
    if args.slots == 0 {
        bail!("--slots must be at least 1");
    }
    // On the GPU every search runs through the trial array; on the CPU only with --slots > 1.
    let use_array = args.slots > 1 || device == Device::Cuda;
    if !use_array && args.micro_batch.is_some() {
        bail!("--micro-batch applies to the trial array: use it with --slots 2 or more");
    }
    let base = args.hyper.train_config();
    base.validate()?;
    args.study.check()?;
    // Checked before loading data: a bad --micro-batch should fail at once.
    let micro_batch = match use_array {
        false => 0,
        true => {
            micro_batch_size(args.micro_batch, &space_batch_sizes(&args.study.search_space()?.0, &base)?)?
        }
    };
    // Data and weights before the database: bad input must not leave a new, empty study behind.
    let mut prepared = prepare(&args.data)?;
    args.hyper.apply_dropout(&mut prepared.config)?;
    let (initial, report) = initial_model(&args.data, &prepared, base.seed)?;
    let device = checked_device(args.device, device, initial.config.head_size())?;
    // A GPU that failed its self-check under --device auto leaves the search on the CPU.
    let use_array = args.slots > 1 || device == Device::Cuda;
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
    let mut progress = LineProgress { out: std::io::stderr(), n_trials: args.study.n_trials };
    let outcome = if use_array {
        let backend: Box<dyn ArrayBackend> = if device == Device::Cuda {
            // T from free device memory: --slots, or enough for the whole study.
            let wanted = if args.slots > 1 { args.slots } else { args.study.n_trials.min(256) as usize };
            let max_len = prepared.tokenizer.max_length;
            Box::new(crate::cuda::array_ops::cuda_array_backend(
                &initial.config,
                micro_batch,
                max_len,
                wanted,
            )?)
        } else {
            Box::new(CpuArrayBackend::new(&initial.config, args.slots))
        };
        eprintln!(
            "trial array on {}: {} slots, micro-batch {micro_batch}",
            backend.describe(),
            backend.slots()
        );
        let options = ArrayOptions { micro_batch };
        let trials = TrialBase { prepared: &prepared, initial, base };
        let mut runner = ArrayTrialRunner { trials, backend, options };
        run_study_array(
            &mut study.storage,
            &study.study,
            &study.space,
            study.sampler.as_mut(),
            study.pruner.as_mut(),
            &study.options,
            &mut runner,
            &mut progress,
        )?
    } else {
        let mut runner = CpuTrialRunner { prepared: &prepared, initial, base };
        run_study(
            &mut study.storage,
            &study.study,
            &study.space,
            study.sampler.as_mut(),
            study.pruner.as_mut(),
            &study.options,
            &mut runner,
            &mut progress,
        )?
    };
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
