//! The Tree-structured Parzen Estimator, following Optuna 5.0's `TPESampler` with its defaults:
//! random start-up for the first `n_startup_trials` (10) finished trials; then the finished
//! trials are split into the best `gamma(n) = min(ceil(0.1 n), 25)` ("below") and the rest
//! ("above"), a Parzen estimator is fitted to each (`default_weights`, prior weight 1, magic clip,
//! no endpoints), 24 candidates are drawn from "below" and the one maximising
//! `log l(x) - log g(x)` wins.
//!
//! Single-objective studies use the multivariate estimator (Optuna's default since it made
//! `multivariate=None` mean "multivariate unless multi-objective") over the intersection search
//! space, and `constant_liar` (Optuna's default, `True`): RUNNING trials join the "above" set, so
//! workers — or one `ask` of k trials — do not all propose the same point.
//! Pruned trials rank below complete ones, by their last step then last value, as in Optuna.
//! `group=False`; no constraints are set by hpo-gpu, but trials carrying Optuna's `constraints`
//! system attribute are ranked as infeasible the way Optuna ranks them.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value;

use super::parzen::{ParzenEstimator, ParzenParams};
use super::random::RandomSampler;
use super::{Sampler, StudyView, intersection_search_space};
use crate::distributions::{Distribution, ParamValue};
use crate::trial::{FrozenTrial, StudyDirection, TrialState};

/// The system-attribute prefix under which Optuna shares relative params of RUNNING trials.
const RELATIVE_PARAMS_KEY: &str = "tpe:relative_params";

/// Optuna's `default_gamma`: the size of the "below" set.
pub fn default_gamma(n: usize) -> usize {
    ((0.1 * n as f64).ceil() as usize).min(25)
}

/// TPE settings; `Default` gives Optuna 5.0's defaults for a single-objective study.
#[derive(Clone, Debug, PartialEq)]
pub struct TpeOptions {
    pub n_startup_trials: usize,
    pub n_ei_candidates: usize,
    pub parzen: ParzenParams,
    pub multivariate: bool,
    pub constant_liar: bool,
    pub seed: Option<u64>,
}

impl Default for TpeOptions {
    fn default() -> Self {
        TpeOptions {
            n_startup_trials: 10,
            n_ei_candidates: 24,
            parzen: ParzenParams::default(),
            multivariate: true,
            constant_liar: true,
            seed: None,
        }
    }
}

/// What TPE fitted for one proposal (see [`TpeSampler::fit`]).
#[derive(Clone, Debug)]
pub struct TpeFit {
    /// Trial numbers in the "below" (good) set and the "above" set.
    pub below: Vec<u64>,
    pub above: Vec<u64>,
    /// l(x), fitted on "below"; candidates are drawn from it.
    pub l: ParzenEstimator,
    /// g(x), fitted on "above".
    pub g: ParzenEstimator,
}

/// A parameter of a history trial: stored (internal) or shared by a worker (external).
enum Observed {
    Internal(f64),
    External(ParamValue),
}

/// Optuna's TPESampler.
pub struct TpeSampler {
    options: TpeOptions,
    rng: StdRng,
    random: RandomSampler,
}

impl TpeSampler {
    pub fn new(options: TpeOptions) -> Self {
        let rng = match options.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        // A separate stream for start-up, like Optuna's inner RandomSampler(seed=seed).
        let random = RandomSampler::new(options.seed.map(|s| s ^ 0x9e37_79b9_7f4a_7c15));
        TpeSampler { options, rng, random }
    }

    pub fn options(&self) -> &TpeOptions {
        &self.options
    }

