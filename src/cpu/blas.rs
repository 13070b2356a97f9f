//! Which library multiplies matrices on the CPU, by `HPO_GPU_GEMM`: `matrixmultiply` (pure Rust),
//! `onednn` (oneDNN's f32 matmul, for the linear layers' products: [`super::onednn`]) or
//! `openblas`. Unset, oneDNN where the CPU has AVX-512 and `libdnnl.so.2` loads, `matrixmultiply`
//! elsewhere ([`default_choice`]).
//!
//! oneDNN computes a row of a product the same way wherever the row falls (fixed blocks; tested
//! in `cpu::onednn`), as `matrixmultiply` does: that is what makes a trial in a trial array
//! bit-identical to the same trial alone, and predictions independent of the batch.
//!
//! OpenBLAS is opened at run time (`libopenblas.so.0`, Debian's `libopenblas0-pthread`), not
//! linked: the same binary runs where it is missing. Debian builds it with `DYNAMIC_ARCH`, so its
//! kernel is picked for the CPU it runs on (Haswell/Zen AVX2, SkylakeX/Cooperlake AVX-512, ...).
//! It runs single-threaded here: [`super::real::gemm`] splits a product into blocks over rayon's
//! threads itself.
//!
//! Why OpenBLAS is never the default (benchmarks/README.md has the numbers): on an AVX2 machine it
//! is within ±15 % of `matrixmultiply` per shape and 0–8 % faster per training step; and its result
//! for one row of a product depends on where that row falls in the block (edge kernels), so the
//! model's outputs would change in the last bits with the batch's make-up; and with OpenBLAS four
//! bias gradients of the transformers parity test drift past its 1e-4 tolerance (1.2–1.4e-4).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{Result, bail};

/// The environment variable that picks the library.
pub const GEMM_ENV: &str = "HPO_GPU_GEMM";

/// The library that multiplies matrices in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmLibrary {
    OpenBlas,
    MatrixMultiply,
    /// oneDNN's f32 matmul for the linear layers' products (the attention products stay with
    /// `matrixmultiply`: many small shapes, each a kernel to compile).
    OneDnn,
}

/// A CBLAS `?gemm` entry point.
pub type CblasGemm<F> = unsafe extern "C" fn(
    c_int, // order
    c_int, // trans A
    c_int, // trans B
    c_int, // m
    c_int, // n
    c_int, // k
    F,     // alpha
    *const F,
    c_int, // lda
    *const F,
    c_int, // ldb
    F,     // beta
    *mut F,
    c_int, // ldc
);

/// The loaded library's entry points.
pub struct OpenBlas {
    pub(crate) sgemm: CblasGemm<f32>,
    pub(crate) dgemm: CblasGemm<f64>,
    /// `openblas_get_corename()`: the kernel family picked for this CPU.
    pub core: String,
}

const CBLAS_ROW_MAJOR: c_int = 101;
const CBLAS_NO_TRANS: c_int = 111;
const CBLAS_TRANS: c_int = 112;

/// What `HPO_GPU_GEMM` asks for, loaded.
enum Choice {
    MatrixMultiply,
    OpenBlas(OpenBlas),
    OneDnn,
}

static CHOICE: OnceLock<std::result::Result<Choice, String>> = OnceLock::new();

fn load() -> std::result::Result<Choice, String> {
    match std::env::var(GEMM_ENV).ok().as_deref() {
        None | Some("") => Ok(default_choice()),
        Some("matrixmultiply") => Ok(Choice::MatrixMultiply),
        Some("openblas") => open_openblas().map(Choice::OpenBlas).ok_or_else(|| {
            format!("{GEMM_ENV}=openblas but libopenblas.so.0 cannot be loaded (apt-get install libopenblas0-pthread)")
        }),
        Some("onednn") => match super::onednn::loaded() {
            Ok(_) => Ok(Choice::OneDnn),
            Err(why) => Err(format!("{GEMM_ENV}=onednn needs {why}")),
        },
        Some(other) => {
            Err(format!("{GEMM_ENV}={other:?} is not a GEMM library (use openblas, onednn or matrixmultiply)"))
        }
    }
}

