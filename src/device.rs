//! Which device a command runs on: `--device auto|cpu|cuda`, resolved against what this machine
//! and build can use, and the GPU's self-check before the first trial.

use anyhow::{Result, bail};

/// The compute device a command runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The GPU when one is usable, else the CPU reference.
    Auto,
    Cpu,
    Cuda,
}

/// The precision of the CPU's linear-layer products (`--precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in fp32.
    #[default]
    Fp32,
    /// The linear layers' products in bfloat16 (AMX or AVX512_BF16, through oneDNN), sums,
    /// weights, optimizer state and every other op in fp32.
    Bf16,
}

/// Turns `--precision bf16` on for this process, or says in one line why it cannot (the GPU
/// path, a CPU without bf16 instructions, oneDNN missing). Call with the device that will run.
pub fn resolve_precision(precision: Precision, device: Device) -> Result<()> {
    match (precision, device) {
        (Precision::Fp32, _) => Ok(()),
        (Precision::Bf16, Device::Cuda) => {
            bail!(
                "--precision bf16 is for the CPU; the GPU path trains in fp32 (use --device cpu or --precision fp32)"
            )
        }
        (Precision::Bf16, _) => {
            let what = crate::cpu::onednn::enable_bf16()?;
            eprintln!("note: linear layers' products in bf16 by {what}");
            Ok(())
        }
    }
}

/// Resolves `--device` to the backend that will run: `cuda` must be usable; `auto` takes the GPU
/// when it is usable and falls back to the CPU otherwise (saying why on stderr).
pub fn resolve_device(requested: Device) -> Result<Device> {
    let device = resolve(requested)?;
    if device == Device::Cpu {
        // A bad HPO_GPU_GEMM is one line here, before any work.
        crate::cpu::blas::gemm_library()?;
        if let Some(warning) = crate::cpu::blas::openblas_core_warning() {
            eprintln!("note: {warning}");
        }
    }
    Ok(device)
}

fn resolve(requested: Device) -> Result<Device> {
    match requested {
        Device::Cpu => Ok(Device::Cpu),
        Device::Cuda => {
            crate::cuda::availability().map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
            Ok(Device::Cuda)
        }
        Device::Auto => match crate::cuda::availability() {
            Err(why) => {
                eprintln!("note: running on the CPU ({why})");
                Ok(Device::Cpu)
            }
            Ok(name) => {
                eprintln!("note: running on {name} (--device cpu for the CPU reference)");
                Ok(Device::Cuda)
            }
        },
    }
}

/// Runs the GPU self-check (`crate::trial_array::device::gpu::tick_matches_host`) when `device` is the GPU: a mismatch
/// stops `--device cuda` with the reason, and sends `--device auto` to the CPU with one line
/// saying why. `head_dim` is the model's attention head size.
pub fn checked_device(requested: Device, device: Device, head_dim: usize) -> Result<Device> {
    if device != Device::Cuda {
        return Ok(device);
    }
    let check = crate::cuda::context::Gpu::new()
        .and_then(|gpu| crate::trial_array::device::gpu::tick_matches_host(gpu, head_dim));
    match (check, requested) {
        (Ok(()), _) => Ok(Device::Cuda),
        (Err(why), Device::Cuda) => bail!("--device cuda: {why:#}"),
        (Err(why), _) => {
            eprintln!("note: running on the CPU: {why:#}");
            Ok(Device::Cpu)
        }
    }
}
