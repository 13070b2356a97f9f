//! CPU reference backend: the model (`bert`), its optimizer (`adamw`), the dropout generator
//! (`philox`) and the matrix multiply it is built on (`real`).

pub mod adamw;
pub mod bert;
pub mod philox;
pub mod real;
