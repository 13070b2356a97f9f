//! The Parzen estimator of Optuna 5.0's TPE (`samplers/_tpe/parzen_estimator.py` and
//! `probability_distributions.py`): a mixture with one kernel per observation plus a prior
//! kernel, each kernel a product over parameters of a truncated normal (numerical, in log space
//! for log parameters, integrated over a step for discrete ones) or a categorical distribution.
//!
//! Observations and samples are in Optuna's internal representation (floats; categorical
//! indices), one column per parameter, in the order of the search space.

use anyhow::{Result, bail};
use rand::RngExt;
use rand::rngs::StdRng;

use super::truncnorm;
use crate::distributions::Distribution;

const EPS: f64 = 1e-12;

/// Optuna's `_ParzenEstimatorParameters` (the `multivariate` flag is unused there too).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParzenParams {
    pub prior_weight: f64,
    pub consider_magic_clip: bool,
    pub consider_endpoints: bool,
}

impl Default for ParzenParams {
    fn default() -> Self {
        ParzenParams { prior_weight: 1.0, consider_magic_clip: true, consider_endpoints: false }
    }
}

/// Optuna's `default_weights(n)`: flat for n < 25, else a linear ramp from 1/n over the oldest
/// n - 25 observations followed by 25 ones.
pub fn default_weights(n: usize) -> Vec<f64> {
    if n < 25 {
        return vec![1.0; n];
    }
    let num = n - 25;
    let start = 1.0 / n as f64;
    let mut w: Vec<f64> = match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (1.0 - start) / (num - 1) as f64;
            let mut ramp: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            ramp[num - 1] = 1.0;
            ramp
        }
    };
    w.extend(std::iter::repeat_n(1.0, 25));
    w
}

/// The per-parameter factor of every kernel.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelColumn {
    /// `weights[k * n_choices + c]`: probability of choice c under kernel k.
    Categorical { weights: Vec<f64>, n_choices: usize },
    /// Truncated normals: one (mu, sigma) per kernel, in log space when `log`. `low`/`high` are
    /// the distribution's bounds; `step` is 0 for continuous parameters.
    Numerical { mus: Vec<f64>, sigmas: Vec<f64>, low: f64, high: f64, step: f64, log: bool },
}

impl KernelColumn {
    /// The bounds of the truncation, widened by half a step for discrete parameters and in log
    /// space for log parameters (`adapted_low/high`).
    fn adapted_bounds(low: f64, high: f64, step: f64, log: bool) -> (f64, f64) {
        let (l, h) = (low - step / 2.0, high + step / 2.0);
        if log { (l.ln(), h.ln()) } else { (l, h) }
    }
}

/// A mixture of product distributions (`_MixtureOfProductDistribution`).
#[derive(Clone, Debug, PartialEq)]
pub struct ParzenEstimator {
    /// Normalised kernel weights; the last kernel is the prior.
    pub weights: Vec<f64>,
    pub columns: Vec<KernelColumn>,
}

