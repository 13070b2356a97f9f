//! cuBLAS of the virtual device: the handle API and four GEMMs (`cublasSgemm_v2`,
//! `cublasSgemmStridedBatched`, `cublasGemmEx`, `cublasGemmStridedBatchedEx`), computed on the host
//! CPU. Device pointers of the virtual device are host addresses (see [`crate::memory`]), so the
//! operands are read and written in place.
//!
//! Written from NVIDIA's cuBLAS documentation (the cuBLAS API chapter: data layout, cublasStatus_t,
//! cublasMath_t, cublasComputeType_t, cublas<t>gemm, cublas<t>gemmStridedBatched, cublasGemmEx,
//! cublasGemmStridedBatchedEx). The exported C signatures and enum values are those of cudarc
//! 0.19's `cublas::sys` bindings, which dlsym these names; enum arguments are taken as plain
//! integers so that an out-of-range value from a caller is reported, not undefined behaviour.
//!
//! What a GEMM computes, per batch `b` (batch 0 only for the non-batched calls):
//! `C_b = alpha * op(A_b) * op(B_b) + beta * C_b`, column-major storage (element (i, j) of a matrix
//! with leading dimension `ld` lies at `i + j * ld`), op(A) m×k, op(B) k×n, C m×n, op(X) = X for
//! CUBLAS_OP_N and Xᵀ for CUBLAS_OP_T and CUBLAS_OP_C (the conjugate of a real matrix is itself),
//! `X_b` starting `b * strideX` elements after `X`.
//! - `alpha` and `beta` are read from host memory as `f32` (the scale type of every compute type
//!   implemented here); with CUBLAS_POINTER_MODE_DEVICE a GEMM answers CUBLAS_STATUS_NOT_SUPPORTED.
//! - `beta == 0`: C is not read ("if beta == 0, C does not have to be a valid input").
//! - `alpha == 0` or `k == 0`: `C = beta * C`, A and B are not read (as the reference BLAS does);
//!   if moreover `beta == 1`, nothing is touched. `m == 0`, `n == 0` or `batchCount == 0`: nothing.
//! - Accumulation is in `f32` in a fixed order: product `p` of the k-sum goes to partial sum
//!   `p mod 8`, and the eight partial sums are added pairwise at the end; no fused multiply-add.
//! - Inputs: `f32`, or bf16/f16 widened exactly. Reduced-precision input rounding (each element of
//!   A and B rounded to nearest even before multiplying) follows the compute type and math mode:
//!   CUBLAS_COMPUTE_32F_FAST_TF32, or CUBLAS_COMPUTE_32F / `cublasSgemm` under
//!   CUBLAS_TF32_TENSOR_OP_MATH → TF32 (10 mantissa bits); CUBLAS_COMPUTE_32F_FAST_16BF → bf16;
//!   CUBLAS_COMPUTE_32F_FAST_16F, or CUBLAS_COMPUTE_32F / `cublasSgemm` under the deprecated
//!   CUBLAS_TENSOR_OP_MATH → f16. CUBLAS_DEFAULT_MATH, CUBLAS_PEDANTIC_MATH and the `_PEDANTIC`
//!   compute types keep exact `f32`. The math mode only affects `f32` inputs.
//! - Outputs: `f32`, or rounded to nearest even into bf16/f16 (`half`).
//! - cublasGemmEx types (Atype = Btype, Ctype, computeType): {32F, 16BF, 16F} in, same or 32F out,
//!   with CUBLAS_COMPUTE_32F or _PEDANTIC; 32F in and out with the three FAST compute types. The
//!   legacy `cudaDataType_t` value CUDA_R_32F as computeType means CUBLAS_COMPUTE_32F (or
//!   _PEDANTIC under CUBLAS_PEDANTIC_MATH), as cuBLAS 11 kept it for backward compatibility.
//!   Other known types answer CUBLAS_STATUS_NOT_SUPPORTED; values that are no type at all,
//!   CUBLAS_STATUS_INVALID_VALUE.
//!
//! Checks beyond cuBLAS (this is a test device): before computing, every batch's byte range of A,
//! B and C that the GEMM touches must lie inside one live allocation and be aligned to its element
//! size, else CUBLAS_STATUS_EXECUTION_FAILED with nothing written; after computing, the guard zones
//! of all allocations are checked ([`crate::memory::check_guards`]). Every failure prints one line
//! to stderr and is kept for [`last_error`].
//!
//! The work runs synchronously on the calling thread when the function is called; the handle's
//! stream is recorded (cublasGetStream_v2 returns it) but orders nothing.

// The exported names are cuBLAS's; their safety contract is the C API's (NVIDIA's documentation):
// valid handles, pointers to what each argument describes.
#![allow(non_snake_case, clippy::missing_safety_doc, clippy::too_many_arguments)]

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_longlong, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use half::{bf16, f16};

/// `cublasHandle_t`.
pub type CublasHandle = *mut c_void;
/// `cudaStream_t` / `CUstream`.
pub type CudaStream = *mut c_void;
/// `cublasStatus_t`.
pub type CublasStatus = u32;

