//! The device ops moved below the trial array and the GPU backend, to [`crate::ops`]; this keeps
//! the old paths (`trial_array::ops::…`) working until `trial_array/mod.rs` drops the module.

pub use super::schedule::DropoutProbs;
pub use crate::ops::{
    ArrayOps, BiasShape, EmbeddingTables, LayerNormShape, Operand, Out, SlotInput, SlotOptimizerStep, Tick,
    TickLayout,
};
