//! Reading and writing `.safetensors` files.

use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::{Dtype, SafeTensors};

use super::tensor::{DType, RawTensor};

/// Reads every tensor of a safetensors file, in the header's order.
pub fn load_safetensors(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    load_safetensors_bytes(&bytes, &path.display().to_string())
}

pub fn load_safetensors_bytes(bytes: &[u8], origin: &str) -> Result<Vec<(String, RawTensor)>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{origin}: not a valid safetensors file: {e}"))?;
    let mut out = Vec::new();
    for (name, view) in st.iter() {
        let dtype = match view.dtype() {
            Dtype::F64 => DType::F64,
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            Dtype::I16 => DType::I16,
            Dtype::I8 => DType::I8,
            Dtype::U8 => DType::U8,
            Dtype::BOOL => DType::Bool,
            other => bail!("{origin}: tensor {name:?} has unsupported dtype {other:?}"),
        };
        out.push((
            name.to_string(),
            RawTensor { dtype, shape: view.shape().to_vec(), data: view.data().to_vec() },
        ));
    }
    // The header is a map; keep a stable order.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Writes f32 tensors to `path` (through a temporary file and a rename, so a crash never leaves a
/// half-written file under the final name).
pub fn save_safetensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let bytes: &[u8] = bytemuck::cast_slice(data);
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| anyhow::anyhow!("tensor {name:?}: {e}"))
        })
        .collect::<Result<_>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| anyhow::anyhow!("{}: cannot serialise: {e}", path.display()))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}
