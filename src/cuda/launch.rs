//! What every launcher shares: the activation storage types, device addresses, grid shapes and
//! the bounds checks that keep a wrong shape from becoming an out-of-bounds GPU write.

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, LaunchConfig, SyncOnDrop,
    ValidAsZeroBits,
};

/// An activation storage type: fp32, or bf16 for the bf16 compute mode (arithmetic stays fp32;
/// master weights, gradients and moments are always fp32).
pub trait Act: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {
    /// The kernel name suffix (`layernorm_forward_f32`, `…_bf16`).
    const SUFFIX: &'static str;
    fn of_f32(x: f32) -> Self;
    fn as_f32(self) -> f32;
}

impl Act for f32 {
    const SUFFIX: &'static str = "f32";
    fn of_f32(x: f32) -> Self {
        x
    }
    fn as_f32(self) -> f32 {
        self
    }
}

impl Act for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn of_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn as_f32(self) -> f32 {
        self.to_f32()
    }
}

/// The device address of element `offset` of `buf`, with the guard cudarc needs kept alive until
/// the launch is enqueued.
pub fn addr<'a, T>(buf: &'a CudaSlice<T>, offset: usize, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    let (p, guard) = buf.device_ptr(stream);
    (p + (offset * std::mem::size_of::<T>()) as u64, guard)
}

/// Checks that `buf` (of `len` elements) holds `trials` blocks of `per_trial` elements spaced
/// `stride` apart, starting at `offset`.
pub fn check_len(
    name: &str,
    len: usize,
    offset: usize,
    trials: usize,
    stride: usize,
    per_trial: usize,
) -> Result<()> {
    let need = if trials == 0 || per_trial == 0 { 0 } else { offset + (trials - 1) * stride + per_trial };
    ensure!(
        len >= need,
        "{name}: the device buffer holds {len} elements but the launch reaches element {need} \
         ({trials} trials, stride {stride}, {per_trial} per trial from offset {offset})"
    );
    ensure!(
        trials <= 1 || stride == 0 || stride >= per_trial,
        "{name}: per-trial stride {stride} is shorter than one trial's {per_trial} elements"
    );
    Ok(())
}

/// `v` as a kernel `int`.
pub fn int(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("{name} = {v} does not fit a kernel int"))
}

/// A launch over `x_blocks` × `y` × `z` blocks of `block` threads, within CUDA's grid limits.
pub fn config(x_blocks: u64, y: usize, z: usize, block: u32, shared_mem_bytes: u32) -> Result<LaunchConfig> {
    ensure!((1..(1 << 31)).contains(&x_blocks), "grid x = {x_blocks} blocks is outside CUDA's limit");
    ensure!((1..=65_535).contains(&y), "grid y = {y} is outside CUDA's limit of 65535");
    ensure!((1..=65_535).contains(&z), "grid z = {z} is outside CUDA's limit of 65535");
    Ok(LaunchConfig {
        grid_dim: (x_blocks as u32, y as u32, z as u32),
        block_dim: (block, 1, 1),
        shared_mem_bytes,
    })
}

/// Blocks of `block` threads covering `n` elements.
pub fn blocks(n: usize, block: u32) -> u64 {
    (n as u64).div_ceil(block as u64).max(1)
}

/// Turns a driver error into one that names the kernel.
pub fn launched(name: &str, r: std::result::Result<(), cudarc::driver::DriverError>) -> Result<()> {
    r.map_err(|e| anyhow!("launching {name} failed: {e:?}"))
}

/// A kernel's arguments packed into one parameter buffer as CUDA lays one out (each value at the
/// next multiple of its own alignment, in order), launched with `CU_LAUNCH_PARAM_BUFFER_POINTER`
/// and `CU_LAUNCH_PARAM_BUFFER_SIZE`. The driver then knows how many bytes the launcher passed and
/// refuses a buffer that does not match the kernel's parameters — an `int` where the kernel takes
/// a `u64`, or an argument too few — instead of reading past what was passed.
pub struct KernelArgs {
    function: CudaFunction,
    buffer: Vec<u8>,
}

impl KernelArgs {
    pub fn new(function: CudaFunction) -> Self {
        KernelArgs { function, buffer: Vec::with_capacity(128) }
    }

    /// Appends one argument: a device address (`u64`), a scalar, or a `#[repr(C)]` struct of them.
    pub fn arg<T: DeviceRepr>(&mut self, value: &T) -> &mut Self {
        let align = std::mem::align_of::<T>();
        self.buffer.resize(self.buffer.len().next_multiple_of(align), 0);
        // SAFETY: DeviceRepr types are plain `#[repr(C)]` values; the ones launched here (integers,
        // floats, structs of 4-byte fields) have no padding, so every byte read is initialised.
        let bytes =
            unsafe { std::slice::from_raw_parts(value as *const T as *const u8, std::mem::size_of::<T>()) };
        self.buffer.extend_from_slice(bytes);
        self
    }

