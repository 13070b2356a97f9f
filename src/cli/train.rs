//! `hpo-gpu train`: fine-tune one model — one slot of the engine — and save it in the Hugging Face
//! format; with `--from-study`, with a study's best parameters (the recipe's final model).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use serde_json::json;

use crate::cli::pipeline::{ModelDataArgs, initial_model, prepare};
use crate::device::{Device, Precision, checked_device, resolve_device, resolve_precision};
use crate::export::export_model;
use crate::train::{BestBy, Objective, TrainConfig};
use crate::trial::ParamSet;
use crate::trial::protocol::{EpochMetrics, EpochProgress, TrainResult, TrialEnd, TrialHost, Verdict};
use crate::trial_array::ArrayBackend;
use crate::trial_array::reference_backend::ReferenceBackend;
use crate::trial_array::schedule::{ArrayOptions, MicroBatch, run_array};
use crate::trial_array::setup::TrialSetup;

/// Training hyperparameters (transformers' `TrainingArguments` names and defaults).
#[derive(Clone, Debug, clap::Args, serde::Serialize)]
pub struct HyperArgs {
    #[arg(long, default_value_t = 5e-5)]
    pub learning_rate: f64,
    /// Examples per optimizer step (`per_device_train_batch_size`).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Examples per evaluation forward pass (does not change results).
    #[arg(long, default_value_t = 32)]
    pub eval_batch_size: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// Warm-up steps (overrides --warmup-ratio when > 0).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// Seed of the example order, dropout masks and newly initialised weights.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Dropout on hidden states (default: the model config's hidden_dropout_prob).
    #[arg(long)]
    pub hidden_dropout: Option<f64>,
    /// Dropout on attention probabilities (default: the config's attention_probs_dropout_prob).
    #[arg(long)]
    pub attention_dropout: Option<f64>,
    /// Which epoch's weights to keep: lowest eval loss (Trainer's default) or highest accuracy.
    #[arg(long, value_enum, default_value_t = BestBy::Loss)]
    pub best_by: BestBy,
    /// The reported objective: the last epoch's eval accuracy (Trainer's) or the kept epoch's.
    #[arg(long, value_enum, default_value_t = Objective::LastEpoch)]
    pub objective: Objective,
}

impl HyperArgs {
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            learning_rate: self.learning_rate,
            batch_size: self.batch_size,
            eval_batch_size: self.eval_batch_size,
            weight_decay: self.weight_decay,
            epochs: self.epochs,
            warmup_ratio: self.warmup_ratio,
            warmup_steps: self.warmup_steps,
            max_grad_norm: self.max_grad_norm,
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_epsilon: self.adam_epsilon,
            seed: self.seed,
            best_by: self.best_by,
            objective: self.objective,
        }
    }

    /// Applies the dropout overrides to a model config.
    pub fn apply_dropout(&self, config: &mut crate::config::BertConfig) -> Result<()> {
        for (flag, v) in
            [("--hidden-dropout", self.hidden_dropout), ("--attention-dropout", self.attention_dropout)]
        {
            if let Some(p) = v
                && !(0.0..1.0).contains(&p)
            {
                bail!("{flag} must be in [0, 1), got {p}");
            }
        }
        if let Some(p) = self.hidden_dropout {
            config.hidden_dropout_prob = p;
        }
        if let Some(p) = self.attention_dropout {
            config.attention_probs_dropout_prob = p;
        }
        Ok(())
    }
}

/// `hpo-gpu train`: fine-tune one model and save it in the Hugging Face format.
#[derive(Clone, Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: ModelDataArgs,
    #[command(flatten)]
    pub hyper: HyperArgs,
    /// Output folder (config.json, model.safetensors, tokenizer, training_metrics.json).
    #[arg(long, default_value = "./final_model")]
    pub output: PathBuf,
    /// Train with the hyperparameters of this study's best trial (the recipe's final model);
    /// they override the corresponding flags.
    #[arg(long)]
    pub from_study: Option<String>,
    /// The study's database (with --from-study).
    #[arg(long, default_value = "sqlite:///optuna_trials.db")]
    pub storage: String,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// fp32, or bf16 for the linear layers' products on CPUs with AMX or AVX512_BF16 (oneDNN;
    /// weights and optimizer state stay fp32).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Print the final metrics as JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// A progress bar on stderr: examples/s and ETA per epoch.
