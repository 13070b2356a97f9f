//! Trials as every part of the program sees them: what one training run reports and how it
//! ends ([`protocol`]), shared by the study driver, `hpo-gpu train` and the engine.

pub mod protocol;
