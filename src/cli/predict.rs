//! `hpo-gpu predict`: classify texts with a saved model — given as arguments, one per line on
//! standard input, or a data file's text column — as text, JSON lines or CSV, in packed batches.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::data::batch::TokenizedSplit;
use crate::data::source::read_texts as read_data_texts;
use crate::model::BertModel;
use crate::model::files::ModelFiles;

/// `hpo-gpu predict`: classify texts with a saved model.
#[derive(Clone, Debug, clap::Args)]
pub struct PredictArgs {
    /// Model folder (or Hub id) with a classification head.
    #[arg(long)]
    pub model: String,
    /// Texts to classify (default: --input, else standard input, one text per line).
    pub texts: Vec<String>,
    /// A data file of texts to classify: .jsonl/.json, .csv or .parquet (gzip or not), as
    /// --dataset reads, with a text column (--text-column).
    #[arg(long, conflicts_with = "texts")]
    pub input: Option<PathBuf>,
    /// The column of --input holding the texts.
    #[arg(long, default_value = "text", requires = "input")]
    pub text_column: String,
    /// Tokens per text after truncation (default: 512, or the model's limit if lower).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Texts per forward pass (texts of similar length are packed together; the order of the
    /// output is the order of the input).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Print JSON lines instead of text.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV (text, label, one probability column per label) instead of text.
    #[arg(long)]
    pub csv: bool,
    /// No progress bar (it is drawn only when standard error is a terminal).
    #[arg(long)]
    pub quiet: bool,
}

/// The texts to classify: the arguments, `--input`, or standard input (one per line).
fn read_texts(args: &PredictArgs) -> Result<Vec<String>> {
    if !args.texts.is_empty() {
        return Ok(args.texts.clone());
    }
    if let Some(path) = &args.input {
        return read_data_texts(path, &args.text_column);
    }
    const NO_TEXTS: &str = "no texts to classify: give them as arguments, with --input FILE, or on standard input (one per line)";
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        bail!("{NO_TEXTS}");
    }
    let mut texts = Vec::new();
    for (i, line) in stdin.lock().lines().enumerate() {
        let line = line.with_context(|| format!("standard input: line {}", i + 1))?;
        let line = line.strip_suffix('\r').unwrap_or(&line);
        if !line.trim().is_empty() {
            texts.push(line.to_string());
        }
    }
    if texts.is_empty() {
        bail!("{NO_TEXTS}");
    }
    Ok(texts)
}

pub fn run_predict(args: &PredictArgs, out: &mut dyn Write) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
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
    let texts = read_texts(args)?;
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let ids = tokenizer.encode_batch(&refs).context("tokenizing the texts")?;
    // Longest first, so each forward pass packs texts of similar length (and the bar's rate
    // settles early); results go back to the input order.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
    let bar = if args.quiet || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(texts.len() as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} texts  {per_sec}  ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("predict");
    let nl = config.num_labels;
    let mut logits = vec![0.0f32; texts.len() * nl];
    for chunk in order.chunks(args.batch_size) {
        let split = TokenizedSplit {
            ids: chunk.iter().map(|&i| ids[i].clone()).collect(),
            labels: vec![0; chunk.len()],
        };
        let (chunk_logits, _) = crate::train::predict(&model, &split, args.batch_size)?;
        for (&i, row) in chunk.iter().zip(chunk_logits.chunks_exact(nl)) {
            logits[i * nl..(i + 1) * nl].copy_from_slice(row);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if args.csv {
        let header: Vec<String> = ["text".to_string(), "label".to_string()]
            .into_iter()
            .chain(config.label_names.iter().map(|n| format!("probability_{n}")))
            .collect();
        out.write_all(&csv_line(&header)?)?;
    }
    for (text, row) in texts.iter().zip(logits.chunks_exact(nl)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = row.iter().map(|v| ((v - max) as f64).exp()).collect();
        let sum: f64 = exps.iter().sum();
        let probs: Vec<f64> = exps.iter().map(|e| e / sum).collect();
        let label = &config.label_names[crate::train::argmax(row)];
        if args.csv {
            let record: Vec<String> = [text.clone(), label.clone()]
                .into_iter()
                .chain(probs.iter().map(|p| format!("{p}")))
                .collect();
            out.write_all(&csv_line(&record)?)?;
        } else if args.json {
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

/// One CSV record, quoted as needed, with its line end.
fn csv_line(fields: &[String]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(fields)?;
    w.into_inner().map_err(|e| anyhow::anyhow!("writing CSV: {}", e.error()))
}
