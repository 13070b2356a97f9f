//! A tensor as read from a checkpoint file, before it is converted into the parameter layout.

use anyhow::{Result, bail};

/// Element types that checkpoints hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
}

/// A contiguous, row-major, little-endian tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32 (floating dtypes only; integer tensors such as `position_ids` are not
    /// parameters).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let n = self.numel();
        if self.data.len() != n * self.dtype.size() {
            bail!(
                "tensor data holds {} bytes but shape {:?} of {:?} needs {}",
                self.data.len(),
                self.shape,
                self.dtype,
                n * self.dtype.size()
            );
        }
        let d = &self.data;
        Ok(match self.dtype {
            DType::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32)
                .collect(),
            DType::F16 => {
                d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            DType::BF16 => {
                d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            other => bail!("expected a floating-point tensor, found {other:?}"),
        })
    }
}