pub struct Bar {
    bar: indicatif::ProgressBar,
    /// The epoch the bar shows.
    epoch: usize,
}

impl Bar {
    pub fn new(quiet: bool) -> Self {
        let bar = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(0) };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>12} [{bar:30}] {pos}/{len} examples  {per_sec}  ETA {eta}  loss {prefix}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Bar { bar, epoch: 0 }
    }

    pub fn show(&mut self, p: &EpochProgress) {
        if p.epoch != self.epoch {
            self.epoch = p.epoch;
            self.bar.reset();
            self.bar.set_length(p.examples as u64);
            self.bar.set_message(format!("epoch {}/{}", p.epoch, p.epochs));
        }
        self.bar.set_prefix(format!("{:.4}", p.loss));
        self.bar.set_position(p.done as u64);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `hpo-gpu train`'s side of the engine: one trial, its epochs printed and its progress drawn.
struct TrainHost<'a> {
    params: Option<ParamSet>,
    out: &'a mut dyn Write,
    json: bool,
    bar: Bar,
    end: Option<TrialEnd>,
}

impl TrialHost for TrainHost<'_> {
    fn next_trials(&mut self, _free_slots: usize, _idle: bool) -> Result<Vec<(u64, ParamSet)>> {
        Ok(self.params.take().map(|p| (0, p)).into_iter().collect())
    }

    fn on_epoch(&mut self, _number: u64, metrics: &EpochMetrics) -> Result<Verdict> {
        self.bar.finish();
        if !self.json {
            print_epoch(self.out, metrics)?;
        }
        Ok(Verdict::Continue)
    }

    fn on_end(&mut self, _number: u64, end: TrialEnd) -> Result<()> {
        self.end = Some(end);
        Ok(())
    }

    fn on_progress(&mut self, _number: u64, progress: &EpochProgress) {
        self.bar.show(progress);
    }
}

pub fn print_epoch(out: &mut dyn Write, m: &EpochMetrics) -> Result<()> {
    writeln!(
        out,
        "epoch {}: train_loss {:.4}  eval_loss {:.4}  eval_accuracy {:.4}  ({:.1} train ex/s, {:.1} eval ex/s)",
        m.epoch,
        m.train_loss,
        m.eval_loss,
        m.eval_accuracy,
        m.train_examples_per_second,
        m.eval_examples_per_second
    )?;
    Ok(())
}

/// The best COMPLETE trial of a stored study: its number and parameters.
fn best_trial_params(storage_url: &str, study_name: &str) -> Result<(u64, f64, crate::trial::ParamSet)> {
    let mut storage = crate::study::storage::Storage::open_existing(storage_url)?;
    let study = storage.load_study(study_name)?;
    let Some(best) = storage.best_trial(&study)? else {
        bail!("--from-study {study_name}: the study has no COMPLETE trial yet");
    };
    Ok((best.number, best.value().unwrap_or(f64::NAN), best.param_set()))
}