    fn n_finished(study: &StudyView) -> usize {
        study.trials.iter().filter(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned)).count()
    }

    /// `_get_params`: a RUNNING trial's params include relative params another Optuna worker
    /// shared (as external values) through system attributes before storing them.
    fn trial_params(&self, trial: &FrozenTrial) -> BTreeMap<String, Observed> {
        let mut out = BTreeMap::new();
        if !trial.state.is_finished() && self.options.multivariate {
            let mut text = String::new();
            let mut i = 0;
            while let Some(Value::String(chunk)) =
                trial.system_attrs.get(&format!("{RELATIVE_PARAMS_KEY}:{i}"))
            {
                text.push_str(chunk);
                i += 1;
            }
            // An incomplete chunk set (a race between workers) falls back to the stored params.
            if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&text) {
                for (name, v) in map {
                    if let Ok(pv) = ParamValue::from_json_value(&v) {
                        out.insert(name, Observed::External(pv));
                    }
                }
            }
        }
        for p in &trial.params {
            out.insert(p.name.clone(), Observed::Internal(p.internal));
        }
        out
    }

    /// Internal values of `space` for the trials that have all of its parameters.
    fn observations(&self, trials: &[&FrozenTrial], space: &[(String, Distribution)]) -> Vec<Vec<f64>> {
        let mut columns = vec![Vec::with_capacity(trials.len()); space.len()];
        let mut row = Vec::with_capacity(space.len());
        for t in trials {
            row.clear();
            // Finished trials (nearly all of them) are read directly; only unfinished ones may
            // carry relative params shared by another worker.
            if t.state.is_finished() || !self.options.multivariate {
                // Trials of one space store their params in the space's order: try that first.
                for (i, (name, _)) in space.iter().enumerate() {
                    match t.param_hinted(name, i) {
                        Some(p) => row.push(p.internal),
                        None => break,
                    }
                }
            } else {
                let params = self.trial_params(t);
                for (name, dist) in space {
                    match params.get(name) {
                        Some(Observed::Internal(x)) => row.push(*x),
                        Some(Observed::External(v)) => match dist.to_internal(v) {
                            Ok(x) => row.push(x),
                            Err(_) => break,
                        },
                        None => break,
                    }
                }
            }
            if row.len() == space.len() {
                for (c, x) in columns.iter_mut().zip(&row) {
                    c.push(*x);
                }
            }
        }
        columns
    }

    /// The split and the two Parzen estimators TPE fits for `trial` over `space`: l(x) on the
    /// "below" trials, g(x) on the "above" ones (RUNNING trials included with constant liar).
    pub fn fit(
        &self,
        study: &StudyView,
        trial: &FrozenTrial,
        space: &[(String, Distribution)],
    ) -> Result<TpeFit> {
        let trials: Vec<&FrozenTrial> = study
            .trials
            .iter()
            .filter(|t| match t.state {
                TrialState::Complete | TrialState::Pruned => true,
                TrialState::Running => self.options.constant_liar,
                _ => false,
            })
            .filter(|t| !(self.options.constant_liar && t.number == trial.number))
            .collect();
        let n = trials.iter().filter(|t| t.state != TrialState::Running).count();
        let (below, above) = split_trials(&trials, study.direction, default_gamma(n));
        let l = ParzenEstimator::new(&self.observations(&below, space), space, &self.options.parzen, None)
            .context("TPE: below estimator")?;
        let g = ParzenEstimator::new(&self.observations(&above, space), space, &self.options.parzen, None)
            .context("TPE: above estimator")?;
        Ok(TpeFit {
            below: below.iter().map(|t| t.number).collect(),
            above: above.iter().map(|t| t.number).collect(),
            l,
            g,
        })
    }

    /// `TPESampler._sample`: the best of `n_ei_candidates` draws from l(x) by log l(x) - log g(x).
    fn sample(
        &mut self,
        study: &StudyView,
        trial: &FrozenTrial,
        space: &[(String, Distribution)],
    ) -> Result<BTreeMap<String, f64>> {
        let TpeFit { l: mpe_below, g: mpe_above, .. } = self.fit(study, trial, space)?;
        let samples = mpe_below.sample(&mut self.rng, self.options.n_ei_candidates.max(1));
        let lb = mpe_below.log_pdf(&samples);
        let la = mpe_above.log_pdf(&samples);
        // np.argmax: the first maximum; NaN counts as the maximum, as in numpy.
        let mut best = 0;
        let mut best_val = f64::NEG_INFINITY;
        for (i, (b, a)) in lb.iter().zip(&la).enumerate() {
            let v = b - a;
            if v.is_nan() {
                best = i;
                break;
            }
            if v > best_val {
                best_val = v;
                best = i;
            }
        }
        Ok(space.iter().zip(&samples).map(|((name, _), col)| (name.clone(), col[best])).collect())
    }
}

