//! CPU reference backend: the model (`bert`), its optimizer (`adamw`), the dropout generator
//! (`philox`) and the matrix multiply it is built on (`real`, with the library behind it in `blas`).

pub mod adamw;
pub mod bert;
pub mod blas;
pub mod philox;
pub mod real;
