//! One sequence and head of attention, ctx = softmax(scale·Q·Kᵀ)·V, in blocks of query rows:
//! a block's scores against every key, their softmax and their weighted sum of V are done while
//! the block sits in the first-level cache, so no whole `q_len × k_len` score matrix is written
//! (evaluation) or read back (training keeps each block's probabilities for the backward pass,
//! through the caller's `each_block`).
//!
//! Both products are register-blocked outer products of R query rows × C columns: R = 8, C = 32
//! (sixteen 16-lane accumulators) on AVX-512; R = 4, C = 16 on AVX2 + FMA and portably. K is
//! copied once per (sequence, head), transposed, into zero-padded panels of C keys; V is read in
//! place where the head size is whole panels of C columns (else copied, padded); a block's
//! queries are read in place (the last, short block is copied). Every output is the same chain of fused multiply-adds in the same order whatever
//! R, C and the instruction set, so all builds give the same bits, and a query row's result never
//! depends on the rows beside it or on where its block falls.

use super::real::Head;
use super::vmath;

/// Reused buffers: K's (and where needed V's) panels, a short block's queries, a block's scores.
#[derive(Default)]
pub struct Scratch {
    k_panels: Vec<f32>,
    v_panels: Vec<f32>,
    block: Vec<f32>,
    scores: Vec<f32>,
}