impl ParzenEstimator {
    /// Fits the estimator to `observations[i]` = the values of parameter `space[i]`, all columns
    /// of equal length n (kernels = n + 1 with the prior). `predetermined_weights` replaces
    /// `default_weights` (Optuna uses it for multi-objective "below" sets).
    pub fn new(
        observations: &[Vec<f64>],
        space: &[(String, Distribution)],
        params: &ParzenParams,
        predetermined_weights: Option<&[f64]>,
    ) -> Result<Self> {
        if params.prior_weight < 0.0 {
            bail!("prior_weight must be non-negative, got {}", params.prior_weight);
        }
        if observations.len() != space.len() {
            bail!("{} observation columns for {} parameters", observations.len(), space.len());
        }
        let n = observations.first().map_or(0, Vec::len);
        if observations.iter().any(|c| c.len() != n) {
            bail!("observation columns differ in length");
        }
        let mut weights = match predetermined_weights {
            Some(w) if w.len() == n => w.to_vec(),
            Some(w) => bail!("{} predetermined weights for {n} observations", w.len()),
            None => default_weights(n),
        };
        if n == 0 {
            weights = vec![1.0];
        } else {
            weights.push(params.prior_weight);
        }
        let total: f64 = weights.iter().sum();
        if total.is_nan() || total <= 0.0 || total.is_infinite() {
            bail!("kernel weights must have a positive finite sum");
        }
        for w in &mut weights {
            *w /= total;
        }
        let columns = space
            .iter()
            .zip(observations)
            .map(|((_, dist), obs)| match dist {
                Distribution::Categorical(c) => Ok(categorical_column(obs, c.choices.len(), params)),
                Distribution::Float(f) => {
                    Ok(numerical_column(obs, f.low, f.high, f.step.unwrap_or(0.0), f.log, params))
                }
                Distribution::Int(i) => {
                    Ok(numerical_column(obs, i.low as f64, i.high as f64, i.step as f64, i.log, params))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ParzenEstimator { weights, columns })
    }

    /// Draws `size` samples (one column per parameter, internal representation).
    pub fn sample(&self, rng: &mut StdRng, size: usize) -> Vec<Vec<f64>> {
        let mut cdf = Vec::with_capacity(self.weights.len());
        let mut acc = 0.0;
        for w in &self.weights {
            acc += w;
            cdf.push(acc);
        }
        let total = acc;
        // numpy's choice(p=...): searchsorted(cdf / cdf[-1], u, side="right").
        let active: Vec<usize> = (0..size)
            .map(|_| {
                let u: f64 = rng.random();
                cdf.partition_point(|c| c / total <= u).min(self.weights.len() - 1)
            })
            .collect();
        self.columns
            .iter()
            .map(|col| match col {
                KernelColumn::Categorical { weights, n_choices } => active
                    .iter()
                    .map(|&k| {
                        let u: f64 = rng.random();
                        let row = &weights[k * n_choices..(k + 1) * n_choices];
                        let mut cum = 0.0;
                        let mut index = 0;
                        for (c, p) in row.iter().enumerate() {
                            cum = if c + 1 == *n_choices { 1.0 } else { cum + p };
                            if cum < u {
                                index = c + 1;
                            }
                        }
                        index.min(n_choices - 1) as f64
                    })
                    .collect(),
                KernelColumn::Numerical { mus, sigmas, low, high, step, log } => {
                    let (alow, ahigh) = KernelColumn::adapted_bounds(*low, *high, *step, *log);
                    active
                        .iter()
                        .map(|&k| {
                            let (mu, sigma) = (mus[k], sigmas[k]);
                            let u: f64 = rng.random();
                            let z = truncnorm::ppf(u, (alow - mu) / sigma, (ahigh - mu) / sigma);
                            let mut x = z * sigma + mu;
                            if *log {
                                x = x.exp();
                            }
                            if *step != 0.0 {
                                x = (low + ((x - low) / step).round_ties_even() * step).clamp(*low, *high);
                            }
                            x
                        })
                        .collect()
                }
            })
            .collect()
    }

    /// log density of each sample (`samples[i]` = values of parameter i).
    pub fn log_pdf(&self, samples: &[Vec<f64>]) -> Vec<f64> {
        let n_samples = samples.first().map_or(0, Vec::len);
        let n_kernels = self.weights.len();
        // Everything that does not depend on the sample is prepared per column first; then each
        // sample's row of n_kernels terms is built and reduced while it sits in L1 cache.
        let prepared: Vec<Prepared> =
            self.columns.iter().zip(samples).map(|(col, xs)| Prepared::new(col, xs, n_kernels)).collect();
        let log_weights: Vec<f64> = self.weights.iter().map(|w| w.ln()).collect();
        let mut row = vec![0.0f64; n_kernels];
        (0..n_samples)
            .map(|s| {
                row.copy_from_slice(&log_weights);
                for p in &prepared {
                    p.add_to(s, &mut row);
                }
                let mut max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    max = 0.0;
                }
                // Terms below e^-50 of the largest change the sum by far less than an ulp even
                // summed over 10^5 kernels; skipping their exp() halves TPE's time. NaN stays.
                let sum: f64 =
                    row.iter().map(|v| v - max).filter(|d| d.is_nan() || *d > -50.0).map(f64::exp).sum();
                sum.ln() + max
            })
            .collect()
    }
}

/// One column of [`ParzenEstimator::log_pdf`], with its per-kernel work done once.
enum Prepared<'a> {
    /// `log_weights[c][k]`: log probability of choice c under kernel k; `choice[s]` per sample.
    Categorical { log_weights: Vec<Vec<f64>>, choice: Vec<Option<usize>> },
    /// Standardised bounds and constant part of each kernel's log density (a degenerate kernel,
    /// a == b, gives NaN as in Optuna); samples in the kernels' (log) space.
    Continuous {
        mus: &'a [f64],
        sigmas: &'a [f64],
        lo: Vec<f64>,
        hi: Vec<f64>,
        constant: Vec<f64>,
        xs: Vec<f64>,
    },
    /// Log mass of each kernel over each distinct sample's step; `row_of[s]` picks the row.
    Discrete { mass: Vec<Vec<f64>>, row_of: Vec<usize> },
}

