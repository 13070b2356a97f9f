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
        let mut i = 0;
        while i < data.len() {
            let idx = base + i;
            let words = self.block(site, (idx / 4) as u32);
            let lane0 = idx % 4;
            let take = (4 - lane0).min(data.len() - i);
            for l in 0..take {
                let u = (words[lane0 + l] >> 8) as f32 * (1.0 / 16_777_216.0);
                data[i + l] = if u >= threshold { data[i + l] * scale } else { F::zero() };
            }
            i += take;
        }
    }
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
        // Another site, step or stream gives another mask.
        let mut y = vec![1.0f32; 1000];
        rng.apply(0.1, 6, 0, &mut y);
        assert_ne!(&y[..], &x[..1000]);
    }
}
