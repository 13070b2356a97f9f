//! CPU reference backend: the model (`bert`), its optimizer (`adamw`), the dropout generator
//! (`philox`), the matrix multiply it is built on (`real`, with the library behind it in `blas`, and
//! the bf16 products of `--precision bf16` in `onednn`) and
//! its vectorized f32 exp/erf/GELU/softmax (`vmath`) and attention (`fused_attention`).

pub mod adamw;
pub mod bert;
pub mod blas;
pub mod fused_attention;
pub mod onednn;
pub mod philox;
pub mod real;
pub mod vmath;
