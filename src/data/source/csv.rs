//! The CSV and TSV reader (header line required).

use std::path::Path;

use anyhow::{Result, anyhow, bail};

use super::input::{Input, decompressing_reader};
use super::labels::{RawLabel, Sink};
use super::{ColumnSpec, Location, row_error};

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

pub(super) fn read_delimited(
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
    let label_index = columns.label.as_ref().map(|l| find(l, "label")).transpose()?;
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
        let label = match label_index {
            Some(index) => csv_label(field(index, "label")?).map_err(|msg| row_error(path, location, msg))?,
            None => RawLabel::Int(0),
        };
        sink.push(path, location, text, label)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_label_cells() {
        assert!(matches!(csv_label(" 3 "), Ok(RawLabel::Int(3))));
        assert!(matches!(csv_label("-1"), Ok(RawLabel::Int(-1))));
        assert!(matches!(csv_label("pos"), Ok(RawLabel::Str("pos"))));
        assert!(matches!(csv_label("e"), Ok(RawLabel::Str("e"))));
        assert_eq!(csv_label("1.5").err().as_deref(), Some("label 1.5 is not an integer class id"));
        assert_eq!(csv_label("").err().as_deref(), Some("empty label"));
    }
}
