//! Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
//! counter-based generator behind dropout. A mask element is a pure function of
//! (seed, stream, step, site, index), so the CPU reference and the GPU kernels draw the same masks
//! without sharing any state, and a backward pass regenerates its forward's mask instead of
//! storing it. `kernels/` implements the same function; keep the two identical.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Ten Philox rounds on `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        c = [((p1 >> 32) as u32) ^ c[1] ^ k[0], p1 as u32, ((p0 >> 32) as u32) ^ c[3] ^ k[1], p0 as u32];
    }
    c
}

/// Dropout for one forward pass of one model: `stream` separates trials that share a seed,
/// `step` counts forward passes, and each dropout site of the network has its own `site` id.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutRng {
    pub seed: u64,
    pub stream: u32,
    pub step: u32,
}

impl DropoutRng {
    fn key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    /// Four uniform 32-bit words for elements `4·block .. 4·block+4` of a site.
    pub fn block(&self, site: u32, block: u32) -> [u32; 4] {
        philox4x32_10([block, site, self.step, self.stream], self.key())
    }

    /// Multiplies `data` (elements `base..base+len` of a site) by keep/(1−p): an element is kept
    /// when the top 24 bits of its word, as a fraction of 2^24, are ≥ p. 24 bits make the
    /// comparison exact in f32 on both CPU and GPU.
    pub fn apply<F: crate::cpu::real::Real>(&self, p: f64, site: u32, base: usize, data: &mut [F]) {
        if p <= 0.0 {
            return;
        }
        let threshold = p as f32;
        let scale = F::of(1.0 / (1.0 - p));
        let keep = |word: u32, x: F| {
            // Below 2^24, so exact as i32 → f32 (which vectorizes where u32 → f32 does not).
            let u = ((word >> 8) as i32) as f32 * (1.0 / 16_777_216.0);
            if u >= threshold { x * scale } else { F::zero() }
        };
        let mut i = 0;
        while i < data.len() {
            let idx = base + i;
            // Whole groups of LANES blocks at once (the same words, computed side by side).
            if idx.is_multiple_of(4) && data.len() - i >= 4 * LANES {
                let words = self.words_in_order(site, (idx / 4) as u32);
                for (x, w) in data[i..i + 4 * LANES].iter_mut().zip(words) {
                    *x = keep(w, *x);
                }
                i += 4 * LANES;
                continue;
            }
            let words = self.block(site, (idx / 4) as u32);
            let lane0 = idx % 4;
            let take = (4 - lane0).min(data.len() - i);
            for l in 0..take {
                data[i + l] = keep(words[lane0 + l], data[i + l]);
            }
            i += take;
        }
    }

    /// The words of blocks `first .. first + LANES` in element order (word j of block b at
    /// 4·b + j), as [`DropoutRng::apply`] consumes them. With AVX-512 (or AVX2, in two halves)
    /// the lanes run in vector registers.
    fn words_in_order(&self, site: u32, first: u32) -> [u32; 4 * LANES] {
        let (step, stream, key) = (self.step, self.stream, self.key());
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { philox_in_order_avx512(first, site, step, stream, key) };
        }
        let words = self.blocks(site, first);
        std::array::from_fn(|e| words[e % 4][e / 4])
    }

    /// [`DropoutRng::block`] for blocks `first .. first + LANES`: `words[j][b]` is word `j` of
    /// block `first + b`; AVX2 runs eight lanes at a time.
    fn blocks(&self, site: u32, first: u32) -> [[u32; LANES]; 4] {
        let (step, stream, key) = (self.step, self.stream, self.key());
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            let mut out = [[0u32; LANES]; 4];
            for half in 0..LANES / AVX2_LANES {
                let start = first.wrapping_add((half * AVX2_LANES) as u32);
                // SAFETY: the CPU has AVX2 (checked just above).
                let words = unsafe { philox_lanes_avx2(start, site, step, stream, key) };
                for (row, w) in out.iter_mut().zip(words) {
                    row[half * AVX2_LANES..(half + 1) * AVX2_LANES].copy_from_slice(&w);
                }
            }
            return out;
        }
        philox_lanes(first, site, step, stream, key)
    }
}

/// How many Philox blocks [`DropoutRng::apply`] computes side by side.
const LANES: usize = 16;
/// Blocks per AVX2 call.
const AVX2_LANES: usize = 8;

