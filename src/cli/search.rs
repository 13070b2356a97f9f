//! `hpo-gpu search`: the recipe's study. Samples hyperparameters (`study`, `search`), trains the
//! trials in the engine (`trial_array`: one at a time, or `--slots` at once; re-creating the model
//! from the same checkpoint and seed for every trial, as Trainer's `model_init` does) on the CPU
//! reference or the GPU, and stores everything in Optuna's schema.

use std::io::Write;

use anyhow::{Result, bail};

use crate::cli::pipeline::{ModelDataArgs, initial_model, prepare};
use crate::cli::study::SearchStudyArgs;
use crate::cli::train::HyperArgs;
use crate::device::{Device, Precision, checked_device, resolve_device, resolve_precision};
use crate::distributions::Distribution;
use crate::search::space::SearchSpace;
use crate::study::driver::{LineProgress, run_study};
use crate::train::TrainConfig;
use crate::trial_array::reference_backend::ReferenceBackend;
use crate::trial_array::schedule::{ArrayOptions, Engine, MicroBatch};
use crate::trial_array::setup::TrialSetup;
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
    /// fp32, or bf16 for the linear layers' products on CPUs with AMX or AVX512_BF16 (oneDNN;
    /// weights and optimizer state stay fp32).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Trials trained at once in a trial array (1: one after another, as the recipe does).
    #[arg(long, default_value_t = 1)]
    pub slots: usize,
    /// Examples per trial per trial-array tick; must divide every batch size the search can
    /// choose (default: the gcd of 16 and those batch sizes).
    #[arg(long)]
    pub micro_batch: Option<usize>,
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
    resolve_precision(args.precision, device)?;
    if args.slots == 0 {
        bail!("--slots must be at least 1");
    }
    // A GPU array is sized by its micro-batch; on the CPU one slot trains whole batches.
    let fixed_micro_batch = args.slots > 1 || device == Device::Cuda;
    if !fixed_micro_batch && args.micro_batch.is_some() {
        bail!("--micro-batch applies to the trial array: use it with --slots 2 or more");
    }
    let base = args.hyper.train_config();
    base.validate()?;
    args.study.check()?;
    // Checked before loading data: a bad --micro-batch should fail at once.
    let micro_batch = match fixed_micro_batch {
        false => MicroBatch::WholeBatch,
        true => MicroBatch::Fixed(micro_batch_size(
            args.micro_batch,
            &space_batch_sizes(&args.study.search_space()?.0, &base)?,
        )?),
    };
    // Data and weights before the database: bad input must not leave a new, empty study behind.
    let mut prepared = prepare(&args.data)?;
    args.hyper.apply_dropout(&mut prepared.config)?;
    let (initial, report) = initial_model(&args.data, &prepared, base.seed)?;
    let device = checked_device(args.device, device, initial.config.head_size())?;
    // A GPU that failed its self-check under --device auto leaves the search on the CPU, where
    // one slot trains whole batches again.
    let micro_batch = match micro_batch {
        MicroBatch::Fixed(_) if args.slots == 1 && device != Device::Cuda && args.micro_batch.is_none() => {
            MicroBatch::WholeBatch
        }
        m => m,
    };
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
    let backend: Box<dyn ArrayBackend> = match (device, micro_batch) {
        (Device::Cuda, MicroBatch::Fixed(m)) => {
            // T from free device memory: --slots, or enough for the whole study.
            let wanted = if args.slots > 1 { args.slots } else { args.study.n_trials.min(256) as usize };
            let max_len = prepared.tokenizer.max_length;
            Box::new(crate::trial_array::device::gpu::cuda_array_backend(
                &initial.config,
                m,
                max_len,
                wanted,
            )?)
        }
        _ => Box::new(ReferenceBackend::new(&initial.config, args.slots)),
    };
    let per_tick = match micro_batch {
        MicroBatch::Fixed(m) => format!("micro-batch {m}"),
        MicroBatch::WholeBatch => "whole batches".to_string(),
    };
    let slots = match backend.slots() {
        1 => "1 slot".to_string(),
        n => format!("{n} slots"),
    };
    eprintln!("trial array on {}: {slots}, {per_tick}", backend.describe());
    let max_length = prepared.tokenizer.max_length;
    let trials = TrialSetup::new(initial, base, prepared.train, prepared.eval, max_length);
    let mut engine = Engine { backend, trials: Box::new(trials), options: ArrayOptions { micro_batch } };
    let mut progress = LineProgress { out: std::io::stderr(), n_trials: args.study.n_trials };
    let outcome = run_study(
        &mut study.storage,
        &study.study,
        &study.space,
        study.sampler.as_mut(),
        study.pruner.as_mut(),
        &study.options,
        &mut engine,
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
