//! Random search: each parameter drawn uniformly (log-uniformly for log parameters), exactly as
//! Optuna's RandomSampler maps a uniform draw through `_SearchSpaceTransform`.

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::{Sampler, StudyView};
use crate::distributions::Distribution;
use crate::trial::FrozenTrial;

/// Optuna's RandomSampler with a seeded ChaCha generator (`StdRng`).
pub struct RandomSampler {
    rng: StdRng,
}

impl RandomSampler {
    /// `seed = None` draws a seed from the operating system.
    pub fn new(seed: Option<u64>) -> Self {
        RandomSampler {
            rng: seed.map(StdRng::seed_from_u64).unwrap_or_else(|| StdRng::from_rng(&mut rand::rng())),
        }
    }

    /// One uniform draw mapped into `dist`, in internal representation.
    pub fn draw(rng: &mut StdRng, dist: &Distribution) -> f64 {
        let mut uniform = |low: f64, high: f64| low + (high - low) * rng.random::<f64>();
        match dist {
            Distribution::Float(d) => {
                if d.log {
                    let x = uniform(d.low.ln(), d.high.ln()).exp();
                    if d.low == d.high { x } else { x.clamp(d.low, next_down(d.high)) }
                } else if let Some(step) = d.step {
                    let x = uniform(d.low - 0.5 * step, d.high + 0.5 * step);
                    (((x - d.low) / step).round_ties_even() * step + d.low).clamp(d.low, d.high)
                } else {
                    let x = uniform(d.low, d.high);
                    if d.low == d.high { x } else { x.min(next_down(d.high)) }
                }
            }
            Distribution::Int(d) => {
                let (low, high, step) = (d.low as f64, d.high as f64, d.step as f64);
                if d.log {
                    let x = uniform((low - 0.5).ln(), (high + 0.5).ln()).exp().round_ties_even();
                    x.clamp(low, high)
                } else {
                    let x = uniform(low - 0.5 * step, high + 0.5 * step);
                    let index = ((x - low) / step + 0.5).floor();
                    (index * step + low).clamp(low, high)
                }
            }
            // One-hot encoding then argmax of uniform draws = a uniform choice.
            Distribution::Categorical(d) => {
                let n = d.choices.len();
                let mut best = (0usize, f64::NEG_INFINITY);
                for i in 0..n {
                    let u: f64 = rng.random();
                    if u > best.1 {
                        best = (i, u);
                    }
                }
                best.0 as f64
            }
        }
    }
}

/// The largest float below `x` (`np.nextafter(x, x - 1)`).
fn next_down(x: f64) -> f64 {
    if x.is_nan() || x == f64::NEG_INFINITY {
        return x;
    }
    if x == 0.0 {
        return -f64::from_bits(1);
    }
    let bits = x.to_bits();
    f64::from_bits(if x > 0.0 { bits - 1 } else { bits + 1 })
}

impl Sampler for RandomSampler {
    fn name(&self) -> &str {
        "RandomSampler"
    }

    fn reseed(&mut self, seed: u64) {
        self.rng = StdRng::seed_from_u64(seed);
    }

    fn sample_independent(
        &mut self,
        _: &StudyView,
        _: &FrozenTrial,
        _: &str,
        dist: &Distribution,
    ) -> Result<f64> {
        Ok(Self::draw(&mut self.rng, dist))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributions::{CategoricalDistribution, FloatDistribution, IntDistribution, ParamValue};

    #[test]
    fn draws_cover_the_range_and_respect_steps() {
        let mut rng = StdRng::seed_from_u64(1);
        let logf = Distribution::Float(FloatDistribution::new(1e-6, 1e-4, true, None).unwrap());
        let stepped = Distribution::Float(FloatDistribution::new(0.0, 0.3, false, Some(0.1)).unwrap());
        let int = Distribution::Int(IntDistribution::new(16, 128, true, 1).unwrap());
        let cat = Distribution::Categorical(
            CategoricalDistribution::new(vec![ParamValue::Int(16), ParamValue::Int(32), ParamValue::Int(64)])
                .unwrap(),
        );
        let mut below_1e5 = 0;
        let mut seen = [0usize; 3];
        for _ in 0..2000 {
            let x = RandomSampler::draw(&mut rng, &logf);
            assert!((1e-6..1e-4).contains(&x));
            below_1e5 += usize::from(x < 1e-5);
            let s = RandomSampler::draw(&mut rng, &stepped);
            assert!(stepped.contains(s), "{s}");
            let i = RandomSampler::draw(&mut rng, &int);
            assert!(i.fract() == 0.0 && (16.0..=128.0).contains(&i));
            seen[RandomSampler::draw(&mut rng, &cat) as usize] += 1;
        }
        // Log-uniform: half the mass lies below the geometric midpoint 1e-5.
        assert!((850..1150).contains(&below_1e5), "{below_1e5}");
        assert!(seen.iter().all(|&n| (550..780).contains(&n)), "{seen:?}");
        // Same seed, same draws.
        let (mut a, mut b) = (StdRng::seed_from_u64(9), StdRng::seed_from_u64(9));
        assert_eq!(RandomSampler::draw(&mut a, &logf), RandomSampler::draw(&mut b, &logf));
    }
}