pub const CUBLAS_STATUS_SUCCESS: CublasStatus = 0;
pub const CUBLAS_STATUS_NOT_INITIALIZED: CublasStatus = 1;
pub const CUBLAS_STATUS_ALLOC_FAILED: CublasStatus = 3;
pub const CUBLAS_STATUS_INVALID_VALUE: CublasStatus = 7;
pub const CUBLAS_STATUS_ARCH_MISMATCH: CublasStatus = 8;
pub const CUBLAS_STATUS_MAPPING_ERROR: CublasStatus = 11;
pub const CUBLAS_STATUS_EXECUTION_FAILED: CublasStatus = 13;
pub const CUBLAS_STATUS_INTERNAL_ERROR: CublasStatus = 14;
pub const CUBLAS_STATUS_NOT_SUPPORTED: CublasStatus = 15;
pub const CUBLAS_STATUS_LICENSE_ERROR: CublasStatus = 16;

// cublasOperation_t
pub const CUBLAS_OP_N: u32 = 0;
pub const CUBLAS_OP_T: u32 = 1;
pub const CUBLAS_OP_C: u32 = 2;

// cublasPointerMode_t
pub const CUBLAS_POINTER_MODE_HOST: u32 = 0;
pub const CUBLAS_POINTER_MODE_DEVICE: u32 = 1;

// cublasMath_t: one mode in the low bits, optionally or'ed with the flag.
pub const CUBLAS_DEFAULT_MATH: u32 = 0;
pub const CUBLAS_TENSOR_OP_MATH: u32 = 1;
pub const CUBLAS_PEDANTIC_MATH: u32 = 2;
pub const CUBLAS_TF32_TENSOR_OP_MATH: u32 = 3;
pub const CUBLAS_FP32_EMULATED_BF16X9_MATH: u32 = 4;
pub const CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH: u32 = 8;
pub const CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION: u32 = 16;

// cudaDataType_t (the ones implemented; values 0..=33 are all known types).
pub const CUDA_R_32F: u32 = 0;
pub const CUDA_R_16F: u32 = 2;
pub const CUDA_R_16BF: u32 = 14;
const LAST_KNOWN_DATA_TYPE: u32 = 33;

// cublasComputeType_t
pub const CUBLAS_COMPUTE_16F: u32 = 64;
pub const CUBLAS_COMPUTE_16F_PEDANTIC: u32 = 65;
pub const CUBLAS_COMPUTE_32F: u32 = 68;
pub const CUBLAS_COMPUTE_32F_PEDANTIC: u32 = 69;
pub const CUBLAS_COMPUTE_64F: u32 = 70;
pub const CUBLAS_COMPUTE_64F_PEDANTIC: u32 = 71;
pub const CUBLAS_COMPUTE_32I: u32 = 72;
pub const CUBLAS_COMPUTE_32I_PEDANTIC: u32 = 73;
pub const CUBLAS_COMPUTE_32F_FAST_16F: u32 = 74;
pub const CUBLAS_COMPUTE_32F_FAST_16BF: u32 = 75;
pub const CUBLAS_COMPUTE_32F_FAST_TF32: u32 = 77;
pub const CUBLAS_COMPUTE_32F_EMULATED_16BFX9: u32 = 78;
pub const CUBLAS_COMPUTE_64F_EMULATED_FIXEDPOINT: u32 = 79;

// cublasGemmAlgo_t: the algorithm picks an implementation, never a different result, so every
// known value is accepted.
pub const CUBLAS_GEMM_DEFAULT: i32 = -1;
pub const CUBLAS_GEMM_DEFAULT_TENSOR_OP: i32 = 99;
const CUBLAS_GEMM_AUTOTUNE: i32 = 999;

/// The version cublasGetVersion_v2 reports (major * 10000 + minor * 100 + patch): cuBLAS 13.0.0,
/// the CUDA 13.0 that the project's cudarc features name.
pub const VERSION: c_int = 13 * 10000;

// ---------------------------------------------------------------------------------------------
// Failures, last_error, the FFI boundary

/// Why a call failed: the status it returns and a sentence for stderr and [`last_error`].
struct Failure {
    status: CublasStatus,
    message: String,
}

fn fail<T>(status: CublasStatus, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure { status, message: message.into() })
}

static LAST_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// The line printed for the most recent failed call of this module (any thread), if any.
pub fn last_error() -> Option<String> {
    LAST_ERROR.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Runs an exported function's body: a failure is printed and recorded, a panic becomes
/// CUBLAS_STATUS_INTERNAL_ERROR instead of unwinding into C.
fn entry(function: &str, body: impl FnOnce() -> Result<(), Failure>) -> CublasStatus {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return CUBLAS_STATUS_SUCCESS,
        Ok(Err(failure)) => failure,
        Err(_) => Failure {
            status: CUBLAS_STATUS_INTERNAL_ERROR,
            message: "panicked (a bug in vcuda's cuBLAS)".to_string(),
        },
    };
    let line = format!("vcuda cuBLAS: {function}: {}", failure.message);
    // eprintln (not a raw write to stderr) so test harnesses capture it; its panic when stderr
    // is gone must not cross into C, and there is nothing useful to do about it.
    let _ = catch_unwind(|| eprintln!("{line}"));
    *LAST_ERROR.lock().unwrap_or_else(|p| p.into_inner()) = Some(line);
    failure.status
}

