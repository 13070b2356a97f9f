//! Labelled text datasets: local JSON Lines / JSON / CSV / TSV / Parquet files (each optionally gzip'd),
//! local directories holding one file (or HF-style shards) per split, and Hugging Face Hub datasets
//! through [`crate::hub`]; plus HF-exact `shuffle(seed).select(range(n))` subsets.
//!
//! Labels become class ids: integer labels are the ids themselves, string labels map through the given
//! label names or, without names, through the sorted set of distinct strings. Parquet files written by
//! HF `datasets` carry their `ClassLabel` names in the schema metadata, and those are used when no names
//! are given. Every malformed input is an error naming the file and the line (or row).
//!
//! The readers, one per format, are in `json.rs`, `csv.rs` and `parquet.rs`; `input.rs` gives them a
//! file's bytes, `labels.rs` turns their rows into examples, and `watchdog.rs` guards the parquet crate.

mod csv;
mod input;
mod json;
mod labels;
mod parquet;
mod watchdog;

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use self::input::{Input, open, read_all};
use self::labels::Sink;
use super::numpy_rng::numpy_permutation;
use crate::hub::{self, RepoKind};

/// The Hub repo that `--dataset imdb` means.
pub const IMDB_REPO: &str = "stanfordnlp/imdb";
/// HF's `ClassLabel(names=["neg", "pos"])` for IMDB.
pub const IMDB_LABEL_NAMES: [&str; 2] = ["neg", "pos"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    pub label: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Class names indexed by class id.
    pub label_names: Vec<String>,
    /// Where the rows came from, for messages and reports.
    pub origin: String,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    pub fn num_labels(&self) -> usize {
        self.label_names.len()
    }

    /// Number of examples per class id.
    pub fn label_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.label_names.len()];
        for example in &self.examples {
            if let Some(count) = counts.get_mut(example.label) {
                *count += 1;
            }
        }
        counts
    }
}

/// The columns to read: the text, and the label unless only texts are wanted (every example then
/// gets class 0, as for texts to classify).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub text: String,
    pub label: Option<String>,
}

impl Default for ColumnSpec {
    fn default() -> Self {
        Self { text: "text".to_string(), label: Some("label".to_string()) }
    }
}

impl ColumnSpec {
    fn validate(&self) -> Result<()> {
        if self.text.is_empty() || self.label.as_ref().is_some_and(String::is_empty) {
            bail!(
                "column names must not be empty (text column {:?}, label column {:?})",
                self.text,
                self.label.as_deref().unwrap_or_default()
            );
        }
        if Some(&self.text) == self.label.as_ref() {
            bail!("the text and label columns must differ (both are {:?})", self.text);
        }
        Ok(())
    }
}

/// The texts of a data file (`.jsonl`/`.json`, `.csv`, `.parquet`, gzip or not) in column
/// `text_column`, in file order.
pub fn read_texts(path: &Path, text_column: &str) -> Result<Vec<String>> {
    let columns = ColumnSpec { text: text_column.to_string(), label: None };
    Ok(read_file(path, &columns, None)?.examples.into_iter().map(|e| e.text).collect())
}

// ---------------------------------------------------------------------------------------------------
// File formats

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `.jsonl`, `.ndjson` and `.json`: JSON Lines, or one JSON array of objects.
    Json,
    Csv,
    Tsv,
    Parquet,
}

/// Splits `name.ext[.gz]` into (stem, format, gzip'd); None for unsupported extensions.
fn parse_file_name(name: &str) -> Option<(&str, Format, bool)> {
    let (rest, gz) = match name.strip_suffix(".gz") {
        Some(rest) => (rest, true),
        None => (name, false),
    };
    let (stem, ext) = rest.rsplit_once('.')?;
    let format = match ext.to_ascii_lowercase().as_str() {
        "jsonl" | "ndjson" | "json" => Format::Json,
        "csv" => Format::Csv,
        "tsv" => Format::Tsv,
        "parquet" => Format::Parquet,
        _ => return None,
    };
    (!stem.is_empty()).then_some((stem, format, gz))
}

