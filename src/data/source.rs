//! Labelled text datasets: local JSON Lines / JSON / CSV / TSV / Parquet files (each optionally gzip'd),
//! local directories holding one file (or HF-style shards) per split, and Hugging Face Hub datasets
//! through [`crate::hub`]; plus HF-exact `shuffle(seed).select(range(n))` subsets.
//!
//! Labels become class ids: integer labels are the ids themselves, string labels map through the given
//! label names or, without names, through the sorted set of distinct strings. Parquet files written by
//! HF `datasets` carry their `ClassLabel` names in the schema metadata, and those are used when no names
//! are given. Every malformed input is an error naming the file and the line (or row).

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    ArrowPrimitiveType, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type,
    UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::ChunkReader;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use super::numpy_rng::numpy_permutation;
use crate::hub::{self, RepoKind};

/// The Hub repo that `--dataset imdb` means.
pub const IMDB_REPO: &str = "stanfordnlp/imdb";
/// HF's `ClassLabel(names=["neg", "pos"])` for IMDB.
pub const IMDB_LABEL_NAMES: [&str; 2] = ["neg", "pos"];
/// More classes than this is taken as a data error (e.g. a numeric id column used as the label), and it
/// bounds the label-name table built for integer labels.
pub const MAX_CLASSES: usize = 65_536;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub text: String,
    pub label: String,
}

impl Default for ColumnSpec {
    fn default() -> Self {
        Self { text: "text".to_string(), label: "label".to_string() }
    }
}

impl ColumnSpec {
    fn validate(&self) -> Result<()> {
        if self.text.is_empty() || self.label.is_empty() {
            bail!(
                "column names must not be empty (text column {:?}, label column {:?})",
                self.text,
                self.label
            );
        }
        if self.text == self.label {
            bail!("the text and label columns must differ (both are {:?})", self.text);
        }
        Ok(())
    }
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
// Labels

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelKind {
    Integer,
    Text,
}

impl fmt::Display for LabelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LabelKind::Integer => "integer",
            LabelKind::Text => "string",
        })
    }
}

/// One label as read from a file, before it becomes a class id.
#[derive(Debug, Clone, Copy)]
enum RawLabel<'a> {
    Int(i128),
    Str(&'a str),
}

/// Turns raw labels into class ids as rows stream in, so that an error can name its row.
struct LabelCollector {
    /// Names given by the caller (or found in parquet metadata), with their index.
    given: Option<(Vec<String>, HashMap<String, usize>)>,
    first_kind: Option<(LabelKind, String)>,
    max_int: Option<usize>,
    /// Without given names: distinct string labels in first-seen order (provisional ids).
    seen: HashMap<String, usize>,
    seen_order: Vec<String>,
}

impl LabelCollector {
    fn new(names: Option<&[String]>) -> Result<Self> {
        let mut collector =
            Self { given: None, first_kind: None, max_int: None, seen: HashMap::new(), seen_order: vec![] };
        if let Some(names) = names {
            collector.set_names(names.to_vec())?;
        }
        Ok(collector)
    }