/// [`philox_lanes`] in AVX-512 registers (the 32×32→64-bit products of sixteen lanes at a time),
/// the four words then transposed into element order in registers too.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn philox_in_order_avx512(first: u32, site: u32, step: u32, stream: u32, key: [u32; 2]) -> [u32; 4 * LANES] {
    use std::arch::x86_64::*;
    const ODD: __mmask16 = 0b1010_1010_1010_1010;
    // (high, low) 32-bit halves of m·a in each of the sixteen lanes.
    let mul_hi_lo = |a: __m512i, m: __m512i| {
        let even = _mm512_mul_epu32(a, m);
        let odd = _mm512_mul_epu32(_mm512_srli_epi64::<32>(a), m);
        let hi = _mm512_mask_blend_epi32(ODD, _mm512_srli_epi64::<32>(even), odd);
        let lo = _mm512_mask_blend_epi32(ODD, even, _mm512_slli_epi64::<32>(odd));
        (hi, lo)
    };
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut c0 = _mm512_add_epi32(_mm512_set1_epi32(first as i32), lanes);
    let mut c1 = _mm512_set1_epi32(site as i32);
    let mut c2 = _mm512_set1_epi32(step as i32);
    let mut c3 = _mm512_set1_epi32(stream as i32);
    let (m0, m1) = (_mm512_set1_epi32(M0 as i32), _mm512_set1_epi32(M1 as i32));
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mul_hi_lo(c0, m0);
        let (hi1, lo1) = mul_hi_lo(c2, m1);
        let k0 = _mm512_set1_epi32(k[0] as i32);
        let k1 = _mm512_set1_epi32(k[1] as i32);
        c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), k0);
        c1 = lo1;
        c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), k1);
        c3 = lo0;
    }
    // c_j holds word j of blocks 0..16. Within each 128-bit lane L (blocks 4L..4L+4), a 4×4
    // transpose gives r_b = block 4L+b's four words; then the 128-bit lanes themselves are
    // transposed so that vector L holds blocks 4L..4L+4 whole: elements 16L..16L+16.
    let (t0, t1) = (_mm512_unpacklo_epi32(c0, c1), _mm512_unpackhi_epi32(c0, c1));
    let (t2, t3) = (_mm512_unpacklo_epi32(c2, c3), _mm512_unpackhi_epi32(c2, c3));
    let (r0, r1) = (_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2));
    let (r2, r3) = (_mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3));
    const LOW_HALVES: i32 = 0b01_00_01_00;
    const HIGH_HALVES: i32 = 0b11_10_11_10;
    const EVEN_LANES: i32 = 0b10_00_10_00;
    const ODD_LANES: i32 = 0b11_01_11_01;
    let u0 = _mm512_shuffle_i32x4::<LOW_HALVES>(r0, r1);
    let u1 = _mm512_shuffle_i32x4::<LOW_HALVES>(r2, r3);
    let u2 = _mm512_shuffle_i32x4::<HIGH_HALVES>(r0, r1);
    let u3 = _mm512_shuffle_i32x4::<HIGH_HALVES>(r2, r3);
    let ordered = [
        _mm512_shuffle_i32x4::<EVEN_LANES>(u0, u1),
        _mm512_shuffle_i32x4::<ODD_LANES>(u0, u1),
        _mm512_shuffle_i32x4::<EVEN_LANES>(u2, u3),
        _mm512_shuffle_i32x4::<ODD_LANES>(u2, u3),
    ];
    let mut out = [0u32; 4 * LANES];
    for (chunk, v) in out.chunks_exact_mut(16).zip(ordered) {
        // SAFETY: `chunk` is 16 u32 = 64 bytes; storeu has no alignment requirement.
        unsafe { _mm512_storeu_si512(chunk.as_mut_ptr().cast(), v) };
    }
    out
}

/// [`philox_lanes`] in AVX2 registers: the 32×32→64-bit products of eight lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn philox_lanes_avx2(first: u32, site: u32, step: u32, stream: u32, key: [u32; 2]) -> [[u32; AVX2_LANES]; 4] {
    use std::arch::x86_64::*;
    const ODD: i32 = 0b1010_1010;
    // (high, low) 32-bit halves of m·a in each of the eight lanes.
    let mul_hi_lo = |a: __m256i, m: __m256i| {
        let even = _mm256_mul_epu32(a, m);
        let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), m);
        let hi = _mm256_blend_epi32::<ODD>(_mm256_srli_epi64::<32>(even), odd);
        let lo = _mm256_blend_epi32::<ODD>(even, _mm256_slli_epi64::<32>(odd));
        (hi, lo)
    };
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut c0 = _mm256_add_epi32(_mm256_set1_epi32(first as i32), lanes);
    let mut c1 = _mm256_set1_epi32(site as i32);
    let mut c2 = _mm256_set1_epi32(step as i32);
    let mut c3 = _mm256_set1_epi32(stream as i32);
    let (m0, m1) = (_mm256_set1_epi32(M0 as i32), _mm256_set1_epi32(M1 as i32));
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mul_hi_lo(c0, m0);
        let (hi1, lo1) = mul_hi_lo(c2, m1);
        let k0 = _mm256_set1_epi32(k[0] as i32);
        let k1 = _mm256_set1_epi32(k[1] as i32);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
        c1 = lo1;
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
        c3 = lo0;
    }
    let mut out = [[0u32; AVX2_LANES]; 4];
    for (row, v) in out.iter_mut().zip([c0, c1, c2, c3]) {
        // SAFETY: `row` is 8 u32 = 32 bytes; storeu has no alignment requirement.
        unsafe { _mm256_storeu_si256(row.as_mut_ptr().cast(), v) };
    }
    out
}