fn detect_format(path: &Path) -> Result<(Format, bool)> {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    parse_file_name(&name).map(|(_, format, gz)| (format, gz)).ok_or_else(|| {
        anyhow!(
            "{}: unsupported file type: expected .jsonl, .json, .ndjson, .csv, .tsv or .parquet, each optionally .gz",
            path.display()
        )
    })
}

/// Where a row sits in its file, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Location {
    /// 1-based line (JSON Lines, CSV, TSV).
    Line(u64),
    /// 1-based element of a top-level JSON array.
    Record(usize),
    /// 0-based row index (Parquet), as HF `ds[i]` counts.
    Row(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(line) => write!(f, "line {line}"),
            Location::Record(record) => write!(f, "record {record}"),
            Location::Row(row) => write!(f, "row index {row}"),
        }
    }
}

fn row_error(path: &Path, location: Location, message: impl fmt::Display) -> anyhow::Error {
    anyhow!("{}: {location}: {message}", path.display())
}

// ---------------------------------------------------------------------------------------------------
// Reading files

/// Reads one local file: .jsonl / .ndjson / .json (JSON Lines, or one JSON array of objects), .csv, .tsv
/// (header line required) or .parquet, each optionally .gz. Row order is file order.
pub fn read_file(path: &Path, columns: &ColumnSpec, label_names: Option<&[String]>) -> Result<Dataset> {
    columns.validate()?;
    let mut sink = Sink::new(label_names)?;
    read_into(path, Input::File, columns, &mut sink)?;
    sink.finish(path.display().to_string())
}

/// Same as [`read_file`], from a file's bytes already in memory: `name` (e.g. `train.jsonl.gz`)
/// picks the format as a file name would, and names the source in messages.
pub fn read_bytes(
    name: &str,
    bytes: &[u8],
    columns: &ColumnSpec,
    label_names: Option<&[String]>,
) -> Result<Dataset> {
    columns.validate()?;
    let path = Path::new(name);
    let mut sink = Sink::new(label_names)?;
    read_into(path, Input::Memory(bytes), columns, &mut sink)?;
    sink.finish(name.to_string())
}

