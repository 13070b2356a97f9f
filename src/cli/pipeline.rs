//! From command-line choices to a ready model and tokenized splits: resolve the model files,
//! load the config, tokenizer and weights, load the dataset splits, take the HF-exact shuffled
//! subsets and tokenize them. Shared by `train`, `search` and `predict`.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::config::BertConfig;
use crate::data::batch::TokenizedSplit;
use crate::data::source::{ColumnSpec, Dataset, load_split, shuffled_subset};
use crate::data::tokenize::TextTokenizer;
use crate::model::files::ModelFiles;
use crate::model::{BertModel, LoadReport};

/// Where the model and data come from and how they are cut (the flags `train` and `search`
/// share).
#[derive(Clone, Debug, clap::Args, serde::Serialize)]
pub struct ModelDataArgs {
    /// Model: a local directory (config.json, model.safetensors or pytorch_model.bin, tokenizer)
    /// or a Hugging Face Hub id, resolved through the HF cache (HF_HUB_OFFLINE=1 honoured).
    #[arg(long, default_value = "prajjwal1/bert-tiny")]
    pub model: String,
    /// Start from random weights (transformers' init) instead of the checkpoint's; the model
    /// folder then needs only config.json and a tokenizer.
    #[arg(long)]
    pub random_init: bool,
    /// Tokenizer to use instead of the model's: a tokenizer.json, a WordPiece vocab.txt
    /// (lower-casing as the tokenizer_config.json beside it or the model's says), or a folder
    /// holding either.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Dataset: `imdb` (stanfordnlp/imdb), another Hub dataset id, a local folder holding
    /// `<split>` files (.jsonl/.csv/.parquet, optionally .gz), or one local file.
    #[arg(long, default_value = "imdb")]
    pub dataset: String,
    /// Dataset for evaluation when it is not the `--eval-split` of `--dataset`.
    #[arg(long)]
    pub eval_dataset: Option<String>,
    #[arg(long, default_value = "train")]
    pub train_split: String,
    #[arg(long, default_value = "test")]
    pub eval_split: String,
    #[arg(long, default_value = "text")]
    pub text_column: String,
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Class names in id order (e.g. `neg,pos`) for string labels; default: from the data.
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Training examples: the first N of the split shuffled with --data-seed, as
    /// `shuffle(seed).select(range(N))` in HF datasets (0 = all).
    #[arg(long, default_value_t = 2500)]
    pub train_samples: usize,
    /// Evaluation examples, taken the same way (0 = all).
    #[arg(long, default_value_t = 1000)]
    pub eval_samples: usize,
    /// Seed of the subset shuffle (HF `Dataset.shuffle(seed=…)`).
    #[arg(long, default_value_t = 42)]
    pub data_seed: u64,
    /// Tokens per example after truncation ([CLS] and [SEP] included).
    #[arg(long, default_value_t = 512)]
    pub max_length: usize,
}

pub struct Prepared {
    pub files: ModelFiles,
    pub config: BertConfig,
    pub tokenizer: TextTokenizer,
    pub train: TokenizedSplit,
    pub eval: TokenizedSplit,
    pub label_names: Vec<String>,
}

fn subset(ds: Dataset, seed: u64, n: usize) -> Result<Dataset> {
    if n == 0 { Ok(ds) } else { shuffled_subset(&ds, seed, n) }
}

/// Tokenizes every text of `ds`.
pub fn tokenize(tokenizer: &TextTokenizer, ds: &Dataset) -> Result<TokenizedSplit> {
    let texts: Vec<&str> = ds.examples.iter().map(|e| e.text.as_str()).collect();
    let ids = tokenizer.encode_batch(&texts)?;
    Ok(TokenizedSplit { ids, labels: ds.examples.iter().map(|e| e.label).collect() })
}

/// Loads config and tokenizer and checks they agree with each other and with `max_length`.
pub fn load_config_and_tokenizer(args: &ModelDataArgs) -> Result<(ModelFiles, BertConfig, TextTokenizer)> {
    let files = ModelFiles::resolve(&args.model)?;
    let config = BertConfig::from_file(&files.config)?;
    if args.max_length > config.max_position_embeddings {
        bail!(
            "--max-length {} exceeds the model's max_position_embeddings {} ({})",
            args.max_length,
            config.max_position_embeddings,
            files.config.display()
        );
    }
    let tokenizer = TextTokenizer::load(&files, args.tokenizer.as_deref(), args.max_length)?;
    if tokenizer.id_bound() > config.vocab_size {
        bail!(
            "{}: the tokenizer produces token ids up to {} but {} has vocab_size {} (tokenizer and model do not match)",
            tokenizer.origin,
            tokenizer.id_bound() - 1,
            files.config.display(),
            config.vocab_size
        );
    }
    Ok((files, config, tokenizer))
}

/// Everything `train` and `search` need except the weights (each trial loads its own).
pub fn prepare(args: &ModelDataArgs) -> Result<Prepared> {
    let (files, mut config, tokenizer) = load_config_and_tokenizer(args)?;
    if !args.random_init && files.weights().is_none() {
        bail!(
            "{}: no model.safetensors or pytorch_model.bin (use --random-init to start from the config alone)",
            files.origin
        );
    }
    let columns = ColumnSpec { text: args.text_column.clone(), label: Some(args.label_column.clone()) };
    let train_ds = load_split(&args.dataset, &args.train_split, &columns, args.labels.as_deref())?;
    let label_names = train_ds.label_names.clone();
    if label_names.len() < 2 {
        bail!(
            "{}: the training data has {} class(es); classification needs at least 2",
            train_ds.origin,
            label_names.len()
        );
    }
    let eval_source = args.eval_dataset.as_deref().unwrap_or(&args.dataset);
    let eval_ds = load_split(eval_source, &args.eval_split, &columns, Some(&label_names)).map_err(|e| {
        // The reader names the flag `--dataset` when the source is not found; here it came from
        // `--eval-dataset`.
        let message = format!("{e:#}");
        match (&args.eval_dataset, message.strip_prefix(&format!("--dataset {eval_source}:"))) {
            (Some(_), Some(rest)) => anyhow::anyhow!("--eval-dataset {eval_source}:{rest}"),
            _ => e,
        }
    })?;
    let train_ds = subset(train_ds, args.data_seed, args.train_samples)?;
    let eval_ds = subset(eval_ds, args.data_seed, args.eval_samples)?;
    config.set_labels(&label_names);
    let train = tokenize(&tokenizer, &train_ds)?;
    let eval = tokenize(&tokenizer, &eval_ds)?;
    Ok(Prepared { files, config, tokenizer, train, eval, label_names })
}

/// The starting weights of one model (a trial or a final training run).
pub fn initial_model(args: &ModelDataArgs, p: &Prepared, seed: u64) -> Result<(BertModel, LoadReport)> {
    if args.random_init {
        return Ok((BertModel::random_init(&p.config, seed), LoadReport::default()));
    }
    let origin = p.files.weights().map(|w| w.display().to_string()).unwrap_or_else(|| p.files.origin.clone());
    BertModel::from_tensors(&p.config, p.files.load_tensors()?, &origin, seed)
}