impl Sampler for TpeSampler {
    fn name(&self) -> &str {
        "TPESampler"
    }

    fn reseed(&mut self, seed: u64) {
        self.rng = StdRng::seed_from_u64(seed);
        self.random.reseed(seed ^ 0x9e37_79b9_7f4a_7c15);
    }

    fn infer_relative_search_space(
        &self,
        study: &StudyView,
        _trial: &FrozenTrial,
    ) -> Vec<(String, Distribution)> {
        if !self.options.multivariate {
            return Vec::new();
        }
        intersection_search_space(study.trials).into_iter().filter(|(_, d)| !d.single()).collect()
    }

    fn sample_relative(
        &mut self,
        study: &StudyView,
        trial: &FrozenTrial,
        space: &[(String, Distribution)],
    ) -> Result<BTreeMap<String, f64>> {
        if space.is_empty() || Self::n_finished(study) < self.options.n_startup_trials {
            return Ok(BTreeMap::new());
        }
        self.sample(study, trial, space)
    }

    fn sample_independent(
        &mut self,
        study: &StudyView,
        trial: &FrozenTrial,
        name: &str,
        dist: &Distribution,
    ) -> Result<f64> {
        if Self::n_finished(study) < self.options.n_startup_trials {
            return self.random.sample_independent(study, trial, name, dist);
        }
        let space = [(name.to_string(), dist.clone())];
        let values = self.sample(study, trial, &space)?;
        Ok(values[name])
    }
}

/// Constraint violation, Optuna's `_get_infeasible_trial_score`: the sum of positive values of
/// the `constraints` system attribute.
fn infeasible_score(t: &FrozenTrial) -> f64 {
    match t.system_attrs.get("constraints") {
        Some(Value::Array(vs)) => vs.iter().filter_map(Value::as_f64).filter(|v| *v > 0.0).sum(),
        Some(Value::Object(m)) => m.values().filter_map(Value::as_f64).filter(|v| *v > 0.0).sum(),
        _ => 0.0,
    }
}

/// Optuna's `_get_pruned_trial_score`: deeper first, then better last value; NaN last.
fn pruned_score(t: &FrozenTrial, direction: StudyDirection) -> (f64, f64) {
    match t.intermediate_values.iter().next_back() {
        Some((&step, &v)) => {
            if v.is_nan() {
                (-(step as f64), f64::INFINITY)
            } else if direction == StudyDirection::Minimize {
                (-(step as f64), v)
            } else {
                (-(step as f64), -v)
            }
        }
        None => (1.0, 0.0),
    }
}