fn read_into(path: &Path, input: Input<'_>, columns: &ColumnSpec, sink: &mut Sink) -> Result<()> {
    let (format, gz) = detect_format(path)?;
    match (format, input) {
        (Format::Json, _) => json::read_json(path, input, gz, columns, sink),
        (Format::Csv, _) => csv::read_delimited(path, input, gz, b',', columns, sink),
        (Format::Tsv, _) => csv::read_delimited(path, input, gz, b'\t', columns, sink),
        (Format::Parquet, Input::File) if !gz => parquet::read_parquet(path, open(path)?, columns, sink),
        (Format::Parquet, _) => {
            let bytes = read_all(path, input, gz)?;
            parquet::read_parquet(path, bytes::Bytes::from(bytes), columns, sink)
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Dataset resolution

/// Whether a file name belongs to `split`: stem `split`, `*_split`, `*-split`, or `split-*` (HF shards
/// such as `train-00000-of-00001.parquet`).
fn is_split_file(file_name: &str, split: &str) -> bool {
    let Some((stem, _, _)) = parse_file_name(file_name) else {
        return false;
    };
    stem == split
        || stem.strip_suffix(split).is_some_and(|head| head.ends_with(['_', '-']))
        || stem.strip_prefix(split).is_some_and(|tail| tail.starts_with('-'))
}

/// `...-00000-of-00003`: one shard of a split that HF wrote as several files.
fn is_shard_name(file_name: &str) -> bool {
    let stem = parse_file_name(file_name).map_or("", |(stem, _, _)| stem);
    let mut parts = stem.rsplitn(3, '-');
    let (total, of, index) = (parts.next(), parts.next(), parts.next());
    let numeric = |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    let index_digits = index.and_then(|s| s.rsplit('-').next());
    numeric(total) && of == Some("of") && numeric(index_digits)
}

/// Picks the file(s) of `split` among `names` (sorted): one file, or several HF-style shards.
fn pick_split_files<'a>(names: &'a [String], split: &str, within: &str) -> Result<Vec<&'a String>> {
    let file_name = |name: &'a String| name.rsplit('/').next().unwrap_or(name);
    let matches: Vec<&String> = names
        .iter()
        .filter(|name| {
            let file = file_name(name);
            let parent_is_split = name.rsplit('/').nth(1) == Some(split) && parse_file_name(file).is_some();
            is_split_file(file, split) || parent_is_split
        })
        .collect();
    if matches.is_empty() {
        let data_files: Vec<&String> =
            names.iter().filter(|n| parse_file_name(file_name(n)).is_some()).collect();
        bail!(
            "{within}: no data file for split {split:?} (looked for {split}.*, *_{split}.*, *-{split}.*, {split}-*.* \
             and {split}/*); data files found: {data_files:?}"
        );
    }
    let parent = |name: &String| name.rsplit_once('/').map_or(String::new(), |(dir, _)| dir.to_string());
    let same_folder = matches.iter().all(|m| parent(m) == parent(matches[0]));
    let all_shards = matches.iter().all(|m| is_shard_name(file_name(m)) || parent(m).ends_with(split));
    if matches.len() > 1 && !(same_folder && all_shards) {
        bail!("{within}: several files could be split {split:?}: {matches:?}; name one file instead");
    }
    Ok(matches)
}

fn read_many(
    paths: &[PathBuf],
    columns: &ColumnSpec,
    label_names: Option<&[String]>,
    origin: String,
) -> Result<Dataset> {
    let mut sink = Sink::new(label_names)?;
    for path in paths {
        read_into(path, Input::File, columns, &mut sink)?;
    }
    sink.finish(origin)
}

fn load_local_dir(
    dir: &Path,
    split: &str,
    columns: &ColumnSpec,
    label_names: Option<&[String]>,
) -> Result<Dataset> {
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list the directory", dir.display()))?
    {
        let entry = entry.with_context(|| format!("{}: cannot list the directory", dir.display()))?;
        if entry.path().is_file() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    let picked = pick_split_files(&names, split, &dir.display().to_string())?;
    let paths: Vec<PathBuf> = picked.iter().map(|name| dir.join(name)).collect();
    let origin = match paths.as_slice() {
        [single] => single.display().to_string(),
        _ => format!("{} ({} shards of split {split})", dir.display(), paths.len()),
    };
    read_many(&paths, columns, label_names, origin)
}

/// Plausible `owner/name` or `name` Hub id (not a mistyped local path).
fn looks_like_repo_id(dataset: &str) -> bool {
    let valid_chars = dataset.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    valid_chars
        && !dataset.starts_with(['.', '/', '-'])
        && !dataset.ends_with('/')
        && dataset.matches('/').count() <= 1
        && parse_file_name(dataset).is_none()
}

fn load_hub(id: &str, split: &str, columns: &ColumnSpec, label_names: Option<&[String]>) -> Result<Dataset> {
    if id == IMDB_REPO {
        if !["train", "test"].contains(&split) {
            bail!("{IMDB_REPO} has labelled splits \"train\" and \"test\", not {split:?}");
        }
        let file = format!("plain_text/{split}-00000-of-00001.parquet");
        let path = hub::resolve_file(RepoKind::Dataset, id, &file)?;
        let imdb_names: Vec<String> = IMDB_LABEL_NAMES.iter().map(|s| s.to_string()).collect();
        return read_many(
            &[path],
            columns,
            Some(label_names.unwrap_or(&imdb_names)),
            format!("{id} ({split})"),
        );
    }
    let files = hub::list_files(RepoKind::Dataset, id)?;
    let picked = pick_split_files(&files, split, &format!("dataset repo {id}"))?;
    let mut paths = Vec::with_capacity(picked.len());
    for file in picked {
        paths.push(hub::resolve_file(RepoKind::Dataset, id, file)?);
    }
    read_many(&paths, columns, label_names, format!("{id} ({split})"))
}

/// `--dataset` resolution, in this order:
/// - a local directory: the file for `split` inside it, whose stem is `split`, ends in `_split` / `-split`,
///   or starts with `split-` (e.g. `../shared/data/imdb_train.jsonl.gz`); HF-style shards
///   (`train-00000-of-00002.parquet`, ...) are read in name order into one dataset;
/// - a local file: that file, whichever split is asked;
/// - "imdb" (alias of "stanfordnlp/imdb"): `plain_text/{split}-00000-of-00001.parquet` via [`crate::hub`],
///   label names neg, pos unless others are given;
/// - another Hub dataset id: its data files for `split` (same naming rules, or inside a `split/` folder),
///   listed on the Hub, or in the cached snapshot when `HF_HUB_OFFLINE` is set.
pub fn load_split(
    dataset: &str,
    split: &str,
    columns: &ColumnSpec,
    label_names: Option<&[String]>,
) -> Result<Dataset> {
    columns.validate()?;
    if split.is_empty() || split.contains(['/', '\\']) {
        bail!("invalid split name {split:?}");
    }
    let path = Path::new(dataset);
    if path.is_dir() {
        return load_local_dir(path, split, columns, label_names);
    }
    if path.is_file() {
        return read_file(path, columns, label_names);
    }
    if dataset == "imdb" || dataset == IMDB_REPO {
        return load_hub(IMDB_REPO, split, columns, label_names);
    }
    if looks_like_repo_id(dataset) {
        return load_hub(dataset, split, columns, label_names).with_context(|| {
            format!("--dataset {dataset}: no such local file or directory, so tried the Hub")
        });
    }
    bail!("--dataset {dataset}: no such file or directory (and not a Hugging Face dataset id)")
}

/// HF `shuffle(seed).select(range(n))`: n > len is an error naming the dataset and both numbers.
pub fn shuffled_subset(ds: &Dataset, seed: u64, n: usize) -> Result<Dataset> {
    if n > ds.len() {
        bail!("{}: asked for {n} examples but the dataset has only {}", ds.origin, ds.len());
    }
    let perm = numpy_permutation(seed, ds.len());
    Ok(Dataset {
        examples: perm[..n].iter().map(|&i| ds.examples[i].clone()).collect(),
        label_names: ds.label_names.clone(),
        origin: format!("{}, shuffle(seed={seed}) first {n}", ds.origin),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_file_names() {
        for name in [
            "train.jsonl",
            "imdb_train.jsonl.gz",
            "imdb-train.csv",
            "train-00000-of-00001.parquet",
            "train.tsv.gz",
        ] {
            assert!(is_split_file(name, "train"), "{name}");
        }
        for name in
            ["pretrain.jsonl", "train.txt", "trainset.csv", "imdb_test.jsonl.gz", "train", "train_x.jsonl"]
        {
            assert!(!is_split_file(name, "train"), "{name}");
        }
        assert!(is_shard_name("train-00001-of-00003.parquet"));
        assert!(is_shard_name("imdb-train-00001-of-00003.parquet"));
        assert!(!is_shard_name("train-x-of-00003.parquet"));
        assert!(!is_shard_name("train.parquet"));
    }

    #[test]
    fn picking_split_files() -> Result<()> {
        let names: Vec<String> = [
            "README.md",
            "data/test-00000-of-00001.parquet",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(pick_split_files(&names, "train", "repo")?, vec![&names[2], &names[3]]);
        assert_eq!(pick_split_files(&names, "test", "repo")?, vec![&names[1]]);
        let err = pick_split_files(&names, "validation", "repo").unwrap_err();
        assert!(err.to_string().contains("no data file for split \"validation\""), "{err}");
        let nested: Vec<String> = ["default/train/0000.parquet", "default/train/0001.parquet"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(pick_split_files(&nested, "train", "repo")?.len(), 2);
        let ambiguous: Vec<String> = ["a_train.jsonl", "b_train.csv"].iter().map(|s| s.to_string()).collect();
        let err = pick_split_files(&ambiguous, "train", "dir").unwrap_err();
        assert!(err.to_string().contains("several files could be split \"train\""), "{err}");
        Ok(())
    }

    #[test]
    fn repo_id_shapes() {
        assert!(looks_like_repo_id("stanfordnlp/imdb"));
        assert!(looks_like_repo_id("sst2"));
        assert!(!looks_like_repo_id("./data"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("missing.jsonl"));
        assert!(!looks_like_repo_id("/abs/path"));
    }
}
