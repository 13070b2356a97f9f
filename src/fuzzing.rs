//! Entry points for the `cargo fuzz` targets in `fuzz/` and for `tests/fuzz_corpus.rs`, which
//! replays the committed corpora on every `cargo test`.
//!
//! Each function feeds arbitrary bytes to one of the real loaders, in memory, and then touches
//! what was loaded the way the trainer would (converting tensors, encoding text, drawing from a
//! search space). An `Err` is the expected answer to bad input; a panic, a hang or a huge
//! allocation is a bug. Invariants that must hold for anything a loader accepts are asserted, so
//! the fuzzer reports them as crashes too.

use anyhow::Result;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::config::BertConfig;
use crate::data::source::{ColumnSpec, read_bytes};
use crate::data::tokenize::TextTokenizer;
use crate::distributions::Distribution;
use crate::model::layout::ParamLayout;
use crate::model::safetensors_io::load_safetensors_bytes;
use crate::model::tensor::{DType, RawTensor};
use crate::model::torch_bin::load_torch_state_dict_bytes;
use crate::search::sampler::random::RandomSampler;
use crate::search::space::SearchSpace;

/// Converts every floating-point tensor the way the model loader does.
fn convert_tensors(tensors: &[(String, RawTensor)]) -> Result<()> {
    for (_, tensor) in tensors {
        if matches!(tensor.dtype, DType::F64 | DType::F32 | DType::F16 | DType::BF16) {
            let values = tensor.to_f32()?;
            assert_eq!(values.len(), tensor.numel(), "to_f32 returned the wrong number of values");
        }
    }
    Ok(())
}

/// A `model.safetensors` file.
pub fn safetensors(data: &[u8]) -> Result<()> {
    convert_tensors(&load_safetensors_bytes(data, "fuzz.safetensors")?)
}

/// A `pytorch_model.bin` file (zip or legacy torch format).
pub fn torch_bin(data: &[u8]) -> Result<()> {
    convert_tensors(&load_torch_state_dict_bytes(data, "fuzz.bin")?)
}

/// A model `config.json`.
pub fn config_json(data: &[u8]) -> Result<()> {
    let config = BertConfig::from_json_bytes(data, "config.json")?;
    assert_eq!(config.label_names.len(), config.num_labels, "one name per label");
    let _ = (config.head_size(), config.classifier_dropout_prob(), config.to_export_json());
    // What `--random-init` and the checkpoint loader build next: the parameter table (offsets
    // only, no values), which a hostile config must not be able to blow up.
    let layout = ParamLayout::new(&config);
    assert!(layout.len <= 1 << 32, "an accepted config lays out {} parameters", layout.len);
    Ok(())
}

/// Text with the cases a tokenizer must handle: accents, CJK, punctuation, a special token,
/// more words than `max_length`.
const SAMPLE_TEXT: &str = "Hello, World! A naïve café — 日本語 [SEP] don't stop; ünïcödé\u{2028}end. \
                           one two three four five six seven eight nine ten eleven twelve";

/// Tokenizer files: the first byte picks the loader (even: `tokenizer.json`, odd: `vocab.txt`,
/// lower-casing when bit 1 is set), the rest is the file. A loaded tokenizer then encodes a
/// sample text, truncated to 16 tokens.
pub fn tokenizer(data: &[u8]) -> Result<()> {
    let Some((&mode, file)) = data.split_first() else { return Ok(()) };
    let max_length = 16;
    let tokenizer = if mode & 1 == 0 {
        TextTokenizer::from_tokenizer_json_bytes(file, "tokenizer.json", max_length)?
    } else {
        TextTokenizer::from_vocab_bytes(file, "vocab.txt", mode & 2 != 0, max_length)?
    };
    let ids = tokenizer.encode(SAMPLE_TEXT)?;
    assert!(ids.len() <= max_length, "{} tokens exceed max_length {max_length}", ids.len());
    let _ = (tokenizer.vocab_size(), tokenizer.id_bound());
    Ok(())
}

/// A gzip stream when the bytes start with gzip's magic number, so seeds may be either.
fn dataset_name(data: &[u8], stem_and_ext: &str) -> String {
    if data.starts_with(&[0x1f, 0x8b]) { format!("{stem_and_ext}.gz") } else { stem_and_ext.to_string() }
}

fn check_dataset(name: &str, data: &[u8]) -> Result<()> {
    let dataset = read_bytes(&dataset_name(data, name), data, &ColumnSpec::default(), None)?;
    assert!(!dataset.is_empty(), "an accepted dataset has examples");
    for example in &dataset.examples {
        assert!(example.label < dataset.num_labels(), "label {} has no name", example.label);
    }
    Ok(())
}

/// A JSON Lines (or JSON array) dataset file, optionally gzip'd.
pub fn dataset_jsonl(data: &[u8]) -> Result<()> {
    check_dataset("fuzz.jsonl", data)
}

/// A CSV dataset file, optionally gzip'd.
pub fn dataset_csv(data: &[u8]) -> Result<()> {
    check_dataset("fuzz.csv", data)
}

/// A Parquet dataset file, optionally gzip'd.
pub fn dataset_parquet(data: &[u8]) -> Result<()> {
    check_dataset("fuzz.parquet", data)
}

/// A search-space file, read as TOML and as JSON (and as Optuna's inline JSON); every space
/// accepted is then drawn from and written back to Optuna's JSON, as a study does.
pub fn search_space(data: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(data)?;
    let mut spaces = Vec::new();
    let mut errors = Vec::new();
    for parsed in [
        SearchSpace::from_toml_str(text, "space.toml").map(|(s, _)| s),
        SearchSpace::from_json_str(text, "space.json").map(|(s, _)| s),
        SearchSpace::from_optuna_json(text),
    ] {
        match parsed {
            Ok(space) => spaces.push(space),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    for space in &spaces {
        exercise_space(space);
    }
    if spaces.is_empty() {
        anyhow::bail!("{}", errors.join("\n"));
    }
    Ok(())
}

fn exercise_space(space: &SearchSpace) {
    let mut rng = StdRng::seed_from_u64(7);
    for (name, dist) in space.iter() {
        let json = dist.to_json();
        if let Err(e) = Distribution::from_json(&json) {
            panic!("parameter {name:?}: our own JSON {json} does not read back: {e:#}");
        }
        if dist.single() {
            let _ = dist.single_value();
            continue;
        }
        for _ in 0..4 {
            let internal = RandomSampler::draw(&mut rng, dist);
            if let Ok(value) = dist.to_external(internal) {
                let _ = dist.to_internal(&value);
            }
        }
    }
    let _ = space.to_optuna_json();
}
