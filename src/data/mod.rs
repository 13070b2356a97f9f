//! Datasets: sources, subsets, tokenization and packed batches.
