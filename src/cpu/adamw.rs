//! AdamW, gradient clipping and the learning-rate schedule exactly as the Hugging Face Trainer
//! applies them (torch.optim.AdamW with decoupled weight decay; clip_grad_norm_; linear decay).

/// Optimizer hyperparameters (Trainer defaults: β1 0.9, β2 0.999, ε 1e-8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// First and second moments, same layout as the parameters.
#[derive(Clone, Debug, Default)]
pub struct AdamState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Optimizer steps taken so far.
    pub step: u64,
}

impl AdamState {
    pub fn new(len: usize) -> Self {
        AdamState { m: vec![0.0; len], v: vec![0.0; len], step: 0 }
    }
}

impl AdamW {
    /// One step at learning rate `lr`, as torch's AdamW does it: decoupled decay `p −= lr·wd·p`
    /// (where `decay[i]`), then the bias-corrected Adam update.
    pub fn step(&self, params: &mut [f32], grads: &[f32], decay: &[bool], state: &mut AdamState, lr: f64) {
        assert!(params.len() == grads.len() && params.len() == decay.len() && params.len() == state.m.len());
        state.step += 1;
        let t = state.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let (eps, bc2_sqrt) = (self.eps as f32, bc2_sqrt as f32);
        let decay_factor = (1.0 - lr * self.weight_decay) as f32;
        let k = StepConstants { b1, b2, eps, bc2_sqrt, step_size, decay_factor };
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(decay.par_chunks(CHUNK))
            .zip(state.m.par_chunks_mut(CHUNK))
            .zip(state.v.par_chunks_mut(CHUNK))
            .for_each(|((((p, g), d), m), v)| update(p, g, d, m, v, &k));
    }
}

/// One step's numbers, the same for every parameter.
struct StepConstants {
    b1: f32,
    b2: f32,
    eps: f32,
    bc2_sqrt: f32,
    step_size: f32,
    decay_factor: f32,
}

/// The AdamW update of one chunk, in the widest vectors the CPU has: every operation is IEEE
/// (sqrt and division correctly rounded, no fused multiply-add), so each build gives the
/// scalar loop's bits.
fn update(p: &mut [f32], g: &[f32], d: &[bool], m: &mut [f32], v: &mut [f32], k: &StepConstants) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { update_avx512(p, g, d, m, v, k) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: as above, for AVX2.
            return unsafe { update_avx2(p, g, d, m, v, k) };
        }
    }
    update_body(p, g, d, m, v, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn update_avx512(
    p: &mut [f32],
    g: &[f32],
    d: &[bool],
    m: &mut [f32],
    v: &mut [f32],
    k: &StepConstants,
) {
    update_body(p, g, d, m, v, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn update_avx2(p: &mut [f32], g: &[f32], d: &[bool], m: &mut [f32], v: &mut [f32], k: &StepConstants) {
    update_body(p, g, d, m, v, k)
}

/// Zipped iterators (no indexing, so no bounds checks) and a select for the decay, which lets
/// the compiler vectorize the loop.
#[inline(always)]
fn update_body(p: &mut [f32], g: &[f32], d: &[bool], m: &mut [f32], v: &mut [f32], k: &StepConstants) {
    let &StepConstants { b1, b2, eps, bc2_sqrt, step_size, decay_factor } = k;
    for ((((p, g), d), m), v) in p.iter_mut().zip(g).zip(d).zip(m.iter_mut()).zip(v.iter_mut()) {
        let decayed = *p * decay_factor;
        let x = if *d { decayed } else { *p };
        *m = b1 * *m + (1.0 - b1) * *g;
        *v = b2 * *v + (1.0 - b2) * *g * *g;
        let denom = v.sqrt() / bc2_sqrt + eps;
        *p = x - step_size * *m / denom;
    }
}

/// The global L2 norm of `grads`, accumulated in f64.
pub fn grad_norm(grads: &[f32]) -> f64 {
    use rayon::prelude::*;
    let partial: Vec<f64> = grads.par_chunks(1 << 14).map(sum_of_squares).collect();
    partial.iter().sum::<f64>().sqrt()
}

/// Σ g² in f64 as eight running sums by position mod 8, added pairwise at the end: a fixed order
/// that the compiler keeps in vector registers (one sum in order is a chain of dependent adds).
fn sum_of_squares(g: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = g.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += *x as f64 * *x as f64;
        }
    }
    let sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    rest.iter().fold(sum, |s, x| s + *x as f64 * *x as f64)
}

/// `torch.nn.utils.clip_grad_norm_`: scales the gradients by max_norm/(norm+1e-6) when that is
/// below 1. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let c = coef as f32;
        grads.iter_mut().for_each(|g| *g *= c);
    }
    norm
}