impl<'a> Prepared<'a> {
    fn new(col: &'a KernelColumn, xs: &[f64], n_kernels: usize) -> Self {
        match col {
            KernelColumn::Categorical { weights, n_choices } => Prepared::Categorical {
                log_weights: (0..*n_choices)
                    .map(|c| (0..n_kernels).map(|k| weights[k * n_choices + c].ln()).collect())
                    .collect(),
                // An index outside the choices has probability 0.
                choice: xs
                    .iter()
                    .map(|&x| (x >= 0.0 && (x as usize) < *n_choices).then_some(x as usize))
                    .collect(),
            },
            KernelColumn::Numerical { mus, sigmas, low, high, step, log } => {
                let (alow, ahigh) = KernelColumn::adapted_bounds(*low, *high, *step, *log);
                if *step == 0.0 {
                    let mut lo = Vec::with_capacity(n_kernels);
                    let mut hi = Vec::with_capacity(n_kernels);
                    let mut constant = Vec::with_capacity(n_kernels);
                    for (&mu, &sigma) in mus.iter().zip(sigmas) {
                        let (a, b) = ((alow - mu) / sigma, (ahigh - mu) / sigma);
                        if a == b {
                            lo.push(f64::NEG_INFINITY);
                            hi.push(f64::INFINITY);
                            constant.push(f64::NAN);
                        } else {
                            lo.push(a);
                            hi.push(b);
                            constant.push(
                                -0.918_938_533_204_672_7 - (truncnorm::log_gauss_mass(a, b) + sigma.ln()),
                            );
                        }
                    }
                    let xs = xs.iter().map(|&x| if *log { x.ln() } else { x }).collect();
                    Prepared::Continuous { mus, sigmas, lo, hi, constant, xs }
                } else {
                    let norms: Vec<f64> = mus
                        .iter()
                        .zip(sigmas)
                        .map(|(&mu, &sigma)| {
                            truncnorm::log_gauss_mass((alow - mu) / sigma, (ahigh - mu) / sigma)
                        })
                        .collect();
                    // Discrete samples repeat often: evaluate each distinct value once.
                    let mut distinct: Vec<f64> = xs.to_vec();
                    distinct.sort_by(f64::total_cmp);
                    distinct.dedup();
                    let mass = distinct
                        .iter()
                        .map(|&x| {
                            let (left, right) = if *log {
                                ((x - step / 2.0).ln(), (x + step / 2.0).ln())
                            } else {
                                (x - step / 2.0, x + step / 2.0)
                            };
                            (0..n_kernels)
                                .map(|k| {
                                    truncnorm::log_gauss_mass(
                                        (left - mus[k]) / sigmas[k],
                                        (right - mus[k]) / sigmas[k],
                                    ) - norms[k]
                                })
                                .collect()
                        })
                        .collect();
                    let row_of =
                        xs.iter().map(|x| distinct.partition_point(|d| d.total_cmp(x).is_lt())).collect();
                    Prepared::Discrete { mass, row_of }
                }
            }
        }
    }

