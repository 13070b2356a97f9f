//! The floating-point type the CPU reference is generic over (f32 for training, f64 for
//! finite-difference gradient checks), its matrix multiply (the library behind it: `blas`) and
//! its elementwise GELU and softmax (f32's vectorized in `vmath`), and one sequence and head of
//! attention (f32's fused kernel in `fused_attention`).

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use rayon::prelude::*;

use super::blas::{self, CblasGemm, OpenBlas};
use super::fused_attention;
use super::onednn;
use super::vmath;

pub trait Real:
    num_traits::Float
    + Default
    + Debug
    + Send
    + Sync
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + 'static
{
    fn of(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn erf(self) -> Self;
    /// C = alpha·A·B + beta·C for strided row/column layouts (matrixmultiply's convention:
    /// `rs*` is the row stride, `cs*` the column stride; A is m×k, B is k×n, C is m×n), by
    /// `matrixmultiply`.
    ///
    /// # Safety
    /// The strides must keep every addressed element inside the given slices.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
    /// OpenBLAS's GEMM for this type.
    fn cblas_gemm(lib: &OpenBlas) -> CblasGemm<Self>;
    /// C = A·B (+ C when `accumulate`) by oneDNN (f32 only, [`super::onednn`]): with bf16
    /// operands when `--precision bf16` is on, else in fp32 when `HPO_GPU_GEMM=onednn`; `false`
    /// when it did nothing.
    fn gemm_onednn(_a: Mat<Self>, _b: Mat<Self>, _accumulate: bool, _c: &mut [Self], _ldc: usize) -> bool {
        false
    }
    /// C (its elements possibly uninitialized) = A·B + the bias row by oneDNN, the bias added in
    /// its product, where [`Real::gemm_onednn`] would take the product; `false` (C untouched)
    /// elsewhere.
    fn linear_onednn(
        _a: Mat<Self>,
        _b: Mat<Self>,
        _bias: &[Self],
        _c: &mut [std::mem::MaybeUninit<Self>],
        _ldc: usize,
    ) -> bool {
        false
    }
    /// y = GELU(x) elementwise (exact, erf-based, as BERT's "gelu").
    fn gelu_slice(x: &[Self], y: &mut [Self]) {
        y.iter_mut().zip(x).for_each(|(y, x)| *y = gelu(*x));
    }
    /// x = GELU(x) elementwise.
    fn gelu_in_place(x: &mut [Self]) {
        x.iter_mut().for_each(|x| *x = gelu(*x));
    }
    /// dx = dy · GELU'(x) elementwise.
    fn gelu_grad_slice(x: &[Self], dy: &[Self], dx: &mut [Self]) {
        for ((dx, x), dy) in dx.iter_mut().zip(x).zip(dy) {
            *dx = *dy * gelu_grad(*x);
        }
    }
    /// Working memory of [`Real::attention_head`], reused from head to head on one thread.
    type AttentionScratch: Default + Send;
    /// One sequence and head of attention: the context rows (row i at `ctx + i·ldc`) =
    /// softmax(scale·Q·Kᵀ)·V, `each_block(first, probs)` seeing the probabilities of consecutive
    /// query rows from `first` (`k_len` each, row after row) after the softmax and before they
    /// weigh V (to keep them, or to drop some out). f32 runs the fused
    /// row-block kernel ([`fused_attention`]), f64 [`attention_head_by_gemm`].
    ///
    /// # Safety
    /// `ctx` must be valid for writes at `i·ldc + c` (i < q_len, c < d), touched by no other
    /// thread during the call.
    unsafe fn attention_head(
        head: Head<Self>,
        ctx: *mut Self,
        ldc: usize,
        scratch: &mut Self::AttentionScratch,
        each_block: &mut dyn FnMut(usize, &mut [Self]),
    );
    /// row = softmax(row) in place.
    fn softmax_row(row: &mut [Self]) {
        let max = row.iter().copied().fold(Self::neg_infinity(), Self::max);
        let mut sum = Self::zero();
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        row.iter_mut().for_each(|x| *x /= sum);
    }
}

/// GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2)).
pub fn gelu<F: Real>(x: F) -> F {
    F::of(0.5) * x * (F::one() + (x * F::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// GELU'(x) = Φ(x) + x·φ(x).
pub fn gelu_grad<F: Real>(x: F) -> F {
    let cdf = F::of(0.5) * (F::one() + (x * F::of(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = (-F::of(0.5) * x * x).exp() * F::of(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    cdf + x * pdf
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn erf(self) -> Self {
        sys_erf::erff(self)
    }
    fn cblas_gemm(lib: &OpenBlas) -> CblasGemm<Self> {
        lib.sgemm
    }
    fn gemm_onednn(a: Mat<f32>, b: Mat<f32>, accumulate: bool, c: &mut [f32], ldc: usize) -> bool {
        onednn::gemm_bf16(a, b, accumulate, c, ldc)
            || (blas::onednn_chosen() && onednn::gemm_f32(a, b, accumulate, c, ldc))
    }
    fn linear_onednn(
        a: Mat<f32>,
        b: Mat<f32>,
        bias: &[f32],
        c: &mut [std::mem::MaybeUninit<f32>],
        ldc: usize,
    ) -> bool {
        onednn::linear_with_bias(a, b, bias, c, ldc)
    }
    fn gelu_slice(x: &[f32], y: &mut [f32]) {
        vmath::gelu(x, y)
    }
    fn gelu_in_place(x: &mut [f32]) {
        vmath::gelu_in_place(x)
    }
    fn gelu_grad_slice(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        vmath::gelu_grad(x, dy, dx)
    }
    fn softmax_row(row: &mut [f32]) {
        vmath::softmax(row)
    }
    type AttentionScratch = fused_attention::Scratch;
    unsafe fn attention_head(
        head: Head<f32>,
        ctx: *mut f32,
        ldc: usize,
        scratch: &mut fused_attention::Scratch,
        each_block: &mut dyn FnMut(usize, &mut [f32]),
    ) {
        unsafe { fused_attention::head_forward(head, ctx, ldc, scratch, each_block) }
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        unsafe { matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn erf(self) -> Self {
        sys_erf::erf(self)
    }
    fn cblas_gemm(lib: &OpenBlas) -> CblasGemm<Self> {
        lib.dgemm
    }
    type AttentionScratch = Vec<f64>;
    unsafe fn attention_head(
        head: Head<f64>,
        ctx: *mut f64,
        ldc: usize,
        scratch: &mut Vec<f64>,
        each_block: &mut dyn FnMut(usize, &mut [f64]),
    ) {
        unsafe { attention_head_by_gemm(head, ctx, ldc, scratch, each_block) }
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        unsafe { matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
    }
}

/// erf from the C library where it is glibc's (about twice as fast as the portable `libm` crate
/// in GELU-heavy forward passes); the portable version elsewhere. Both are accurate to an ulp or so.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod sys_erf {
    unsafe extern "C" {
        #[link_name = "erff"]
        fn c_erff(x: f32) -> f32;
        #[link_name = "erf"]
        fn c_erf(x: f64) -> f64;
    }
    pub fn erff(x: f32) -> f32 {
        unsafe { c_erff(x) }
    }
    pub fn erf(x: f64) -> f64 {
        unsafe { c_erf(x) }
    }
}
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod sys_erf {
    pub use libm::{erf, erff};
}

/// One sequence and head of attention's inputs: the head's columns of the query rows and of the
/// key/value rows, rows `q_stride` (`kv_stride`) elements apart — the hidden size with the heads
/// side by side, or more where Q, K and V came out of one product side by side:
/// `q[i·q_stride + c]`, `k[j·kv_stride + c]` for i < q_len, j < k_len, c < d.
#[derive(Clone, Copy)]
pub struct Head<'a, F> {
    pub q: &'a [F],
    pub k: &'a [F],
    pub v: &'a [F],
    pub q_stride: usize,
    pub kv_stride: usize,
    pub q_len: usize,
    pub k_len: usize,
    pub d: usize,
    /// 1/√d, applied to the scores.
    pub scale: F,
}

/// [`Real::attention_head`] as three whole passes: scores = scale·Q·Kᵀ by [`gemm`] into
/// `scores` (`q_len × k_len`), each row's softmax, then ctx = probs·V.
///
/// # Safety
/// As [`Real::attention_head`].
pub unsafe fn attention_head_by_gemm<F: Real>(
    head: Head<F>,
    ctx: *mut F,
    ldc: usize,
    scores: &mut Vec<F>,
    each_block: &mut dyn FnMut(usize, &mut [F]),
) {
    let Head { q, k, v, q_stride, kv_stride, q_len, k_len, d, scale } = head;
    // Sized only: the product overwrites every element (beta 0).
    scores.resize(q_len * k_len, F::zero());
    let qm = Mat { data: q, rows: q_len, cols: d, rs: q_stride, cs: 1 };
    let kt = Mat { data: k, rows: d, cols: k_len, rs: 1, cs: kv_stride };
    gemm(scale, qm, kt, F::zero(), scores, k_len);
    scores.chunks_exact_mut(k_len).for_each(F::softmax_row);
    each_block(0, scores);
    let vm = Mat { data: v, rows: k_len, cols: d, rs: kv_stride, cs: 1 };
    unsafe { gemm_serial_raw(F::one(), Mat::rm(scores, q_len, k_len), vm, F::zero(), ctx, ldc) };
}

/// A read-only row-major or transposed view: element (i, j) is at `i*rs + j*cs`.
#[derive(Clone, Copy)]
pub struct Mat<'a, F> {
    pub data: &'a [F],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, F> Mat<'a, F> {
    /// A row-major `rows × cols` matrix.
    pub fn rm(data: &'a [F], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major `rows × cols` matrix (so this view is `cols × rows`).
    pub fn rm_t(data: &'a [F], rows: usize, cols: usize) -> Self {
        Mat { data, rows: cols, cols: rows, rs: 1, cs: cols }
    }
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// C (m×n, row stride `ldc`) = alpha·A·B + beta·C. Large products are split across threads
/// by rows (or columns when there are few rows); each part is an independent block of C, so the
/// result does not depend on the thread count.
pub fn gemm<F: Real>(alpha: F, a: Mat<F>, b: Mat<F>, beta: F, c: &mut [F], ldc: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: inner dimensions differ");
    assert!(a.data.len() >= a.extent() && b.data.len() >= b.extent(), "gemm: operand too small");
    assert!(m == 0 || n == 0 || c.len() >= (m - 1) * ldc + n, "gemm: output too small");
    if m == 0 || n == 0 {
        return;
    }
    let work = m * n * k.max(1);
    let threads = rayon::current_num_threads();
    if work < 1 << 18 || threads == 1 {
        unsafe { gemm_block(alpha, a, b, beta, c.as_mut_ptr(), ldc, 0..m, 0..n) };
        return;
    }
    let cp = SendPtr(c.as_mut_ptr());
    if m >= 4 * threads {
        // One block per thread: every block packs all of B again (matrixmultiply has no shared
        // packing), so more, smaller blocks cost more than they balance (MiniLM +4–5%).
        let chunk = m.div_ceil(threads).max(16);
        (0..m.div_ceil(chunk)).into_par_iter().for_each(|t| {
            let r = t * chunk..((t + 1) * chunk).min(m);
            unsafe { gemm_block(alpha, a, b, beta, cp.get(), ldc, r, 0..n) };
        });
    } else {
        let chunk = n.div_ceil(threads * 2).max(16);
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|t| {
            let cr = t * chunk..((t + 1) * chunk).min(n);
            unsafe { gemm_block(alpha, a, b, beta, cp.get(), ldc, 0..m, cr) };
        });
    }
}

/// A linear layer's product (activations times weights, or their gradients): C = A·B + beta·C,
/// `beta` 0 or 1. By oneDNN in bf16 when `--precision bf16` is on, or in fp32 when
/// `HPO_GPU_GEMM=onednn` ([`super::onednn`]); else [`gemm`].
pub fn linear_gemm<F: Real>(a: Mat<F>, b: Mat<F>, beta: F, c: &mut [F], ldc: usize) {
    let accumulate = beta == F::one();
    debug_assert!(accumulate || beta == F::zero(), "linear_gemm: beta is 0 or 1");
    if !F::gemm_onednn(a, b, accumulate, c, ldc) {
        gemm(F::one(), a, b, beta, c, ldc);
    }
}

/// Single-threaded C = alpha·A·B + beta·C into raw memory with row stride `ldc`, for callers
/// that write disjoint, interleaved blocks of one buffer from several threads.
///
/// # Safety
/// `c` must be valid for writes at every `i*ldc + j` (i < A.rows, j < B.cols), and no other
/// thread may access those elements during the call.
pub unsafe fn gemm_serial_raw<F: Real>(alpha: F, a: Mat<F>, b: Mat<F>, beta: F, c: *mut F, ldc: usize) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    assert!(a.data.len() >= a.extent() && b.data.len() >= b.extent(), "gemm: operand too small");
    unsafe { gemm_block(alpha, a, b, beta, c, ldc, 0..a.rows, 0..b.cols) }
}

/// A raw pointer that parallel work items share, each writing only elements no other touches.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<F>(pub(crate) *mut F);
unsafe impl<F> Send for SendPtr<F> {}
unsafe impl<F> Sync for SendPtr<F> {}
impl<F> SendPtr<F> {
    pub(crate) fn get(self) -> *mut F {
        self.0
    }
}

/// One block of C: rows `r` and columns `cr`. Blocks of different calls never overlap.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block<F: Real>(
    alpha: F,
    a: Mat<F>,
    b: Mat<F>,
    beta: F,
    c: *mut F,
    ldc: usize,
    r: std::ops::Range<usize>,
    cr: std::ops::Range<usize>,
) {
    // OpenBLAS when it is chosen and takes this layout ([`blas`]), matrixmultiply otherwise.
    if let Some(lib) = blas::openblas() {
        let (a_ptr, b_ptr) =
            unsafe { (a.data.as_ptr().add(r.start * a.rs), b.data.as_ptr().add(cr.start * b.cs)) };
        let operands = ((a_ptr, a.rs as isize, a.cs as isize), (b_ptr, b.rs as isize, b.cs as isize));
        let out = (unsafe { c.add(r.start * ldc + cr.start) }, ldc as isize, 1);
        let dims = (r.len(), a.cols, cr.len());
        if unsafe { blas::cblas_gemm(F::cblas_gemm(lib), dims, alpha, operands.0, operands.1, beta, out) } {
            return;
        }
    }
    unsafe {
        F::gemm_raw(
            r.len(),
            a.cols,
            cr.len(),
            alpha,
            a.data.as_ptr().add(r.start * a.rs),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr().add(cr.start * b.cs),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.add(r.start * ldc + cr.start),
            ldc as isize,
            1,
        )
    }
}