    fn set_names(&mut self, names: Vec<String>) -> Result<()> {
        if names.is_empty() {
            bail!("the list of label names is empty");
        }
        if names.len() > MAX_CLASSES {
            bail!("{} label names given; at most {MAX_CLASSES} classes are supported", names.len());
        }
        let mut index = HashMap::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            if index.insert(name.clone(), i).is_some() {
                bail!("label name {name:?} appears twice in the label names {names:?}");
            }
        }
        self.given = Some((names, index));
        Ok(())
    }

    fn has_names(&self) -> bool {
        self.given.is_some()
    }

    fn check_kind(&mut self, kind: LabelKind, location: &dyn fmt::Display) -> Result<(), String> {
        match &self.first_kind {
            None => {
                self.first_kind = Some((kind, location.to_string()));
                Ok(())
            }
            Some((first, _)) if *first == kind => Ok(()),
            Some((first, first_at)) => Err(format!(
                "{kind} label, but the label column started with {first} labels ({first_at}); labels must be \
                 all integers or all strings"
            )),
        }
    }

    fn push(&mut self, label: RawLabel<'_>, location: &dyn fmt::Display) -> Result<usize, String> {
        match label {
            RawLabel::Int(value) => self.push_int(value, location),
            RawLabel::Str(value) => self.push_str(value, location),
        }
    }

    fn push_int(&mut self, value: i128, location: &dyn fmt::Display) -> Result<usize, String> {
        self.check_kind(LabelKind::Integer, location)?;
        if value < 0 {
            return Err(format!("negative label {value}: class ids must be 0 or more"));
        }
        let limit = self.given.as_ref().map_or(MAX_CLASSES, |(names, _)| names.len());
        let id = usize::try_from(value).ok().filter(|&id| id < limit).ok_or_else(|| match &self.given {
            Some((names, _)) => {
                format!("label {value} is out of range for the {} label names {names:?}", names.len())
            }
            None => format!("label {value} is too large for a class id (at most {})", MAX_CLASSES - 1),
        })?;
        self.max_int = Some(self.max_int.map_or(id, |max| max.max(id)));
        Ok(id)
    }

    fn push_str(&mut self, value: &str, location: &dyn fmt::Display) -> Result<usize, String> {
        self.check_kind(LabelKind::Text, location)?;
        if let Some((names, index)) = &self.given {
            return index
                .get(value)
                .copied()
                .ok_or_else(|| format!("label {value:?} is not one of the label names {names:?}"));
        }
        if let Some(&id) = self.seen.get(value) {
            return Ok(id);
        }
        if self.seen_order.len() >= MAX_CLASSES {
            return Err(format!(
                "more than {MAX_CLASSES} distinct string labels; is {value:?} really a label?"
            ));
        }
        let id = self.seen_order.len();
        self.seen.insert(value.to_string(), id);
        self.seen_order.push(value.to_string());
        Ok(id)
    }

    /// Final label names, and for unnamed string labels the map from provisional to final ids.
    fn finish(self) -> (Vec<String>, Option<Vec<usize>>) {
        if let Some((names, _)) = self.given {
            return (names, None);
        }
        match self.first_kind {
            Some((LabelKind::Text, _)) => {
                let mut sorted: Vec<(usize, String)> = self.seen_order.into_iter().enumerate().collect();
                sorted.sort_by(|a, b| a.1.cmp(&b.1));
                let mut remap = vec![0; sorted.len()];
                for (final_id, (provisional, _)) in sorted.iter().enumerate() {
                    remap[*provisional] = final_id;
                }
                (sorted.into_iter().map(|(_, name)| name).collect(), Some(remap))
            }
            _ => {
                let count = self.max_int.map_or(0, |max| max + 1);
                ((0..count).map(|id| id.to_string()).collect(), None)
            }
        }
    }
}

/// Collects examples from one or more files (shards) with one label mapping.
struct Sink {
    labels: LabelCollector,
    examples: Vec<Example>,
}

impl Sink {
    fn new(label_names: Option<&[String]>) -> Result<Self> {
        Ok(Self { labels: LabelCollector::new(label_names)?, examples: Vec::new() })
    }

    fn push(&mut self, path: &Path, location: Location, text: String, label: RawLabel<'_>) -> Result<()> {
        if text.trim().is_empty() {
            let what = if text.is_empty() { "empty text" } else { "text is only whitespace" };
            return Err(row_error(path, location, format!("{what}; every example needs some text")));
        }
        let label = self.labels.push(label, &location).map_err(|msg| row_error(path, location, msg))?;
        self.examples.push(Example { text, label });
        Ok(())
    }

    fn finish(self, origin: String) -> Result<Dataset> {
        if self.examples.is_empty() {
            bail!("{origin}: the dataset has no examples");
        }
        let (label_names, remap) = self.labels.finish();
        let mut examples = self.examples;
        if let Some(remap) = remap {
            for example in &mut examples {
                example.label = remap[example.label];
            }
        }
        Ok(Dataset { examples, label_names, origin })
    }
}

