//! Dropout with the counter-based Philox generator, for every trial at once.
//!
//! CPU twin: `cpu::philox::DropoutRng::apply` (as `cpu::bert`'s `apply_dropout` calls it).
//! Kernels: `kernels/dropout.cu`, generator in `kernels/philox.cuh`.

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::kernel::DROPOUT;
use super::launch::{Act, Launch, Span, blocks, config};
use crate::cpu::philox::DropoutRng;

/// Each trial's generator `[T]` on the device (seed lo, seed hi, stream, step: `DropoutState`).
pub struct DeviceRng {
    pub buf: CudaSlice<u32>,
    pub trials: usize,
}

impl DeviceRng {
    pub fn upload(gpu: &Gpu, rngs: &[DropoutRng]) -> Result<Self> {
        ensure!(!rngs.is_empty(), "dropout generators: no trials");
        let words: Vec<u32> =
            rngs.iter().flat_map(|r| [r.seed as u32, (r.seed >> 32) as u32, r.stream, r.step]).collect();
        let buf =
            gpu.stream.clone_htod(&words).map_err(|e| anyhow!("uploading dropout generators: {e:?}"))?;
        Ok(DeviceRng { buf, trials: rngs.len() })
    }
}

/// The keep threshold and scale exactly as the CPU computes them (`p as f32`, `(1/(1−p)) as f32`);
/// p = 0 keeps everything unchanged.
pub(crate) fn threshold_and_scale(p: f64) -> Result<(f32, f32)> {
    ensure!((0.0..=1.0).contains(&p), "dropout probability {p} is outside [0, 1]");
    Ok(if p <= 0.0 { (0.0, 1.0) } else { (p as f32, (1.0 / (1.0 - p)) as f32) })
}

/// Where a dropout launch reads and writes: `n` elements per trial, `stride` apart, which are
/// elements `base..base+n` of dropout site `site`.
#[derive(Clone, Copy, Debug)]
pub struct DropoutShape {
    pub trials: usize,
    pub n: usize,
    pub stride: usize,
    pub site: u32,
    pub base: usize,
}

/// out = x · keep/(1 − p), or in place when `out` is None.
pub fn dropout<A: Act>(
    gpu: &Gpu,
    shape: &DropoutShape,
    p: f64,
    rng: &DeviceRng,
    x: &mut CudaSlice<A>,
    out: Option<&mut CudaSlice<A>>,
) -> Result<()> {
    let (threshold, scale) = threshold_and_scale(p)?;
    ensure!(rng.trials >= shape.trials, "dropout: {} generators for {} trials", rng.trials, shape.trials);
    let span = Span::trials(shape.trials, shape.stride, shape.n);
    let mut launch = Launch::new(gpu, DROPOUT, A::SUFFIX)?;
    // In place, the kernel writes where it reads.
    match out.as_deref() {
        Some(out) => launch.buffer("out", out, span)?,
        None => launch.buffer("x", x, span)?,
    };
    launch.buffer("x", x, span)?.table(&rng.buf).arg(threshold).arg(scale).arg(shape.site);
    launch.arg(shape.base as u64).arg(shape.n as u64).arg(shape.stride as u64);
    if out.is_none() && p <= 0.0 {
        return Ok(()); // in place with nothing dropped: nothing to do, as on the CPU
    }
    launch.run(config(blocks(shape.n, 256), shape.trials, 1, 256, 0)?)
}
