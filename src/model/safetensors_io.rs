//! Reading and writing `.safetensors` checkpoints through the `safetensors` crate.
//!
//! The crate validates the header (JSON, offsets that tile the data exactly, shape × dtype equal
//! to each tensor's byte length, no overflow) before we touch any tensor; this module maps its
//! dtypes onto [`DType`], turns its errors into one-line messages that name the file, and writes
//! F32 checkpoints atomically so an interrupted export never leaves a half-written file behind.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensorError, SafeTensors, View};

use super::tensor::{DType, RawTensor};

/// Reads every tensor of a `.safetensors` file, in the order their data lies in the file.
pub fn load_safetensors(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("{origin}: cannot read"))?;
    load_safetensors_bytes(&bytes, &origin)
}

/// Same, from bytes; `origin` names the source in error messages.
pub fn load_safetensors_bytes(bytes: &[u8], origin: &str) -> Result<Vec<(String, RawTensor)>> {
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| explain(e, bytes, origin))?;
    // `read_metadata` checked that the header fits and that the offsets tile the rest exactly.
    let data = &bytes[8 + header_len..];
    metadata
        .offset_keys()
        .into_iter()
        .map(|name| {
            let info = metadata.info(&name).ok_or_else(|| anyhow!("{origin}: tensor '{name}' vanished"))?;
            let dtype = map_dtype(info.dtype).ok_or_else(|| {
                anyhow!("{origin}: tensor '{name}' has dtype {:?}, which is not supported", info.dtype)
            })?;
            let (start, end) = info.data_offsets;
            let tensor = RawTensor { dtype, shape: info.shape.clone(), data: data[start..end].to_vec() };
            Ok((name, tensor))
        })
        .collect()
}

/// The header's free-form `__metadata__` map of a `.safetensors` file.
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("{origin}: cannot read"))?;
    let (_, metadata): (usize, Metadata) =
        SafeTensors::read_metadata(&bytes).map_err(|e| explain(e, &bytes, &origin))?;
    Ok(metadata.metadata().clone().unwrap_or_default())
}

fn map_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::BOOL => DType::Bool,
        Dtype::U8 => DType::U8,
        Dtype::I8 => DType::I8,
        Dtype::I16 => DType::I16,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I32 => DType::I32,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        _ => return None,
    })
}

/// One line that says what is wrong with the file, in terms a user can act on.
fn explain(e: SafeTensorError, bytes: &[u8], origin: &str) -> anyhow::Error {
    let header_len = bytes.get(..8).map(|h| u64::from_le_bytes(h.try_into().unwrap_or([0; 8])));
    let what = match e {
        SafeTensorError::HeaderTooSmall => {
            format!("truncated: {} bytes, too short for the 8-byte header length", bytes.len())
        }
        SafeTensorError::InvalidHeaderLength => format!(
            "the header claims {} bytes but the file has only {}: truncated, or not a safetensors file",
            header_len.unwrap_or(0),
            bytes.len().saturating_sub(8)
        ),
        SafeTensorError::HeaderTooLarge => format!(
            "the header claims {} bytes, over the 100 MB limit: corrupt, or not a safetensors file",
            header_len.unwrap_or(0)
        ),
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the tensor data in the header does not match the file's {} bytes: truncated, or extra bytes",
            bytes.len()
        ),
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's shape and dtype do not match the length of its data_offsets".to_string()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor '{name}': its data_offsets overlap, leave a gap, or run backwards")
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows when multiplied out".to_string(),
        other => format!("invalid safetensors header: {other}"),
    };
    anyhow!("{origin}: {what}")
}

/// An F32 tensor borrowed for serialisation.
struct F32View<'a> {
    values: &'a [f32],
    shape: &'a [usize],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            Cow::Borrowed(bytemuck::cast_slice(self.values))
        } else {
            Cow::Owned(self.values.iter().flat_map(|v| v.to_le_bytes()).collect())
        }
    }
    fn data_len(&self) -> usize {
        std::mem::size_of_val(self.values)
    }
}

/// Writes F32 tensors to `path` atomically: the data goes to a temporary file beside it that is
/// renamed over `path` only when complete (the crate's `serialize_to_file` does the
/// temp-and-rename), then flushed to disk. `metadata` becomes the header's `__metadata__`;
/// `"format": "pt"` is added when absent because transformers refuses safetensors files without it.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, &[f32], Vec<usize>)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let origin = path.display().to_string();
    let mut seen = std::collections::HashSet::new();
    for (name, values, shape) in tensors {
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if numel != Some(values.len()) {
            bail!("{origin}: tensor '{name}' has {} values but shape {shape:?}", values.len());
        }
        if !seen.insert(name.as_str()) {
            bail!("{origin}: tensor '{name}' appears twice");
        }
    }
    let mut metadata = metadata.clone();
    metadata.entry("format".to_string()).or_insert_with(|| "pt".to_string());
    let views = tensors.iter().map(|(name, values, shape)| (name.as_str(), F32View { values, shape }));
    // The crate puts its temporary file in `path.parent()`, which is "" for a bare file name.
    let target = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new(".").join(path),
        _ => path.to_path_buf(),
    };
    safetensors::serialize_to_file(views, Some(metadata), &target)
        .map_err(|e| anyhow!("{origin}: cannot write safetensors: {e}"))?;
    std::fs::File::open(&target)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{origin}: cannot flush to disk"))?;
    Ok(())
}
