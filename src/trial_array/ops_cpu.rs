//! The host ops moved to [`crate::ops::cpu`]; this keeps the old path (`trial_array::ops_cpu::CpuOps`)
//! working until `trial_array/mod.rs` drops the module.

pub use crate::ops::cpu::CpuOps;