/// [`philox4x32_10`] on the counters `[first + b, site, step, stream]` for b < LANES, laid out
/// by word then lane: the portable twin of [`philox_in_order_avx512`] and [`philox_lanes_avx2`].
#[inline(always)]
fn philox_lanes(first: u32, site: u32, step: u32, stream: u32, key: [u32; 2]) -> [[u32; LANES]; 4] {
    let mut c = [[0u32; LANES], [site; LANES], [step; LANES], [stream; LANES]];
    for (b, counter) in c[0].iter_mut().enumerate() {
        *counter = first.wrapping_add(b as u32);
    }
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let mut next = [[0u32; LANES]; 4];
        for b in 0..LANES {
            let p0 = (M0 as u64) * (c[0][b] as u64);
            let p1 = (M1 as u64) * (c[2][b] as u64);
            next[0][b] = ((p1 >> 32) as u32) ^ c[1][b] ^ k[0];
            next[1][b] = p1 as u32;
            next[2][b] = ((p0 >> 32) as u32) ^ c[3][b] ^ k[1];
            next[3][b] = p0 as u32;
        }
        c = next;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answers() {
        // Known-answer vectors from the Random123 distribution (kat_vectors, philox4x32 R=10).
        assert_eq!(philox4x32_10([0, 0, 0, 0], [0, 0]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(
            philox4x32_10([0xffffffff; 4], [0xffffffff; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn dropout_keeps_about_one_minus_p_and_scales() {
        let rng = DropoutRng { seed: 42, stream: 3, step: 7 };
        let mut x = vec![1.0f32; 100_000];
        rng.apply(0.1, 5, 0, &mut x);
        let kept = x.iter().filter(|v| **v != 0.0).count() as f64 / x.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept fraction {kept}");
        assert!(x.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.9).abs() < 1e-6));
        // Applying to a sub-range with its base index gives the same mask as the whole.
        let mut part = vec![1.0f32; 37];
        rng.apply(0.1, 5, 1001, &mut part);
        assert_eq!(&part[..], &x[1001..1038]);
        // The blocks computed side by side are the scalar ones, at every offset and length.
        for (base, len) in [(0usize, 100usize), (3, 61), (32, 32), (4, 4 * LANES + 5), (1023, 200)] {
            let mut fast = vec![1.0f32; len];
            rng.apply(0.1, 5, base, &mut fast);
            let scalar: Vec<f32> = (base..base + len)
                .map(|i| {
                    let u = (rng.block(5, (i / 4) as u32)[i % 4] >> 8) as f32 / 16_777_216.0;
                    if u >= 0.1 { 1.0 / 0.9 } else { 0.0 }
                })
                .collect();
            assert_eq!(fast, scalar, "base {base}, len {len}");
        }
        let lanes = rng.blocks(9, 77);
        assert_eq!(philox_lanes(77, 9, rng.step, rng.stream, rng.key()), lanes, "portable and vector lanes");
        let from_lanes: Vec<[u32; 4]> = (0..LANES).map(|b| lanes.map(|word| word[b])).collect();
        let scalar: Vec<[u32; 4]> = (0..LANES).map(|b| rng.block(9, 77 + b as u32)).collect();
        assert_eq!(from_lanes, scalar, "blocks side by side vs one at a time");
        let in_order = rng.words_in_order(9, 77);
        assert_eq!(in_order.to_vec(), scalar.concat(), "words in element order (AVX-512 where there)");
        // Another site, step or stream gives another mask.
        let mut y = vec![1.0f32; 1000];
        rng.apply(0.1, 6, 0, &mut y);
        assert_ne!(&y[..], &x[..1000]);
    }
}
