//! The CUDA driver API of the virtual device: the calls cudarc makes for hpo-gpu's flow
//! (../shared/toolchain-notes.md §1 lists them), with CUDA's error codes.
//!
//! One device ("vcuda virtual device"), one primary context, synchronous streams (work is done
//! when the call returns, so events and stream waits have nothing to wait for). Modules are PTX:
//! each `.entry` is bound at load to the host-compiled kernel of the same name, and the load fails
//! when a PTX entry has no host twin, a host kernel of the same file has no PTX entry, or their
//! parameter lists differ in count or size. A launch enforces the hardware's limits (block ≤ 1024
//! threads, grid y/z ≤ 65535, static shared ≤ 48 KB, dynamic shared above 48 KB only after
//! cuFuncSetAttribute), takes the arguments as `kernelParams` or as one packed buffer whose size
//! must be exactly the kernel's (`extra`, as hpo-gpu's launchers pass them), checks that every
//! pointer parameter is device memory, runs every block
//! (runtime/scheduler.cpp), then checks every allocation's guard zones.
//!
//! Failures print one line to stderr starting `vcuda:` that names the kernel and the problem (the
//! driver API can only return a code); [`last_error`] keeps it for tests.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use crate::memory::{self, AllocError};
use crate::ptx;

pub type CUresult = c_uint;
pub type CUdevice = c_int;
pub type CUdeviceptr = u64;

pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
pub const CUDA_ERROR_INVALID_IMAGE: CUresult = 200;
pub const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
pub const CUDA_ERROR_INVALID_PTX: CUresult = 218;
pub const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
pub const CUDA_ERROR_ILLEGAL_ADDRESS: CUresult = 700;
pub const CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: CUresult = 701;
pub const CUDA_ERROR_LAUNCH_FAILED: CUresult = 719;
pub const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;

/// The device's name: says it is not a GPU.
pub const DEVICE_NAME: &str = "vcuda virtual device (kernels run on the host)";
/// Shared memory a block may use without opting in, and the most it may opt in to (H100).
pub const SHARED_DEFAULT: u64 = 48 * 1024;
pub const SHARED_OPTIN_MAX: u64 = 227 * 1024;
pub const MAX_BLOCK_THREADS: u32 = 1024;

// ---- what the C++ runtime provides (runtime/registry.h, runtime/scheduler.cpp) ----

#[repr(C)]
pub struct KernelInfo {
    name: *const c_char,
    file: *const c_char,
    param_count: c_uint,
    param_sizes: *const c_uint,
    param_aligns: *const c_uint,
    param_is_pointer: *const u8,
    invoke: unsafe extern "C" fn(*mut *mut c_void),
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Dim3 {
    x: c_uint,
    y: c_uint,
    z: c_uint,
}

#[repr(C)]
struct RunLaunch {
    kernel: *const KernelInfo,
    grid: Dim3,
    block: Dim3,
    dynamic_shared_bytes: c_uint,
    params: *mut *mut c_void,
}

unsafe extern "C" {
    fn vcuda_kernel_count() -> usize;
    fn vcuda_kernel_at(i: usize) -> *const KernelInfo;
    fn vcuda_run(launch: *const RunLaunch, err: *mut c_char, err_len: usize, fault: *mut u64) -> c_int;
}

/// A host-compiled kernel, as the table describes it.
#[derive(Clone, Copy)]
pub struct HostKernel(&'static KernelInfo);

// SAFETY: the table is static and immutable.
unsafe impl Send for HostKernel {}
unsafe impl Sync for HostKernel {}

impl HostKernel {
    pub fn name(&self) -> &'static str {
        // SAFETY: the table holds string literals.
        unsafe { CStr::from_ptr(self.0.name) }.to_str().unwrap_or("?")
    }
    pub fn file(&self) -> &'static str {
        // SAFETY: as above.
        unsafe { CStr::from_ptr(self.0.file) }.to_str().unwrap_or("?")
    }
    pub fn param_sizes(&self) -> &'static [u32] {
        // SAFETY: the arrays hold param_count elements (plus one).
        unsafe { std::slice::from_raw_parts(self.0.param_sizes, self.0.param_count as usize) }
    }
    fn param_is_pointer(&self) -> &'static [u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.0.param_is_pointer, self.0.param_count as usize) }
    }
}