pub fn run_train(args: &TrainArgs, out: &mut dyn Write) -> Result<()> {
    let device = resolve_device(args.device)?;
    resolve_precision(args.precision, device)?;
    let base = args.hyper.train_config();
    base.validate()?;
    // Checked again on export; here so a training run is not spent before the export refuses.
    if args.output.exists() && !args.output.is_dir() {
        bail!("--output {}: exists and is not a directory", args.output.display());
    }
    let from_study = match &args.from_study {
        Some(name) => Some((name, best_trial_params(&args.storage, name)?)),
        None => None,
    };
    let t0 = Instant::now();
    let mut prepared = prepare(&args.data)?;
    args.hyper.apply_dropout(&mut prepared.config)?;
    let (model, report) = initial_model(&args.data, &prepared, base.seed)?;
    let device = checked_device(args.device, device, model.config.head_size())?;
    let (train_examples, eval_examples) = (prepared.train.len(), prepared.eval.len());
    let mean_tokens = prepared.train.tokens() as f64 / train_examples.max(1) as f64;
    let max_length = prepared.tokenizer.max_length;
    let mut setup = TrialSetup::new(model, base, prepared.train, prepared.eval, max_length);
    let params = from_study.as_ref().map(|(_, (_, _, params))| params.clone()).unwrap_or_default();
    // The trial's settings: the flags, overridden by the study's best parameters.
    let settings = setup.settings(&params)?;
    let mut study_info = serde_json::Value::Null;
    if let Some((name, (number, value, params))) = &from_study {
        if settings.max_length != max_length {
            bail!(
                "--from-study: the best trial used max_length {}; pass --max-length {}",
                settings.max_length,
                settings.max_length
            );
        }
        eprintln!(
            "training with study {name:?}'s best trial {number} (value {value:.4}): {}",
            params.to_py_json()
        );
        study_info = json!({"study_name": name, "storage": args.storage, "trial_number": number,
                            "trial_value": value, "params": serde_json::from_str::<serde_json::Value>(&params.to_py_json())?});
    }
    if !report.initialised.is_empty() {
        eprintln!("note: newly initialised (not in the checkpoint): {}", report.initialised.join(", "));
    }
    eprintln!(
        "{train_examples} train / {eval_examples} eval examples, {} labels ({}), {mean_tokens:.0} tokens per train example on average; prepared in {:.1}s",
        prepared.label_names.len(),
        prepared.label_names.join(", "),
        t0.elapsed().as_secs_f64()
    );
    // One slot of the engine, each optimizer batch in one pass.
    let cfg = settings.cfg;
    let config = &settings.config;
    let mut backend: Box<dyn ArrayBackend> = match device {
        Device::Cuda => Box::new(crate::trial_array::device::gpu::cuda_array_backend(
            config,
            cfg.batch_size,
            max_length,
            1,
        )?),
        _ => Box::new(ReferenceBackend::new(config, 1)),
    };
    let mut host = TrainHost {
        params: Some(params),
        out: &mut *out,
        json: args.json,
        bar: Bar::new(args.quiet),
        end: None,
    };
    let options = ArrayOptions { micro_batch: MicroBatch::WholeBatch };
    run_array(backend.as_mut(), &mut setup, &mut host, &options)?;
    let (result, params): (TrainResult, Vec<f32>) = match host.end {
        Some(TrialEnd::Finished { result, params }) => (result, params),
        Some(TrialEnd::Failed { reason } | TrialEnd::Evicted { reason }) => bail!("{reason}"),
        None => bail!("the engine ended without training the model"),
    };
    let mut model = setup.initial;
    model.config = settings.config;
    model.params = params;
    let metrics = json!({
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "objective": result.objective,
        "train_config": cfg,
        "model": args.data.model,
        "dataset": args.data.dataset,
        "train_examples": train_examples,
        "eval_examples": eval_examples,
        "device": if device == Device::Cuda { "cuda" } else { "cpu" },
        "precision": args.precision,
        // The library behind the CPU's fp32 products (benchmarks compare them).
        "gemm": (device == Device::Cpu).then(crate::cpu::blas::gemm_library_name),
        "study": study_info,
    });
    export_model(
        &model,
        &prepared.tokenizer,
        &prepared.files,
        &args.output,
        &[("training_metrics.json", metrics.clone())],
    )?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&metrics)?)?;
    } else {
        writeln!(
            out,
            "best epoch {} kept; objective (eval accuracy) {:.4}; saved to {}",
            result.best_epoch,
            result.objective,
            args.output.display()
        )?;
    }
    Ok(())
}