/// With `HPO_GPU_GEMM` unset: oneDNN on CPUs with AVX-512 where `libdnnl.so.2` loads (there its
/// products run 1.35–1.5× `matrixmultiply`'s speed on the forward shapes, a training step 1.0–1.3×
/// as fast: benchmarks/README.md), `matrixmultiply` elsewhere (on AVX2 oneDNN is not measured yet).
fn default_choice() -> Choice {
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    if avx512 && super::onednn::loaded().is_ok() { Choice::OneDnn } else { Choice::MatrixMultiply }
}

fn open_openblas() -> Option<OpenBlas> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; the handle is never closed, so the
    // function pointers stay valid for the life of the process.
    unsafe {
        let handle = libc::dlopen(c"libopenblas.so.0".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            return None;
        }
        let sym = |name: &CStr| -> *mut c_void { libc::dlsym(handle, name.as_ptr()) };
        let (sgemm, dgemm) = (sym(c"cblas_sgemm"), sym(c"cblas_dgemm"));
        let (set_threads, corename) = (sym(c"openblas_set_num_threads"), sym(c"openblas_get_corename"));
        if sgemm.is_null() || dgemm.is_null() || set_threads.is_null() {
            return None;
        }
        let set_threads = std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int)>(set_threads);
        set_threads(1);
        let core = if corename.is_null() {
            String::from("unknown")
        } else {
            let corename =
                std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> *const c_char>(corename);
            CStr::from_ptr(corename()).to_string_lossy().into_owned()
        };
        Some(OpenBlas {
            sgemm: std::mem::transmute::<*mut c_void, CblasGemm<f32>>(sgemm),
            dgemm: std::mem::transmute::<*mut c_void, CblasGemm<f64>>(dgemm),
            core,
        })
    }
}

/// OpenBLAS as loaded by [`use_gemm_library`] (benchmarks), whatever `HPO_GPU_GEMM` says.
static REQUESTED: OnceLock<Option<OpenBlas>> = OnceLock::new();
/// What [`use_gemm_library`] chose: nothing yet (`HPO_GPU_GEMM` decides), or a library.
static OVERRIDE: AtomicU8 = AtomicU8::new(NO_OVERRIDE);
const NO_OVERRIDE: u8 = 0;
const OVERRIDE_MATRIXMULTIPLY: u8 = 1;
const OVERRIDE_OPENBLAS: u8 = 2;
const OVERRIDE_ONEDNN: u8 = 3;

pub(crate) fn openblas() -> Option<&'static OpenBlas> {
    match OVERRIDE.load(Ordering::Relaxed) {
        OVERRIDE_OPENBLAS => REQUESTED.get().and_then(Option::as_ref),
        NO_OVERRIDE => match CHOICE.get_or_init(load) {
            Ok(Choice::OpenBlas(lib)) => Some(lib),
            _ => None,
        },
        _ => None,
    }
}

/// Whether the linear layers' fp32 products go to oneDNN.
pub(crate) fn onednn_chosen() -> bool {
    match OVERRIDE.load(Ordering::Relaxed) {
        OVERRIDE_ONEDNN => true,
        NO_OVERRIDE => matches!(CHOICE.get_or_init(load), Ok(Choice::OneDnn)),
        _ => false,
    }
}

/// The library in use, or the one clear line why `HPO_GPU_GEMM` cannot be honoured. The CLI
/// calls this at start-up; the multiply itself falls back to `matrixmultiply` after such an error.
pub fn gemm_library() -> Result<GemmLibrary> {
    CHOICE.get_or_init(load).as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(if openblas().is_some() {
        GemmLibrary::OpenBlas
    } else if onednn_chosen() {
        GemmLibrary::OneDnn
    } else {
        GemmLibrary::MatrixMultiply
    })
}