// ---------------------------------------------------------------------------------------------------
// Reading files

fn open(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("{}: cannot open", path.display()))
}

/// Where a file's bytes come from: the file at its path, or memory ([`read_bytes`]). The path names
/// the source in messages either way.
#[derive(Clone, Copy)]
enum Input<'a> {
    File,
    Memory(&'a [u8]),
}

fn decompressing_reader<'a>(path: &Path, input: Input<'a>, gz: bool) -> Result<Box<dyn Read + 'a>> {
    let raw: Box<dyn std::io::BufRead + 'a> = match input {
        Input::File => Box::new(BufReader::with_capacity(1 << 16, open(path)?)),
        Input::Memory(bytes) => Box::new(bytes),
    };
    Ok(if gz { Box::new(flate2::bufread::MultiGzDecoder::new(raw)) } else { Box::new(raw) })
}

fn read_all(path: &Path, input: Input<'_>, gz: bool) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    decompressing_reader(path, input, gz)?.read_to_end(&mut bytes).map_err(|err| {
        if gz {
            anyhow!("{}: corrupt or truncated gzip data: {err}", path.display())
        } else {
            anyhow!("{}: read failed: {err}", path.display())
        }
    })?;
    Ok(bytes)
}

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
        (Format::Json, _) => read_json(path, input, gz, columns, sink),
        (Format::Csv, _) => read_delimited(path, input, gz, b',', columns, sink),
        (Format::Tsv, _) => read_delimited(path, input, gz, b'\t', columns, sink),
        (Format::Parquet, Input::File) if !gz => read_parquet(path, open(path)?, columns, sink),
        (Format::Parquet, _) => {
            let bytes = read_all(path, input, gz)?;
            read_parquet(path, bytes::Bytes::from(bytes), columns, sink)
        }
    }
}

fn json_type_name(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The two wanted fields of one JSON object; other fields are skipped without being built.
#[derive(Default)]
struct JsonRow {
    text: Option<serde_json::Value>,
    label: Option<serde_json::Value>,
}

struct JsonRowSeed<'c>(&'c ColumnSpec);

impl<'de> DeserializeSeed<'de> for JsonRowSeed<'_> {
    type Value = JsonRow;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<JsonRow, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for JsonRowSeed<'_> {
    type Value = JsonRow;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonRow, A::Error> {
        let mut row = JsonRow::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == self.0.text {
                row.text = Some(map.next_value()?);
            } else if key == self.0.label {
                row.label = Some(map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(row)
    }
}

fn object_keys(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(map) => {
            let keys: Vec<&String> = map.keys().collect();
            format!("{keys:?}")
        }
        _ => "none".to_string(),
    }
}

fn json_row_into_sink(
    path: &Path,
    location: Location,
    row: JsonRow,
    columns: &ColumnSpec,
    keys: impl FnOnce() -> String,
    sink: &mut Sink,
) -> Result<()> {
    let (text, label) = match (row.text, row.label) {
        (Some(text), Some(label)) => (text, label),
        (text, _) => {
            let missing = if text.is_none() { &columns.text } else { &columns.label };
            let role = if text.is_none() { "text" } else { "label" };
            return Err(row_error(
                path,
                location,
                format!("no {role} column {missing:?}; the columns are {}", keys()),
            ));
        }
    };
    let text = match text {
        serde_json::Value::String(text) => text,
        other => {
            let kind = json_type_name(&other);
            return Err(row_error(
                path,
                location,
                format!("text column {:?} holds {kind}, not a string", columns.text),
            ));
        }
    };
    let label = match &label {
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(v), _) => RawLabel::Int(i128::from(v)),
            (None, Some(v)) => RawLabel::Int(i128::from(v)),
            (None, None) => {
                return Err(row_error(path, location, format!("label {n} is not an integer class id")));
            }
        },
        serde_json::Value::String(s) => RawLabel::Str(s),
        other => {
            let kind = json_type_name(other);
            return Err(row_error(
                path,
                location,
                format!("label column {:?} holds {kind}; expected an integer or a string", columns.label),
            ));
        }
    };
    sink.push(path, location, text, label)
}

