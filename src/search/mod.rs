//! The search: parameter distributions and spaces, samplers (random, TPE) and pruners (median,
//! percentile, successive halving, hyperband), all following Optuna 5.0 and reading the study
//! history as [`crate::study::FrozenTrial`] records.

pub mod distributions;
pub mod pruner;
pub mod pyjson;
pub mod sampler;
pub mod space;
