//! hpo-gpu: hyperparameter search for BERT fine-tuning, many trials at once on one GPU, with a CPU
//! reference implementation that matches Hugging Face transformers.
//!
//! Dependency direction: `main -> {study, search, train} -> {model, data} -> {cpu, cuda}`.

pub mod cli;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod device;
pub mod distributions;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;
pub mod model;
pub mod ops;
pub mod push;
pub mod pyjson;
pub mod report;
pub mod search;
pub mod study;
pub mod train;
pub mod trial;
pub mod trial_array;

/// Keeps freed large buffers in the process instead of returning them to the kernel. The CPU
/// backend allocates activation buffers of several MB per forward pass; with glibc's default
/// thresholds each one is a fresh mmap whose page faults and zeroing cost ~10% of a step.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
