//! The virtual device's cuBLAS against a naive reference written here from the documented formula
//! `C = alpha·op(A)·op(B) + beta·C` (column-major, f64 accumulation), plus its argument checks,
//! extent checks and handle API. Enum values are spelled here as cudarc's `cublas::sys` has them,
//! not taken from the implementation.

use std::ffi::{CStr, c_void};
use std::marker::PhantomData;
use std::ptr::{null, null_mut};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use cuda::cublas::{self as blas, CublasHandle};
use half::{bf16, f16};

const OP_N: u32 = 0;
const OP_T: u32 = 1;
const OP_C: u32 = 2;

const SUCCESS: u32 = 0;
const NOT_INITIALIZED: u32 = 1;
const INVALID_VALUE: u32 = 7;
const EXECUTION_FAILED: u32 = 13;
const NOT_SUPPORTED: u32 = 15;

const R_32F: u32 = 0;
const R_64F: u32 = 1;
const R_16F: u32 = 2;
const R_8I: u32 = 3;
const R_16BF: u32 = 14;

const COMPUTE_16F: u32 = 64;
const COMPUTE_32F: u32 = 68;
const COMPUTE_32F_PEDANTIC: u32 = 69;
const COMPUTE_64F: u32 = 70;
const COMPUTE_32F_FAST_16F: u32 = 74;
const COMPUTE_32F_FAST_16BF: u32 = 75;
const COMPUTE_32F_FAST_TF32: u32 = 77;

const DEFAULT_MATH: u32 = 0;
const TENSOR_OP_MATH: u32 = 1;
const PEDANTIC_MATH: u32 = 2;
const TF32_TENSOR_OP_MATH: u32 = 3;
const DISALLOW_REDUCED_PRECISION_REDUCTION: u32 = 16;

const POINTER_MODE_HOST: u32 = 0;
const POINTER_MODE_DEVICE: u32 = 1;

const GEMM_DEFAULT: i32 = -1;
const GEMM_DEFAULT_TENSOR_OP: i32 = 99;

/// Tests that make calls fail (and so write `last_error`), or damage a guard zone (which the next
/// GEMM of any test reports), run alone; the others run together.
static ALONE: RwLock<()> = RwLock::new(());

fn alone() -> RwLockWriteGuard<'static, ()> {
    ALONE.write().unwrap_or_else(|p| p.into_inner())
}

fn together() -> RwLockReadGuard<'static, ()> {
    ALONE.read().unwrap_or_else(|p| p.into_inner())
}

// ------------------------------------------------------------------------------------------------
// Elements, device buffers, handles

trait El: Copy + std::fmt::Debug {
    /// cudaDataType_t.
    const TYPE: u32;
    /// Relative error of one rounding to this type.
    const ROUNDOFF: f64;
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
    fn bits(self) -> u32;
}

impl El for f32 {
    const TYPE: u32 = R_32F;
    const ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn bits(self) -> u32 {
        self.to_bits()
    }
}

impl El for bf16 {
    const TYPE: u32 = R_16BF;
    const ROUNDOFF: f64 = 1.0 / 256.0;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
}

impl El for f16 {
    const TYPE: u32 = R_16F;
    const ROUNDOFF: f64 = 1.0 / 2048.0;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
}

/// Device memory holding `len` elements of `T`.
struct Dev<T> {
    ptr: u64,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Copy> Dev<T> {
    /// Fresh memory: 0xFF bytes, NaN for every float type here.
    fn new(len: usize) -> Self {
        let ptr = cuda::memory::alloc((len * size_of::<T>()) as u64).expect("device allocation");
        Dev { ptr, len, _t: PhantomData }
    }

    fn from(data: &[T]) -> Self {
        let d = Dev::new(data.len());
        d.write(data);
        d
    }

    fn write(&self, data: &[T]) {
        assert_eq!(data.len(), self.len);
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr as *mut T, self.len) };
    }

    fn read(&self) -> Vec<T> {
        unsafe { std::slice::from_raw_parts(self.ptr as *const T, self.len) }.to_vec()
    }
}

impl<T> Drop for Dev<T> {
    fn drop(&mut self) {
        cuda::memory::free(self.ptr);
    }
}

struct Handle(CublasHandle);

impl Handle {
    fn new() -> Self {
        let mut h = null_mut();
        assert_eq!(unsafe { blas::cublasCreate_v2(&mut h) }, SUCCESS);
        assert!(!h.is_null());
        Handle(h)
    }

    fn with_math(mode: u32) -> Self {
        let h = Handle::new();
        assert_eq!(unsafe { blas::cublasSetMathMode(h.0, mode) }, SUCCESS);
        h
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        assert_eq!(unsafe { blas::cublasDestroy_v2(self.0) }, SUCCESS);
    }
}

/// Deterministic values in [-1, 1) with all 24 bits of an f32 significand in use.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let x = (self.0 >> 40) as f64 / (1u64 << 24) as f64; // [0, 1)
        (2.0 * x - 1.0) as f32 as f64
    }
}

// ------------------------------------------------------------------------------------------------
// Calling the four GEMMs with raw arguments

#[derive(Clone, Copy, Debug, PartialEq)]
enum Api {
    Sgemm,
    SgemmStridedBatched,
    /// cublasGemmEx with this computeType.
    GemmEx(u32),
    /// cublasGemmStridedBatchedEx with this computeType.
    GemmStridedBatchedEx(u32),
}

const ALL_APIS: [Api; 4] =
    [Api::Sgemm, Api::SgemmStridedBatched, Api::GemmEx(COMPUTE_32F), Api::GemmStridedBatchedEx(COMPUTE_32F)];

impl Api {
    fn batched(self) -> bool {
        matches!(self, Api::SgemmStridedBatched | Api::GemmStridedBatchedEx(_))
    }
    fn name(self) -> &'static str {
        match self {
            Api::Sgemm => "cublasSgemm_v2",
            Api::SgemmStridedBatched => "cublasSgemmStridedBatched",
            Api::GemmEx(_) => "cublasGemmEx",
            Api::GemmStridedBatchedEx(_) => "cublasGemmStridedBatchedEx",
        }
    }
}