    /// Enqueues the kernel on `stream`.
    ///
    /// # Safety
    /// The arguments must be what the kernel's signature declares, and every device address in
    /// them must stay valid until the kernel has run.
    pub unsafe fn launch(&self, stream: &CudaStream, cfg: LaunchConfig) -> Result<(), DriverError> {
        use std::ffi::c_void;
        stream.context().bind_to_thread()?;
        let mut size = self.buffer.len();
        // cuLaunchKernel's `extra`: (key, value) pairs closed by CU_LAUNCH_PARAM_END (keys 1, 2, 0).
        let mut extra: [*mut c_void; 5] = [
            std::ptr::without_provenance_mut(1),
            self.buffer.as_ptr() as *mut c_void,
            std::ptr::without_provenance_mut(2),
            &mut size as *mut usize as *mut c_void,
            std::ptr::null_mut(),
        ];
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        // SAFETY: the caller's contract; `extra` and the buffer outlive the call, which copies them.
        unsafe {
            cudarc::driver::sys::cuLaunchKernel(
                self.function.cu_function(),
                g.0,
                g.1,
                g.2,
                b.0,
                b.1,
                b.2,
                cfg.shared_mem_bytes,
                stream.cu_stream(),
                std::ptr::null_mut(),
                extra.as_mut_ptr(),
            )
        }
        .result()
    }
}

/// The elements one launch reaches in a buffer: `trials` blocks of `per_trial` elements, `stride`
/// apart (0: one block shared by every trial), from element `offset`.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub offset: usize,
    pub trials: usize,
    pub stride: usize,
    pub per_trial: usize,
}

impl Span {
    /// `trials` blocks of `per_trial` elements `stride` apart, from element 0.
    pub fn trials(trials: usize, stride: usize, per_trial: usize) -> Span {
        Span { offset: 0, trials, stride, per_trial }
    }
    /// The same blocks from element `offset` of every trial's block.
    pub fn at(self, offset: usize) -> Span {
        Span { offset, ..self }
    }
}

/// One kernel launch being put together: its arguments in order, each buffer checked against the
/// elements the launch reaches before its device address is taken, and the guards cudarc needs
/// kept until the kernel is enqueued.
pub struct Launch<'a> {
    stream: &'a CudaStream,
    name: String,
    args: KernelArgs,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Launch<'a> {
    /// A launch of `kernel` with `variant` appended to its name (`""`: none).
    pub fn new(gpu: &'a super::context::Gpu, kernel: super::kernel::Kernel, variant: &str) -> Result<Self> {
        Ok(Launch {
            stream: &gpu.stream,
            name: super::context::full_name(kernel, variant),
            args: KernelArgs::new(gpu.function(kernel, variant)?),
            guards: Vec::new(),
        })
    }

    /// The kernel's full name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Appends a scalar or a `#[repr(C)]` struct of them (see [`KernelArgs::arg`]).
    pub fn arg<T: DeviceRepr>(&mut self, value: T) -> &mut Self {
        self.args.arg(&value);
        self
    }

    /// Appends `value` as a kernel `int`.
    pub fn int(&mut self, what: &str, value: usize) -> Result<&mut Self> {
        Ok(self.arg(int(what, value)?))
    }

    /// Appends the address of element `span.offset` of `buf` after checking that `buf` holds every
    /// element of `span` (`what` names the buffer in the error).
    pub fn buffer<T>(&mut self, what: &str, buf: &'a CudaSlice<T>, span: Span) -> Result<&mut Self> {
        let name = format!("{} {what}", self.name);
        check_len(&name, buf.len(), span.offset, span.trials, span.stride, span.per_trial)?;
        Ok(self.address(buf, span.offset))
    }

    /// [`Launch::buffer`], or a null address when the kernel is to do without the buffer.
    pub fn optional<T>(
        &mut self,
        what: &str,
        buf: Option<&'a CudaSlice<T>>,
        span: Span,
    ) -> Result<&mut Self> {
        match buf {
            Some(buf) => self.buffer(what, buf, span),
            None => Ok(self.arg(0u64)),
        }
    }

    /// Appends the address of a buffer whose contents were checked when it was made (token rows,
    /// labels, attention blocks, generators, the launcher's own scratch).
    pub fn table<T>(&mut self, buf: &'a CudaSlice<T>) -> &mut Self {
        self.address(buf, 0)
    }

    fn address<T>(&mut self, buf: &'a CudaSlice<T>, offset: usize) -> &mut Self {
        let (address, guard) = addr(buf, offset, self.stream);
        self.guards.push(guard);
        self.arg(address)
    }

    /// Enqueues the kernel over `cfg`'s grid.
    pub fn run(self, cfg: LaunchConfig) -> Result<()> {
        // SAFETY: every launcher appends exactly the kernel's parameters (the driver refuses a
        // parameter buffer of another size), and `self.guards` keeps each address valid until
        // the launch is enqueued.
        let result = unsafe { self.args.launch(self.stream, cfg) };
        drop(self.guards);
        launched(&self.name, result)
    }
}
