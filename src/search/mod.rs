//! The search: parameter distributions and spaces, samplers (random, TPE) and pruners (median,
//! percentile, successive halving, hyperband), all following Optuna 5.0 and reading the study
//! history as [`crate::trial::FrozenTrial`] records.

pub mod pruner;
pub mod sampler;
pub mod space;
