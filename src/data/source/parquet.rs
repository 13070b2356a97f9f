//! The parquet reader: HF `ClassLabel` names from the schema metadata, the parquet crate's panics
//! caught and its stalls cut short (through `watchdog.rs`), and column chunks checked to lie
//! inside the file.

use std::path::Path;

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

use super::labels::{RawLabel, Sink};
use super::watchdog::{WatchStop, Watched, call_watched};
use super::{ColumnSpec, Location, row_error};

/// How long the parquet reader may take for one batch of rows (8,192 IMDB reviews decode in well
/// under a second) before the file is taken for corrupt.
const PARQUET_STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

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

pub(super) fn read_parquet<R: ChunkReader + Send + 'static>(
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
    let label_index = columns.label.as_ref().map(|l| find(l, "label")).transpose()?;
    let text_type = schema.field(text_index).data_type().clone();
    let label_type = label_index.map(|i| schema.field(i).data_type().clone());
    if !sink.labels.has_names()
        && sink.examples.is_empty()
        && let Some(label) = &columns.label
        && let Some(names) = hf_class_label_names(schema.metadata(), label)
    {
        sink.labels
            .set_names(names)
            .with_context(|| format!("{}: ClassLabel names in the parquet metadata", path.display()))?;
    }
    let mask =
        ProjectionMask::roots(builder.parquet_schema(), std::iter::once(text_index).chain(label_index));
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
        let labels = match (&columns.label, &label_type) {
            (Some(label), Some(label_type)) => Some(label_column(column(label)?.as_ref()).ok_or_else(|| {
                anyhow!(
                    "{}: label column {label:?} has type {label_type}; expected an integer or string type",
                    path.display()
                )
            })?),
            _ => None,
        };
        for (i, text) in texts.into_iter().enumerate() {
            let location = Location::Row(row + i);
            let text = text.ok_or_else(|| row_error(path, location, "text is null"))?;
            let label = match &labels {
                Some(LabelColumn::Ints(values)) => values[i].map(RawLabel::Int),
                Some(LabelColumn::Strs(values)) => values[i].map(RawLabel::Str),
                None => Some(RawLabel::Int(0)),
            };
            let label = label.ok_or_else(|| row_error(path, location, "label is null"))?;
            sink.push(path, location, text.to_string(), label)?;
        }
        row += batch.num_rows();
    }
    Ok(())
}
