//! exp, erf, GELU and softmax on f32 slices, eight or sixteen lanes at a time.
//!
//! Each function is written once over a vector of lanes ([`Lanes`]) and built three times: on
//! AVX-512 registers (16 lanes), on AVX2 + FMA registers (8 lanes) — picked at run time — and on
//! plain f32 arrays for other CPUs. All run the same IEEE operations (a fused multiply-add is one
//! rounding in each), and softmax adds its row in one order whatever the width, so every build
//! gives the same bits; an element's result never depends on its neighbours or on where it sits
//! in the slice. Accuracy (tests below, against f64): exp within 2 ulp, erf within 4e-7
//! absolute — what GELU's `1 + erf` keeps in f32.

/// The widest vector's lanes: softmax keeps one running sum per position modulo this.
const MAX_LANES: usize = 16;
/// The portable build's lanes.
const LANES: usize = 8;

/// A vector of f32 lanes and the IEEE operations the functions below are written in. Each
/// operation is exact or one rounding, the same in every implementation, so every implementation
/// gives the same bits.
trait Lanes: Copy {
    /// Lanes per vector: 8 or 16.
    const N: usize;
    fn splat(v: f32) -> Self;
    /// Lanes `i..i+N` of `x`, zeros past its end.
    fn load(x: &[f32], i: usize) -> Self;
    /// Writes the lanes to `y[i..]` (as many as fit).
    fn store(self, y: &mut [f32], i: usize);
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// self·b + c, one rounding.
    fn fma(self, b: Self, c: Self) -> Self;
    /// `self > o ? self : o` (x86's maxps: `o` when either is NaN).
    fn max(self, o: Self) -> Self;
    /// `self < o ? self : o`.
    fn min(self, o: Self) -> Self;
    /// To the nearest integer, ties to even.
    fn round(self) -> Self;
    /// 2ⁿ for lanes holding integers n in [−126, 127].
    fn pow2(self) -> Self;
    /// `self` where `x ≥ bound`, 0 elsewhere (and where x is NaN).
    fn zero_below(self, x: Self, bound: f32) -> Self;
    /// The lanes, in `out[..N]`.
    fn lanes(self, out: &mut [f32]) {
        self.store(out, 0)
    }
}

/// Horner's rule with coefficients from the highest power down.
#[inline(always)]
fn poly<L: Lanes>(x: L, coefficients: &[f32]) -> L {
    let mut p = L::splat(coefficients[0]);
    for &c in &coefficients[1..] {
        p = p.fma(x, L::splat(c));
    }
    p
}

/// eˣ (Cephes' expf: x = n·ln2 + r, |r| ≤ ln2/2, a degree-5 polynomial for e^r − 1 − r). Below
/// −87.3 (where eˣ leaves f32's normal range) the result is 0.
#[inline(always)]
fn exp_lanes<L: Lanes>(x: L) -> L {
    const LOWEST: f32 = -87.336_55;
    let xc = x.max(L::splat(LOWEST)).min(L::splat(88.376_26));
    let n = xc.mul(L::splat(std::f32::consts::LOG2_E)).round();
    // r = x − n·ln2, with ln2 split in two so n·ln2_hi is exact.
    let r = n.fma(L::splat(-0.693_359_4), xc);
    let r = n.fma(L::splat(2.121_944_4e-4), r);
    let p = poly(r, &[1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5]);
    let y = p.fma(r.mul(r), r).add(L::splat(1.0));
    y.mul(n.pow2()).zero_below(x, LOWEST)
}