// ---------------------------------------------------------------------------------------------
// Handles

#[derive(Clone, Copy, Debug)]
struct HandleState {
    stream: usize,
    math_mode: u32,
    pointer_mode: u32,
}

const NEW_HANDLE: HandleState =
    HandleState { stream: 0, math_mode: CUBLAS_DEFAULT_MATH, pointer_mode: CUBLAS_POINTER_MODE_HOST };

/// Live handles by value. Handles are opaque tokens never reused, so a destroyed handle is always
/// recognised (CUBLAS_STATUS_NOT_INITIALIZED) rather than aliasing a newer one.
static HANDLES: Mutex<BTreeMap<usize, HandleState>> = Mutex::new(BTreeMap::new());
static HANDLES_MADE: AtomicUsize = AtomicUsize::new(0);
const HANDLE_BASE: usize = 0xcb1a_0000_0000;

fn handles() -> MutexGuard<'static, BTreeMap<usize, HandleState>> {
    // Every update is one insert, remove or field store: a poisoned map is still consistent.
    HANDLES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Applies `f` to the state of a live handle.
fn with_handle<R>(handle: CublasHandle, f: impl FnOnce(&mut HandleState) -> R) -> Result<R, Failure> {
    if handle.is_null() {
        return fail(CUBLAS_STATUS_NOT_INITIALIZED, "handle is NULL");
    }
    match handles().get_mut(&(handle as usize)) {
        Some(state) => Ok(f(state)),
        None => fail(
            CUBLAS_STATUS_NOT_INITIALIZED,
            format!(
                "handle {handle:p} is not a live handle (never created by cublasCreate_v2, or destroyed)"
            ),
        ),
    }
}