/// Every argument of a GEMM call, as the C API takes them (types and algo only for the Ex calls,
/// strides and batch only for the batched ones).
#[derive(Clone, Copy, Debug)]
struct Raw {
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: i32,
    n: i32,
    k: i32,
    alpha: *const f32,
    a: u64,
    atype: u32,
    lda: i32,
    stride_a: i64,
    b: u64,
    btype: u32,
    ldb: i32,
    stride_b: i64,
    beta: *const f32,
    c: u64,
    ctype: u32,
    ldc: i32,
    stride_c: i64,
    batch: i32,
    algo: i32,
}

fn invoke(api: Api, r: &Raw) -> u32 {
    let (alpha, beta) = (r.alpha as *const c_void, r.beta as *const c_void);
    unsafe {
        match api {
            Api::Sgemm => blas::cublasSgemm_v2(
                r.handle,
                r.transa,
                r.transb,
                r.m,
                r.n,
                r.k,
                r.alpha,
                r.a as *const f32,
                r.lda,
                r.b as *const f32,
                r.ldb,
                r.beta,
                r.c as *mut f32,
                r.ldc,
            ),
            Api::SgemmStridedBatched => blas::cublasSgemmStridedBatched(
                r.handle,
                r.transa,
                r.transb,
                r.m,
                r.n,
                r.k,
                r.alpha,
                r.a as *const f32,
                r.lda,
                r.stride_a,
                r.b as *const f32,
                r.ldb,
                r.stride_b,
                r.beta,
                r.c as *mut f32,
                r.ldc,
                r.stride_c,
                r.batch,
            ),
            Api::GemmEx(compute) => blas::cublasGemmEx(
                r.handle,
                r.transa,
                r.transb,
                r.m,
                r.n,
                r.k,
                alpha,
                r.a as *const c_void,
                r.atype,
                r.lda,
                r.b as *const c_void,
                r.btype,
                r.ldb,
                beta,
                r.c as *mut c_void,
                r.ctype,
                r.ldc,
                compute,
                r.algo,
            ),
            Api::GemmStridedBatchedEx(compute) => blas::cublasGemmStridedBatchedEx(
                r.handle,
                r.transa,
                r.transb,
                r.m,
                r.n,
                r.k,
                alpha,
                r.a as *const c_void,
                r.atype,
                r.lda,
                r.stride_a,
                r.b as *const c_void,
                r.btype,
                r.ldb,
                r.stride_b,
                beta,
                r.c as *mut c_void,
                r.ctype,
                r.ldc,
                r.stride_c,
                r.batch,
                compute,
                r.algo,
            ),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// One GEMM against the reference

/// A GEMM's shape, storage and scalars (strides ≥ 0, in elements).
#[derive(Clone, Copy, Debug)]
struct Case {
    transa: u32,
    transb: u32,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
    batch: usize,
    alpha: f32,
    beta: f32,
}

impl Case {
    /// Minimal leading dimensions, one batch, alpha 1.25, beta -0.5.
    fn new(transa: u32, transb: u32, m: usize, n: usize, k: usize) -> Case {
        let mut c = Case {
            transa,
            transb,
            m,
            n,
            k,
            lda: 0,
            ldb: 0,
            ldc: m,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            batch: 1,
            alpha: 1.25,
            beta: -0.5,
        };
        c.lda = c.a_shape().0.max(1);
        c.ldb = c.b_shape().0.max(1);
        c
    }

    /// Leading dimensions `extra` past the minimum.
    fn padded(mut self, extra: usize) -> Case {
        self.lda += extra;
        self.ldb += extra;
        self.ldc += extra;
        self
    }

    /// `batch` batches, each operand's matrices `gap` elements apart past its own span; a
    /// broadcast operand (named in `broadcast`) gets stride 0.
    fn batched(mut self, batch: usize, gap: usize, broadcast: &str) -> Case {
        self.batch = batch;
        let span = |(rows, cols): (usize, usize), ld: usize| (cols - 1) * ld + rows;
        self.stride_a = if broadcast.contains('A') { 0 } else { span(self.a_shape(), self.lda) + gap };
        self.stride_b = if broadcast.contains('B') { 0 } else { span(self.b_shape(), self.ldb) + gap };
        self.stride_c = span((self.m, self.n), self.ldc) + gap;
        self
    }

    fn scalars(mut self, alpha: f32, beta: f32) -> Case {
        self.alpha = alpha;
        self.beta = beta;
        self
    }

    /// (rows, cols) of A as stored.
    fn a_shape(&self) -> (usize, usize) {
        if self.transa == OP_N { (self.m, self.k) } else { (self.k, self.m) }
    }

    fn b_shape(&self) -> (usize, usize) {
        if self.transb == OP_N { (self.k, self.n) } else { (self.n, self.k) }
    }

    /// op(A)(i, p) of batch `batch`, as an index into A's buffer.
    fn a_index(&self, batch: usize, i: usize, p: usize) -> usize {
        let (row, col) = if self.transa == OP_N { (i, p) } else { (p, i) };
        batch * self.stride_a + row + col * self.lda
    }

    /// op(B)(p, j) of batch `batch`, as an index into B's buffer.
    fn b_index(&self, batch: usize, p: usize, j: usize) -> usize {
        let (row, col) = if self.transb == OP_N { (p, j) } else { (j, p) };
        batch * self.stride_b + row + col * self.ldb
    }

    fn c_index(&self, batch: usize, i: usize, j: usize) -> usize {
        batch * self.stride_c + i + j * self.ldc
    }
}

/// Buffer of `len` elements: `fill` everywhere, fresh values at the indices `touched` yields.
fn buffer<T: El>(
    len: usize,
    fill: T,
    touched: impl Iterator<Item = usize>,
    rng: &mut Rng,
) -> (Vec<T>, Vec<bool>) {
    let mut values = vec![fill; len];
    let mut mask = vec![false; len];
    for idx in touched {
        if !mask[idx] {
            mask[idx] = true;
            values[idx] = T::from_f64(rng.next());
        }
    }
    (values, mask)
}

/// Runs `case` through `api` with random inputs of type I and C of type O, checks every C element
/// against the reference (inputs passed through `input_rounding`, f64 sums) and that C's padding
/// is untouched; returns C's buffer. Padding of A and B holds NaN, so reading it shows; with
/// beta == 0 so does C.
fn check<I: El, O: El>(
    h: &Handle,
    api: Api,
    case: &Case,
    seed: u64,
    input_rounding: fn(f64) -> f64,
) -> Vec<O> {
    let mut rng = Rng(seed);
    let cs = *case;
    let batches = 0..cs.batch;
    let span = |len: usize, stride: usize| (cs.batch - 1) * stride + len;
    let a_touched = batches
        .clone()
        .flat_map(|b| (0..cs.m).flat_map(move |i| (0..cs.k).map(move |p| cs.a_index(b, i, p))));
    let b_touched = batches
        .clone()
        .flat_map(|b| (0..cs.k).flat_map(move |p| (0..cs.n).map(move |j| cs.b_index(b, p, j))));
    let c_touched = batches
        .clone()
        .flat_map(|b| (0..cs.m).flat_map(move |i| (0..cs.n).map(move |j| cs.c_index(b, i, j))));
    let a_len = span(cs.a_shape().0 + (cs.a_shape().1 - 1) * cs.lda, cs.stride_a);
    let b_len = span(cs.b_shape().0 + (cs.b_shape().1 - 1) * cs.ldb, cs.stride_b);
    let c_len = span(cs.m + (cs.n - 1) * cs.ldc, cs.stride_c);
    let (a, _) = buffer::<I>(a_len, I::from_f64(f64::NAN), a_touched, &mut rng);
    let (b, _) = buffer::<I>(b_len, I::from_f64(f64::NAN), b_touched, &mut rng);
    let (mut c, c_mask) = buffer::<O>(c_len, O::from_f64(4321.0), c_touched, &mut rng);
    if cs.beta == 0.0 {
        for (x, &touched) in c.iter_mut().zip(&c_mask) {
            if touched {
                *x = O::from_f64(f64::NAN);
            }
        }
    }
    let (da, db, dc) = (Dev::from(&a), Dev::from(&b), Dev::from(&c));
    let raw = Raw {
        handle: h.0,
        transa: cs.transa,
        transb: cs.transb,
        m: cs.m as i32,
        n: cs.n as i32,
        k: cs.k as i32,
        alpha: &cs.alpha,
        a: da.ptr,
        atype: I::TYPE,
        lda: cs.lda as i32,
        stride_a: cs.stride_a as i64,
        b: db.ptr,
        btype: I::TYPE,
        ldb: cs.ldb as i32,
        stride_b: cs.stride_b as i64,
        beta: &cs.beta,
        c: dc.ptr,
        ctype: O::TYPE,
        ldc: cs.ldc as i32,
        stride_c: cs.stride_c as i64,
        batch: cs.batch as i32,
        algo: GEMM_DEFAULT,
    };
    assert!(api.batched() || cs.batch == 1);
    assert_eq!(invoke(api, &raw), SUCCESS, "{api:?} {cs:?}: {:?}", blas::last_error());
    let got = dc.read();

    let (alpha, beta) = (cs.alpha as f64, cs.beta as f64);
    for batch in 0..cs.batch {
        for j in 0..cs.n {
            for i in 0..cs.m {
                let (mut sum, mut magnitude) = (0.0f64, 0.0f64);
                for p in 0..cs.k {
                    let x = input_rounding(a[cs.a_index(batch, i, p)].to_f64());
                    let y = input_rounding(b[cs.b_index(batch, p, j)].to_f64());
                    sum += x * y;
                    magnitude += (x * y).abs();
                }
                let idx = cs.c_index(batch, i, j);
                let (mut expected, mut bound) = (alpha * sum, (alpha * magnitude).abs());
                if beta != 0.0 {
                    expected += beta * c[idx].to_f64();
                    bound += (beta * c[idx].to_f64()).abs();
                }
                let value = got[idx].to_f64();
                let tolerance = 1e-5 * bound + 1.01 * O::ROUNDOFF * expected.abs();
                assert!(
                    (value - expected).abs() <= tolerance,
                    "{api:?} {cs:?}: C[{i},{j}] of batch {batch} is {value}, expected {expected} (tolerance {tolerance})"
                );
            }
        }
    }
    for (idx, touched) in c_mask.iter().enumerate() {
        if !touched {
            assert_eq!(got[idx].bits(), c[idx].bits(), "{api:?} {cs:?}: C padding element {idx} was written");
        }
    }
    got
}

fn exact(x: f64) -> f64 {
    x
}

/// `x` to `bits` significant bits, to nearest even (a float of unbounded exponent range).
fn round_significant(x: f64, bits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let mut e = x.abs().log2().floor() as i32;
    while 2f64.powi(e) > x.abs() {
        e -= 1;
    }
    while 2f64.powi(e + 1) <= x.abs() {
        e += 1;
    }
    let quantum = 2f64.powi(e - (bits - 1));
    (x / quantum).round_ties_even() * quantum
}

/// TF32: 10 stored mantissa bits, 11 significant.
fn tf32(x: f64) -> f64 {
    round_significant(x, 11)
}

fn to_bf16(x: f64) -> f64 {
    round_significant(x, 8)
}

fn to_f16(x: f64) -> f64 {
    f16::from_f64(x).to_f64()
}

fn bits_of<T: El>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.bits()).collect()
}

// ------------------------------------------------------------------------------------------------
// Results

const OPS: [(u32, u32); 4] = [(OP_N, OP_N), (OP_N, OP_T), (OP_T, OP_N), (OP_T, OP_T)];

#[test]
fn sgemm_all_transposes_non_square_with_padded_leading_dimensions() {
    let _together = together();
    let h = Handle::new();
    for (seed, &(ta, tb)) in OPS.iter().enumerate() {
        for extra in [0, 3] {
            let case = Case::new(ta, tb, 5, 3, 7).padded(extra);
            check::<f32, f32>(&h, Api::Sgemm, &case, seed as u64, exact);
            check::<f32, f32>(&h, Api::GemmEx(COMPUTE_32F), &case, seed as u64, exact);
        }
        // Other shapes: a single row or column, k past one 8-lane chunk with a tail.
        for (m, n, k) in [(1, 6, 4), (6, 1, 19), (9, 4, 1), (3, 11, 16)] {
            check::<f32, f32>(&h, Api::Sgemm, &Case::new(ta, tb, m, n, k).padded(2), 10 + seed as u64, exact);
        }
    }
}

#[test]
fn op_c_is_op_t_for_real_matrices() {
    let _together = together();
    let h = Handle::new();
    let with_t = check::<f32, f32>(&h, Api::Sgemm, &Case::new(OP_T, OP_T, 4, 6, 5), 7, exact);
    let with_c = check::<f32, f32>(&h, Api::Sgemm, &Case::new(OP_C, OP_C, 4, 6, 5), 7, exact);
    assert_eq!(bits_of(&with_t), bits_of(&with_c));
}

#[test]
fn scalars_beta_zero_never_reads_c() {
    let _together = together();
    let h = Handle::new();
    for api in ALL_APIS {
        for (alpha, beta) in [(1.0, 0.0), (-2.5, 0.0), (0.75, 1.0), (1.0, -3.0), (0.5, 2.0)] {
            // beta == 0: C holds NaN (check() fills it so); the result must be finite.
            let case = Case::new(OP_T, OP_N, 6, 4, 9).padded(1).scalars(alpha, beta);
            let c = check::<f32, f32>(&h, api, &case, 3, exact);
            if beta == 0.0 {
                for j in 0..case.n {
                    for i in 0..case.m {
                        assert!(c[case.c_index(0, i, j)].is_finite(), "{api:?}: NaN leaked from C");
                    }
                }
            }
        }
    }
}

#[test]
fn alpha_zero_or_k_zero_scales_c_without_reading_a_or_b() {
    let _together = together();
    let h = Handle::new();
    let (m, n) = (3, 4);
    let c0: Vec<f32> = (0..m * n).map(|x| x as f32 - 5.0).collect();
    for (k, alpha, beta) in [(5, 0.0f32, 2.0f32), (0, 1.5, -0.5), (5, 0.0, 0.0), (0, 1.0, 0.0), (5, 0.0, 1.0)]
    {
        for api in ALL_APIS {
            // A and B are fresh (NaN) and one element long: never read when alpha == 0 or k == 0.
            let (a, b) = (Dev::<f32>::new(1), Dev::<f32>::new(1));
            let c = Dev::from(&c0);
            let raw = Raw {
                handle: h.0,
                transa: OP_N,
                transb: OP_N,
                m,
                n,
                k,
                alpha: &alpha,
                a: a.ptr,
                atype: R_32F,
                lda: m,
                stride_a: 0,
                b: b.ptr,
                btype: R_32F,
                ldb: k.max(1),
                stride_b: 0,
                beta: &beta,
                c: c.ptr,
                ctype: R_32F,
                ldc: m,
                stride_c: 0,
                batch: 1,
                algo: GEMM_DEFAULT,
            };
            assert_eq!(invoke(api, &raw), SUCCESS, "{api:?} k={k} alpha={alpha} beta={beta}");
            let expected: Vec<f32> = c0.iter().map(|&x| beta * x).collect();
            assert_eq!(c.read(), expected, "{api:?} k={k} alpha={alpha} beta={beta}");
        }
    }
}

#[test]
fn strided_batches_with_gaps_and_a_broadcast_operand() {
    let _together = together();
    let h = Handle::new();
    for (seed, &(ta, tb)) in OPS.iter().enumerate() {
        for broadcast in ["", "A", "B"] {
            let case = Case::new(ta, tb, 5, 3, 7).padded(2).batched(4, 5, broadcast).scalars(0.5, 1.5);
            check::<f32, f32>(&h, Api::SgemmStridedBatched, &case, seed as u64, exact);
            check::<f32, f32>(&h, Api::GemmStridedBatchedEx(COMPUTE_32F), &case, seed as u64, exact);
            check::<bf16, bf16>(&h, Api::GemmStridedBatchedEx(COMPUTE_32F), &case, seed as u64, exact);
        }
    }
}

#[test]
fn larger_batched_gemm_matches_reference() {
    let _together = together();
    let h = Handle::new();
    let case = Case::new(OP_N, OP_T, 67, 45, 130).padded(3).batched(3, 1, "").scalars(1.0, 0.0);
    check::<f32, f32>(&h, Api::SgemmStridedBatched, &case, 99, exact);
    let case = Case::new(OP_T, OP_N, 64, 33, 61).batched(2, 0, "B");
    check::<bf16, f32>(&h, Api::GemmStridedBatchedEx(COMPUTE_32F), &case, 98, exact);
}

#[test]
fn bf16_and_f16_inputs_and_outputs() {
    let _together = together();
    let h = Handle::new();
    for (seed, &(ta, tb)) in OPS.iter().enumerate() {
        let seed = seed as u64;
        let case = Case::new(ta, tb, 5, 3, 7).padded(1);
        for beta in [0.0, -0.5] {
            let case = case.scalars(1.25, beta);
            check::<bf16, bf16>(&h, Api::GemmEx(COMPUTE_32F), &case, seed, exact);
            check::<bf16, f32>(&h, Api::GemmEx(COMPUTE_32F), &case, seed, exact);
            check::<f16, f16>(&h, Api::GemmEx(COMPUTE_32F), &case, seed, exact);
            check::<f16, f32>(&h, Api::GemmEx(COMPUTE_32F_PEDANTIC), &case, seed, exact);
        }
    }
}

#[test]
fn bf16_output_is_the_f32_result_rounded_to_nearest_even() {
    let _together = together();
    // With f32 output and with bf16 output from the same inputs, the bf16 values are the f32
    // results rounded once.
    let h = Handle::new();
    let case = Case::new(OP_N, OP_N, 7, 5, 12).scalars(1.0, 0.0);
    let wide = check::<bf16, f32>(&h, Api::GemmEx(COMPUTE_32F), &case, 5, exact);
    let narrow = check::<bf16, bf16>(&h, Api::GemmEx(COMPUTE_32F), &case, 5, exact);
    for j in 0..case.n {
        for i in 0..case.m {
            let idx = case.c_index(0, i, j);
            assert_eq!(narrow[idx].to_bits(), bf16::from_f32(wide[idx]).to_bits(), "C[{i},{j}]");
        }
    }
}

#[test]
fn tf32_math_mode_rounds_fp32_inputs() {
    let _together = together();
    let exact_handle = Handle::new();
    let tf32_handle = Handle::with_math(TF32_TENSOR_OP_MATH);
    let case = Case::new(OP_N, OP_T, 8, 6, 40).padded(1);
    let precise = check::<f32, f32>(&exact_handle, Api::Sgemm, &case, 21, exact);
    let rounded = check::<f32, f32>(&tf32_handle, Api::Sgemm, &case, 21, tf32);
    // The two differ, by about TF32's precision: each product is off by at most ~2·2^-11 of itself.
    let (mut largest, mut differing) = (0.0f64, 0);
    for j in 0..case.n {
        for i in 0..case.m {
            let idx = case.c_index(0, i, j);
            let diff = (precise[idx] as f64 - rounded[idx] as f64).abs();
            largest = largest.max(diff);
            differing += (diff > 0.0) as usize;
        }
    }
    // |a|, |b| < 1, alpha = 1.25; beta·C is the same in both.
    let bound = 1.25 * case.k as f64 * 2.0 * 2f64.powi(-11) * 1.01 + 1e-5;
    assert!(differing > case.m * case.n / 2, "TF32 rounding changed only {differing} results");
    assert!(largest > 1e-4 && largest < bound, "largest TF32 difference {largest}");

    // The same rounding from the compute type, whatever the math mode; the flag bit changes nothing.
    let fast = check::<f32, f32>(&exact_handle, Api::GemmEx(COMPUTE_32F_FAST_TF32), &case, 21, tf32);
    assert_eq!(bits_of(&fast), bits_of(&rounded));
    let ex = check::<f32, f32>(&tf32_handle, Api::GemmEx(COMPUTE_32F), &case, 21, tf32);
    assert_eq!(bits_of(&ex), bits_of(&rounded));
    let flagged = Handle::with_math(TF32_TENSOR_OP_MATH | DISALLOW_REDUCED_PRECISION_REDUCTION);
    assert_eq!(bits_of(&check::<f32, f32>(&flagged, Api::Sgemm, &case, 21, tf32)), bits_of(&rounded));
    // Batched too.
    let batched = case.batched(3, 2, "A");
    check::<f32, f32>(&tf32_handle, Api::SgemmStridedBatched, &batched, 22, tf32);
    check::<f32, f32>(&exact_handle, Api::GemmStridedBatchedEx(COMPUTE_32F_FAST_TF32), &batched, 22, tf32);

    // Pedantic compute type or math mode, and default math: exact fp32.
    let pedantic = check::<f32, f32>(&tf32_handle, Api::GemmEx(COMPUTE_32F_PEDANTIC), &case, 21, exact);
    assert_eq!(bits_of(&pedantic), bits_of(&precise));
    let pedantic_math = Handle::with_math(PEDANTIC_MATH);
    assert_eq!(bits_of(&check::<f32, f32>(&pedantic_math, Api::Sgemm, &case, 21, exact)), bits_of(&precise));
    let default_ex = check::<f32, f32>(&exact_handle, Api::GemmEx(COMPUTE_32F), &case, 21, exact);
    assert_eq!(bits_of(&default_ex), bits_of(&precise));
    // bf16 inputs are exact in TF32: the math mode changes nothing for them.
    let bf_default = check::<bf16, f32>(&exact_handle, Api::GemmEx(COMPUTE_32F), &case, 23, exact);
    let bf_tf32 = check::<bf16, f32>(&tf32_handle, Api::GemmEx(COMPUTE_32F), &case, 23, exact);
    assert_eq!(bits_of(&bf_default), bits_of(&bf_tf32));
}

#[test]
fn fast_16bf_and_16f_compute_types_round_inputs() {
    let _together = together();
    let h = Handle::new();
    let case = Case::new(OP_T, OP_T, 6, 7, 24).padded(2);
    check::<f32, f32>(&h, Api::GemmEx(COMPUTE_32F_FAST_16BF), &case, 31, to_bf16);
    check::<f32, f32>(&h, Api::GemmEx(COMPUTE_32F_FAST_16F), &case, 32, to_f16);
    // The deprecated CUBLAS_TENSOR_OP_MATH makes fp32 GEMMs use CUBLAS_COMPUTE_32F_FAST_16F.
    let tensor_op = Handle::with_math(TENSOR_OP_MATH);
    check::<f32, f32>(&tensor_op, Api::Sgemm, &case, 33, to_f16);
}

#[test]
fn legacy_cuda_r_32f_compute_type_is_compute_32f() {
    let _together = together();
    let h = Handle::new();
    let case = Case::new(OP_N, OP_N, 4, 5, 6);
    let legacy = check::<f32, f32>(&h, Api::GemmEx(R_32F), &case, 41, exact);
    let modern = check::<f32, f32>(&h, Api::GemmEx(COMPUTE_32F), &case, 41, exact);
    assert_eq!(bits_of(&legacy), bits_of(&modern));
    check::<bf16, bf16>(&h, Api::GemmStridedBatchedEx(R_32F), &case.batched(2, 1, ""), 42, exact);
}

#[test]
fn ex_and_sgemm_agree_bit_for_bit() {
    let _together = together();
    let h = Handle::new();
    let case = Case::new(OP_T, OP_N, 9, 7, 33).padded(1).batched(2, 3, "");
    let s = check::<f32, f32>(&h, Api::SgemmStridedBatched, &case, 51, exact);
    let ex = check::<f32, f32>(&h, Api::GemmStridedBatchedEx(COMPUTE_32F), &case, 51, exact);
    assert_eq!(bits_of(&s), bits_of(&ex));
}

#[test]
fn every_known_algo_is_accepted() {
    let _together = together();
    let h = Handle::new();
    let case = Case::new(OP_N, OP_N, 2, 2, 2);
    let (a, b, c) = (Dev::from(&[1.0f32; 4]), Dev::from(&[1.0f32; 4]), Dev::from(&[0.0f32; 4]));
    for algo in [GEMM_DEFAULT, 0, 23, GEMM_DEFAULT_TENSOR_OP, 115] {
        let raw = valid_raw(&h, &a, &b, &c, &case, algo);
        assert_eq!(invoke(Api::GemmEx(COMPUTE_32F), &raw), SUCCESS, "algo {algo}");
        assert_eq!(c.read(), vec![2.0f32; 4]);
    }
}

fn valid_raw(h: &Handle, a: &Dev<f32>, b: &Dev<f32>, c: &Dev<f32>, case: &Case, algo: i32) -> Raw {
    Raw {
        handle: h.0,
        transa: case.transa,
        transb: case.transb,
        m: case.m as i32,
        n: case.n as i32,
        k: case.k as i32,
        alpha: &1.0,
        a: a.ptr,
        atype: R_32F,
        lda: case.lda as i32,
        stride_a: case.stride_a as i64,
        b: b.ptr,
        btype: R_32F,
        ldb: case.ldb as i32,
        stride_b: case.stride_b as i64,
        beta: &0.0,
        c: c.ptr,
        ctype: R_32F,
        ldc: case.ldc as i32,
        stride_c: case.stride_c as i64,
        batch: case.batch as i32,
        algo,
    }
}

// ------------------------------------------------------------------------------------------------
// Failures

/// Calls `api` with `raw`; asserts the status, that C kept its contents, and that the recorded
/// error names the function and contains `said`.
fn expect_failure(api: Api, raw: &Raw, c: &Dev<f32>, status: u32, said: &str) {
    let before = bits_of(&c.read());
    assert_eq!(invoke(api, raw), status, "{api:?} {raw:?}: {:?}", blas::last_error());
    assert_eq!(bits_of(&c.read()), before, "{api:?}: C was written by a failing call");
    let error = blas::last_error().unwrap_or_default();
    assert!(error.contains(api.name()) && error.contains(said), "{api:?}: error {error:?} lacks {said:?}");
}

#[test]
fn invalid_arguments_answer_documented_statuses() {
    let _alone = alone();
    let h = Handle::new();
    let (a, b, c) = (Dev::<f32>::new(4096), Dev::<f32>::new(4096), Dev::from(&vec![3.0f32; 4096]));
    for api in ALL_APIS {
        for &(ta, tb) in &OPS {
            let case = Case::new(ta, tb, 5, 3, 7).batched(2, 0, "");
            let good = valid_raw(&h, &a, &b, &c, &case, GEMM_DEFAULT);
            let mut r;
            macro_rules! bad {
                ($field:ident = $value:expr, $status:expr, $said:expr) => {
                    r = good;
                    r.$field = $value;
                    expect_failure(api, &r, &c, $status, $said);
                };
            }
            bad!(m = -1, INVALID_VALUE, "m = -1");
            bad!(n = -2, INVALID_VALUE, "n = -2");
            bad!(k = -3, INVALID_VALUE, "k = -3");
            bad!(transa = 7, INVALID_VALUE, "transa");
            bad!(transb = 3, INVALID_VALUE, "transb");
            // lda ≥ max(1, m) for op N, max(1, k) otherwise; ldb ≥ max(1, k) for op N, max(1, n)
            // otherwise; ldc ≥ max(1, m).
            let a_rows = if ta == OP_N { 5 } else { 7 };
            let b_rows = if tb == OP_N { 7 } else { 3 };
            bad!(lda = a_rows - 1, INVALID_VALUE, "lda");
            bad!(ldb = b_rows - 1, INVALID_VALUE, "ldb");
            bad!(ldc = 4, INVALID_VALUE, "ldc");
            bad!(lda = 0, INVALID_VALUE, "lda = 0");
            bad!(alpha = null(), INVALID_VALUE, "alpha");
            bad!(beta = null(), INVALID_VALUE, "beta");
            bad!(handle = null_mut(), NOT_INITIALIZED, "NULL");
            bad!(handle = 0x1234 as CublasHandle, NOT_INITIALIZED, "not a live handle");
            if api.batched() {
                bad!(batch = -1, INVALID_VALUE, "batchCount");
            }
            // Leading dimensions of an empty matrix must still be ≥ 1.
            r = good;
            r.m = 0;
            r.ldc = 0;
            expect_failure(api, &r, &c, INVALID_VALUE, "ldc = 0");
        }
    }
}

#[test]
fn quick_returns_touch_nothing() {
    let _alone = alone();
    let h = Handle::new();
    let (a, b, c) = (Dev::<f32>::new(64), Dev::<f32>::new(64), Dev::from(&[3.0f32; 64]));
    for api in ALL_APIS {
        let good = valid_raw(&h, &a, &b, &c, &Case::new(OP_N, OP_N, 4, 4, 4).batched(2, 0, ""), GEMM_DEFAULT);
        // m or n == 0: nothing to do, even with operands that are not device memory.
        for (m, n) in [(0, 4), (4, 0)] {
            let r = Raw { m, n, a: 8, b: 8, c: 8, ..good };
            assert_eq!(invoke(api, &r), SUCCESS, "{api:?} m={m} n={n}");
        }
        if api.batched() {
            let r = Raw { batch: 0, a: 8, b: 8, c: 8, ..good };
            assert_eq!(invoke(api, &r), SUCCESS, "{api:?} batchCount 0");
        }
        assert_eq!(c.read(), vec![3.0f32; 64]);
    }
}

#[test]
fn unsupported_type_combinations() {
    let _alone = alone();
    let h = Handle::new();
    let (a, b, c) = (Dev::<f32>::new(256), Dev::<f32>::new(256), Dev::from(&[3.0f32; 256]));
    let case = Case::new(OP_N, OP_T, 4, 3, 5);
    let good = valid_raw(&h, &a, &b, &c, &case, GEMM_DEFAULT);
    for api in [Api::GemmEx(COMPUTE_32F), Api::GemmStridedBatchedEx(COMPUTE_32F)] {
        let with_types = |atype, btype, ctype| Raw { atype, btype, ctype, ..good };
        // A and B of different types; 16-bit output from fp32 inputs; f16 output from bf16 inputs.
        for (at, bt, ct) in
            [(R_16F, R_16BF, R_32F), (R_32F, R_32F, R_16BF), (R_16BF, R_16BF, R_16F), (R_64F, R_64F, R_64F)]
        {
            expect_failure(api, &with_types(at, bt, ct), &c, NOT_SUPPORTED, "not");
        }
        expect_failure(api, &with_types(R_8I, R_8I, R_32F), &c, NOT_SUPPORTED, "Atype = 3");
        expect_failure(api, &with_types(999, R_32F, R_32F), &c, INVALID_VALUE, "Atype = 999");
        expect_failure(api, &with_types(R_32F, R_32F, 500), &c, INVALID_VALUE, "Ctype = 500");
        expect_failure(api, &Raw { algo: 57, ..good }, &c, NOT_SUPPORTED, "algo 57");
    }
    let with_compute = |compute| Api::GemmEx(compute);
    // The FAST compute types take fp32 only; 16F and 64F compute are not implemented.
    let bf = Raw { atype: R_16BF, btype: R_16BF, ctype: R_16BF, ..good };
    expect_failure(with_compute(COMPUTE_32F_FAST_TF32), &bf, &c, NOT_SUPPORTED, "computeType 77");
    expect_failure(with_compute(COMPUTE_32F_FAST_16BF), &bf, &c, NOT_SUPPORTED, "computeType 75");
    expect_failure(with_compute(COMPUTE_16F), &good, &c, NOT_SUPPORTED, "computeType 64");
    expect_failure(with_compute(COMPUTE_64F), &good, &c, NOT_SUPPORTED, "computeType 70");
    expect_failure(with_compute(R_64F), &good, &c, NOT_SUPPORTED, "computeType 1");
    expect_failure(with_compute(1234), &good, &c, INVALID_VALUE, "computeType 1234");
    // Device pointer mode: set is accepted, GEMMs refuse it.
    assert_eq!(unsafe { blas::cublasSetPointerMode_v2(h.0, POINTER_MODE_DEVICE) }, SUCCESS);
    for api in ALL_APIS {
        expect_failure(api, &good, &c, NOT_SUPPORTED, "CUBLAS_POINTER_MODE_DEVICE");
    }
    assert_eq!(unsafe { blas::cublasSetPointerMode_v2(h.0, POINTER_MODE_HOST) }, SUCCESS);
    assert_eq!(invoke(Api::Sgemm, &good), SUCCESS);
}

#[test]
fn operand_past_its_allocation_fails_without_writing() {
    let _alone = alone();
    let h = Handle::new();
    // m=4, n=3, k=5, N/N: A needs 4·5 = 20 elements, B 5·3 = 15, C 4·3 = 12.
    let case = Case::new(OP_N, OP_N, 4, 3, 5);
    let (a, b, c) = (Dev::from(&[1.0f32; 20]), Dev::from(&[1.0f32; 15]), Dev::from(&[3.0f32; 12]));
    let short_b = Dev::from(&[1.0f32; 14]);
    let short_c = Dev::from(&[3.0f32; 11]);
    let good = valid_raw(&h, &a, &b, &c, &case, GEMM_DEFAULT);
    assert_eq!(invoke(Api::Sgemm, &good), SUCCESS);
    assert_eq!(c.read(), vec![5.0f32; 12]);
    c.write(&[3.0; 12]);
    for api in ALL_APIS {
        let r = Raw { b: short_b.ptr, ..good };
        expect_failure(api, &r, &c, EXECUTION_FAILED, "operand B: 60 bytes from");
        expect_failure(api, &r, &c, EXECUTION_FAILED, "run 4 bytes past the end of the 56-byte allocation");
        let r = Raw { c: short_c.ptr, ..good };
        expect_failure(api, &r, &short_c, EXECUTION_FAILED, "operand C:");
        // lda larger than the allocation allows: the last column of A runs past it.
        let r = Raw { lda: 6, ..good };
        expect_failure(api, &r, &c, EXECUTION_FAILED, "operand A:");
        // Misaligned: an f32 operand two bytes into its allocation.
        let r = Raw { a: a.ptr + 2, ..good };
        expect_failure(api, &r, &c, EXECUTION_FAILED, "operand A: address");
        // Host memory is not device memory.
        let host = vec![1.0f32; 64];
        let r = Raw { b: host.as_ptr() as u64, ..good };
        expect_failure(api, &r, &c, EXECUTION_FAILED, "operand B:");
    }
    // Strided batches: the third batch of C runs past; the message says which batch.
    let big_a = Dev::from(&[1.0f32; 20]);
    let batched = Case::new(OP_N, OP_N, 4, 3, 5).batched(3, 0, "AB");
    let c3 = Dev::from(&[3.0f32; 30]);
    let r = valid_raw(&h, &big_a, &b, &c3, &batched, GEMM_DEFAULT);
    for api in [Api::SgemmStridedBatched, Api::GemmStridedBatchedEx(COMPUTE_32F)] {
        expect_failure(api, &r, &c3, EXECUTION_FAILED, "operand C:");
        expect_failure(api, &r, &c3, EXECUTION_FAILED, "(batch 2 of 3)");
        // A negative stride that leaves memory.
        let r = Raw { stride_a: -20, ..r };
        expect_failure(api, &r, &c3, EXECUTION_FAILED, "operand A:");
    }
    // Exactly enough room succeeds.
    let c36 = Dev::from(&[3.0f32; 36]);
    let r = valid_raw(&h, &big_a, &b, &c36, &batched, GEMM_DEFAULT);
    assert_eq!(invoke(Api::SgemmStridedBatched, &r), SUCCESS);
    assert_eq!(c36.read(), vec![5.0f32; 36]);
}

#[test]
fn guard_damage_after_the_gemm_is_reported() {
    // Damage the guard of some unrelated allocation: the GEMM's post-check reports it as
    // EXECUTION_FAILED (the driver's policy: whatever ran last is told).
    let _alone = alone();
    let h = Handle::new();
    let victim = Dev::<f32>::new(5);
    unsafe { *((victim.ptr + 21) as *mut u8) = 0 };
    let case = Case::new(OP_N, OP_N, 2, 2, 2);
    let (a, b, c) = (Dev::from(&[1.0f32; 4]), Dev::from(&[1.0f32; 4]), Dev::from(&[0.0f32; 4]));
    let raw = valid_raw(&h, &a, &b, &c, &case, GEMM_DEFAULT);
    assert_eq!(invoke(Api::Sgemm, &raw), EXECUTION_FAILED);
    let error = blas::last_error().unwrap_or_default();
    assert!(error.contains("cublasSgemm_v2") && error.contains("guard"), "{error}");
    assert_eq!(invoke(Api::Sgemm, &raw), SUCCESS, "a damaged guard is reported once");
}

// ------------------------------------------------------------------------------------------------
// Handle API

#[test]
fn handle_state_round_trips_and_dies_with_destroy() {
    let _alone = alone();
    let h = Handle::new();
    let mut mode = 99u32;
    unsafe {
        assert_eq!(blas::cublasGetMathMode(h.0, &mut mode), SUCCESS);
        assert_eq!(mode, DEFAULT_MATH);
        assert_eq!(blas::cublasGetPointerMode_v2(h.0, &mut mode), SUCCESS);
        assert_eq!(mode, POINTER_MODE_HOST);
        let mut stream = 0x99usize as *mut c_void;
        assert_eq!(blas::cublasGetStream_v2(h.0, &mut stream), SUCCESS);
        assert!(stream.is_null());

        assert_eq!(blas::cublasSetStream_v2(h.0, 0xabc0 as *mut c_void), SUCCESS);
        assert_eq!(blas::cublasGetStream_v2(h.0, &mut stream), SUCCESS);
        assert_eq!(stream as usize, 0xabc0);
        for m in [TF32_TENSOR_OP_MATH, PEDANTIC_MATH | DISALLOW_REDUCED_PRECISION_REDUCTION, DEFAULT_MATH] {
            assert_eq!(blas::cublasSetMathMode(h.0, m), SUCCESS);
            assert_eq!(blas::cublasGetMathMode(h.0, &mut mode), SUCCESS);
            assert_eq!(mode, m);
        }
        assert_eq!(blas::cublasSetMathMode(h.0, 7), INVALID_VALUE);
        assert_eq!(blas::cublasSetPointerMode_v2(h.0, 2), INVALID_VALUE);
        assert_eq!(blas::cublasGetMathMode(h.0, null_mut()), INVALID_VALUE);
        assert_eq!(blas::cublasSetWorkspace_v2(h.0, 0x1000 as *mut c_void, 4096), SUCCESS);
        let mut version = 0;
        assert_eq!(blas::cublasGetVersion_v2(h.0, &mut version), SUCCESS);
        assert!(version >= 110000, "{version}");
        assert_eq!(blas::cublasCreate_v2(null_mut()), INVALID_VALUE);

        let mut other = null_mut();
        assert_eq!(blas::cublasCreate_v2(&mut other), SUCCESS);
        assert_ne!(other, h.0);
        assert_eq!(blas::cublasDestroy_v2(other), SUCCESS);
        assert_eq!(blas::cublasDestroy_v2(other), NOT_INITIALIZED);
        assert_eq!(blas::cublasSetStream_v2(other, null_mut()), NOT_INITIALIZED);
        assert_eq!(blas::cublasGetMathMode(other, &mut mode), NOT_INITIALIZED);
        assert_eq!(blas::cublasSetMathMode(null_mut(), DEFAULT_MATH), NOT_INITIALIZED);
        assert_eq!(blas::cublasSetWorkspace_v2(other, null_mut(), 0), NOT_INITIALIZED);
        // A handle made after a destroy is never the destroyed one.
        let mut third = null_mut();
        assert_eq!(blas::cublasCreate_v2(&mut third), SUCCESS);
        assert_ne!(third, other);
        assert_eq!(blas::cublasDestroy_v2(third), SUCCESS);
    }
}

#[test]
fn status_names_and_strings() {
    let _together = together();
    let name = |s| unsafe { CStr::from_ptr(blas::cublasGetStatusName(s)) }.to_str().unwrap_or("").to_string();
    let text =
        |s| unsafe { CStr::from_ptr(blas::cublasGetStatusString(s)) }.to_str().unwrap_or("").to_string();
    assert_eq!(name(SUCCESS), "CUBLAS_STATUS_SUCCESS");
    assert_eq!(name(NOT_INITIALIZED), "CUBLAS_STATUS_NOT_INITIALIZED");
    assert_eq!(name(INVALID_VALUE), "CUBLAS_STATUS_INVALID_VALUE");
    assert_eq!(name(EXECUTION_FAILED), "CUBLAS_STATUS_EXECUTION_FAILED");
    assert_eq!(name(NOT_SUPPORTED), "CUBLAS_STATUS_NOT_SUPPORTED");
    assert_eq!(name(12345), "CUBLAS_STATUS_UNKNOWN");
    for s in [0, 1, 3, 7, 8, 11, 13, 14, 15, 16, 999] {
        assert!(!text(s).is_empty(), "status {s}");
    }
}
