//! Bit-exact port of `numpy.random.default_rng(seed).permutation(n)`.
//!
//! Hugging Face `Dataset.shuffle(seed=s)` draws its row order from exactly this call, so porting it lets
//! `shuffle(seed).select(range(k))` subsets be reproduced for any seed and dataset size without Python.
//! The pieces follow numpy's sources: `SeedSequence` (`bit_generator.pyx`: entropy mixing into a 4-word
//! pool, then `generate_state`), PCG64 (`pcg64.h`: 128-bit LCG with XSL-RR output, 32-bit draws buffered
//! from halves of a 64-bit draw) and `Generator.shuffle` (`_shuffle_raw` with `random_interval`'s masked
//! rejection sampling).

const POOL_SIZE: usize = 4;
const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

const PCG_MULTIPLIER: u128 = 0x2360_ED05_1FC6_5DA4_4385_DF64_9FCC_F645;

/// numpy's `SeedSequence(entropy)` with no spawn key: the mixed 4-word entropy pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSequence {
    pool: [u32; POOL_SIZE],
}

/// numpy's `hashmix`: `hash_const` advances on every call, so call order matters.
fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut value = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    value = value.wrapping_mul(*hash_const);
    value ^ (value >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let result = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    result ^ (result >> XSHIFT)
}

/// numpy's `_int_to_uint32_array`: little-endian 32-bit words, and `[0]` for zero.
fn seed_words(seed: u64) -> Vec<u32> {
    if seed == 0 {
        return vec![0];
    }
    let mut words = Vec::with_capacity(2);
    let mut rest = seed;
    while rest > 0 {
        words.push(rest as u32);
        rest >>= 32;
    }
    words
}

impl SeedSequence {
    pub fn new(seed: u64) -> Self {
        let entropy = seed_words(seed);
        let mut pool = [0u32; POOL_SIZE];
        let mut hash_const = INIT_A;
        for (i, slot) in pool.iter_mut().enumerate() {
            *slot = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hash_const);
        }
        for i_src in 0..POOL_SIZE {
            for i_dst in 0..POOL_SIZE {
                if i_src != i_dst {
                    pool[i_dst] = mix(pool[i_dst], hashmix(pool[i_src], &mut hash_const));
                }
            }
        }
        // Entropy beyond the pool size (impossible for a u64 seed, kept for fidelity) is folded in.
        for &word in entropy.iter().skip(POOL_SIZE) {
            for slot in pool.iter_mut() {
                *slot = mix(*slot, hashmix(word, &mut hash_const));
            }
        }
        Self { pool }
    }

    pub fn pool(&self) -> [u32; POOL_SIZE] {
        self.pool
    }

    /// `generate_state(n_words, np.uint64)`: 2·n_words u32 draws, paired little-endian into u64s.
    pub fn generate_state_u64(&self, n_words: usize) -> Vec<u64> {
        let mut hash_const = INIT_B;
        let mut draw = |i: usize| {
            let mut value = self.pool[i % POOL_SIZE] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            value = value.wrapping_mul(hash_const);
            value ^ (value >> XSHIFT)
        };
        (0..n_words)
            .map(|k| {
                let lo = draw(2 * k);
                let hi = draw(2 * k + 1);
                u64::from(lo) | (u64::from(hi) << 32)
            })
            .collect()
    }
}

/// numpy's PCG64 bit generator (PCG XSL-RR 128/64) with its 32-bit draw buffer.
#[derive(Debug, Clone)]
pub struct Pcg64 {
    state: u128,
    inc: u128,
    buffered_u32: Option<u32>,
}

impl Pcg64 {
    /// `PCG64(SeedSequence(seed))`.
    pub fn from_seed(seed: u64) -> Self {
        let words = SeedSequence::new(seed).generate_state_u64(4);
        // pcg64_set_seed: seed[0]/inc[0] are the high halves.
        let init_state = (u128::from(words[0]) << 64) | u128::from(words[1]);
        let init_seq = (u128::from(words[2]) << 64) | u128::from(words[3]);
        let mut rng = Self { state: 0, inc: (init_seq << 1) | 1, buffered_u32: None };
        rng.step();
        rng.state = rng.state.wrapping_add(init_state);
        rng.step();
        rng
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULTIPLIER).wrapping_add(self.inc);
    }

    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let folded = ((self.state >> 64) as u64) ^ (self.state as u64);
        folded.rotate_right((self.state >> 122) as u32)
    }

    /// Low half of a fresh 64-bit draw, then its high half on the next call (numpy's `pcg64_next32`).
    pub fn next_u32(&mut self) -> u32 {
        if let Some(high) = self.buffered_u32.take() {
            return high;
        }
        let draw = self.next_u64();
        self.buffered_u32 = Some((draw >> 32) as u32);
        draw as u32
    }

    /// numpy's `random_interval`: uniform on `0..=max` by masked rejection.
    pub fn random_interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        if max <= u64::from(u32::MAX) {
            loop {
                let value = u64::from(self.next_u32()) & mask;
                if value <= max {
                    return value;
                }
            }
        }
        loop {
            let value = self.next_u64() & mask;
            if value <= max {
                return value;
            }
        }
    }
}