    /// Adds this column's log density of sample `s` under every kernel to `row`.
    fn add_to(&self, s: usize, row: &mut [f64]) {
        match self {
            Prepared::Categorical { log_weights, choice } => match choice[s] {
                Some(c) => row.iter_mut().zip(&log_weights[c]).for_each(|(r, w)| *r += w),
                None => row.iter_mut().for_each(|r| *r += f64::NEG_INFINITY),
            },
            Prepared::Continuous { mus, sigmas, lo, hi, constant, xs } => {
                let x = xs[s];
                for k in 0..row.len() {
                    let z = (x - mus[k]) / sigmas[k];
                    let inside = z >= lo[k] && z <= hi[k];
                    row[k] += if inside { -(z * z) / 2.0 + constant[k] } else { f64::NEG_INFINITY };
                }
            }
            Prepared::Discrete { mass, row_of } => {
                row.iter_mut().zip(&mass[row_of[s]]).for_each(|(r, m)| *r += m);
            }
        }
    }
}

fn categorical_column(obs: &[f64], n_choices: usize, params: &ParzenParams) -> KernelColumn {
    if obs.is_empty() {
        return KernelColumn::Categorical { weights: vec![1.0 / n_choices as f64; n_choices], n_choices };
    }
    let n_kernels = obs.len() + 1;
    let mut weights = vec![params.prior_weight / n_kernels as f64; n_kernels * n_choices];
    for (k, &x) in obs.iter().enumerate() {
        let c = (x as usize).min(n_choices - 1);
        weights[k * n_choices + c] += 1.0;
    }
    for row in weights.chunks_mut(n_choices) {
        let sum: f64 = row.iter().sum();
        let sum = if sum == 0.0 { 1.0 } else { sum };
        for w in row {
            *w /= sum;
        }
    }
    KernelColumn::Categorical { weights, n_choices }
}

fn numerical_column(
    obs: &[f64],
    low: f64,
    high: f64,
    step: f64,
    log: bool,
    params: &ParzenParams,
) -> KernelColumn {
    let (tlow, thigh) = KernelColumn::adapted_bounds(low, high, step, log);
    let mut mus: Vec<f64> = if log { obs.iter().map(|x| x.ln()).collect() } else { obs.to_vec() };
    let n = mus.len();
    let mut sigmas = vec![0.0; n];
    if n > 0 {
        // Ties broken by position, i.e. a stable sort: numpy's argsort is also stable for the small
        // inputs TPE sees, and ties only swap which of two equal observations gets which bandwidth.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by(|&i, &j| mus[i].total_cmp(&mus[j]).then(i.cmp(&j)));
        let mut with_ends = Vec::with_capacity(n + 2);
        with_ends.push(tlow);
        with_ends.extend(order.iter().map(|&i| mus[i]));
        with_ends.push(thigh);
        let mut sorted_sigmas: Vec<f64> =
            (1..=n).map(|i| (with_ends[i] - with_ends[i - 1]).max(with_ends[i + 1] - with_ends[i])).collect();
        if !params.consider_endpoints && with_ends.len() >= 4 {
            sorted_sigmas[0] = with_ends[2] - with_ends[1];
            sorted_sigmas[n - 1] = with_ends[n] - with_ends[n - 1];
        }
        let max_sigma = thigh - tlow;
        let min_sigma = if params.consider_magic_clip {
            (thigh - tlow) / (100.0f64).min(1.0 + (n + 1) as f64)
        } else {
            EPS
        };
        for (rank, &i) in order.iter().enumerate() {
            // np.clip(v, lo, hi) = min(max(v, lo), hi)
            sigmas[i] = sorted_sigmas[rank].max(min_sigma).min(max_sigma);
        }
    }
    mus.push(0.5 * (tlow + thigh));
    sigmas.push(thigh - tlow);
    KernelColumn::Numerical { mus, sigmas, low, high, step, log }
}

