//! Where a file's bytes come from (its path, or memory), gunzipped when the name ends in `.gz`:
//! the input shared by the format readers.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{Context, Result, anyhow};

pub(super) fn open(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("{}: cannot open", path.display()))
}

/// Where a file's bytes come from: the file at its path, or memory
/// ([`read_bytes`](super::read_bytes)). The path names the source in messages either way.
#[derive(Clone, Copy)]
pub(super) enum Input<'a> {
    File,
    Memory(&'a [u8]),
}

pub(super) fn decompressing_reader<'a>(
    path: &Path,
    input: Input<'a>,
    gz: bool,
) -> Result<Box<dyn Read + 'a>> {
    let raw: Box<dyn std::io::BufRead + 'a> = match input {
        Input::File => Box::new(BufReader::with_capacity(1 << 16, open(path)?)),
        Input::Memory(bytes) => Box::new(bytes),
    };
    Ok(if gz { Box::new(flate2::bufread::MultiGzDecoder::new(raw)) } else { Box::new(raw) })
}

pub(super) fn read_all(path: &Path, input: Input<'_>, gz: bool) -> Result<Vec<u8>> {
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