/// Every kernel compiled into this library.
pub fn host_kernels() -> Vec<HostKernel> {
    // SAFETY: indices below the count are valid table entries.
    (0..unsafe { vcuda_kernel_count() }).map(|i| HostKernel(unsafe { &*vcuda_kernel_at(i) })).collect()
}

// ---- errors ----

thread_local! {
    static LAST_ERROR: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The last failure's message on this thread (what was printed to stderr).
pub fn last_error() -> Option<String> {
    LAST_ERROR.with(|e| e.borrow().clone())
}

/// Says why a call fails, once, on stderr, and returns `code`.
fn failure(code: CUresult, message: String) -> CUresult {
    eprintln!("vcuda: {message}");
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(message));
    code
}

/// Runs an API call, turning a panic into CUDA_ERROR_UNKNOWN (nothing may unwind into C).
fn api(f: impl FnOnce() -> CUresult) -> CUresult {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        failure(CUDA_ERROR_UNKNOWN, "internal error (a panic in the virtual driver)".into())
    })
}

fn error_name(code: CUresult) -> &'static CStr {
    match code {
        CUDA_SUCCESS => c"CUDA_SUCCESS",
        CUDA_ERROR_INVALID_VALUE => c"CUDA_ERROR_INVALID_VALUE",
        CUDA_ERROR_OUT_OF_MEMORY => c"CUDA_ERROR_OUT_OF_MEMORY",
        CUDA_ERROR_NOT_INITIALIZED => c"CUDA_ERROR_NOT_INITIALIZED",
        CUDA_ERROR_INVALID_DEVICE => c"CUDA_ERROR_INVALID_DEVICE",
        CUDA_ERROR_INVALID_IMAGE => c"CUDA_ERROR_INVALID_IMAGE",
        CUDA_ERROR_INVALID_CONTEXT => c"CUDA_ERROR_INVALID_CONTEXT",
        CUDA_ERROR_INVALID_PTX => c"CUDA_ERROR_INVALID_PTX",
        CUDA_ERROR_INVALID_HANDLE => c"CUDA_ERROR_INVALID_HANDLE",
        CUDA_ERROR_NOT_FOUND => c"CUDA_ERROR_NOT_FOUND",
        CUDA_ERROR_ILLEGAL_ADDRESS => c"CUDA_ERROR_ILLEGAL_ADDRESS",
        CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES => c"CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
        CUDA_ERROR_LAUNCH_FAILED => c"CUDA_ERROR_LAUNCH_FAILED",
        CUDA_ERROR_NOT_SUPPORTED => c"CUDA_ERROR_NOT_SUPPORTED",
        _ => c"CUDA_ERROR_UNKNOWN",
    }
}

fn error_string(code: CUresult) -> &'static CStr {
    match code {
        CUDA_SUCCESS => c"no error",
        CUDA_ERROR_INVALID_VALUE => c"invalid argument",
        CUDA_ERROR_OUT_OF_MEMORY => c"out of memory",
        CUDA_ERROR_NOT_INITIALIZED => c"initialization error",
        CUDA_ERROR_INVALID_DEVICE => c"invalid device ordinal",
        CUDA_ERROR_INVALID_IMAGE => c"device kernel image is invalid",
        CUDA_ERROR_INVALID_CONTEXT => c"invalid device context",
        CUDA_ERROR_INVALID_PTX => c"a PTX JIT compilation failed",
        CUDA_ERROR_INVALID_HANDLE => c"invalid resource handle",
        CUDA_ERROR_NOT_FOUND => c"named symbol not found",
        CUDA_ERROR_ILLEGAL_ADDRESS => c"an illegal memory access was encountered",
        CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES => c"too many resources requested for launch",
        CUDA_ERROR_LAUNCH_FAILED => c"unspecified launch failure",
        CUDA_ERROR_NOT_SUPPORTED => c"operation not supported",
        _ => c"unknown error",
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, p_str: *mut *const c_char) -> CUresult {
    if p_str.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    unsafe { *p_str = error_string(error).as_ptr() };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, p_str: *mut *const c_char) -> CUresult {
    if p_str.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    unsafe { *p_str = error_name(error).as_ptr() };
    CUDA_SUCCESS
}

// ---- device and context ----

/// The primary context's handle: the address of this static.
static PRIMARY: u8 = 0;
static PRIMARY_RETAINS: AtomicU32 = AtomicU32::new(0);