/// Writes the head's context rows (row i at `ctx + i·ldc`, d columns). `each_block(first, probs)`
/// is called with each block's probabilities (query rows `first..`, `k_len` each, row after row)
/// after the softmax and before they weigh V: it may keep a copy (training) and change them
/// (dropout).
///
/// # Safety
/// `ctx` must be valid for writes at `i·ldc + c` for i < q_len, c < d, and no other thread may
/// touch those elements during the call.
pub unsafe fn head_forward(
    head: Head<f32>,
    ctx: *mut f32,
    ldc: usize,
    scratch: &mut Scratch,
    each_block: &mut dyn FnMut(usize, &mut [f32]),
) {
    let Head { q, k, v, q_stride, kv_stride, q_len, k_len, d, .. } = head;
    assert!(q_len > 0 && k_len > 0 && d > 0 && q_stride >= d && kv_stride >= d);
    assert!(q.len() >= (q_len - 1) * q_stride + d, "fused attention: queries out of range");
    assert!(k.len() >= (k_len - 1) * kv_stride + d && v.len() >= (k_len - 1) * kv_stride + d);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above); the caller's promise covers ctx.
            return unsafe { head_avx512(head, ctx, ldc, scratch, each_block) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: as above, for AVX2 + FMA.
            return unsafe { head_avx2(head, ctx, ldc, scratch, each_block) };
        }
    }
    unsafe { head_body::<4, 16, Portable>(head, ctx, ldc, scratch, each_block) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn head_avx512(
    head: Head<f32>,
    ctx: *mut f32,
    ldc: usize,
    scratch: &mut Scratch,
    each_block: &mut dyn FnMut(usize, &mut [f32]),
) {
    unsafe { head_body::<8, 32, Avx512>(head, ctx, ldc, scratch, each_block) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(
    head: Head<f32>,
    ctx: *mut f32,
    ldc: usize,
    scratch: &mut Scratch,
    each_block: &mut dyn FnMut(usize, &mut [f32]),
) {
    unsafe { head_body::<4, 16, Avx2>(head, ctx, ldc, scratch, each_block) }
}

#[inline(always)]
unsafe fn head_body<const R: usize, const C: usize, K: OuterProducts<R, C>>(
    head: Head<f32>,
    ctx: *mut f32,
    ldc: usize,
    scratch: &mut Scratch,
    each_block: &mut dyn FnMut(usize, &mut [f32]),
) {
    let Head { q, k, v, q_stride, kv_stride, q_len, k_len, d, scale } = head;
    // Keys padded to whole panels of C.
    let kp = k_len.next_multiple_of(C);
    let Scratch { k_panels, v_panels, block, scores } = scratch;
    // K transposed in panels of C keys (`[panel][c < d][C]`), zeros past the last key.
    refill(k_panels, kp * d);
    for j in 0..k_len {
        let first = (j / C) * d * C + j % C;
        let column = k_panels[first..].iter_mut().step_by(C);
        column.zip(&k[j * kv_stride..j * kv_stride + d]).for_each(|(o, x)| *o = *x);
    }
    // V's panels of C head columns (`[j < k_len][C]`, `v_rs` apart): V itself where d is whole
    // panels, else a copy padded with zero columns.
    let (v_source, v_rs, v_panel_step) = if d.is_multiple_of(C) {
        (v, kv_stride, C)
    } else {
        let dp = d.next_multiple_of(C);
        refill(v_panels, k_len * dp);
        for j in 0..k_len {
            for (c, x) in v[j * kv_stride..j * kv_stride + d].iter().enumerate() {
                v_panels[(c / C) * k_len * C + j * C + c % C] = *x;
            }
        }
        (v_panels.as_slice(), C, k_len * C)
    };
    // A block's scores (and then probabilities), `k_len` per row, rows end to end: every element
    // is written by the product below before it is read, so the buffer is only sized.
    scores.resize(R * k_len, 0.0);
    for i0 in (0..q_len).step_by(R) {
        let rows = R.min(q_len - i0);
        // The block's queries in place (row r, column c at r·q_stride + c); the last, short block
        // copied transposed (`[c < d][R]`) with zero rows past q_len.
        let (queries, q_step, q_rs) = if rows == R {
            (&q[i0 * q_stride..], 1, q_stride)
        } else {
            refill(block, d * R);
            for r in 0..rows {
                let row = &q[(i0 + r) * q_stride..(i0 + r) * q_stride + d];
                block[r..].iter_mut().step_by(R).zip(row).for_each(|(o, x)| *o = *x);
            }
            (block.as_slice(), R, 1)
        };
        for (p, panel) in k_panels.chunks_exact(d * C).enumerate() {
            let acc = K::outer_products(queries, q_step, q_rs, panel, C, d);
            let (j0, width) = (p * C, C.min(k_len - p * C));
            for (r, acc) in acc.iter().enumerate() {
                for (o, a) in scores[r * k_len + j0..r * k_len + j0 + width].iter_mut().zip(acc) {
                    *o = a * scale;
                }
            }
        }
        let probs = &mut scores[..rows * k_len];
        probs.chunks_exact_mut(k_len).for_each(vmath::softmax);
        each_block(i0, probs);
        // (Rows past q_len hold the scores of zero queries: finite, and never written out.)
        for c0 in (0..d).step_by(C) {
            let panel = &v_source[(c0 / C) * v_panel_step..];
            let acc = K::outer_products(scores, 1, k_len, panel, v_rs, k_len);
            let width = C.min(d - c0);
            for (r, acc) in acc.iter().enumerate().take(rows) {
                // SAFETY: row i0 + r < q_len and columns c0..c0 + width ≤ d: the caller's block.
                let dst = unsafe { std::slice::from_raw_parts_mut(ctx.add((i0 + r) * ldc + c0), width) };
                dst.copy_from_slice(&acc[..width]);
            }
        }
    }
}

/// Sizes `buf` to `len` zeros (what the padded panels rely on past the copied values).
fn refill(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

/// out[r][c] = Σ_n a[n][r]·b[n][c] (n < len), each sum a
/// chain of fused multiply-adds in order of n starting from 0 — the same bits in every
/// implementation. R×C accumulators stay in registers.
trait OuterProducts<const R: usize, const C: usize> {
    /// `a[n][r]` is at `a[n·step + r·rs]`, `b[n][c]` at `b[n·b_rs + c]`, for n < `len`.
    fn outer_products(a: &[f32], step: usize, rs: usize, b: &[f32], b_rs: usize, len: usize)
    -> [[f32; C]; R];
}

/// Plain f32 arithmetic (`mul_add` is one rounding, as the vector FMAs).
struct Portable;

impl OuterProducts<4, 16> for Portable {
    #[inline(always)]
    fn outer_products(
        a: &[f32],
        step: usize,
        rs: usize,
        b: &[f32],
        b_rs: usize,
        len: usize,
    ) -> [[f32; 16]; 4] {
        let mut acc = [[0.0; 16]; 4];
        for n in 0..len {
            let b = &b[n * b_rs..n * b_rs + 16];
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = a[n * step + r * rs];
                for (s, y) in acc.iter_mut().zip(b) {
                    *s = x.mul_add(*y, *s);
                }
            }
        }
        acc
    }
}

/// 8 rows × two 16-lane registers; only built into `head_avx512`, called on CPUs with AVX-512F.
#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl OuterProducts<8, 32> for Avx512 {
    #[inline(always)]
    fn outer_products(
        a: &[f32],
        step: usize,
        rs: usize,
        b: &[f32],
        b_rs: usize,
        len: usize,
    ) -> [[f32; 32]; 8] {
        use std::arch::x86_64::*;
        assert!(len == 0 || ((len - 1) * step + (8 - 1) * rs < a.len() && (len - 1) * b_rs + 32 <= b.len()));
        let mut out = [[0.0; 32]; 8];
        // SAFETY: reads stay inside `a` and `b` (asserted); the CPU has AVX-512F (the only
        // caller is compiled for it and reached after checking).
        unsafe {
            let mut acc = [_mm512_setzero_ps(); 16];
            for i in 0..len {
                let b0 = _mm512_loadu_ps(b.as_ptr().add(i * b_rs));
                let b1 = _mm512_loadu_ps(b.as_ptr().add(i * b_rs + 16));
                for r in 0..8 {
                    let x = _mm512_set1_ps(*a.get_unchecked(i * step + r * rs));
                    acc[2 * r] = _mm512_fmadd_ps(x, b0, acc[2 * r]);
                    acc[2 * r + 1] = _mm512_fmadd_ps(x, b1, acc[2 * r + 1]);
                }
            }
            for (r, row) in out.iter_mut().enumerate() {
                _mm512_storeu_ps(row.as_mut_ptr(), acc[2 * r]);
                _mm512_storeu_ps(row.as_mut_ptr().add(16), acc[2 * r + 1]);
            }
        }
        out
    }
}

/// 4 rows × two 8-lane registers; only built into `head_avx2`, called on CPUs with AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl OuterProducts<4, 16> for Avx2 {
    #[inline(always)]
    fn outer_products(
        a: &[f32],
        step: usize,
        rs: usize,
        b: &[f32],
        b_rs: usize,
        len: usize,
    ) -> [[f32; 16]; 4] {
        use std::arch::x86_64::*;
        assert!(len == 0 || ((len - 1) * step + (4 - 1) * rs < a.len() && (len - 1) * b_rs + 16 <= b.len()));
        let mut out = [[0.0; 16]; 4];
        // SAFETY: as for `Avx512`, with AVX2 + FMA.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            for i in 0..len {
                let b0 = _mm256_loadu_ps(b.as_ptr().add(i * b_rs));
                let b1 = _mm256_loadu_ps(b.as_ptr().add(i * b_rs + 8));
                for r in 0..4 {
                    let x = _mm256_set1_ps(*a.get_unchecked(i * step + r * rs));
                    acc[2 * r] = _mm256_fmadd_ps(x, b0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(x, b1, acc[2 * r + 1]);
                }
            }
            for (r, row) in out.iter_mut().enumerate() {
                _mm256_storeu_ps(row.as_mut_ptr(), acc[2 * r]);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[2 * r + 1]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-2, 2).
    fn fill(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// softmax(scale·q·kᵀ)·v in f64, with `change` applied to each probability row before it
    /// weighs v.
    fn reference(head: Head<f32>, change: impl Fn(usize, &mut [f64])) -> Vec<f64> {
        let Head { q, k, v, q_stride, kv_stride, q_len, k_len, d, scale } = head;
        let mut out = vec![0.0; q_len * d];
        for i in 0..q_len {
            let mut p: Vec<f64> = (0..k_len)
                .map(|j| {
                    (0..d).map(|c| q[i * q_stride + c] as f64 * k[j * kv_stride + c] as f64).sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            p.iter_mut().for_each(|x| *x = (*x - max).exp());
            let z: f64 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= z);
            change(i, &mut p);
            for c in 0..d {
                out[i * d + c] = (0..k_len).map(|j| p[j] * v[j * kv_stride + c] as f64).sum();
            }
        }
        out
    }

    /// Runs `head_forward` (the build this CPU picks) and returns ctx (`q_len × d`) and the
    /// probability rows `each_block` saw, `each` applied to every row.
    fn run(head: Head<f32>, each: impl Fn(usize, &mut [f32])) -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut ctx = vec![f32::NAN; head.q_len * head.d];
        let mut seen = Vec::new();
        let mut each_block = |first: usize, block: &mut [f32]| {
            assert_eq!(first, seen.len(), "blocks come in order, end to end");
            for row in block.chunks_exact_mut(head.k_len) {
                seen.push(row.to_vec());
                each(seen.len() - 1, row);
            }
        };
        unsafe { head_forward(head, ctx.as_mut_ptr(), head.d, &mut Scratch::default(), &mut each_block) };
        (ctx, seen)
    }

    fn head<'a>(
        x: &'a [f32],
        y: &'a [f32],
        z: &'a [f32],
        (q_stride, kv_stride): (usize, usize),
        shape: (usize, usize, usize),
    ) -> Head<'a, f32> {
        let (q_len, k_len, d) = shape;
        Head { q: x, k: y, v: z, q_stride, kv_stride, q_len, k_len, d, scale: 1.0 / (d as f32).sqrt() }
    }

    #[test]
    fn fused_attention_matches_f64_on_every_tail() {
        for (n, &(q_len, k_len, d)) in [
            (1, 1, 8),
            (1, 77, 64),
            (7, 5, 8),
            (8, 32, 32),
            (9, 33, 24),
            (17, 100, 40),
            (33, 31, 64),
            (64, 129, 32),
        ]
        .iter()
        .enumerate()
        {
            // Heads side by side: the head's columns are the first d of each wider row; keys and
            // values as rows of a wider product (Q, K and V side by side).
            let (q_stride, kv_stride) = (d + 5, 3 * d + 1);
            let (q, k, v) = (
                fill(q_len * q_stride, 3 * n as u64),
                fill(k_len * kv_stride, 3 * n as u64 + 1),
                fill(k_len * kv_stride, 3 * n as u64 + 2),
            );
            let h = head(&q, &k, &v, (q_stride, kv_stride), (q_len, k_len, d));
            // Drop every third probability of each row (as dropout would), scaling the rest.
            let (ctx, seen) = run(h, |i, row| {
                row.iter_mut().enumerate().filter(|(j, _)| (i + j) % 3 == 0).for_each(|(_, p)| *p = 0.0);
                row.iter_mut().for_each(|p| *p *= 1.5);
            });
            let want = reference(h, |i, row| {
                row.iter_mut().enumerate().filter(|(j, _)| (i + j) % 3 == 0).for_each(|(_, p)| *p = 0.0);
                row.iter_mut().for_each(|p| *p *= 1.5);
            });
            for (g, w) in ctx.iter().zip(&want) {
                assert!((*g as f64 - w).abs() <= 2e-6 * (1.0 + w.abs()), "{q_len}x{k_len}x{d}: {g} vs {w}");
            }
            assert_eq!(seen.len(), q_len);
            for row in &seen {
                assert_eq!(row.len(), k_len);
                let total: f64 = row.iter().map(|&p| p as f64).sum();
                assert!((total - 1.0).abs() < 1e-5, "{q_len}x{k_len}x{d}: probabilities sum to {total}");
            }
        }
    }

    /// A query row's context is the same bits whichever block it falls in (here shifted by three
    /// rows, and alone), what keeps trial arrays and chunked batches bit-identical to whole ones.
    #[test]
    fn a_rows_result_does_not_depend_on_its_block() {
        let (stride, d, k_len) = (64, 64, 45);
        let (q, k, v) = (fill(20 * stride, 7), fill(k_len * stride, 8), fill(k_len * stride, 9));
        let strides = (stride, stride);
        let (all, _) = run(head(&q, &k, &v, strides, (20, k_len, d)), |_, _| {});
        let (shifted, _) = run(head(&q[3 * stride..], &k, &v, strides, (17, k_len, d)), |_, _| {});
        assert_eq!(&all[3 * d..], &shifted[..]);
        let (alone, _) = run(head(&q[11 * stride..], &k, &v, strides, (1, k_len, d)), |_, _| {});
        assert_eq!(&all[11 * d..12 * d], &alone[..]);
    }

    type HeadFn = unsafe fn(Head<f32>, *mut f32, usize, &mut Scratch, &mut dyn FnMut(usize, &mut [f32]));

    /// The AVX-512 and AVX2 builds give the portable build's bits (each where the CPU has it).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_build_gives_the_same_bits() {
        for &(q_len, k_len, d) in &[(13, 70, 64), (9, 33, 24), (1, 5, 32)] {
            let stride = d + 3;
            let rows = q_len.max(k_len);
            let (q, k, v) =
                (fill(rows * stride, 1), fill(rows * (stride + d), 2), fill(rows * (stride + d), 3));
            let h = head(&q, &k, &v, (stride, stride + d), (q_len, k_len, d));
            let build = |f: HeadFn| {
                let mut ctx = vec![0.0f32; q_len * d];
                unsafe { f(h, ctx.as_mut_ptr(), d, &mut Scratch::default(), &mut |_, _| {}) };
                ctx
            };
            let portable = build(|h, c, l, s, e| unsafe { head_body::<4, 16, Portable>(h, c, l, s, e) });
            let mut ran = 0;
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                assert_eq!(build(head_avx2), portable, "AVX2, {q_len}x{k_len}x{d}");
                ran += 1;
            }
            if std::is_x86_feature_detected!("avx512f") {
                assert_eq!(build(head_avx512), portable, "AVX-512, {q_len}x{k_len}x{d}");
                ran += 1;
            }
            if ran == 0 {
                eprintln!(
                    "skipped: this CPU has neither AVX2 + FMA nor AVX-512; only the portable build runs"
                );
            }
        }
    }
}