/// Writes `value` to a caller's out-pointer, failing on NULL.
fn put<T>(out: *mut T, value: T, what: &str) -> Result<(), Failure> {
    if out.is_null() {
        return fail(CUBLAS_STATUS_INVALID_VALUE, format!("{what} (the out-pointer) is NULL"));
    }
    // SAFETY: the C API's contract: a non-NULL out-pointer points to writable storage for a T.
    unsafe { out.write_unaligned(value) };
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasCreate_v2(handle: *mut CublasHandle) -> CublasStatus {
    entry("cublasCreate_v2", || {
        if handle.is_null() {
            return fail(CUBLAS_STATUS_INVALID_VALUE, "handle (the out-pointer) is NULL");
        }
        let token = HANDLE_BASE + 16 * (HANDLES_MADE.fetch_add(1, Ordering::Relaxed) + 1);
        handles().insert(token, NEW_HANDLE);
        put(handle, token as CublasHandle, "handle")
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasDestroy_v2(handle: CublasHandle) -> CublasStatus {
    entry("cublasDestroy_v2", || {
        with_handle(handle, |_| ())?;
        handles().remove(&(handle as usize));
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSetStream_v2(handle: CublasHandle, stream: CudaStream) -> CublasStatus {
    entry("cublasSetStream_v2", || with_handle(handle, |s| s.stream = stream as usize))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGetStream_v2(handle: CublasHandle, stream: *mut CudaStream) -> CublasStatus {
    entry("cublasGetStream_v2", || {
        let current = with_handle(handle, |s| s.stream)?;
        put(stream, current as CudaStream, "streamId")
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSetMathMode(handle: CublasHandle, mode: u32) -> CublasStatus {
    entry("cublasSetMathMode", || {
        with_handle(handle, |_| ())?;
        let base = mode & !CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
        let known = [
            CUBLAS_DEFAULT_MATH,
            CUBLAS_TENSOR_OP_MATH,
            CUBLAS_PEDANTIC_MATH,
            CUBLAS_TF32_TENSOR_OP_MATH,
            CUBLAS_FP32_EMULATED_BF16X9_MATH,
            CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH,
        ];
        if !known.contains(&base) {
            return fail(CUBLAS_STATUS_INVALID_VALUE, format!("mode {mode} is not a cublasMath_t"));
        }
        with_handle(handle, |s| s.math_mode = mode)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGetMathMode(handle: CublasHandle, mode: *mut u32) -> CublasStatus {
    entry("cublasGetMathMode", || {
        let current = with_handle(handle, |s| s.math_mode)?;
        put(mode, current, "mode")
    })
}

/// Both modes are accepted here; a GEMM under CUBLAS_POINTER_MODE_DEVICE answers
/// CUBLAS_STATUS_NOT_SUPPORTED.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSetPointerMode_v2(handle: CublasHandle, mode: u32) -> CublasStatus {
    entry("cublasSetPointerMode_v2", || {
        with_handle(handle, |_| ())?;
        if mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE {
            return fail(CUBLAS_STATUS_INVALID_VALUE, format!("mode {mode} is not a cublasPointerMode_t"));
        }
        with_handle(handle, |s| s.pointer_mode = mode)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGetPointerMode_v2(handle: CublasHandle, mode: *mut u32) -> CublasStatus {
    entry("cublasGetPointerMode_v2", || {
        let current = with_handle(handle, |s| s.pointer_mode)?;
        put(mode, current, "mode")
    })
}

/// Accepted and ignored: the host GEMMs need no workspace.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSetWorkspace_v2(
    handle: CublasHandle,
    _workspace: *mut c_void,
    _workspace_size_in_bytes: usize,
) -> CublasStatus {
    entry("cublasSetWorkspace_v2", || with_handle(handle, |_| ()))
}

/// The library's version; like cuBLAS's, it does not need a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGetVersion_v2(_handle: CublasHandle, version: *mut c_int) -> CublasStatus {
    entry("cublasGetVersion_v2", || put(version, VERSION, "version"))
}

/// MAJOR_VERSION (0), MINOR_VERSION (1), PATCH_LEVEL (2) of [`VERSION`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGetProperty(kind: u32, value: *mut c_int) -> CublasStatus {
    entry("cublasGetProperty", || {
        let part = match kind {
            0 => VERSION / 10000,
            1 => VERSION / 100 % 100,
            2 => VERSION % 100,
            _ => {
                return fail(
                    CUBLAS_STATUS_INVALID_VALUE,
                    format!("type {kind} is not a libraryPropertyType"),
                );
            }
        };
        put(value, part, "value")
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGetStatusName(status: CublasStatus) -> *const c_char {
    let name = match status {
        CUBLAS_STATUS_SUCCESS => c"CUBLAS_STATUS_SUCCESS",
        CUBLAS_STATUS_NOT_INITIALIZED => c"CUBLAS_STATUS_NOT_INITIALIZED",
        CUBLAS_STATUS_ALLOC_FAILED => c"CUBLAS_STATUS_ALLOC_FAILED",
        CUBLAS_STATUS_INVALID_VALUE => c"CUBLAS_STATUS_INVALID_VALUE",
        CUBLAS_STATUS_ARCH_MISMATCH => c"CUBLAS_STATUS_ARCH_MISMATCH",
        CUBLAS_STATUS_MAPPING_ERROR => c"CUBLAS_STATUS_MAPPING_ERROR",
        CUBLAS_STATUS_EXECUTION_FAILED => c"CUBLAS_STATUS_EXECUTION_FAILED",
        CUBLAS_STATUS_INTERNAL_ERROR => c"CUBLAS_STATUS_INTERNAL_ERROR",
        CUBLAS_STATUS_NOT_SUPPORTED => c"CUBLAS_STATUS_NOT_SUPPORTED",
        CUBLAS_STATUS_LICENSE_ERROR => c"CUBLAS_STATUS_LICENSE_ERROR",
        _ => c"CUBLAS_STATUS_UNKNOWN",
    };
    name.as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGetStatusString(status: CublasStatus) -> *const c_char {
    let text = match status {
        CUBLAS_STATUS_SUCCESS => c"the operation completed successfully",
        CUBLAS_STATUS_NOT_INITIALIZED => c"the library was not initialized",
        CUBLAS_STATUS_ALLOC_FAILED => c"the resource allocation failed",
        CUBLAS_STATUS_INVALID_VALUE => c"an invalid numeric value was used as an argument",
        CUBLAS_STATUS_ARCH_MISMATCH => c"an absent device architectural feature is required",
        CUBLAS_STATUS_MAPPING_ERROR => c"an access to GPU memory space failed",
        CUBLAS_STATUS_EXECUTION_FAILED => c"the GPU program failed to execute",
        CUBLAS_STATUS_INTERNAL_ERROR => c"an internal operation failed",
        CUBLAS_STATUS_NOT_SUPPORTED => c"the feature required is not supported",
        CUBLAS_STATUS_LICENSE_ERROR => c"the functionality requested requires some license",
        _ => c"unknown status",
    };
    text.as_ptr()
}

// ---------------------------------------------------------------------------------------------
// Element types and input rounding

/// A matrix element type: widened to `f32` on load, rounded to nearest even on store.
trait Element: Copy {
    fn load(self) -> f32;
    fn store(value: f32) -> Self;
}

impl Element for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(value: f32) -> Self {
        value
    }
}

impl Element for bf16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

impl Element for f16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(value: f32) -> Self {
        f16::from_f32(value)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }
}

/// What each A and B element is rounded to before it is multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rounding {
    Exact,
    Tf32,
    Bf16,
    F16,
}

impl Rounding {
    fn apply(self, x: f32) -> f32 {
        match self {
            Rounding::Exact => x,
            Rounding::Tf32 => round_to_tf32(x),
            Rounding::Bf16 => bf16::from_f32(x).to_f32(),
            Rounding::F16 => f16::from_f32(x).to_f32(),
        }
    }
}

/// `x` rounded to TF32 (8 exponent bits, 10 mantissa bits), to nearest even; a value past the
/// largest TF32 number becomes infinite. NaN and infinities pass unchanged.
fn round_to_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    const DROPPED: u32 = 13; // 23 - 10 mantissa bits
    let bits = x.to_bits();
    let lsb = (bits >> DROPPED) & 1;
    let half = (1 << (DROPPED - 1)) - 1 + lsb;
    f32::from_bits((bits + half) & !((1 << DROPPED) - 1))
}

/// The input rounding that a math mode asks of an `f32` GEMM computed with CUBLAS_COMPUTE_32F.
fn math_mode_rounding(math_mode: u32) -> Rounding {
    match math_mode & !CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION {
        CUBLAS_TF32_TENSOR_OP_MATH => Rounding::Tf32,
        // Deprecated; the docs: "for single precision GEMM routines cuBLAS will use the
        // CUBLAS_COMPUTE_32F_FAST_16F compute type".
        CUBLAS_TENSOR_OP_MATH => Rounding::F16,
        _ => Rounding::Exact,
    }
}

/// Element types and rounding of one GEMM.
#[derive(Clone, Copy, Debug)]
struct Plan {
    input: DType,
    output: DType,
    rounding: Rounding,
}

fn data_type(value: u32, name: &str) -> Result<DType, Failure> {
    match value {
        CUDA_R_32F => Ok(DType::F32),
        CUDA_R_16BF => Ok(DType::Bf16),
        CUDA_R_16F => Ok(DType::F16),
        v if v <= LAST_KNOWN_DATA_TYPE => fail(
            CUBLAS_STATUS_NOT_SUPPORTED,
            format!("{name} = {v} is not implemented by vcuda (only CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF)"),
        ),
        v => fail(CUBLAS_STATUS_INVALID_VALUE, format!("{name} = {v} is not a cudaDataType_t")),
    }
}

/// The cublasGemmEx type table (the rows with real 32F/16F/16BF types and f32 accumulation).
fn plan_ex(atype: u32, btype: u32, ctype: u32, compute: u32, math_mode: u32) -> Result<Plan, Failure> {
    let (a, b, c) = (data_type(atype, "Atype")?, data_type(btype, "Btype")?, data_type(ctype, "Ctype")?);
    let pedantic_math = math_mode & !CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION == CUBLAS_PEDANTIC_MATH;
    let compute = match compute {
        CUDA_R_32F if pedantic_math => CUBLAS_COMPUTE_32F_PEDANTIC,
        CUDA_R_32F => CUBLAS_COMPUTE_32F,
        other => other,
    };
    let unsupported = || {
        fail(
            CUBLAS_STATUS_NOT_SUPPORTED,
            format!(
                "Atype {atype}, Btype {btype}, Ctype {ctype} with computeType {compute} is not a supported combination"
            ),
        )
    };
    if a != b {
        return unsupported();
    }
    match compute {
        CUBLAS_COMPUTE_32F | CUBLAS_COMPUTE_32F_PEDANTIC => {
            if c != a && c != DType::F32 {
                return unsupported();
            }
            let rounding = if compute == CUBLAS_COMPUTE_32F && a == DType::F32 {
                math_mode_rounding(math_mode)
            } else {
                Rounding::Exact
            };
            Ok(Plan { input: a, output: c, rounding })
        }
        CUBLAS_COMPUTE_32F_FAST_TF32 | CUBLAS_COMPUTE_32F_FAST_16BF | CUBLAS_COMPUTE_32F_FAST_16F => {
            if a != DType::F32 || c != DType::F32 {
                return unsupported();
            }
            let rounding = match compute {
                CUBLAS_COMPUTE_32F_FAST_TF32 => Rounding::Tf32,
                CUBLAS_COMPUTE_32F_FAST_16BF => Rounding::Bf16,
                _ => Rounding::F16,
            };
            Ok(Plan { input: a, output: c, rounding })
        }
        CUBLAS_COMPUTE_16F
        | CUBLAS_COMPUTE_16F_PEDANTIC
        | CUBLAS_COMPUTE_64F
        | CUBLAS_COMPUTE_64F_PEDANTIC
        | CUBLAS_COMPUTE_32I
        | CUBLAS_COMPUTE_32I_PEDANTIC
        | CUBLAS_COMPUTE_32F_EMULATED_16BFX9
        | CUBLAS_COMPUTE_64F_EMULATED_FIXEDPOINT => unsupported(),
        // Legacy cudaDataType_t compute types other than CUDA_R_32F map to 16F/64F/32I ones.
        v if v <= LAST_KNOWN_DATA_TYPE => unsupported(),
        v => fail(CUBLAS_STATUS_INVALID_VALUE, format!("computeType {v} is not a cublasComputeType_t")),
    }
}

fn check_algo(algo: i32) -> Result<(), Failure> {
    let known =
        matches!(algo, CUBLAS_GEMM_DEFAULT..=23 | CUBLAS_GEMM_DEFAULT_TENSOR_OP..=115 | CUBLAS_GEMM_AUTOTUNE);
    if known {
        Ok(())
    } else {
        fail(CUBLAS_STATUS_NOT_SUPPORTED, format!("algo {algo} is not a cublasGemmAlgo_t"))
    }
}

// ---------------------------------------------------------------------------------------------
// Geometry: operands, validation, extents

/// Offset of element (row, col) of a column-major matrix with leading dimension `ld`.
fn cm(row: usize, col: usize, ld: usize) -> usize {
    row + col * ld
}

/// One matrix operand: where batch 0 starts and how the matrix is stored (before op).
#[derive(Clone, Copy, Debug)]
struct Operand {
    name: &'static str,
    addr: u64,
    ld: usize,
    /// Elements from one batch's matrix to the next.
    stride: i64,
    rows: usize,
    cols: usize,
}

impl Operand {
    /// Address of batch `batch`'s matrix for `elem`-byte elements (may be out of range for bad
    /// strides; [`check_extent`] rejects those before anything is read).
    fn batch_addr(&self, batch: usize, elem: usize) -> i128 {
        self.addr as i128 + batch as i128 * self.stride as i128 * elem as i128
    }

    /// Bytes from the first to past the last element touched (rows, cols ≥ 1).
    fn span(&self, elem: usize) -> u128 {
        ((self.cols - 1) as u128 * self.ld as u128 + self.rows as u128) * elem as u128
    }

    /// Pointer to element (row, col) of batch `batch`'s matrix.
    fn element<T>(&self, batch: usize, row: usize, col: usize) -> *mut T {
        let start = self.batch_addr(batch, size_of::<T>()) as usize as *mut T;
        start.wrapping_add(cm(row, col, self.ld))
    }
}

/// Every batch's touched range of `op` lies in one live allocation and is element-aligned.
fn check_extent(op: &Operand, elem: usize, batch_count: usize) -> Result<(), Failure> {
    let at = |batch: usize| {
        if batch_count > 1 { format!(" (batch {batch} of {batch_count})") } else { String::new() }
    };
    if !op.addr.is_multiple_of(elem as u64) {
        return fail(
            CUBLAS_STATUS_EXECUTION_FAILED,
            format!("operand {}: address {:#x} is not aligned to its {elem}-byte elements", op.name, op.addr),
        );
    }
    let span = op.span(elem);
    let distinct = if op.stride == 0 { batch_count.min(1) } else { batch_count };
    for batch in 0..distinct {
        let start = op.batch_addr(batch, elem);
        if start < 0 || start as u128 + span > u64::MAX as u128 {
            return fail(
                CUBLAS_STATUS_EXECUTION_FAILED,
                format!(
                    "operand {}: its matrix starts at {start} (as a signed address) and spans {span} bytes: \
                     not addressable{}",
                    op.name,
                    at(batch)
                ),
            );
        }
        if let Err(e) = crate::memory::check_range(start as u64, span as u64) {
            return fail(CUBLAS_STATUS_EXECUTION_FAILED, format!("operand {}: {e}{}", op.name, at(batch)));
        }
    }
    Ok(())
}

fn transposed(op: u32, name: &str) -> Result<bool, Failure> {
    match op {
        CUBLAS_OP_N => Ok(false),
        CUBLAS_OP_T | CUBLAS_OP_C => Ok(true),
        v => fail(
            CUBLAS_STATUS_INVALID_VALUE,
            format!("{name} = {v} is not CUBLAS_OP_N, CUBLAS_OP_T or CUBLAS_OP_C"),
        ),
    }
}

fn dimension(value: c_int, name: &str) -> Result<usize, Failure> {
    usize::try_from(value)
        .or_else(|_| fail(CUBLAS_STATUS_INVALID_VALUE, format!("{name} = {value} is negative")))
}

/// `ld` checked against the rows of the matrix as stored: `ld >= max(1, rows)`.
fn leading_dimension(ld: c_int, name: &str, rows: usize, rows_are: &str) -> Result<usize, Failure> {
    if i64::from(ld) < rows.max(1) as i64 {
        return fail(
            CUBLAS_STATUS_INVALID_VALUE,
            format!("{name} = {ld} is less than max(1, {rows_are} = {rows})"),
        );
    }
    Ok(ld as usize)
}

// ---------------------------------------------------------------------------------------------
// The GEMM

/// Which export was called, with the types cublasGemmEx-style calls name.
#[derive(Clone, Copy)]
enum Types {
    Sgemm,
    Ex { atype: u32, btype: u32, ctype: u32, compute: u32, algo: i32 },
}

/// One GEMM call's arguments as the C API passes them (strides 0 and batch 1 when not batched).
struct GemmArgs {
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    lda: c_int,
    stride_a: c_longlong,
    b: *const c_void,
    ldb: c_int,
    stride_b: c_longlong,
    beta: *const c_void,
    c: *mut c_void,
    ldc: c_int,
    stride_c: c_longlong,
    batch_count: c_int,
    types: Types,
}

/// A validated GEMM: sizes, operands (A and B as stored), scalars.
struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    a_transposed: bool,
    b: Operand,
    b_transposed: bool,
    c: Operand,
    batch_count: usize,
    alpha: f32,
    beta: f32,
}

fn read_scalar(ptr: *const c_void, name: &str) -> Result<f32, Failure> {
    if ptr.is_null() {
        return fail(CUBLAS_STATUS_INVALID_VALUE, format!("{name} is NULL"));
    }
    // SAFETY: host pointer mode: the C API's contract is a readable host scalar of the scale type
    // (f32 for every compute type implemented here).
    Ok(unsafe { (ptr as *const f32).read_unaligned() })
}

fn gemm(args: &GemmArgs) -> Result<(), Failure> {
    let state = with_handle(args.handle, |s| *s)?;
    let plan = match args.types {
        Types::Sgemm => {
            Plan { input: DType::F32, output: DType::F32, rounding: math_mode_rounding(state.math_mode) }
        }
        Types::Ex { atype, btype, ctype, compute, algo } => {
            let plan = plan_ex(atype, btype, ctype, compute, state.math_mode)?;
            check_algo(algo)?;
            plan
        }
    };
    let a_transposed = transposed(args.transa, "transa")?;
    let b_transposed = transposed(args.transb, "transb")?;
    let m = dimension(args.m, "m")?;
    let n = dimension(args.n, "n")?;
    let k = dimension(args.k, "k")?;
    // A is stored m×k (op N) or k×m; B k×n or n×k.
    let (a_rows, a_cols, a_rows_are) = if a_transposed { (k, m, "k") } else { (m, k, "m") };
    let (b_rows, b_cols, b_rows_are) = if b_transposed { (n, k, "n") } else { (k, n, "k") };
    let lda = leading_dimension(args.lda, "lda", a_rows, a_rows_are)?;
    let ldb = leading_dimension(args.ldb, "ldb", b_rows, b_rows_are)?;
    let ldc = leading_dimension(args.ldc, "ldc", m, "m")?;
    let batch_count = dimension(args.batch_count, "batchCount")?;
    if state.pointer_mode != CUBLAS_POINTER_MODE_HOST {
        return fail(
            CUBLAS_STATUS_NOT_SUPPORTED,
            "CUBLAS_POINTER_MODE_DEVICE: vcuda's GEMMs read alpha and beta from host memory only",
        );
    }
    let alpha = read_scalar(args.alpha, "alpha")?;
    let beta = read_scalar(args.beta, "beta")?;

    let reads_ab = alpha != 0.0 && k > 0;
    if m == 0 || n == 0 || batch_count == 0 || (!reads_ab && beta == 1.0) {
        return Ok(());
    }
    let operand = |name, ptr: *const c_void, ld, stride, rows, cols| Operand {
        name,
        addr: ptr as u64,
        ld,
        stride,
        rows,
        cols,
    };
    let g = Gemm {
        m,
        n,
        k,
        a: operand("A", args.a, lda, args.stride_a, a_rows, a_cols),
        a_transposed,
        b: operand("B", args.b, ldb, args.stride_b, b_rows, b_cols),
        b_transposed,
        c: operand("C", args.c, ldc, args.stride_c, m, n),
        batch_count,
        alpha,
        beta,
    };
    if reads_ab {
        check_extent(&g.a, plan.input.bytes(), batch_count)?;
        check_extent(&g.b, plan.input.bytes(), batch_count)?;
    }
    check_extent(&g.c, plan.output.bytes(), batch_count)?;

    match (plan.input, plan.output) {
        (DType::F32, DType::F32) => gemm_core::<f32, f32>(&g, plan.rounding),
        (DType::Bf16, DType::Bf16) => gemm_core::<bf16, bf16>(&g, plan.rounding),
        (DType::Bf16, DType::F32) => gemm_core::<bf16, f32>(&g, plan.rounding),
        (DType::F16, DType::F16) => gemm_core::<f16, f16>(&g, plan.rounding),
        (DType::F16, DType::F32) => gemm_core::<f16, f32>(&g, plan.rounding),
        (input, output) => {
            return fail(CUBLAS_STATUS_INTERNAL_ERROR, format!("no GEMM for {input:?} → {output:?}"));
        }
    }
    crate::memory::check_guards().or_else(|e| {
        fail(CUBLAS_STATUS_EXECUTION_FAILED, format!("device memory guard damaged after the GEMM: {e}"))
    })
}

/// Copies the rows of a `outer`×`k` matrix M into `out`, row `o` at `out[o * k..][..k]`, each
/// element widened and rounded. M(o, p) is the stored element (o, p), or (p, o) when `swapped`.
/// For A, M = op(A) (swapped when transposed); for B, M = op(B)ᵀ (swapped when *not* transposed),
/// so that both operands of each dot product are contiguous.
fn pack<T: Element>(
    op: &Operand,
    batch: usize,
    swapped: bool,
    k: usize,
    rounding: Rounding,
    out: &mut [f32],
) {
    for (o, row) in out.chunks_exact_mut(k).enumerate() {
        for (p, x) in row.iter_mut().enumerate() {
            let (r, c) = if swapped { (p, o) } else { (o, p) };
            // SAFETY: check_extent found every (r, c) of this batch inside a live allocation,
            // aligned for T.
            let value = unsafe { op.element::<T>(batch, r, c).read() };
            *x = rounding.apply(value.load());
        }
    }
}

/// Σ a[p]·b[p] in f32: product p goes to partial sum p mod 8, the partial sums are added pairwise.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut partial = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_tail, b_tail) = (a_chunks.remainder(), b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..LANES {
            partial[lane] += x[lane] * y[lane];
        }
    }
    for (lane, (x, y)) in a_tail.iter().zip(b_tail).enumerate() {
        partial[lane] += x * y;
    }
    let [p0, p1, p2, p3, p4, p5, p6, p7] = partial;
    ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
}

/// The GEMM on validated, extent-checked operands, for every element-type pair.
fn gemm_core<In: Element, Out: Element>(g: &Gemm, rounding: Rounding) {
    let (m, n, k) = (g.m, g.n, g.k);
    let reads_ab = g.alpha != 0.0 && k > 0;
    // Rows of op(A) and columns of op(B), each k contiguous values.
    let mut a_rows = vec![0.0f32; if reads_ab { m * k } else { 0 }];
    let mut b_cols = vec![0.0f32; if reads_ab { n * k } else { 0 }];
    for batch in 0..g.batch_count {
        if reads_ab {
            // A broadcast operand (stride 0) is packed once.
            if batch == 0 || g.a.stride != 0 {
                pack::<In>(&g.a, batch, g.a_transposed, k, rounding, &mut a_rows);
            }
            if batch == 0 || g.b.stride != 0 {
                pack::<In>(&g.b, batch, !g.b_transposed, k, rounding, &mut b_cols);
            }
        }
        for j in 0..n {
            for i in 0..m {
                let product =
                    if reads_ab { g.alpha * dot(&a_rows[i * k..][..k], &b_cols[j * k..][..k]) } else { 0.0 };
                let c = g.c.element::<Out>(batch, i, j);
                // SAFETY: check_extent found every C element of this batch inside a live
                // allocation, aligned for Out. C is read only when beta != 0.
                let value =
                    unsafe { if g.beta == 0.0 { product } else { product + g.beta * c.read().load() } };
                unsafe { c.write(Out::store(value)) };
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The GEMM exports

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSgemm_v2(
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: *const f32,
    c: *mut f32,
    ldc: c_int,
) -> CublasStatus {
    entry("cublasSgemm_v2", || {
        gemm(&GemmArgs {
            handle,
            transa,
            transb,
            m,
            n,
            k,
            alpha: alpha.cast(),
            a: a.cast(),
            lda,
            stride_a: 0,
            b: b.cast(),
            ldb,
            stride_b: 0,
            beta: beta.cast(),
            c: c.cast(),
            ldc,
            stride_c: 0,
            batch_count: 1,
            types: Types::Sgemm,
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSgemmStridedBatched(
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: *const f32,
    lda: c_int,
    stride_a: c_longlong,
    b: *const f32,
    ldb: c_int,
    stride_b: c_longlong,
    beta: *const f32,
    c: *mut f32,
    ldc: c_int,
    stride_c: c_longlong,
    batch_count: c_int,
) -> CublasStatus {
    entry("cublasSgemmStridedBatched", || {
        gemm(&GemmArgs {
            handle,
            transa,
            transb,
            m,
            n,
            k,
            alpha: alpha.cast(),
            a: a.cast(),
            lda,
            stride_a,
            b: b.cast(),
            ldb,
            stride_b,
            beta: beta.cast(),
            c: c.cast(),
            ldc,
            stride_c,
            batch_count,
            types: Types::Sgemm,
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGemmEx(
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    atype: u32,
    lda: c_int,
    b: *const c_void,
    btype: u32,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    ctype: u32,
    ldc: c_int,
    compute_type: u32,
    algo: i32,
) -> CublasStatus {
    entry("cublasGemmEx", || {
        gemm(&GemmArgs {
            handle,
            transa,
            transb,
            m,
            n,
            k,
            alpha,
            a,
            lda,
            stride_a: 0,
            b,
            ldb,
            stride_b: 0,
            beta,
            c,
            ldc,
            stride_c: 0,
            batch_count: 1,
            types: Types::Ex { atype, btype, ctype, compute: compute_type, algo },
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGemmStridedBatchedEx(
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    atype: u32,
    lda: c_int,
    stride_a: c_longlong,
    b: *const c_void,
    btype: u32,
    ldb: c_int,
    stride_b: c_longlong,
    beta: *const c_void,
    c: *mut c_void,
    ctype: u32,
    ldc: c_int,
    stride_c: c_longlong,
    batch_count: c_int,
    compute_type: u32,
    algo: i32,
) -> CublasStatus {
    entry("cublasGemmStridedBatchedEx", || {
        gemm(&GemmArgs {
            handle,
            transa,
            transb,
            m,
            n,
            k,
            alpha,
            a,
            lda,
            stride_a,
            b,
            ldb,
            stride_b,
            beta,
            c,
            ldc,
            stride_c,
            batch_count,
            types: Types::Ex { atype, btype, ctype, compute: compute_type, algo },
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_rounding_keeps_ten_mantissa_bits_to_nearest_even() {
        let ulp = 2f32.powi(-10);
        assert_eq!(round_to_tf32(1.0 + ulp), 1.0 + ulp);
        assert_eq!(round_to_tf32(1.0 + ulp / 2.0), 1.0, "tie to even (down)");
        assert_eq!(round_to_tf32(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp, "tie to even (up)");
        assert_eq!(round_to_tf32(-(1.0 + 0.75 * ulp)), -(1.0 + ulp));
        assert_eq!(round_to_tf32(f32::MAX), f32::INFINITY);
        assert!(round_to_tf32(f32::from_bits(0x7f80_0001)).is_nan());
    }

    #[test]
    fn dot_covers_every_lane_and_the_tail() {
        let a: Vec<f32> = (1..=19).map(|x| x as f32).collect();
        let b = vec![1.0f32; 19];
        assert_eq!(dot(&a, &b), 190.0);
        assert_eq!(dot(&[], &[]), 0.0);
    }
}