/// Switches the library for the whole process, whatever `HPO_GPU_GEMM` says (benchmarks compare
/// them in one run). Results differ in the last bits, so nothing else should be multiplying
/// meanwhile.
pub fn use_gemm_library(library: GemmLibrary) -> Result<()> {
    let choice = match library {
        GemmLibrary::OpenBlas if REQUESTED.get_or_init(open_openblas).is_none() => {
            bail!("OpenBLAS is not available: libopenblas.so.0 cannot be loaded")
        }
        GemmLibrary::OpenBlas => OVERRIDE_OPENBLAS,
        GemmLibrary::OneDnn => {
            super::onednn::loaded().map_err(|why| anyhow::anyhow!("oneDNN is not available: {why}"))?;
            OVERRIDE_ONEDNN
        }
        GemmLibrary::MatrixMultiply => OVERRIDE_MATRIXMULTIPLY,
    };
    OVERRIDE.store(choice, Ordering::Relaxed);
    Ok(())
}

/// A warning when OpenBLAS runs its generic SSE3 kernels ("Prescott") on a CPU with AVX2 or
/// AVX-512: Debian's OpenBLAS 0.3.21 does not know CPUs newer than itself (seen: Emerald Rapids,
/// at a quarter of `matrixmultiply`'s speed), and `OPENBLAS_CORETYPE` overrides its pick.
pub fn openblas_core_warning() -> Option<String> {
    let lib = openblas()?;
    #[cfg(target_arch = "x86_64")]
    let (avx2, avx512) =
        (std::arch::is_x86_feature_detected!("avx2"), std::arch::is_x86_feature_detected!("avx512f"));
    #[cfg(not(target_arch = "x86_64"))]
    let (avx2, avx512) = (false, false);
    core_warning(&lib.core, avx2, avx512)
}

fn core_warning(core: &str, avx2: bool, avx512: bool) -> Option<String> {
    let better = if avx512 {
        "SkylakeX"
    } else if avx2 {
        "Haswell"
    } else {
        return None;
    };
    (core == "Prescott").then(|| {
        format!(
            "OpenBLAS picked its generic kernels (Prescott) for this CPU, which has {}: \
             set OPENBLAS_CORETYPE={better} to use them, or leave HPO_GPU_GEMM unset",
            if avx512 { "AVX-512" } else { "AVX2" }
        )
    })
}

/// A description for logs and benchmark records, e.g. "OpenBLAS (Haswell)".
pub fn gemm_library_name() -> String {
    match openblas() {
        Some(lib) => format!("OpenBLAS ({})", lib.core),
        None if onednn_chosen() => "oneDNN_f32".to_string(),
        None => "matrixmultiply".to_string(),
    }
}

/// How one operand is handed to CBLAS (row-major): not transposed with leading dimension
/// `ld`, or transposed. `None` when its strides fit neither (then `matrixmultiply` takes it).
fn cblas_operand(rows: usize, cols: usize, rs: isize, cs: isize) -> Option<(c_int, c_int)> {
    let fits = |x: usize| c_int::try_from(x).ok();
    if cs == 1 && rs >= cols.max(1) as isize {
        Some((CBLAS_NO_TRANS, fits(rs as usize)?))
    } else if rs == 1 && cs >= rows.max(1) as isize {
        Some((CBLAS_TRANS, fits(cs as usize)?))
    } else {
        None
    }
}

