//! Datasets: sources, subsets, tokenization and packed batches.

pub mod numpy_rng;
pub mod source;
