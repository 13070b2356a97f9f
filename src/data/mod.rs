//! Datasets: sources, HF-exact subsets, tokenization and packed batches.

pub mod batch;
pub mod numpy_rng;
pub mod source;
pub mod tokenize;