#[cfg(test)]
// Reference numbers are pasted from Optuna's output, some happen to equal ln 2 or ln 10.
#[allow(clippy::approx_constant)]
mod tests {
    use super::*;
    use crate::distributions::{CategoricalDistribution, FloatDistribution, IntDistribution, ParamValue};

    fn close_all(got: &[f64], want: &[f64], rtol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= rtol * w.abs().max(1e-12), "{what}[{i}]: got {g}, Optuna {w}");
        }
    }

    fn numerical(col: &KernelColumn) -> (&[f64], &[f64]) {
        match col {
            KernelColumn::Numerical { mus, sigmas, .. } => (mus, sigmas),
            KernelColumn::Categorical { .. } => panic!("expected a numerical column"),
        }
    }

    /// Numbers from tests/interop/parzen_reference.py (Optuna 5.0.0's `_ParzenEstimator` with
    /// TPESampler's default parameters on the same observations).
    #[test]
    fn mixture_and_log_pdf_match_optuna() {
        let space = vec![
            ("lr".to_string(), Distribution::Float(FloatDistribution::new(1e-6, 1e-4, true, None).unwrap())),
            ("wd".to_string(), Distribution::Float(FloatDistribution::new(0.0, 0.3, false, None).unwrap())),
            (
                "drop".to_string(),
                Distribution::Float(FloatDistribution::new(0.0, 0.5, false, Some(0.1)).unwrap()),
            ),
            ("epochs".to_string(), Distribution::Int(IntDistribution::new(1, 5, false, 1).unwrap())),
            ("bs_log".to_string(), Distribution::Int(IntDistribution::new(8, 256, true, 1).unwrap())),
            (
                "bs".to_string(),
                Distribution::Categorical(
                    CategoricalDistribution::new(
                        [16, 32, 64, 128].into_iter().map(ParamValue::Int).collect(),
                    )
                    .unwrap(),
                ),
            ),
        ];
        let obs = vec![
            vec![3e-5, 1e-6, 7.5e-5, 2e-5, 2e-5],
            vec![0.1, 0.25, 0.0, 0.3, 0.12],
            vec![0.1, 0.2, 0.5, 0.0, 0.1],
            vec![1.0, 3.0, 5.0, 2.0, 2.0],
            vec![8.0, 64.0, 256.0, 32.0, 17.0],
            vec![0.0, 3.0, 1.0, 1.0, 2.0],
        ];
        let pe = ParzenEstimator::new(&obs, &space, &ParzenParams::default(), None).unwrap();
        close_all(&pe.weights, &[1.0 / 6.0; 6], 1e-15, "weights");
        let want: [(&[f64], &[f64]); 5] = [
            (
                &[
                    -10.41431317630212,
                    -13.815510557964274,
                    -9.498022444427964,
                    -10.819778284410283,
                    -10.819778284410283,
                    -11.512925464970227,
                ],
                &[
                    0.916290731874156,
                    2.9957322735539904,
                    0.916290731874156,
                    2.9957322735539904,
                    0.6578814551411559,
                    4.605170185988092,
                ],
            ),
            (&[0.1, 0.25, 0.0, 0.3, 0.12, 0.15], &[0.1, 0.13, 0.1, 0.04999999999999999, 0.13, 0.3]),
            (&[0.1, 0.2, 0.5, 0.0, 0.1, 0.25], &[0.1, 0.3, 0.3, 0.1, 0.1, 0.6000000000000001]),
            (&[1.0, 3.0, 5.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 2.0, 1.0, 1.0, 5.0]),
            (
                &[
                    2.0794415416798357,
                    4.1588830833596715,
                    5.545177444479562,
                    3.4657359027997265,
                    2.833213344056216,
                    3.7810158425765446,
                ],
                &[
                    0.7537718023763804,
                    1.3862943611198908,
                    1.3862943611198908,
                    0.693147180559945,
                    0.7537718023763804,
                    3.5322256440685593,
                ],
            ),
        ];
        for (i, (mus, sigmas)) in want.iter().enumerate() {
            let (m, s) = numerical(&pe.columns[i]);
            close_all(m, mus, 1e-14, &format!("{} mus", space[i].0));
            close_all(s, sigmas, 1e-14, &format!("{} sigmas", space[i].0));
        }
        let KernelColumn::Categorical { weights, n_choices: 4 } = &pe.columns[5] else { panic!("bs") };
        #[rustfmt::skip]
        let cat = [
            0.7, 0.1, 0.1, 0.1,  0.1, 0.1, 0.1, 0.7,  0.1, 0.7, 0.1, 0.1,
            0.1, 0.7, 0.1, 0.1,  0.1, 0.1, 0.7, 0.1,  0.25, 0.25, 0.25, 0.25,
        ];
        close_all(weights, &cat, 1e-14, "bs weights");
        let points = vec![
            vec![1e-6, 5e-5, 1e-4, 2.2e-5],
            vec![0.0, 0.15, 0.3, 0.11],
            vec![0.0, 0.3, 0.5, 0.1],
            vec![1.0, 2.0, 5.0, 3.0],
            vec![8.0, 100.0, 256.0, 20.0],
            vec![0.0, 1.0, 3.0, 2.0],
        ];
        close_all(
            &pe.log_pdf(&points),
            &[-10.413763831289415, -10.627958494627034, -13.241312816281114, -6.920749157897522],
            1e-12,
            "log_pdf A",
        );
    }

    /// 30 observations: the ramp of `default_weights` and the magic clip (min sigma = range / 31).
    #[test]
    fn ramp_weights_and_magic_clip_match_optuna() {
        #[rustfmt::skip]
        let obs = vec![0.744068, 1.575947, 1.013817, 0.724416, 0.118274, 1.229471, 0.187936, 2.458865, 2.818314, -0.082792,
            1.958625, 0.644475, 0.840223, 2.627983, -1.64482, -1.564354, -1.898908, 2.163099, 1.890784, 2.350061, 2.893092,
            1.995793, 0.307397, 1.902646, -1.408628, 1.199605, -1.283234, 2.723345, 0.609242, 0.07331];
        let space = vec![(
            "x".to_string(),
            Distribution::Float(FloatDistribution::new(-2.0, 3.0, false, None).unwrap()),
        )];
        let pe =
            ParzenEstimator::new(std::slice::from_ref(&obs), &space, &ParzenParams::default(), None).unwrap();
        let flat = 0.034985422740524776;
        let mut weights =
            vec![0.0011661807580174927, 0.009620991253644314, 0.018075801749271137, 0.026530612244897955];
        weights.extend(std::iter::repeat_n(flat, 27));
        close_all(&pe.weights, &weights, 1e-14, "weights");
        #[rustfmt::skip]
        let sigmas = [0.15625, 0.346476, 0.18578800000000006, 0.15625, 0.15625, 0.346476, 0.15625, 0.1691180000000001, 0.15625,
            1.200442, 0.15625, 0.15625, 0.17359399999999992, 0.1691180000000001, 0.2540880000000001, 0.15625, 0.2540880000000001,
            0.1869620000000003, 0.31483700000000003, 0.1869620000000003, 0.15625, 0.16730599999999995, 0.301845, 0.15625, 0.15625,
            0.18578800000000006, 1.200442, 0.15625, 0.301845, 0.15625, 5.0];
        let (mus, s) = numerical(&pe.columns[0]);
        close_all(&mus[..30], &obs, 0.0, "mus");
        assert_eq!(mus[30], 0.5);
        close_all(s, &sigmas, 1e-12, "sigmas");
        close_all(
            &pe.log_pdf(&[vec![-2.0, -0.5, 0.0, 1.25, 3.0]]),
            &[
                -2.077456746591244,
                -3.4034563921712775,
                -1.3754028839135277,
                -1.779392299304454,
                -1.7140362821383794,
            ],
            1e-12,
            "log_pdf B",
        );
    }

    /// No observations: only the prior kernel.
    #[test]
    fn prior_only_matches_optuna() {
        let space = vec![
            ("x".to_string(), Distribution::Float(FloatDistribution::new(1.0, 10.0, true, None).unwrap())),
            (
                "c".to_string(),
                Distribution::Categorical(
                    CategoricalDistribution::new(["a", "b", "c"].map(|s| ParamValue::Str(s.into())).to_vec())
                        .unwrap(),
                ),
            ),
        ];
        let pe = ParzenEstimator::new(&[vec![], vec![]], &space, &ParzenParams::default(), None).unwrap();
        assert_eq!(pe.weights, vec![1.0]);
        let (mus, sigmas) = numerical(&pe.columns[0]);
        close_all(mus, &[1.151292546497023], 1e-15, "mus");
        close_all(sigmas, &[2.302585092994046], 1e-15, "sigmas");
        close_all(
            &pe.log_pdf(&[vec![1.0, 3.0, 10.0], vec![0.0, 1.0, 2.0]]),
            &[-2.016666933425116, -1.8919286519179175, -2.016666933425116],
            1e-12,
            "log_pdf C",
        );
    }

    #[test]
    fn default_weights_match_optuna() {
        assert_eq!(default_weights(0), Vec::<f64>::new());
        assert_eq!(default_weights(3), vec![1.0; 3]);
        let w = default_weights(28);
        // Optuna's default_weights(28)[:3] = np.linspace(1/28, 1, 3)
        assert_eq!(&w[..3], &[0.03571428571428571, 0.5178571428571429, 1.0]);
        assert_eq!(w.len(), 28);
        assert!(w[3..].iter().all(|&x| x == 1.0));
    }

    #[test]
    fn sample_stays_in_range_and_on_steps() {
        let space = vec![
            ("lr".to_string(), Distribution::Float(FloatDistribution::new(1e-6, 1e-4, true, None).unwrap())),
            ("n".to_string(), Distribution::Int(IntDistribution::new(1, 9, false, 2).unwrap())),
            (
                "c".to_string(),
                Distribution::Categorical(
                    CategoricalDistribution::new(vec![
                        ParamValue::Int(1),
                        ParamValue::Int(2),
                        ParamValue::Int(3),
                    ])
                    .unwrap(),
                ),
            ),
        ];
        let obs = vec![vec![1e-5, 3e-5, 2e-6], vec![3.0, 5.0, 9.0], vec![0.0, 2.0, 2.0]];
        let pe = ParzenEstimator::new(&obs, &space, &ParzenParams::default(), None).unwrap();
        let mut rng = <StdRng as rand::SeedableRng>::seed_from_u64(7);
        let s = pe.sample(&mut rng, 500);
        assert!(s[0].iter().all(|&x| (1e-6..=1e-4).contains(&x)));
        assert!(s[1].iter().all(|&x| [1.0, 3.0, 5.0, 7.0, 9.0].contains(&x)));
        assert!(s[2].iter().all(|&x| [0.0, 1.0, 2.0].contains(&x)));
        // Choice 2 was observed twice: it must be drawn far more often than choice 1.
        let count = |v: f64| s[2].iter().filter(|&&x| x == v).count();
        assert!(count(2.0) > 2 * count(1.0), "{} vs {}", count(2.0), count(1.0));
        let lp = pe.log_pdf(&s);
        assert!(lp.iter().all(|v| v.is_finite()));
    }
}