fn read_json(path: &Path, input: Input<'_>, gz: bool, columns: &ColumnSpec, sink: &mut Sink) -> Result<()> {
    let bytes = read_all(path, input, gz)?;
    let first = bytes.iter().position(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|i| bytes[i] == b'[') {
        return read_json_array(path, &bytes, columns, sink);
    }
    // Split on '\n' only: review texts hold U+0085 and U+2028, which are not line breaks in JSON Lines.
    for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let location = Location::Line(index as u64 + 1);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line = std::str::from_utf8(line).map_err(|err| {
            row_error(path, location, format!("invalid UTF-8 at byte {} of the line", err.valid_up_to() + 1))
        })?;
        let mut deserializer = serde_json::Deserializer::from_str(line);
        let row = JsonRowSeed(columns)
            .deserialize(&mut deserializer)
            .and_then(|row| deserializer.end().map(|()| row))
            .map_err(|err| row_error(path, location, format!("invalid JSON: {err}")))?;
        let keys =
            || serde_json::from_str::<serde_json::Value>(line).map(|v| object_keys(&v)).unwrap_or_default();
        json_row_into_sink(path, location, row, columns, keys, sink)?;
    }
    Ok(())
}

fn read_json_array(path: &Path, bytes: &[u8], columns: &ColumnSpec, sink: &mut Sink) -> Result<()> {
    let text = std::str::from_utf8(bytes).map_err(|err| {
        let line = bytes[..err.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow!("{}: line {line}: invalid UTF-8", path.display())
    })?;
    let records: Vec<serde_json::Value> =
        serde_json::from_str(text).map_err(|err| anyhow!("{}: invalid JSON: {err}", path.display()))?;
    for (index, record) in records.into_iter().enumerate() {
        let location = Location::Record(index + 1);
        let serde_json::Value::Object(mut map) = record else {
            let kind = json_type_name(&record);
            return Err(row_error(path, location, format!("expected a JSON object, found {kind}")));
        };
        let keys = format!("{:?}", map.keys().collect::<Vec<_>>());
        let row = JsonRow { text: map.remove(&columns.text), label: map.remove(&columns.label) };
        json_row_into_sink(path, location, row, columns, || keys, sink)?;
    }
    Ok(())
}

/// A CSV label cell: an integer literal is a class id, a decimal number is an error, anything else a name.
fn csv_label(cell: &str) -> Result<RawLabel<'_>, String> {
    let cell = cell.trim();
    if cell.is_empty() {
        return Err("empty label".to_string());
    }
    let digits = cell.strip_prefix('-').unwrap_or(cell);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return cell.parse::<i128>().map(RawLabel::Int).map_err(|_| format!("label {cell} is too large"));
    }
    let numeric_chars = cell.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
    if numeric_chars && cell.bytes().any(|b| b.is_ascii_digit()) && cell.parse::<f64>().is_ok() {
        return Err(format!("label {cell} is not an integer class id"));
    }
    Ok(RawLabel::Str(cell))
}