/// Optuna's `_split_trials` for one objective: the best `n_below` complete trials, topped up with
/// the best pruned then the least infeasible ones, form "below"; everything else, RUNNING trials
/// included, is "above". Both lists are returned in trial-number order.
pub fn split_trials<'a>(
    trials: &[&'a FrozenTrial],
    direction: StudyDirection,
    n_below: usize,
) -> (Vec<&'a FrozenTrial>, Vec<&'a FrozenTrial>) {
    let mut complete = Vec::new();
    let mut pruned = Vec::new();
    let mut running = Vec::new();
    let mut infeasible = Vec::new();
    for &t in trials {
        if t.state == TrialState::Running {
            running.push(t);
        } else if infeasible_score(t) > 0.0 {
            infeasible.push(t);
        } else if t.state == TrialState::Complete {
            complete.push(t);
        } else if t.state == TrialState::Pruned {
            pruned.push(t);
        }
    }
    // The best `n_below` by value as Python's stable sorted() ranks them (`reverse=True` keeps
    // equal values in their original order): rank by (value, position), selected in O(n).
    let sign = if direction == StudyDirection::Minimize { 1.0 } else { -1.0 };
    let mut ranked: Vec<(f64, usize, &FrozenTrial)> =
        complete.iter().enumerate().map(|(i, t)| (sign * t.value().unwrap_or(f64::NAN), i, *t)).collect();
    let take = n_below.min(ranked.len());
    if take > 0 && take < ranked.len() {
        ranked.select_nth_unstable_by(take - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    }
    let mut below: Vec<&FrozenTrial> = ranked[..take].iter().map(|r| r.2).collect();
    let mut above: Vec<&FrozenTrial> = ranked[take..].iter().map(|r| r.2).collect();
    let n_below = n_below - take;

    pruned.sort_by(|a, b| {
        let (sa, sb) = (pruned_score(a, direction), pruned_score(b, direction));
        sa.0.total_cmp(&sb.0).then(sa.1.total_cmp(&sb.1))
    });
    let take = n_below.min(pruned.len());
    below.extend_from_slice(&pruned[..take]);
    above.extend_from_slice(&pruned[take..]);
    let n_below = n_below - take;

    infeasible.sort_by(|a, b| infeasible_score(a).total_cmp(&infeasible_score(b)));
    let take = n_below.min(infeasible.len());
    below.extend_from_slice(&infeasible[..take]);
    above.extend_from_slice(&infeasible[take..]);
    above.extend(running);

    below.sort_by_key(|t| t.number);
    above.sort_by_key(|t| t.number);
    (below, above)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trial::UtcDateTime;

    fn trial(number: u64, state: TrialState, value: Option<f64>, last: Option<(i64, f64)>) -> FrozenTrial {
        FrozenTrial {
            trial_id: number as i64 + 1,
            number,
            state,
            values: value.map(|v| vec![v]),
            datetime_start: Some(UtcDateTime::now()),
            datetime_complete: None,
            params: Vec::new(),
            user_attrs: Default::default(),
            system_attrs: Default::default(),
            intermediate_values: last.into_iter().collect(),
        }
    }

    #[test]
    fn gamma_matches_optuna() {
        assert_eq!([0, 1, 10, 11, 100, 250, 251, 1000].map(default_gamma), [0, 1, 1, 2, 10, 25, 25, 25]);
    }

    #[test]
    fn split_orders_complete_then_pruned_and_puts_running_above() {
        let ts = [
            trial(0, TrialState::Complete, Some(0.5), None),
            trial(1, TrialState::Complete, Some(0.9), None),
            trial(2, TrialState::Pruned, Some(0.7), Some((1, 0.7))),
            trial(3, TrialState::Pruned, Some(0.6), Some((2, 0.6))),
            trial(4, TrialState::Running, None, None),
            trial(5, TrialState::Complete, Some(0.8), None),
        ];
        let refs: Vec<&FrozenTrial> = ts.iter().collect();
        let numbers = |v: &[&FrozenTrial]| v.iter().map(|t| t.number).collect::<Vec<_>>();
        let (b, a) = split_trials(&refs, StudyDirection::Maximize, 2);
        assert_eq!((numbers(&b), numbers(&a)), (vec![1, 5], vec![0, 2, 3, 4]));
        // With more room than complete trials, the deeper pruned trial (step 2) goes first.
        let (b, a) = split_trials(&refs, StudyDirection::Maximize, 4);
        assert_eq!((numbers(&b), numbers(&a)), (vec![0, 1, 3, 5], vec![2, 4]));
        let (b, _) = split_trials(&refs, StudyDirection::Minimize, 1);
        assert_eq!(numbers(&b), vec![0]);
    }
}