/// `numpy.random.default_rng(seed).permutation(n)`: the row order of HF `Dataset.shuffle(seed=seed)`.
pub fn numpy_permutation(seed: u64, n: usize) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = Pcg64::from_seed(seed);
    for i in (1..n).rev() {
        // j <= i < n, so the cast back to usize is lossless.
        let j = rng.random_interval(i as u64) as usize;
        perm.swap(i, j);
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values below come from numpy 2.4.6.

    #[test]
    fn seed_sequence_state_matches_numpy() {
        assert_eq!(
            SeedSequence::new(42).generate_state_u64(4),
            vec![0x9f1e2e6dcd540ab7, 0xd57873dc79fb94b6, 0x7d282a1b64d420b7, 0x336579714692d5ff]
        );
        // A seed over 2^32 is two entropy words, [7, 256].
        assert_eq!(SeedSequence::new((1 << 40) + 7).pool(), [0xcef14fb5, 0x8e3f6082, 0xb865038b, 0x6aed4368]);
    }

    #[test]
    fn pcg64_raw_draws_match_numpy() {
        let mut rng = Pcg64::from_seed(42);
        let raw: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(raw, vec![0xc621fbcd16d92688, 0x705a5661a791ffc1, 0xdbcd12c26eda1624]);
        let mut rng = Pcg64::from_seed((1 << 40) + 7);
        assert_eq!(rng.next_u64(), 0xd46e9e2034de21aa);
        assert_eq!(rng.next_u64(), 0x415badc99c087675);
    }

    #[test]
    fn u32_draws_are_buffered_like_numpy() {
        // numpy: three next_uint32, one next_uint64, one next_uint32 on PCG64(SeedSequence(42)).
        let mut rng = Pcg64::from_seed(42);
        assert_eq!(rng.next_u32(), 0x16d92688);
        assert_eq!(rng.next_u32(), 0xc621fbcd);
        assert_eq!(rng.next_u32(), 0xa791ffc1);
        assert_eq!(rng.next_u64(), 0xdbcd12c26eda1624);
        assert_eq!(rng.next_u32(), 0x705a5661);
    }

    #[test]
    fn random_interval_stays_in_range_on_both_paths() {
        let mut rng = Pcg64::from_seed(5);
        for max in [1u64, 2, 3, 1000, u64::from(u32::MAX), u64::from(u32::MAX) + 1, 1 << 40, u64::MAX] {
            for _ in 0..200 {
                assert!(rng.random_interval(max) <= max);
            }
        }
        // The 64-bit path must reach values above u32::MAX.
        assert!((0..50).any(|_| rng.random_interval(1 << 40) > u64::from(u32::MAX)));
    }

    #[test]
    fn small_permutations_match_numpy() {
        assert_eq!(numpy_permutation(0, 10), vec![4, 6, 2, 7, 3, 5, 9, 0, 8, 1]);
        assert_eq!(numpy_permutation(42, 3), vec![2, 1, 0]);
        assert_eq!(numpy_permutation(7, 1), vec![0]);
        assert_eq!(numpy_permutation(7, 2), vec![0, 1]);
        assert!(numpy_permutation(7, 0).is_empty());
        assert_eq!(
            numpy_permutation(u64::MAX, 20),
            vec![2, 1, 9, 18, 13, 6, 5, 11, 7, 4, 14, 16, 3, 0, 8, 12, 19, 17, 10, 15]
        );
    }

    #[test]
    fn larger_permutations_match_numpy() {
        let perm = numpy_permutation(123, 1000);
        assert_eq!(
            perm[..20],
            [
                775, 709, 459, 716, 371, 941, 446, 539, 242, 400, 689, 240, 137, 125, 181, 36, 975, 826, 209,
                748
            ]
        );
        assert_eq!(
            perm[980..],
            [
                493, 496, 856, 268, 105, 233, 633, 912, 243, 585, 844, 214, 433, 5, 302, 662, 731, 291, 153,
                461
            ]
        );
        assert_eq!(
            numpy_permutation((1 << 40) + 7, 50),
            vec![
                43, 34, 19, 20, 45, 13, 0, 31, 25, 3, 17, 2, 27, 5, 35, 6, 12, 33, 47, 14, 24, 44, 48, 41,
                10, 8, 26, 46, 37, 36, 29, 22, 28, 16, 23, 30, 7, 38, 18, 1, 49, 39, 21, 40, 11, 15, 4, 9,
                32, 42
            ]
        );
    }
}