fn read_delimited(
    path: &Path,
    input: Input<'_>,
    gz: bool,
    delimiter: u8,
    columns: &ColumnSpec,
    sink: &mut Sink,
) -> Result<()> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(decompressing_reader(path, input, gz)?);
    let csv_error = |err: csv::Error| {
        let gzip_hint = if gz && matches!(err.kind(), csv::ErrorKind::Io(_)) {
            " (corrupt or truncated gzip data?)"
        } else {
            ""
        };
        match err.position() {
            Some(pos) => anyhow!("{}: line {}: {err}{gzip_hint}", path.display(), pos.line()),
            None => anyhow!("{}: {err}{gzip_hint}", path.display()),
        }
    };
    let headers = reader.byte_headers().map_err(csv_error)?.clone();
    let header_names: Vec<String> =
        headers.iter().map(|h| String::from_utf8_lossy(h).trim().to_string()).collect();
    let find = |name: &str, role: &str| {
        header_names.iter().position(|h| h == name).ok_or_else(|| {
            anyhow!("{}: line 1: no {role} column {name:?}; the columns are {header_names:?}", path.display())
        })
    };
    if header_names.iter().all(String::is_empty) {
        bail!("{}: no header line; the first line must name the columns", path.display());
    }
    let text_index = find(&columns.text, "text")?;
    let label_index = find(&columns.label, "label")?;
    let mut record = csv::ByteRecord::new();
    while reader.read_byte_record(&mut record).map_err(csv_error)? {
        let location = Location::Line(record.position().map_or(0, csv::Position::line));
        let field = |index: usize, role: &str| -> Result<&str> {
            let bytes = record.get(index).unwrap_or_default();
            std::str::from_utf8(bytes).map_err(|err| {
                row_error(
                    path,
                    location,
                    format!("invalid UTF-8 in the {role} column at byte {}", err.valid_up_to() + 1),
                )
            })
        };
        let text = field(text_index, "text")?.to_string();
        let label = csv_label(field(label_index, "label")?).map_err(|msg| row_error(path, location, msg))?;
        sink.push(path, location, text, label)?;
    }
    Ok(())
}

/// `ClassLabel` names that HF `datasets` stores in a parquet file's schema metadata (key "huggingface").
fn hf_class_label_names(metadata: &arrow_schema::Metadata, label_column: &str) -> Option<Vec<String>> {
    let info: serde_json::Value = serde_json::from_str(metadata.get("huggingface")?).ok()?;
    let feature = info.get("info")?.get("features")?.get(label_column)?;
    if feature.get("_type")?.as_str()? != "ClassLabel" {
        return None;
    }
    feature.get("names")?.as_array()?.iter().map(|n| n.as_str().map(str::to_string)).collect()
}

/// The text values of one batch; None for a null.
fn string_column(array: &dyn Array) -> Option<Vec<Option<&str>>> {
    if let Some(a) = array.as_string_opt::<i32>() {
        return Some(a.iter().collect());
    }
    if let Some(a) = array.as_string_opt::<i64>() {
        return Some(a.iter().collect());
    }
    if let Some(a) = array.as_string_view_opt() {
        return Some(a.iter().collect());
    }
    let dict = array.as_any_dictionary_opt()?;
    let values = string_column(dict.values().as_ref())?;
    if values.is_empty() {
        return Some(vec![None; dict.len()]);
    }
    let keys = dict.normalized_keys();
    Some((0..dict.len()).map(|i| if dict.is_null(i) { None } else { values[keys[i]] }).collect())
}

fn int_column<T: ArrowPrimitiveType>(array: &dyn Array) -> Option<Vec<Option<i128>>>
where
    T::Native: Into<i128>,
{
    Some(array.as_primitive_opt::<T>()?.iter().map(|v| v.map(Into::into)).collect())
}

enum LabelColumn<'a> {
    Ints(Vec<Option<i128>>),
    Strs(Vec<Option<&'a str>>),
}

fn label_column(array: &dyn Array) -> Option<LabelColumn<'_>> {
    let ints = match array.data_type() {
        DataType::Int8 => int_column::<Int8Type>(array),
        DataType::Int16 => int_column::<Int16Type>(array),
        DataType::Int32 => int_column::<Int32Type>(array),
        DataType::Int64 => int_column::<Int64Type>(array),
        DataType::UInt8 => int_column::<UInt8Type>(array),
        DataType::UInt16 => int_column::<UInt16Type>(array),
        DataType::UInt32 => int_column::<UInt32Type>(array),
        DataType::UInt64 => int_column::<UInt64Type>(array),
        _ => None,
    };
    match ints {
        Some(ints) => Some(LabelColumn::Ints(ints)),
        None => string_column(array).map(LabelColumn::Strs),
    }
}

