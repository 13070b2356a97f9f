//! The JSON reader: JSON Lines (`.jsonl`, `.ndjson`, `.json`) or one JSON array of objects.

use std::fmt;
use std::path::Path;

use anyhow::{Result, anyhow};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use super::input::{Input, read_all};
use super::labels::{RawLabel, Sink};
use super::{ColumnSpec, Location, row_error};

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
            } else if self.0.label.as_deref() == Some(&*key) {
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
    let (text, label) = match (row.text, row.label, &columns.label) {
        (Some(text), label, None) => (text, label.unwrap_or(serde_json::Value::from(0))),
        (Some(text), Some(label), Some(_)) => (text, label),
        (text, _, label_column) => {
            let missing =
                if text.is_none() { &columns.text } else { label_column.as_ref().unwrap_or(&columns.text) };
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
                format!(
                    "label column {:?} holds {kind}; expected an integer or a string",
                    columns.label.as_deref().unwrap_or_default()
                ),
            ));
        }
    };
    sink.push(path, location, text, label)
}

pub(super) fn read_json(
    path: &Path,
    input: Input<'_>,
    gz: bool,
    columns: &ColumnSpec,
    sink: &mut Sink,
) -> Result<()> {
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
        let row = JsonRow {
            text: map.remove(&columns.text),
            label: columns.label.as_ref().and_then(|l| map.remove(l)),
        };
        json_row_into_sink(path, location, row, columns, || keys, sink)?;
    }
    Ok(())
}