fn primary() -> *mut c_void {
    &PRIMARY as *const u8 as *mut c_void
}

thread_local! {
    static CURRENT: std::cell::Cell<*mut c_void> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

fn check_device(dev: CUdevice) -> Result<(), CUresult> {
    if dev == 0 { Ok(()) } else { Err(CUDA_ERROR_INVALID_DEVICE) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    if flags != 0 { CUDA_ERROR_INVALID_VALUE } else { CUDA_SUCCESS }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    if version.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    unsafe { *version = 13000 };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    if count.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    unsafe { *count = 1 };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    if device.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ordinal != 0 {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    unsafe { *device = 0 };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    if let Err(e) = check_device(dev) {
        return e;
    }
    if name.is_null() || len <= 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let bytes = DEVICE_NAME.as_bytes();
    let n = bytes.len().min(len as usize - 1);
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), name as *mut u8, n);
        *name.add(n) = 0;
    }
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], dev: CUdevice) -> CUresult {
    if let Err(e) = check_device(dev) {
        return e;
    }
    if uuid.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    unsafe { *uuid = *b"vcuda-virtual-00" };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], dev: CUdevice) -> CUresult {
    unsafe { cuDeviceGetUuid(uuid, dev) }
}

/// Device attributes: an H100's limits (where they matter for a launch) on a host device.
fn attribute(attrib: c_int) -> Option<c_int> {
    Some(match attrib {
        1 => MAX_BLOCK_THREADS as c_int, // MAX_THREADS_PER_BLOCK
        2 | 3 => 1024,                   // MAX_BLOCK_DIM_X, _Y
        4 => 64,                         // MAX_BLOCK_DIM_Z
        5 => i32::MAX,                   // MAX_GRID_DIM_X
        6 | 7 => 65535,                  // MAX_GRID_DIM_Y, _Z
        8 => SHARED_DEFAULT as c_int,    // MAX_SHARED_MEMORY_PER_BLOCK
        9 => 65536,                      // TOTAL_CONSTANT_MEMORY
        10 => 32,                        // WARP_SIZE
        12 => 65536,                     // MAX_REGISTERS_PER_BLOCK
        13 => 1_000_000,                 // CLOCK_RATE (kHz)
        16 => 1,                         // MULTIPROCESSOR_COUNT
        39 => 2048,                      // MAX_THREADS_PER_MULTIPROCESSOR
        75 => 9,                         // COMPUTE_CAPABILITY_MAJOR
        76 => 0,                         // COMPUTE_CAPABILITY_MINOR
        81 => SHARED_OPTIN_MAX as c_int, // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        97 => SHARED_OPTIN_MAX as c_int, // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        115 => 1,                        // MEMORY_POOLS_SUPPORTED (cuMemAllocAsync)
        _ => 0,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(pi: *mut c_int, attrib: c_int, dev: CUdevice) -> CUresult {
    if let Err(e) = check_device(dev) {
        return e;
    }
    match (pi.is_null(), attribute(attrib)) {
        (false, Some(v)) => {
            unsafe { *pi = v };
            CUDA_SUCCESS
        }
        _ => CUDA_ERROR_INVALID_VALUE,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    if let Err(e) = check_device(dev) {
        return e;
    }
    if bytes.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    unsafe { *bytes = memory::total_bytes() as usize };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut *mut c_void, dev: CUdevice) -> CUresult {
    if let Err(e) = check_device(dev) {
        return e;
    }
    if pctx.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    PRIMARY_RETAINS.fetch_add(1, Ordering::SeqCst);
    unsafe { *pctx = primary() };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    if let Err(e) = check_device(dev) {
        return e;
    }
    let released = PRIMARY_RETAINS.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    if released.is_ok() { CUDA_SUCCESS } else { CUDA_ERROR_INVALID_CONTEXT }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut *mut c_void) -> CUresult {
    if pctx.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    unsafe { *pctx = CURRENT.with(|c| c.get()) };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: *mut c_void) -> CUresult {
    if !ctx.is_null() && ctx != primary() {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    CURRENT.with(|c| c.set(ctx));
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    if device.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    unsafe { *device = 0 };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    CUDA_SUCCESS
}

// ---- memory ----

fn allocate(dptr: *mut CUdeviceptr, bytes: usize) -> CUresult {
    if dptr.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    match memory::alloc(bytes as u64) {
        Ok(p) => {
            unsafe { *dptr = p };
            CUDA_SUCCESS
        }
        Err(AllocError::Empty) => CUDA_ERROR_INVALID_VALUE,
        Err(AllocError::OutOfMemory) => {
            let (free, total) = memory::info();
            failure(
                CUDA_ERROR_OUT_OF_MEMORY,
                format!("out of memory: {bytes} bytes asked, {free} of {total} free (VCUDA_MEMORY_BYTES)"),
            )
        }
    }
}

fn release(dptr: CUdeviceptr) -> CUresult {
    if memory::free(dptr) {
        CUDA_SUCCESS
    } else {
        failure(
            CUDA_ERROR_INVALID_VALUE,
            format!("free of {dptr:#x}, which is not the start of an allocation"),
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytes: usize) -> CUresult {
    api(|| allocate(dptr, bytes))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    bytes: usize,
    _stream: *mut c_void,
) -> CUresult {
    api(|| allocate(dptr, bytes))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    api(|| release(dptr))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, _stream: *mut c_void) -> CUresult {
    api(|| release(dptr))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    if free.is_null() || total.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let (f, t) = memory::info();
    unsafe {
        *free = f as usize;
        *total = t as usize;
    }
    CUDA_SUCCESS
}

fn device_range(call: &str, what: &str, ptr: CUdeviceptr, bytes: usize) -> Result<(), CUresult> {
    if bytes == 0 {
        return Ok(());
    }
    memory::check_range(ptr, bytes as u64)
        .map_err(|e| failure(CUDA_ERROR_INVALID_VALUE, format!("{call}: the {what}: {e}")))
}

fn memset(call: &str, dst: CUdeviceptr, value: u32, width: usize, count: usize) -> CUresult {
    api(|| {
        if let Err(e) = device_range(call, "destination", dst, count * width) {
            return e;
        }
        // SAFETY: the range was checked to lie inside a live allocation.
        unsafe {
            match width {
                1 => std::ptr::write_bytes(dst as *mut u8, value as u8, count),
                2 => std::slice::from_raw_parts_mut(dst as *mut u16, count).fill(value as u16),
                _ => std::slice::from_raw_parts_mut(dst as *mut u32, count).fill(value),
            }
        }
        CUDA_SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, value: u8, n: usize) -> CUresult {
    memset("cuMemsetD8", dst, value as u32, 1, n)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD8Async(dst: CUdeviceptr, value: u8, n: usize, _s: *mut c_void) -> CUresult {
    memset("cuMemsetD8Async", dst, value as u32, 1, n)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD16_v2(dst: CUdeviceptr, value: u16, n: usize) -> CUresult {
    memset("cuMemsetD16", dst, value as u32, 2, n)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD16Async(
    dst: CUdeviceptr,
    value: u16,
    n: usize,
    _s: *mut c_void,
) -> CUresult {
    memset("cuMemsetD16Async", dst, value as u32, 2, n)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, value: c_uint, n: usize) -> CUresult {
    memset("cuMemsetD32", dst, value, 4, n)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD32Async(
    dst: CUdeviceptr,
    value: c_uint,
    n: usize,
    _s: *mut c_void,
) -> CUresult {
    memset("cuMemsetD32Async", dst, value, 4, n)
}

enum Copy {
    HostToDevice(CUdeviceptr, *const c_void),
    DeviceToHost(*mut c_void, CUdeviceptr),
    DeviceToDevice(CUdeviceptr, CUdeviceptr),
}

fn copy(call: &str, what: Copy, bytes: usize) -> CUresult {
    api(|| {
        if bytes == 0 {
            return CUDA_SUCCESS;
        }
        let (dst, src) = match what {
            Copy::HostToDevice(d, s) => {
                if let Err(e) = device_range(call, "destination", d, bytes) {
                    return e;
                }
                (d as *mut u8, s as *const u8)
            }
            Copy::DeviceToHost(d, s) => {
                if let Err(e) = device_range(call, "source", s, bytes) {
                    return e;
                }
                (d as *mut u8, s as *const u8)
            }
            Copy::DeviceToDevice(d, s) => {
                if let Err(e) = device_range(call, "destination", d, bytes) {
                    return e;
                }
                if let Err(e) = device_range(call, "source", s, bytes) {
                    return e;
                }
                (d as *mut u8, s as *const u8)
            }
        };
        if dst.is_null() || src.is_null() {
            return failure(CUDA_ERROR_INVALID_VALUE, format!("{call}: a null host pointer"));
        }
        // SAFETY: device ranges were checked; host pointers are the caller's, valid for the call.
        unsafe { std::ptr::copy(src, dst, bytes) };
        CUDA_SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, bytes: usize) -> CUresult {
    copy("cuMemcpyHtoD", Copy::HostToDevice(dst, src), bytes)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    _s: *mut c_void,
) -> CUresult {
    copy("cuMemcpyHtoDAsync", Copy::HostToDevice(dst, src), bytes)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, bytes: usize) -> CUresult {
    copy("cuMemcpyDtoH", Copy::DeviceToHost(dst, src), bytes)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
    _s: *mut c_void,
) -> CUresult {
    copy("cuMemcpyDtoHAsync", Copy::DeviceToHost(dst, src), bytes)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) -> CUresult {
    copy("cuMemcpyDtoD", Copy::DeviceToDevice(dst, src), bytes)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
    _s: *mut c_void,
) -> CUresult {
    copy("cuMemcpyDtoDAsync", Copy::DeviceToDevice(dst, src), bytes)
}

// ---- streams and events: every call completes its work before returning ----

/// A stream or event handle: a leaked box, so handles are unique non-null addresses.
struct Event {
    recorded: Mutex<Option<Instant>>,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(stream: *mut *mut c_void, _flags: c_uint) -> CUresult {
    if stream.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    unsafe { *stream = Box::into_raw(Box::new(0u64)) as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    stream: *mut *mut c_void,
    flags: c_uint,
    _p: c_int,
) -> CUresult {
    unsafe { cuStreamCreate(stream, flags) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamDestroy_v2(stream: *mut c_void) -> CUresult {
    if stream.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    // SAFETY: made by cuStreamCreate.
    drop(unsafe { Box::from_raw(stream as *mut u64) });
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamSynchronize(_stream: *mut c_void) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamQuery(_stream: *mut c_void) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamWaitEvent(
    _stream: *mut c_void,
    _event: *mut c_void,
    _flags: c_uint,
) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(event: *mut *mut c_void, _flags: c_uint) -> CUresult {
    if event.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    unsafe { *event = Box::into_raw(Box::new(Event { recorded: Mutex::new(None) })) as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventDestroy_v2(event: *mut c_void) -> CUresult {
    if event.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    // SAFETY: made by cuEventCreate.
    drop(unsafe { Box::from_raw(event as *mut Event) });
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecord(event: *mut c_void, _stream: *mut c_void) -> CUresult {
    if event.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    // SAFETY: made by cuEventCreate.
    let e = unsafe { &*(event as *const Event) };
    *e.recorded.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventSynchronize(_event: *mut c_void) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventQuery(_event: *mut c_void) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: *mut c_void, end: *mut c_void) -> CUresult {
    if ms.is_null() || start.is_null() || end.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: made by cuEventCreate.
    let (s, e) = unsafe { (&*(start as *const Event), &*(end as *const Event)) };
    let s = *s.recorded.lock().unwrap_or_else(|p| p.into_inner());
    let e = *e.recorded.lock().unwrap_or_else(|p| p.into_inner());
    match (s, e) {
        (Some(s), Some(e)) => {
            unsafe { *ms = e.saturating_duration_since(s).as_secs_f32() * 1000.0 };
            CUDA_SUCCESS
        }
        _ => CUDA_ERROR_INVALID_HANDLE,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: *mut c_void,
    end: *mut c_void,
) -> CUresult {
    unsafe { cuEventElapsedTime(ms, start, end) }
}

// ---- modules and functions ----

/// A kernel of a loaded module: its PTX entry and its host twin.
pub struct Function {
    entry: ptx::Entry,
    host: HostKernel,
    /// cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES).
    max_dynamic_shared: AtomicU32,
}

/// Never changed after the load, so each function's address (its CUfunction) stays valid.
struct Module {
    functions: Vec<Function>,
}

/// Binds every entry of `ptx` to its host twin, or says why not.
fn load(ptx_text: &str) -> Result<Module, (CUresult, String)> {
    let entries =
        ptx::entries(ptx_text).map_err(|e| (CUDA_ERROR_INVALID_PTX, format!("unreadable PTX: {e}")))?;
    if entries.is_empty() {
        return Err((CUDA_ERROR_INVALID_IMAGE, "the PTX module has no .entry".into()));
    }
    let hosts = host_kernels();
    let mut functions = Vec::new();
    for entry in entries {
        let Some(host) = hosts.iter().find(|h| h.name() == entry.name).copied() else {
            return Err((
                CUDA_ERROR_INVALID_PTX,
                format!("PTX entry {} has no host-compiled twin in this virtual device", entry.name),
            ));
        };
        let ptx_sizes: Vec<u32> = entry.params.iter().map(|p| p.size).collect();
        if ptx_sizes != host.param_sizes() {
            return Err((
                CUDA_ERROR_INVALID_PTX,
                format!(
                    "kernel {}: the PTX declares parameter sizes {ptx_sizes:?} but its C++ signature {:?}",
                    entry.name,
                    host.param_sizes()
                ),
            ));
        }
        if entry.static_shared > SHARED_DEFAULT {
            return Err((
                CUDA_ERROR_INVALID_PTX,
                format!(
                    "kernel {} declares {} bytes of static shared memory (at most {SHARED_DEFAULT})",
                    entry.name, entry.static_shared
                ),
            ));
        }
        let max = (SHARED_DEFAULT - entry.static_shared) as u32;
        functions.push(Function { entry, host, max_dynamic_shared: AtomicU32::new(max) });
    }
    // The reverse: a kernel of the same source file that the PTX lacks.
    let files: Vec<&str> = functions.iter().map(|f| f.host.file()).collect();
    for h in hosts.iter().filter(|h| files.contains(&h.file())) {
        if !functions.iter().any(|f| f.entry.name == h.name()) {
            return Err((
                CUDA_ERROR_INVALID_PTX,
                format!(
                    "kernels/{}.cu defines kernel {} on the host, but the PTX has no such entry",
                    h.file(),
                    h.name()
                ),
            ));
        }
    }
    Ok(Module { functions })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut *mut c_void, image: *const c_void) -> CUresult {
    api(|| {
        if module.is_null() || image.is_null() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        // SAFETY: a PTX image is NUL-terminated text.
        let text = unsafe { CStr::from_ptr(image as *const c_char) };
        let Ok(text) = text.to_str() else {
            return failure(
                CUDA_ERROR_INVALID_IMAGE,
                "cuModuleLoadData: the image is not UTF-8 PTX text".into(),
            );
        };
        match load(text) {
            Ok(m) => {
                unsafe { *module = Box::into_raw(Box::new(m)) as *mut c_void };
                CUDA_SUCCESS
            }
            Err((code, message)) => failure(code, format!("cuModuleLoadData: {message}")),
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleUnload(module: *mut c_void) -> CUresult {
    if module.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    // SAFETY: made by cuModuleLoadData.
    drop(unsafe { Box::from_raw(module as *mut Module) });
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    function: *mut *mut c_void,
    module: *mut c_void,
    name: *const c_char,
) -> CUresult {
    api(|| {
        if function.is_null() || module.is_null() || name.is_null() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        // SAFETY: made by cuModuleLoadData; the name is a C string.
        let (m, name) = unsafe { (&*(module as *const Module), CStr::from_ptr(name)) };
        let name = name.to_string_lossy();
        match m.functions.iter().find(|f| f.entry.name == name) {
            Some(f) => {
                unsafe { *function = f as *const Function as *mut c_void };
                CUDA_SUCCESS
            }
            None => CUDA_ERROR_NOT_FOUND,
        }
    })
}

const FUNC_MAX_THREADS_PER_BLOCK: c_int = 0;
const FUNC_SHARED_SIZE_BYTES: c_int = 1;
const FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES: c_int = 8;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncSetAttribute(function: *mut c_void, attrib: c_int, value: c_int) -> CUresult {
    if function.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    // SAFETY: made by cuModuleGetFunction.
    let f = unsafe { &*(function as *const Function) };
    match attrib {
        FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES => {
            if value < 0 || f.entry.static_shared + value as u64 > SHARED_OPTIN_MAX {
                return failure(
                    CUDA_ERROR_INVALID_VALUE,
                    format!(
                        "cuFuncSetAttribute: {}: {value} bytes of dynamic shared memory exceed the device's {SHARED_OPTIN_MAX} per block",
                        f.entry.name
                    ),
                );
            }
            f.max_dynamic_shared.store(value as u32, Ordering::SeqCst);
            CUDA_SUCCESS
        }
        _ => CUDA_SUCCESS,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    function: *mut c_void,
) -> CUresult {
    if function.is_null() || pi.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: made by cuModuleGetFunction.
    let f = unsafe { &*(function as *const Function) };
    let v = match attrib {
        FUNC_MAX_THREADS_PER_BLOCK => MAX_BLOCK_THREADS as c_int,
        FUNC_SHARED_SIZE_BYTES => f.entry.static_shared as c_int,
        FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES => f.max_dynamic_shared.load(Ordering::SeqCst) as c_int,
        _ => 0,
    };
    unsafe { *pi = v };
    CUDA_SUCCESS
}

/// Why a launch configuration is refused (CUDA_ERROR_INVALID_VALUE), if it is.
fn check_config(
    f: &Function,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    dynamic_shared: c_uint,
) -> Result<(), String> {
    let name = &f.entry.name;
    if block.contains(&0) || grid.contains(&0) {
        return Err(format!("{name}: empty launch (grid {grid:?}, block {block:?})"));
    }
    let threads = block.iter().map(|&b| b as u64).product::<u64>();
    if threads > MAX_BLOCK_THREADS as u64 || block[0] > 1024 || block[1] > 1024 || block[2] > 64 {
        return Err(format!("{name}: block {block:?} has {threads} threads (at most 1024; z at most 64)"));
    }
    if grid[0] > i32::MAX as c_uint || grid[1] > 65535 || grid[2] > 65535 {
        return Err(format!("{name}: grid {grid:?} exceeds CUDA's limits (x < 2^31, y and z ≤ 65535)"));
    }
    let allowed = f.max_dynamic_shared.load(Ordering::SeqCst);
    if dynamic_shared > allowed {
        return Err(format!(
            "{name}: {dynamic_shared} bytes of dynamic shared memory, but the kernel may use {allowed} \
             ({} static; above {SHARED_DEFAULT} in all needs cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES))",
            f.entry.static_shared
        ));
    }
    Ok(())
}

const LAUNCH_PARAM_END: usize = 0;
const LAUNCH_PARAM_BUFFER_POINTER: usize = 1;
const LAUNCH_PARAM_BUFFER_SIZE: usize = 2;

/// Offsets of a kernel's parameters in a packed parameter buffer (each at a multiple of its
/// alignment, in order) and the buffer's size.
fn param_layout(params: &[ptx::Param]) -> (Vec<usize>, usize) {
    let mut offsets = Vec::with_capacity(params.len());
    let mut end = 0usize;
    for p in params {
        let at = end.next_multiple_of(p.align.max(1) as usize);
        offsets.push(at);
        end = at + p.size as usize;
    }
    (offsets, end)
}

/// With `extra` (CU_LAUNCH_PARAM_BUFFER_POINTER/SIZE): one pointer per parameter into the packed
/// buffer, after checking that its size is exactly what the kernel's parameters take. None when
/// the parameters come as `kernelParams`.
unsafe fn packed_params(
    f: &Function,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> Result<Option<Vec<*mut c_void>>, String> {
    if extra.is_null() {
        return Ok(None);
    }
    if !kernel_params.is_null() {
        return Err("both kernelParams and extra are given".into());
    }
    let (mut buffer, mut size) = (None, None);
    let mut i = 0;
    loop {
        // SAFETY: `extra` is a key/value list closed by CU_LAUNCH_PARAM_END.
        let key = unsafe { *extra.add(i) } as usize;
        if key == LAUNCH_PARAM_END {
            break;
        }
        let value = unsafe { *extra.add(i + 1) };
        match key {
            LAUNCH_PARAM_BUFFER_POINTER => buffer = Some(value as *mut u8),
            LAUNCH_PARAM_BUFFER_SIZE => size = Some(unsafe { *(value as *const usize) }),
            other => return Err(format!("unknown `extra` key {other:#x}")),
        }
        i += 2;
    }
    let (Some(buffer), Some(size)) = (buffer, size) else {
        return Err(
            "`extra` needs both CU_LAUNCH_PARAM_BUFFER_POINTER and CU_LAUNCH_PARAM_BUFFER_SIZE".into()
        );
    };
    let (offsets, total) = param_layout(&f.entry.params);
    if size != total {
        let sizes: Vec<u32> = f.entry.params.iter().map(|p| p.size).collect();
        return Err(format!(
            "the launcher passed {size} bytes of arguments, but the kernel's parameters {sizes:?} take {total}"
        ));
    }
    Ok(Some(offsets.iter().map(|&o| unsafe { buffer.add(o) } as *mut c_void).collect()))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernel(
    function: *mut c_void,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_mem_bytes: c_uint,
    _stream: *mut c_void,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    api(|| {
        if function.is_null() {
            return CUDA_ERROR_INVALID_HANDLE;
        }
        // SAFETY: made by cuModuleGetFunction; the module outlives its launches.
        let f = unsafe { &*(function as *const Function) };
        let name = f.entry.name.as_str();
        let (grid, block) = ([grid_x, grid_y, grid_z], [block_x, block_y, block_z]);
        if let Err(e) = check_config(f, grid, block, shared_mem_bytes) {
            return failure(CUDA_ERROR_INVALID_VALUE, format!("cuLaunchKernel: {e}"));
        }
        // SAFETY: cuLaunchKernel's contract for `extra`.
        let mut packed = match unsafe { packed_params(f, kernel_params, extra) } {
            Ok(p) => p,
            Err(e) => return failure(CUDA_ERROR_INVALID_VALUE, format!("cuLaunchKernel: {name}: {e}")),
        };
        let kernel_params = packed.as_mut().map_or(kernel_params, |p| p.as_mut_ptr());
        let count = f.host.param_sizes().len();
        if count > 0 && kernel_params.is_null() {
            return failure(
                CUDA_ERROR_INVALID_VALUE,
                format!("cuLaunchKernel: {name} takes {count} parameters, none given"),
            );
        }
        // Every pointer parameter must be device memory (or null): a host address, a length or a
        // stride passed where the kernel expects a pointer shows here.
        for (i, &is_pointer) in f.host.param_is_pointer().iter().enumerate() {
            if is_pointer == 0 {
                continue;
            }
            // SAFETY: cuLaunchKernel's contract: one valid pointer per kernel parameter.
            let slot = unsafe { *kernel_params.add(i) };
            if slot.is_null() {
                return failure(
                    CUDA_ERROR_INVALID_VALUE,
                    format!("cuLaunchKernel: {name}: parameter {i} is missing"),
                );
            }
            let value = unsafe { (slot as *const u64).read_unaligned() };
            if value != 0
                && memory::allocation_of(value).is_none()
                && memory::allocation_of(value - 1).is_none()
            {
                return failure(
                    CUDA_ERROR_INVALID_VALUE,
                    format!(
                        "cuLaunchKernel: {name}: pointer parameter {i} = {value:#x} is not device memory"
                    ),
                );
            }
        }
        let launch = RunLaunch {
            kernel: f.host.0,
            grid: Dim3 { x: grid_x, y: grid_y, z: grid_z },
            block: Dim3 { x: block_x, y: block_y, z: block_z },
            dynamic_shared_bytes: shared_mem_bytes,
            params: kernel_params,
        };
        let mut err = vec![0u8; 2048];
        let mut fault = 0u64;
        // SAFETY: the launch describes a host kernel and its caller-provided parameters.
        let result = unsafe { vcuda_run(&launch, err.as_mut_ptr() as *mut c_char, err.len(), &mut fault) };
        let err =
            CStr::from_bytes_until_nul(&err).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        match result {
            0 => {}
            1 => return failure(CUDA_ERROR_LAUNCH_FAILED, format!("launch failed: {err}")),
            _ => {
                let place = memory::guard_hit(fault)
                    .unwrap_or_else(|| "outside every allocation (or a fiber's stack overflowed)".into());
                return failure(
                    CUDA_ERROR_ILLEGAL_ADDRESS,
                    format!("{err}: illegal access at {fault:#x}, {place}"),
                );
            }
        }
        match memory::check_guards() {
            Ok(()) => CUDA_SUCCESS,
            Err(e) => failure(
                CUDA_ERROR_ILLEGAL_ADDRESS,
                format!("{name} (grid {grid:?}, block {block:?}) wrote outside its buffers: {e}"),
            ),
        }
    })
}