/// Every column chunk must lie inside the file. The parquet crate panics on a negative offset or
/// size (`ColumnChunkMetaData::byte_range`) and would allocate whatever size a chunk claims.
fn check_column_chunks(metadata: &parquet::file::metadata::ParquetMetaData, file_len: u64) -> Result<()> {
    for (g, group) in metadata.row_groups().iter().enumerate() {
        for (c, column) in group.columns().iter().enumerate() {
            let start = column.dictionary_page_offset().unwrap_or_else(|| column.data_page_offset());
            let len = column.compressed_size();
            let end =
                u64::try_from(start).ok().zip(u64::try_from(len).ok()).and_then(|(s, l)| s.checked_add(l));
            if end.is_none_or(|end| end > file_len) {
                bail!(
                    "row group {g}, column {c}: the chunk at offset {start} of {len} bytes is not inside the \
                     file's {file_len} bytes"
                );
            }
        }
    }
    Ok(())
}

fn read_parquet<R: ChunkReader + Send + 'static>(
    path: &Path,
    input: R,
    columns: &ColumnSpec,
    sink: &mut Sink,
) -> Result<()> {
    let file_len = input.len();
    // Opening parses the footer with the same thrift code that stalls on crafted page headers (an
    // unknown field holding a map of 2^31 booleans is skipped one zero-byte entry at a time), so it
    // is watched like decoding.
    let opened = call_watched("parquet-footer", PARQUET_STALL_LIMIT, move || {
        ParquetRecordBatchReaderBuilder::try_new(input)
    })
    .with_context(|| format!("{}: cannot start the parquet reader", path.display()))?;
    let builder = match opened {
        Ok(builder) => {
            builder.map_err(|err| anyhow!("{}: not a readable parquet file: {err}", path.display()))?
        }
        Err(WatchStop::Stalled) => bail!(
            "{}: corrupt parquet metadata: the parquet reader made no progress for {} s",
            path.display(),
            PARQUET_STALL_LIMIT.as_secs()
        ),
        Err(WatchStop::Panicked(what)) => {
            bail!("{}: corrupt parquet metadata: the parquet reader failed: {what}", path.display())
        }
    };
    check_column_chunks(builder.metadata(), file_len)
        .map_err(|err| anyhow!("{}: corrupt parquet metadata: {err}", path.display()))?;
    let schema = builder.schema().clone();
    let names: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
    let find = |name: &str, role: &str| {
        schema
            .index_of(name)
            .map_err(|_| anyhow!("{}: no {role} column {name:?}; the columns are {names:?}", path.display()))
    };
    let text_index = find(&columns.text, "text")?;
    let label_index = find(&columns.label, "label")?;
    let text_type = schema.field(text_index).data_type().clone();
    let label_type = schema.field(label_index).data_type().clone();
    if !sink.labels.has_names()
        && sink.examples.is_empty()
        && let Some(names) = hf_class_label_names(schema.metadata(), &columns.label)
    {
        sink.labels
            .set_names(names)
            .with_context(|| format!("{}: ClassLabel names in the parquet metadata", path.display()))?;
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), [text_index, label_index]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(8192)
        .build()
        .map_err(|err| anyhow!("{}: not a readable parquet file: {err}", path.display()))?;
    let mut row = 0usize;
    // Decoding runs on its own thread, which we stop waiting for when it stalls: the parquet crate
    // (60.1) can spend many seconds in its page-header parser on a crafted file (found by fuzzing:
    // 12 s for 1.3 KB), and we cannot interrupt third-party code. It can also panic on corrupt
    // page data (an out-of-bounds definition-level bitmap); that is a corrupt file, not a crash of
    // ours. The reader and the partly filled sink are dropped with the error.
    let batches = Watched::spawn("parquet-decode", reader)
        .with_context(|| format!("{}: cannot start the parquet reader", path.display()))?;
    loop {
        let next = match batches.next(PARQUET_STALL_LIMIT) {
            Ok(next) => next,
            Err(WatchStop::Stalled) => bail!(
                "{}: corrupt parquet data after row index {row}: the parquet reader made no progress for {} s",
                path.display(),
                PARQUET_STALL_LIMIT.as_secs()
            ),
            Err(WatchStop::Panicked(what)) => bail!(
                "{}: corrupt parquet data after row index {row}: the parquet reader failed: {what}",
                path.display()
            ),
        };
        let Some(batch) = next else { break };
        let batch: RecordBatch = batch.map_err(|err| {
            anyhow!("{}: corrupt parquet data after row index {row}: {err}", path.display())
        })?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| anyhow!("{}: column {name:?} vanished on reading", path.display()))
        };
        let texts = string_column(column(&columns.text)?.as_ref()).ok_or_else(|| {
            anyhow!(
                "{}: text column {:?} has type {text_type}; expected a string type",
                path.display(),
                columns.text
            )
        })?;
        let labels = label_column(column(&columns.label)?.as_ref()).ok_or_else(|| {
            anyhow!(
                "{}: label column {:?} has type {label_type}; expected an integer or string type",
                path.display(),
                columns.label
            )
        })?;
        for (i, text) in texts.into_iter().enumerate() {
            let location = Location::Row(row + i);
            let text = text.ok_or_else(|| row_error(path, location, "text is null"))?;
            let label = match &labels {
                LabelColumn::Ints(values) => values[i].map(RawLabel::Int),
                LabelColumn::Strs(values) => values[i].map(RawLabel::Str),
            };
            let label = label.ok_or_else(|| row_error(path, location, "label is null"))?;
            sink.push(path, location, text.to_string(), label)?;
        }
        row += batch.num_rows();
    }
    Ok(())
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

