//! `hpo-gpu predict`: classify texts with a saved model.

use std::io::Write;

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::model::BertModel;
use crate::model::files::ModelFiles;

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
