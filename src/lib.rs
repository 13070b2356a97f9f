//! hpo-gpu: hyperparameter search for BERT fine-tuning, many trials at once on one GPU, with a CPU
//! reference implementation that matches Hugging Face transformers.
//!
//! Dependency direction: `main -> {study, search, train} -> {model, data} -> {cpu, cuda}`.

pub mod cpu;
pub mod cuda;
pub mod data;
pub mod model;
pub mod push;
pub mod report;
pub mod search;
pub mod study;