/// How long the parquet reader may take for one batch of rows (8,192 IMDB reviews decode in well
/// under a second) before the file is taken for corrupt.
const PARQUET_STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// An iterator's items pulled on a thread of their own, so that third-party code that stalls or
/// panics on corrupt input becomes an error for the caller instead of a hang or a crash. A stalled
/// thread cannot be stopped; it is abandoned (the process ends on the error it leads to).
struct Watched<T> {
    rx: std::sync::mpsc::Receiver<std::result::Result<Option<T>, String>>,
}

/// Why [`Watched::next`] gave no item.
#[derive(Debug, PartialEq)]
enum WatchStop {
    /// No item (and no end) within the stall limit.
    Stalled,
    /// The iterator panicked, with this message.
    Panicked(String),
}

impl<T: Send + 'static> Watched<T> {
    fn spawn<I: Iterator<Item = T> + Send + 'static>(name: &str, mut iter: I) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new().name(name.to_string()).spawn(move || {
            loop {
                let next = catch_panic_quietly(|| iter.next());
                let more = matches!(next, Ok(Some(_)));
                if tx.send(next).is_err() || !more {
                    break;
                }
            }
        })?;
        Ok(Watched { rx })
    }

    /// The next item (None at the end), waiting at most `stall` for it.
    fn next(&self, stall: std::time::Duration) -> std::result::Result<Option<T>, WatchStop> {
        received(self.rx.recv_timeout(stall))
    }
}

/// `f()` run on a thread of its own, waited for at most `stall`: [`Watched`] for a single call.
fn call_watched<T: Send + 'static>(
    name: &str,
    stall: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::result::Result<T, WatchStop>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new().name(name.to_string()).spawn(move || {
        // The receiver is gone only when the caller stopped waiting; nothing is left to tell.
        let _ = tx.send(catch_panic_quietly(f));
    })?;
    Ok(received(rx.recv_timeout(stall)))
}

