//! The GPU context every launcher runs in: the CUDA context, its stream, the kernel modules
//! (embedded PTX, loaded once) and a cuBLAS handle on the same stream.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context as _, Result, anyhow, bail};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::KERNEL_PTX;
use super::kernel::{Kernel, Module};

/// One device with the kernels loaded. Launchers enqueue on `stream`; nothing waits for the GPU
/// until a copy back to the host (or `synchronize`).
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub name: String,
    modules: HashMap<Module, Arc<CudaModule>>,
}

impl Gpu {
    /// Opens device 0 and loads every kernel module; refuses with the reason when this build has
    /// no kernels, the machine has no NVIDIA driver, or there is no usable device.
    pub fn new() -> Result<Gpu> {
        super::prerequisites()?;
        let ctx = CudaContext::new(0).map_err(|e| anyhow!("no usable CUDA device: {e:?}"))?;
        let name = ctx.name().map_err(|e| anyhow!("cannot query the CUDA device: {e:?}"))?;
        let stream = ctx.default_stream();
        let mut modules = HashMap::new();
        for (stem, ptx) in KERNEL_PTX {
            let module = ctx
                .load_module(Ptx::from_src(*ptx))
                .map_err(|e| anyhow!("kernels/{stem}.cu: the driver refused its PTX on {name}: {e:?}"))?;
            // A file without a `Module` has no launcher (kernel.rs's test keeps the two in step).
            if let Some(id) = Module::from_stem(stem) {
                modules.insert(id, module);
            }
        }
        // Like libcuda, a missing libcublas would panic inside cudarc: check first.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            bail!(
                "libcublas was not found: put the CUDA toolkit's (or the nvidia-cublas wheel's) lib folder on LD_LIBRARY_PATH"
            );
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuBLAS could not start: {e:?}"))?;
        Ok(Gpu { ctx, stream, blas, name, modules })
    }

    /// The function of `kernel` with `variant` appended (`""` for kernels without variants).
    pub fn function(&self, kernel: Kernel, variant: &str) -> Result<CudaFunction> {
        let stem = kernel.module.stem();
        let module = self
            .modules
            .get(&kernel.module)
            .ok_or_else(|| anyhow!("kernels/{stem}.cu is not in this build"))?;
        let name = full_name(kernel, variant);
        module
            .load_function(&name)
            .with_context(|| format!("kernel {name} is missing from kernels/{stem}.cu"))
    }

    /// Waits for everything enqueued so far; a failed kernel surfaces here.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("CUDA stream failed: {e:?}"))
    }
}

/// `kernel`'s name with `variant` appended, as the kernel files name their instantiations.
pub fn full_name(kernel: Kernel, variant: &str) -> String {
    if variant.is_empty() { kernel.name.to_string() } else { format!("{}_{variant}", kernel.name) }
}