/// transformers' `get_linear_schedule_with_warmup`: the learning rate of optimizer step `step`
/// (0-based) of `total`, rising linearly over `warmup` steps, then decaying linearly to 0.
pub fn linear_schedule(base_lr: f64, step: u64, total: u64, warmup: u64) -> f64 {
    let factor = if step < warmup {
        step as f64 / warmup.max(1) as f64
    } else {
        ((total.saturating_sub(step)) as f64 / (total.saturating_sub(warmup)).max(1) as f64).max(0.0)
    };
    base_lr * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_trainer() {
        assert_eq!(linear_schedule(1e-3, 0, 10, 0), 1e-3);
        assert!((linear_schedule(1e-3, 1, 10, 0) - 9e-4).abs() < 1e-15);
        assert!((linear_schedule(1e-3, 9, 10, 0) - 1e-4).abs() < 1e-15);
        assert_eq!(linear_schedule(1e-3, 10, 10, 0), 0.0);
        assert_eq!(linear_schedule(1.0, 1, 10, 4), 0.25);
        assert!((linear_schedule(1.0, 7, 10, 4) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // On the first step m̂/√v̂ = g/|g| = ±1, so every parameter moves by lr (plus decay).
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = vec![0.3f32, -0.1, 0.0];
        let mut st = AdamState::new(3);
        let opt = AdamW { weight_decay: 0.1, ..Default::default() };
        opt.step(&mut p, &g, &[true, false, true], &mut st, 0.01);
        assert!((p[0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6, "{}", p[0]);
        assert!((p[1] - (-2.0 + 0.01)).abs() < 1e-6, "{}", p[1]);
        assert!((p[2] - 0.5 * (1.0 - 0.001)).abs() < 1e-7, "{}", p[2]);
    }

    /// The vectorized update gives, bit for bit, the scalar loop torch's AdamW is written as.
    #[test]
    fn adamw_gives_the_scalar_loops_bits() {
        let n = (1 << 14) + 37;
        let wave =
            |i: usize, f: f32| ((i as f32 * f).sin() * 0.7) * if i.is_multiple_of(5) { 1e-4 } else { 1.0 };
        let p0: Vec<f32> = (0..n).map(|i| wave(i, 0.37)).collect();
        let g: Vec<f32> = (0..n).map(|i| wave(i, 1.13)).collect();
        let decay: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
        let opt = AdamW { weight_decay: 0.05, ..Default::default() };
        let (mut p, mut st) = (p0.clone(), AdamState::new(n));
        let (mut want, mut m, mut v) = (p0, vec![0.0f32; n], vec![0.0f32; n]);
        for step in 1..=3 {
            let lr = 1e-3 * step as f64;
            opt.step(&mut p, &g, &decay, &mut st, lr);
            let bc1 = 1.0 - opt.beta1.powi(step);
            let bc2_sqrt = ((1.0 - opt.beta2.powi(step)).sqrt()) as f32;
            let (b1, b2, eps) = (opt.beta1 as f32, opt.beta2 as f32, opt.eps as f32);
            for i in 0..n {
                if decay[i] {
                    want[i] *= (1.0 - lr * opt.weight_decay) as f32;
                }
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                want[i] -= (lr / bc1) as f32 * m[i] / (v[i].sqrt() / bc2_sqrt + eps);
            }
            assert_eq!(p, want, "step {step}");
            assert_eq!((&st.m, &st.v), (&m, &v));
        }
    }

    #[test]
    fn grad_norm_is_the_l2_norm_in_f64() {
        let g: Vec<f32> = (0..100_003).map(|i| ((i % 17) as f32 - 8.0) * 0.25).collect();
        let want = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((grad_norm(&g) - want).abs() <= 1e-12 * want, "{} vs {want}", grad_norm(&g));
        assert_eq!(grad_norm(&[3.0, 4.0]), 5.0);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![3.0f32, 4.0];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-12);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        let mut small = vec![0.3f32, 0.4];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }
}