/// What a watched thread sent: its value, its panic, or nothing in time.
fn received<T>(
    message: std::result::Result<std::result::Result<T, String>, std::sync::mpsc::RecvTimeoutError>,
) -> std::result::Result<T, WatchStop> {
    match message {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(what)) => Err(WatchStop::Panicked(what)),
        Err(_) => Err(WatchStop::Stalled),
    }
}

/// Runs `f`, turning a panic inside it into `Err(message)` without printing it: the panic hook
/// is swapped for a silent one while `f` runs (the hook is process-wide; loaders run before any
/// training threads start, so nothing else is expected to panic meanwhile). For third-party code
/// that panics on corrupt input (the parquet crate); our own code does not rely on this.
fn catch_panic_quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    result.map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::{WatchStop, Watched, call_watched};
    use std::time::Duration;

    #[test]
    fn watched_items_arrive_in_order_then_the_end() {
        let w = Watched::spawn("t", [1, 2, 3].into_iter()).unwrap();
        let got: Vec<_> = (0..4).map(|_| w.next(Duration::from_secs(5)).unwrap()).collect();
        assert_eq!(got, [Some(1), Some(2), Some(3), None]);
    }

    #[test]
    fn a_stalling_iterator_is_reported_not_waited_for() {
        let slow = std::iter::once(()).map(|_| std::thread::sleep(Duration::from_millis(500)));
        let w = Watched::spawn("t", slow).unwrap();
        let t0 = std::time::Instant::now();
        assert_eq!(w.next(Duration::from_millis(50)), Err(WatchStop::Stalled));
        assert!(t0.elapsed() < Duration::from_millis(400), "waited {:?}", t0.elapsed());
    }

    #[test]
    fn a_panicking_iterator_is_an_error_with_its_message() {
        let boom = std::iter::once(()).map(|_| -> u8 { panic!("boom at page 3") });
        let w = Watched::spawn("t", boom).unwrap();
        assert_eq!(w.next(Duration::from_secs(5)), Err(WatchStop::Panicked("boom at page 3".into())));
    }

    #[test]
    fn a_watched_call_gives_its_value_its_panic_or_stalled() {
        let quick = Duration::from_secs(5);
        assert_eq!(call_watched("t", quick, || 7).unwrap(), Ok(7));
        assert_eq!(
            call_watched("t", quick, || -> u8 { panic!("bad footer") }).unwrap(),
            Err(WatchStop::Panicked("bad footer".into()))
        );
        let started = std::time::Instant::now();
        let stalled =
            call_watched("t", Duration::from_millis(100), || std::thread::sleep(Duration::from_secs(3)));
        assert_eq!(stalled.unwrap(), Err(WatchStop::Stalled));
        assert!(started.elapsed() < Duration::from_secs(2), "waited {:?}", started.elapsed());
    }

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
    fn csv_label_cells() {
        assert!(matches!(csv_label(" 3 "), Ok(RawLabel::Int(3))));
        assert!(matches!(csv_label("-1"), Ok(RawLabel::Int(-1))));
        assert!(matches!(csv_label("pos"), Ok(RawLabel::Str("pos"))));
        assert!(matches!(csv_label("e"), Ok(RawLabel::Str("e"))));
        assert_eq!(csv_label("1.5").err().as_deref(), Some("label 1.5 is not an integer class id"));
        assert_eq!(csv_label("").err().as_deref(), Some("empty label"));
    }

    #[test]
    fn string_labels_sort_without_names() {
        let mut labels = LabelCollector::new(None).unwrap_or_else(|e| panic!("{e}"));
        let ids: Vec<usize> = ["pos", "neg", "pos", "mixed"]
            .iter()
            .map(|s| labels.push(RawLabel::Str(s), &"here").unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert_eq!(ids, vec![0, 1, 0, 2]);
        let (names, remap) = labels.finish();
        assert_eq!(names, vec!["mixed", "neg", "pos"]);
        assert_eq!(remap, Some(vec![2, 1, 0]));
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
