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
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(decay.par_chunks(CHUNK))
            .zip(state.m.par_chunks_mut(CHUNK))
            .zip(state.v.par_chunks_mut(CHUNK))
            .for_each(|((((p, g), d), m), v)| {
                for i in 0..p.len() {
                    if d[i] {
                        p[i] *= decay_factor;
                    }
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    p[i] -= step_size * m[i] / denom;
                }
            });
    }
}

/// The global L2 norm of `grads`, accumulated in f64.
pub fn grad_norm(grads: &[f32]) -> f64 {
    use rayon::prelude::*;
    let partial: Vec<f64> =
        grads.par_chunks(1 << 14).map(|c| c.iter().map(|g| (*g as f64) * (*g as f64)).sum()).collect();
    partial.iter().sum::<f64>().sqrt()
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