/// C = alpha·A·B + beta·C through CBLAS when the layout allows it; `false` when it did nothing.
///
/// # Safety
/// As [`super::real::Real::gemm_raw`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn cblas_gemm<F: Copy>(
    gemm: CblasGemm<F>,
    (m, k, n): (usize, usize, usize),
    alpha: F,
    (a, rsa, csa): (*const F, isize, isize),
    (b, rsb, csb): (*const F, isize, isize),
    beta: F,
    (c, rsc, csc): (*mut F, isize, isize),
) -> bool {
    let dims = (c_int::try_from(m), c_int::try_from(k), c_int::try_from(n));
    let (Ok(mi), Ok(ki), Ok(ni)) = dims else { return false };
    if m == 0 || n == 0 || k == 0 || csc != 1 || rsc < n as isize {
        return false;
    }
    let (Some((ta, lda)), Some((tb, ldb))) = (cblas_operand(m, k, rsa, csa), cblas_operand(k, n, rsb, csb))
    else {
        return false;
    };
    let Ok(ldc) = c_int::try_from(rsc) else { return false };
    // SAFETY: the caller guarantees the strides address memory inside the operands; CBLAS
    // reads and writes exactly the elements the (order, trans, ld) description names.
    unsafe { gemm(CBLAS_ROW_MAJOR, ta, tb, mi, ni, ki, alpha, a, lda, b, ldb, beta, c, ldc) };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_openblas_kernels_on_a_vector_cpu_are_flagged() {
        let warning = core_warning("Prescott", true, true).expect("flagged");
        assert!(warning.contains("OPENBLAS_CORETYPE=SkylakeX"), "{warning}");
        assert!(
            core_warning("Prescott", true, false).expect("flagged").contains("OPENBLAS_CORETYPE=Haswell")
        );
        assert_eq!(core_warning("Prescott", false, false), None);
        assert_eq!(core_warning("SkylakeX", true, true), None);
        assert_eq!(core_warning("Haswell", true, false), None);
    }

    #[test]
    fn operands_map_to_cblas_layouts_or_are_refused() {
        // Row-major 3×4 (rs 4, cs 1), its transpose view (rs 1, cs 3 over a 4×3 store), padded rows.
        assert_eq!(cblas_operand(3, 4, 4, 1), Some((CBLAS_NO_TRANS, 4)));
        assert_eq!(cblas_operand(3, 4, 1, 3), Some((CBLAS_TRANS, 3)));
        assert_eq!(cblas_operand(3, 4, 6, 1), Some((CBLAS_NO_TRANS, 6)));
        // Neither stride is 1, or the leading dimension is too short: not CBLAS's to take.
        assert_eq!(cblas_operand(3, 4, 8, 2), None);
        assert_eq!(cblas_operand(3, 4, 2, 1), None);
    }

    /// A deterministic fill in [-1, 1).
    fn fill(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn openblas_matches_matrixmultiply_on_every_layout_the_model_uses() {
        let Some(lib) = open_openblas() else {
            assert!(
                std::env::var_os("HPO_GPU_REQUIRE_OPENBLAS").is_none(),
                "HPO_GPU_REQUIRE_OPENBLAS is set but libopenblas.so.0 cannot be loaded"
            );
            eprintln!("skipped: libopenblas.so.0 cannot be loaded (apt-get install libopenblas0-pthread)");
            return;
        };
        eprintln!("OpenBLAS core: {}", lib.core);
        // (m, k, n): odd sizes around kernel tile edges, and the models' shapes in small.
        for (case, &(m, k, n)) in
            [(5, 7, 3), (17, 128, 33), (64, 32, 64), (129, 384, 96), (1, 512, 128)].iter().enumerate()
        {
            let (a, b) = (fill(m * k, case as u64), fill(k * n, 100 + case as u64));
            let c0 = fill(m * n, 200 + case as u64);
            // A as stored row-major (NN), or as the transpose of a k×m store (TN); B likewise.
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
                let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
                let (alpha, beta) = (0.75f32, if case % 2 == 0 { 0.0 } else { 0.5 });
                let mut expect = c0.clone();
                let mut got = c0.clone();
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        alpha,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        beta,
                        expect.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                    let done = cblas_gemm(
                        lib.sgemm,
                        (m, k, n),
                        alpha,
                        (a.as_ptr(), rsa, csa),
                        (b.as_ptr(), rsb, csb),
                        beta,
                        (got.as_mut_ptr(), n as isize, 1),
                    );
                    assert!(done, "{m}x{k}x{n} ta={ta} tb={tb} was not handed to OpenBLAS");
                }
                for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
                    let tol = 1e-5 * (k as f32).sqrt() * (1.0 + e.abs());
                    assert!((g - e).abs() <= tol, "{m}x{k}x{n} ta={ta} tb={tb}: C[{i}] = {g}, expected {e}");
                }
            }
        }
    }
}
