//! The `train` and `predict` commands: argument definitions and what each does. `main.rs` only
//! parses and reports errors.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::device::{Device, checked_device, resolve_device};
use crate::model::BertModel;
use crate::model::export::export_model;
use crate::model::files::ModelFiles;
use crate::pipeline::{ModelDataArgs, initial_model, prepare};
use crate::train::{BestBy, EpochMetrics, Objective, Progress, TrainConfig, Verdict, train};
use crate::trial_array::schedule::{ArrayTrial, DropoutProbs, train_one};

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
        Bar { bar }
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        self.bar.reset();
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_message(what.to_string());
    }
    fn advance(&self, n: u64, loss: f64) {
        self.bar.set_prefix(format!("{loss:.4}"));
        self.bar.inc(n);
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
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
fn best_trial_params(storage_url: &str, study_name: &str) -> Result<(u64, f64, crate::study::ParamSet)> {
    let mut storage = crate::study::storage::Storage::open_existing(storage_url)?;
    let study = storage.load_study(study_name)?;
    let Some(best) = storage.best_trial(&study)? else {
        bail!("--from-study {study_name}: the study has no COMPLETE trial yet");
    };
    Ok((best.number, best.value().unwrap_or(f64::NAN), best.param_set()))
}

pub fn run_train(args: &TrainArgs, out: &mut dyn Write) -> Result<()> {
    let device = resolve_device(args.device)?;
    let mut cfg = args.hyper.train_config();
    cfg.validate()?;
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
    let (mut model, report) = initial_model(&args.data, &prepared, cfg.seed)?;
    let device = checked_device(args.device, device, model.config.head_size())?;
    let mut study_info = serde_json::Value::Null;
    if let Some((name, (number, value, params))) = &from_study {
        let max_length = prepared.tokenizer.max_length;
        let (c, m, trial_max_length) = crate::search_cmd::apply_params(&cfg, &model, params, max_length)?;
        if trial_max_length != max_length {
            bail!(
                "--from-study: the best trial used max_length {trial_max_length}; pass --max-length {trial_max_length}"
            );
        }
        (cfg, model) = (c, m);
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
        "{} train / {} eval examples, {} labels ({}), {:.0} tokens per train example on average; prepared in {:.1}s",
        prepared.train.len(),
        prepared.eval.len(),
        prepared.label_names.len(),
        prepared.label_names.join(", "),
        prepared.train.tokens() as f64 / prepared.train.len().max(1) as f64,
        t0.elapsed().as_secs_f64()
    );
    let bar = Bar::new(args.quiet);
    let json_mode = args.json;
    let mut on_epoch = |m: &EpochMetrics| -> Result<Verdict> {
        if !json_mode {
            print_epoch(out, m)?;
        }
        Ok(Verdict::Continue)
    };
    let result = match device {
        Device::Cuda => {
            // One slot of the trial array, micro-batch = batch size: train()'s computation.
            let max_len = prepared.tokenizer.max_length;
            let mut backend =
                crate::cuda::array_ops::cuda_array_backend(&model.config, cfg.batch_size, max_len, 1)?;
            let trial = ArrayTrial {
                key: 0,
                cfg: cfg.clone(),
                initial_params: model.params.clone(),
                dropout: DropoutProbs::from_config(&model.config),
                dropout_stream: 0,
                train: Arc::new(prepared.train.clone()),
                eval: Arc::new(prepared.eval.clone()),
            };
            let (result, params) = train_one(&mut backend, trial, cfg.batch_size, &mut on_epoch)?;
            model.params = params;
            result
        }
        _ => train(&mut model, &prepared.train, &prepared.eval, &cfg, &bar, &mut on_epoch)?,
    };
    let metrics = json!({
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "objective": result.objective,
        "train_config": cfg,
        "model": args.data.model,
        "dataset": args.data.dataset,
        "train_examples": prepared.train.len(),
        "eval_examples": prepared.eval.len(),
        "device": if device == Device::Cuda { "cuda" } else { "cpu" },
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

/// `hpo-gpu predict`: classify texts with a saved model.
#[derive(Clone, Debug, clap::Args)]
pub struct PredictArgs {
    /// Model folder (or Hub id) with a classification head.
    #[arg(long)]
    pub model: String,
    /// Texts to classify.
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// Tokens per text after truncation (default: 512, or the model's limit if lower).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run_predict(args: &PredictArgs, out: &mut dyn Write) -> Result<()> {
    let files = ModelFiles::resolve(&args.model)?;
    if files.weights().is_none() {
        bail!(
            "{}: no model.safetensors or pytorch_model.bin; predict needs trained weights (hpo-gpu train --output DIR writes them)",
            files.origin
        );
    }
    let config = crate::config::BertConfig::from_file(&files.config)?;
    let max_length = args.max_length.unwrap_or(512.min(config.max_position_embeddings));
    if max_length > config.max_position_embeddings {
        bail!("--max-length {max_length} exceeds max_position_embeddings {}", config.max_position_embeddings);
    }
    let tokenizer = crate::data::tokenize::TextTokenizer::load(&files, None, max_length)?;
    let origin = files.weights().map(|w| w.display().to_string()).unwrap_or_default();
    let (model, report) = BertModel::from_tensors(&config, files.load_tensors()?, &origin, 0)?;
    if report.initialised.iter().any(|n| n.starts_with("classifier.")) {
        bail!("{}: has no trained classifier (classifier.weight is missing); train it first", files.origin);
    }
    let texts: Vec<&str> = args.texts.iter().map(|s| s.as_str()).collect();
    let ids = tokenizer.encode_batch(&texts).context("tokenizing the texts")?;
    let split = crate::data::batch::TokenizedSplit { labels: vec![0; ids.len()], ids };
    let (logits, _) = crate::train::predict(&model, &split, 32)?;
    let nl = config.num_labels;
    for (text, row) in args.texts.iter().zip(logits.chunks_exact(nl)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = row.iter().map(|v| ((v - max) as f64).exp()).collect();
        let sum: f64 = exps.iter().sum();
        let probs: Vec<f64> = exps.iter().map(|e| e / sum).collect();
        let label = &config.label_names[crate::train::argmax(row)];
        if args.json {
            let p: serde_json::Map<String, serde_json::Value> =
                config.label_names.iter().zip(&probs).map(|(n, p)| (n.clone(), json!(p))).collect();
            writeln!(out, "{}", json!({"text": text, "label": label, "probabilities": p, "logits": row}))?;
        } else {
            let p: Vec<String> =
                config.label_names.iter().zip(&probs).map(|(n, p)| format!("{n} {p:.4}")).collect();
            writeln!(out, "{label}\t{}\t{}", p.join("  "), text)?;
        }
    }
    Ok(())
}
