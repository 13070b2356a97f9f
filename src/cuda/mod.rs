//! GPU backend. The kernels in `kernels/*.cu` are compiled to PTX by build.rs and embedded here;
//! this module finds out at run time whether they, libcuda and a device are all present.
//! `context::Gpu` loads them (`kernel` names them); `launch` is what every launcher shares; each
//! other file launches one kernel family and names its CPU twin. The device-op interface these
//! implement (`array_ops`) lives below, in `crate::ops`.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

pub mod accuracy;
pub mod array_ops;
pub mod attention;
pub mod bias;
pub mod context;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod gemm;
pub mod kernel;
pub mod launch;
pub mod layernorm;
pub mod optimizer;
pub mod rows;

use anyhow::{Result, bail};

/// Why the GPU cannot be used, or Ok with the device's name.
pub fn availability() -> Result<String> {
    prerequisites()?;
    let ctx =
        cudarc::driver::CudaContext::new(0).map_err(|e| anyhow::anyhow!("no usable CUDA device: {e:?}"))?;
    let name = ctx.name().map_err(|e| anyhow::anyhow!("cannot query the CUDA device: {e:?}"))?;
    Ok(name)
}

/// Ok when this build has kernels and libcuda loads; else why not. Checked before cudarc opens
/// anything: it panics instead of returning an error when libcuda cannot be loaded.
pub(crate) fn prerequisites() -> Result<()> {
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    match missing_piece(BUILT_WITH_NVCC && !KERNEL_PTX.is_empty(), driver) {
        Some(why) => bail!("{why}"),
        None => Ok(()),
    }
}

/// What keeps a GPU from being used before any device is opened: a build without kernels (with
/// how to rebuild when a driver is there to use them) or no driver.
fn missing_piece(built_with_kernels: bool, driver_present: bool) -> Option<&'static str> {
    match (built_with_kernels, driver_present) {
        (true, true) => None,
        (false, true) => Some(
            "this hpo-gpu was built without CUDA kernels although an NVIDIA driver is present: \
             run scripts/install-nvcc.sh, then build again (README, \"On a GPU\")",
        ),
        (false, false) => {
            Some("this hpo-gpu was built without CUDA kernels (nvcc was not found at build time)")
        }
        (true, false) => Some("libcuda.so was not found: no NVIDIA driver on this machine"),
    }
}

#[cfg(test)]
mod tests {
    use super::missing_piece;

    #[test]
    fn a_build_without_kernels_on_a_gpu_machine_says_how_to_rebuild() {
        let why = missing_piece(false, true).unwrap();
        assert!(why.contains("scripts/install-nvcc.sh, then build again"), "{why}");
        assert!(missing_piece(false, false).unwrap().contains("nvcc was not found"));
        assert!(missing_piece(true, false).unwrap().contains("no NVIDIA driver"));
        assert_eq!(missing_piece(true, true), None);
    }
}