/// erf(x) as x·P(x²)/Q(x²) on [−4, 4] (Eigen's rational approximation; outside, erf is ±1 in f32).
#[inline(always)]
fn erf_lanes<L: Lanes>(x: L) -> L {
    let x = x.max(L::splat(-4.0)).min(L::splat(4.0));
    let x2 = x.mul(x);
    let p = poly(
        x2,
        &[
            -2.726_142_3e-10,
            2.770_681_4e-8,
            -2.101_024e-6,
            -5.692_506_4e-5,
            -7.349_906_3e-4,
            -2.954_6e-3,
            -1.609_603_3e-2,
        ],
    );
    let q = poly(x2, &[-1.456_607_2e-5, -2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2]);
    p.mul(x).div(q).max(L::splat(-1.0)).min(L::splat(1.0))
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// Φ(x) = ½(1 + erf(x/√2)).
#[inline(always)]
fn normal_cdf<L: Lanes>(x: L) -> L {
    let half = L::splat(0.5);
    half.mul(L::splat(1.0).add(erf_lanes(x.mul(L::splat(FRAC_1_SQRT_2)))))
}

/// GELU: x·Φ(x).
#[inline(always)]
fn gelu_lanes<L: Lanes>(x: L) -> L {
    x.mul(normal_cdf(x))
}

/// dy · GELU'(x) = dy · (Φ(x) + x·φ(x)).
#[inline(always)]
fn gelu_grad_lanes<L: Lanes>(x: L, dy: L) -> L {
    let pdf = exp_lanes(L::splat(-0.5).mul(x).mul(x)).mul(L::splat(FRAC_1_SQRT_2PI));
    dy.mul(normal_cdf(x).add(x.mul(pdf)))
}

#[inline(always)]
fn gelu_body<L: Lanes>(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    for i in (0..x.len()).step_by(L::N) {
        gelu_lanes(L::load(x, i)).store(y, i);
    }
}

#[inline(always)]
fn gelu_in_place_body<L: Lanes>(x: &mut [f32]) {
    for i in (0..x.len()).step_by(L::N) {
        gelu_lanes(L::load(x, i)).store(x, i);
    }
}

#[inline(always)]
fn gelu_grad_body<L: Lanes>(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert!(x.len() == dy.len() && x.len() == dx.len());
    for i in (0..x.len()).step_by(L::N) {
        gelu_grad_lanes(L::load(x, i), L::load(dy, i)).store(dx, i);
    }
}

/// Σ row = the sixteen partial sums (each over the positions equal modulo 16, in order) added
/// in a fixed tree: the order of every build, whatever its width.
#[inline(always)]
fn partial_sums_total(p: &[f32; MAX_LANES]) -> f32 {
    let quarter = |a: usize| (p[a] + p[a + 8]) + (p[a + 4] + p[a + 12]);
    (quarter(0) + quarter(2)) + (quarter(1) + quarter(3))
}

/// row = softmax(row): the maximum, then eˣ⁻ᵐᵃˣ with one running sum per position modulo 16
/// (`MAX_LANES / N` vectors of sums), then each times 1/Σ.
#[inline(always)]
fn softmax_body<L: Lanes>(row: &mut [f32]) {
    let n = row.len();
    let whole = n - n % L::N;
    let mut m = L::splat(f32::NEG_INFINITY);
    for i in (0..whole).step_by(L::N) {
        m = m.max(L::load(row, i));
    }
    let mut lanes = [f32::NEG_INFINITY; MAX_LANES];
    m.lanes(&mut lanes);
    let max = row[whole..].iter().chain(&lanes[..L::N]).copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [L::splat(0.0); MAX_LANES / LANES];
    for i in (0..n).step_by(MAX_LANES) {
        for (h, sum) in sums.iter_mut().enumerate().take(MAX_LANES / L::N) {
            let j = i + h * L::N;
            if j >= n {
                break;
            }
            let e = exp_lanes(L::load(row, j).sub(L::splat(max)));
            e.store(row, j);
            // Past the row's end, lanes add 0 (reloaded as zeros), which changes no sum.
            *sum = sum.add(if j + L::N <= n { e } else { L::load(row, j) });
        }
    }
    let mut partial = [0.0; MAX_LANES];
    for (h, sum) in sums.iter().enumerate().take(MAX_LANES / L::N) {
        sum.lanes(&mut partial[h * L::N..]);
    }
    let inv = L::splat(1.0 / partial_sums_total(&partial));
    for i in (0..n).step_by(L::N) {
        L::load(row, i).mul(inv).store(row, i);
    }
}

/// The portable lanes: plain f32 arithmetic, lane by lane.
#[derive(Clone, Copy)]
struct Portable([f32; LANES]);

impl Portable {
    #[inline(always)]
    fn each(self, f: impl Fn(f32) -> f32) -> Self {
        Portable(self.0.map(f))
    }
    #[inline(always)]
    fn each2(self, o: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        let mut r = self.0;
        for (r, o) in r.iter_mut().zip(o.0) {
            *r = f(*r, o);
        }
        Portable(r)
    }
}

impl Lanes for Portable {
    const N: usize = LANES;
    fn splat(v: f32) -> Self {
        Portable([v; LANES])
    }
    fn load(x: &[f32], i: usize) -> Self {
        let mut v = [0.0; LANES];
        let n = (x.len() - i).min(LANES);
        v[..n].copy_from_slice(&x[i..i + n]);
        Portable(v)
    }
    fn store(self, y: &mut [f32], i: usize) {
        let n = (y.len() - i).min(LANES);
        y[i..i + n].copy_from_slice(&self.0[..n]);
    }
    fn add(self, o: Self) -> Self {
        self.each2(o, |a, b| a + b)
    }
    fn sub(self, o: Self) -> Self {
        self.each2(o, |a, b| a - b)
    }
    fn mul(self, o: Self) -> Self {
        self.each2(o, |a, b| a * b)
    }
    fn div(self, o: Self) -> Self {
        self.each2(o, |a, b| a / b)
    }
    fn fma(self, b: Self, c: Self) -> Self {
        let mut r = self.0;
        for ((r, b), c) in r.iter_mut().zip(b.0).zip(c.0) {
            *r = r.mul_add(b, c);
        }
        Portable(r)
    }
    fn max(self, o: Self) -> Self {
        self.each2(o, |a, b| if a > b { a } else { b })
    }
    fn min(self, o: Self) -> Self {
        self.each2(o, |a, b| if a < b { a } else { b })
    }
    fn round(self) -> Self {
        self.each(f32::round_ties_even)
    }
    fn pow2(self) -> Self {
        // n + 1.5·2²³ holds n in its low mantissa bits.
        self.each(|n| f32::from_bits((n + 12_582_912.0).to_bits().wrapping_add(127) << 23))
    }
    fn zero_below(self, x: Self, bound: f32) -> Self {
        self.each2(x, |v, x| if x >= bound { v } else { 0.0 })
    }
}

/// AVX2 + FMA lanes; only built into functions compiled with those features and called after
/// checking the CPU has them.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2(std::arch::x86_64::__m256);

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx2 {
    const N: usize = LANES;
    #[inline(always)]
    fn splat(v: f32) -> Self {
        unsafe { Avx2(std::arch::x86_64::_mm256_set1_ps(v)) }
    }
    #[inline(always)]
    fn load(x: &[f32], i: usize) -> Self {
        match x.get(i..i + LANES) {
            // SAFETY: eight readable f32s; loadu has no alignment requirement.
            Some(whole) => unsafe { Avx2(std::arch::x86_64::_mm256_loadu_ps(whole.as_ptr())) },
            None => {
                let Portable(v) = Portable::load(x, i);
                unsafe { Avx2(std::arch::x86_64::_mm256_loadu_ps(v.as_ptr())) }
            }
        }
    }
    #[inline(always)]
    fn store(self, y: &mut [f32], i: usize) {
        match y.get_mut(i..i + LANES) {
            // SAFETY: eight writable f32s.
            Some(whole) => unsafe { std::arch::x86_64::_mm256_storeu_ps(whole.as_mut_ptr(), self.0) },
            None => {
                let mut lanes = [0.0; LANES];
                // SAFETY: `lanes` holds eight f32s.
                unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), self.0) };
                Portable(lanes).store(y, i)
            }
        }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        unsafe { Avx2(std::arch::x86_64::_mm256_add_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        unsafe { Avx2(std::arch::x86_64::_mm256_sub_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        unsafe { Avx2(std::arch::x86_64::_mm256_mul_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        unsafe { Avx2(std::arch::x86_64::_mm256_div_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn fma(self, b: Self, c: Self) -> Self {
        unsafe { Avx2(std::arch::x86_64::_mm256_fmadd_ps(self.0, b.0, c.0)) }
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        unsafe { Avx2(std::arch::x86_64::_mm256_max_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        unsafe { Avx2(std::arch::x86_64::_mm256_min_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn round(self) -> Self {
        use std::arch::x86_64::*;
        unsafe { Avx2(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)) }
    }
    #[inline(always)]
    fn pow2(self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let shifted = _mm256_castps_si256(_mm256_add_ps(self.0, _mm256_set1_ps(12_582_912.0)));
            let biased = _mm256_add_epi32(shifted, _mm256_set1_epi32(127));
            Avx2(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased)))
        }
    }
    #[inline(always)]
    fn zero_below(self, x: Self, bound: f32) -> Self {
        use std::arch::x86_64::*;
        unsafe { Avx2(_mm256_and_ps(self.0, _mm256_cmp_ps::<_CMP_GE_OQ>(x.0, _mm256_set1_ps(bound)))) }
    }
}

/// AVX-512 lanes; only built into functions compiled with AVX-512F and called after checking the
/// CPU has it.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx512(std::arch::x86_64::__m512);

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    /// The mask of the lanes of `i..i+16` inside a slice of `len`.
    #[inline(always)]
    fn mask(len: usize, i: usize) -> u16 {
        let n = (len - i).min(MAX_LANES);
        if n == MAX_LANES { u16::MAX } else { (1u16 << n) - 1 }
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx512 {
    const N: usize = MAX_LANES;
    #[inline(always)]
    fn splat(v: f32) -> Self {
        unsafe { Avx512(std::arch::x86_64::_mm512_set1_ps(v)) }
    }
    #[inline(always)]
    fn load(x: &[f32], i: usize) -> Self {
        assert!(i < x.len());
        // SAFETY: the mask covers only elements inside `x`; masked-off lanes are not read.
        unsafe { Avx512(std::arch::x86_64::_mm512_maskz_loadu_ps(Self::mask(x.len(), i), x.as_ptr().add(i))) }
    }
    #[inline(always)]
    fn store(self, y: &mut [f32], i: usize) {
        assert!(i < y.len());
        // SAFETY: as in `load`, for writes.
        unsafe {
            std::arch::x86_64::_mm512_mask_storeu_ps(y.as_mut_ptr().add(i), Self::mask(y.len(), i), self.0)
        }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        unsafe { Avx512(std::arch::x86_64::_mm512_add_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        unsafe { Avx512(std::arch::x86_64::_mm512_sub_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        unsafe { Avx512(std::arch::x86_64::_mm512_mul_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        unsafe { Avx512(std::arch::x86_64::_mm512_div_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn fma(self, b: Self, c: Self) -> Self {
        unsafe { Avx512(std::arch::x86_64::_mm512_fmadd_ps(self.0, b.0, c.0)) }
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        unsafe { Avx512(std::arch::x86_64::_mm512_max_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        unsafe { Avx512(std::arch::x86_64::_mm512_min_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn round(self) -> Self {
        use std::arch::x86_64::*;
        unsafe { Avx512(_mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)) }
    }
    #[inline(always)]
    fn pow2(self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let shifted = _mm512_castps_si512(_mm512_add_ps(self.0, _mm512_set1_ps(12_582_912.0)));
            let biased = _mm512_add_epi32(shifted, _mm512_set1_epi32(127));
            Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased)))
        }
    }
    #[inline(always)]
    fn zero_below(self, x: Self, bound: f32) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x.0, _mm512_set1_ps(bound));
            Avx512(_mm512_maskz_mov_ps(keep, self.0))
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gelu_avx512(x: &[f32], y: &mut [f32]) {
    gelu_body::<Avx512>(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gelu_in_place_avx512(x: &mut [f32]) {
    gelu_in_place_body::<Avx512>(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gelu_grad_avx512(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    gelu_grad_body::<Avx512>(x, dy, dx)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn softmax_avx512(row: &mut [f32]) {
    softmax_body::<Avx512>(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_avx2(x: &[f32], y: &mut [f32]) {
    gelu_body::<Avx2>(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_in_place_avx2(x: &mut [f32]) {
    gelu_in_place_body::<Avx2>(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_grad_avx2(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    gelu_grad_body::<Avx2>(x, dy, dx)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_avx2(row: &mut [f32]) {
    softmax_body::<Avx2>(row)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

/// y = GELU(x) elementwise (exact GELU, erf-based, as BERT's "gelu").
pub fn gelu(x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { gelu_avx512(x, y) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { gelu_avx2(x, y) };
    }
    gelu_body::<Portable>(x, y)
}

/// x = GELU(x) elementwise (the same bits as `gelu`).
pub fn gelu_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { gelu_in_place_avx512(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: as in `gelu`.
        return unsafe { gelu_in_place_avx2(x) };
    }
    gelu_in_place_body::<Portable>(x)
}

/// dx = dy · GELU'(x) elementwise.
pub fn gelu_grad(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { gelu_grad_avx512(x, dy, dx) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: as in `gelu`.
        return unsafe { gelu_grad_avx2(x, dy, dx) };
    }
    gelu_grad_body::<Portable>(x, dy, dx)
}

/// row = softmax(row) in place.
pub fn softmax(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { softmax_avx512(row) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: as in `gelu`.
        return unsafe { softmax_avx2(row) };
    }
    softmax_body::<Portable>(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// eˣ elementwise, in place (the same function `softmax` and `gelu_grad` use).
    fn exp(x: &mut [f32]) {
        for i in (0..x.len()).step_by(LANES) {
            exp_lanes(Portable::load(x, i)).store(x, i);
        }
    }

    /// erf elementwise, in place (the same function `gelu` uses).
    fn erf(x: &mut [f32]) {
        for i in (0..x.len()).step_by(LANES) {
            erf_lanes(Portable::load(x, i)).store(x, i);
        }
    }

    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..=n).map(|i| lo + (hi - lo) * i as f32 / n as f32).collect()
    }

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = (f32::from_bits(b32.abs().to_bits() + 1) - b32.abs()) as f64;
        (a as f64 - b).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulp_over_f32s_normal_range() {
        let mut x = grid(-87.0, 88.0, 400_000);
        x.extend(grid(-1.0, 1.0, 100_000));
        let mut e = x.clone();
        exp(&mut e);
        let worst = x.iter().zip(&e).map(|(&x, &e)| ulps(e, (x as f64).exp())).fold(0.0, f64::max);
        assert!(worst <= 2.0, "exp is {worst} ulp off");
        let mut tails = vec![-88.0f32, -100.0, -1e30, f32::NEG_INFINITY, 0.0];
        exp(&mut tails);
        assert_eq!(tails, [0.0, 0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn erf_is_within_4e_7_of_f64s_erf() {
        let x = grid(-6.0, 6.0, 600_000);
        let mut e = x.clone();
        erf(&mut e);
        let worst =
            x.iter().zip(&e).map(|(&x, &e)| (e as f64 - libm::erf(x as f64)).abs()).fold(0.0, f64::max);
        assert!(worst < 4e-7, "erf is {worst} off");
        assert!(e.iter().all(|v| v.abs() <= 1.0));
        // Near zero erf(x) ≈ 2x/√π: the relative error stays small too.
        let mut tiny = vec![1e-20f32, -3e-8, 1e-4];
        let want: Vec<f64> = tiny.iter().map(|&v| libm::erf(v as f64)).collect();
        erf(&mut tiny);
        for (g, w) in tiny.iter().zip(want) {
            assert!(((*g as f64 - w) / w).abs() < 1e-6, "erf {g} vs {w}");
        }
    }

    #[test]
    fn gelu_and_its_gradient_match_f64() {
        let x = grid(-10.0, 10.0, 200_001);
        let mut y = vec![0.0; x.len()];
        gelu(&x, &mut y);
        let dy = vec![1.0f32; x.len()];
        let mut dx = vec![0.0; x.len()];
        gelu_grad(&x, &dy, &mut dx);
        for ((&x, &y), &dx) in x.iter().zip(&y).zip(&dx) {
            let xd = x as f64;
            let cdf = 0.5 * (1.0 + libm::erf(xd / std::f64::consts::SQRT_2));
            let want = xd * cdf;
            let want_grad = cdf + xd * (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
            // GELU = ½x(1 + erf): erf's absolute error times |x|/2 (for x < 0, 1 + erf cancels,
            // as it does with any f32 erf), plus an ulp or two of the product.
            let tolerance = 0.5 * xd.abs() * 5e-7 + 2.5e-7 * want.abs();
            assert!((y as f64 - want).abs() <= tolerance, "gelu({x}) = {y}, want {want}");
            assert!((dx as f64 - want_grad).abs() <= 1e-6, "gelu'({x}) = {dx}, want {want_grad}");
        }
    }

    #[test]
    fn softmax_matches_f64_and_ignores_where_the_row_sits() {
        for n in [1usize, 3, 8, 9, 17, 128, 517] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.02 - 10.0).collect();
            let mut p = row.clone();
            softmax(&mut p);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (&g, &v) in p.iter().zip(&row) {
                let want = (v as f64 - max).exp() / z;
                assert!((g as f64 - want).abs() <= 1e-6 * want + 1e-12, "n {n}: {g} vs {want}");
            }
            // The same row inside a longer, shifted buffer gives the same bits.
            let mut shifted = vec![5.0f32; n + 3];
            shifted[3..].copy_from_slice(&row);
            softmax(&mut shifted[3..]);
            assert_eq!(&shifted[3..], &p[..], "n {n}");
        }
    }

    /// The AVX2 and AVX-512 builds give the plain build's bits (each run where the CPU has it), on
    /// lengths with every tail.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_builds_give_the_portable_builds_bits() {
        let x = grid(-12.0, 12.0, 100_003);
        let dy: Vec<f32> = x.iter().map(|v| v.sin()).collect();
        let mut want = vec![0.0; x.len()];
        gelu_body::<Portable>(&x, &mut want);
        let mut want_grad = vec![0.0; x.len()];
        gelu_grad_body::<Portable>(&x, &dy, &mut want_grad);
        let rows: Vec<Vec<f32>> = (1..40).chain([127, 128, 129, 1001]).map(|n| x[..n].to_vec()).collect();
        let mut want_softmax = rows.clone();
        want_softmax.iter_mut().for_each(|r| softmax_body::<Portable>(r));
        type Build = (
            &'static str,
            unsafe fn(&[f32], &mut [f32]),
            unsafe fn(&[f32], &[f32], &mut [f32]),
            unsafe fn(&mut [f32]),
        );
        let mut builds: Vec<Build> = Vec::new();
        if has_avx2_fma() {
            builds.push(("AVX2", gelu_avx2, gelu_grad_avx2, softmax_avx2));
        }
        if has_avx512() {
            builds.push(("AVX-512", gelu_avx512, gelu_grad_avx512, softmax_avx512));
        }
        if builds.is_empty() {
            eprintln!("skipped: this CPU lacks AVX2/FMA and AVX-512, so only the portable build runs");
            return;
        }
        for (name, gelu_v, gelu_grad_v, softmax_v) in builds {
            let mut y = vec![0.0; x.len()];
            unsafe { gelu_v(&x, &mut y) };
            assert_eq!(y, want, "{name} gelu");
            unsafe { gelu_grad_v(&x, &dy, &mut y) };
            assert_eq!(y, want_grad, "{name} gelu_grad");
            for (row, want) in rows.iter().zip(&want_softmax) {
                let mut got = row.clone();
                unsafe { softmax_v(&mut got) };
                assert_eq!(&got, want, "{name} softmax of {}", row.len());
            }
        }
        let mut in_place = x.clone();
        gelu_in_place(&mut in_place);
        assert_eq!(in_place, want);
    }
}
