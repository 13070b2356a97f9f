//! Datasets: sources, HF-exact subsets, tokenization and packed batches.

pub mod batch;
pub mod tokenize;
