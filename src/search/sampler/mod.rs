//! Samplers propose parameters from a study's history, through Optuna's interface: an optional
//! *relative* (joint) proposal over the search space inferred from finished trials, and an
//! *independent* proposal for each remaining parameter. [`suggest_params`] applies Optuna's
//! `Trial._suggest` precedence for every parameter of a space: already stored (a re-queued
//! trial) > `fixed_params` (an enqueued trial) > single-valued > relative > independent.

pub mod parzen;
pub mod random;
pub mod tpe;
pub mod truncnorm;

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};

use super::space::SearchSpace;
use crate::distributions::{Distribution, ParamValue};
use crate::trial::{FrozenTrial, StudyDirection, TrialState};

pub use random::RandomSampler;
pub use tpe::TpeSampler;

/// What a sampler sees of a study: its name, direction and all trials ordered by number.
#[derive(Clone, Copy, Debug)]
pub struct StudyView<'a> {
    pub study_name: &'a str,
    pub direction: StudyDirection,
    pub trials: &'a [FrozenTrial],
}

/// A sampler, as Optuna's `BaseSampler`. Values are in internal representation.
pub trait Sampler: Send {
    fn name(&self) -> &str;

    /// Restarts the random stream from `seed` (the driver does this per trial when seeded).
    fn reseed(&mut self, _seed: u64) {}

    /// The space the relative proposal covers (empty: no joint sampling).
    fn infer_relative_search_space(
        &self,
        _study: &StudyView,
        _trial: &FrozenTrial,
    ) -> Vec<(String, Distribution)> {
        Vec::new()
    }

    /// A joint proposal over `space` (may be empty, e.g. during start-up).
    fn sample_relative(
        &mut self,
        _study: &StudyView,
        _trial: &FrozenTrial,
        _space: &[(String, Distribution)],
    ) -> Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }

    /// A proposal for one parameter.
    fn sample_independent(
        &mut self,
        study: &StudyView,
        trial: &FrozenTrial,
        name: &str,
        dist: &Distribution,
    ) -> Result<f64>;
}

/// Optuna's `IntersectionSearchSpace(include_pruned=True)`: the parameters every COMPLETE or
/// PRUNED trial has, with identical distributions, sorted by name.
pub fn intersection_search_space(trials: &[FrozenTrial]) -> Vec<(String, Distribution)> {
    // (position in the first trial seen, name, distribution): the position is a lookup hint.
    let mut space: Option<Vec<(usize, &str, &Distribution)>> = None;
    for t in trials.iter().rev() {
        if !matches!(t.state, TrialState::Complete | TrialState::Pruned) {
            continue;
        }
        match &mut space {
            None => {
                space = Some(
                    t.params.iter().enumerate().map(|(i, p)| (i, p.name.as_str(), &p.distribution)).collect(),
                );
            }
            Some(s) => s.retain(|(hint, name, dist)| {
                t.param_hinted(name, *hint).is_some_and(|p| &p.distribution == *dist)
            }),
        }
    }
    let mut out: Vec<(String, Distribution)> =
        space.unwrap_or_default().into_iter().map(|(_, n, d)| (n.to_string(), d.clone())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Computes all parameters of `trial` for `space` with Optuna's precedence and returns them as
/// (name, internal value, distribution), in the space's order. Parameters the trial already
/// stores are returned unchanged. `fixed_params` come from the trial's `fixed_params` system
/// attribute (set by `enqueue_trial`).
pub fn suggest_params(
    sampler: &mut dyn Sampler,
    study: &StudyView,
    trial: &FrozenTrial,
    space: &SearchSpace,
) -> Result<Vec<(String, f64, Distribution)>> {
    let fixed = trial.system_attrs.get("fixed_params").and_then(|v| v.as_object());
    let relative_space = sampler.infer_relative_search_space(study, trial);
    let relative = if relative_space.is_empty() {
        BTreeMap::new()
    } else {
        sampler.sample_relative(study, trial, &relative_space)?
    };
    let mut out = Vec::with_capacity(space.len());
    for (name, dist) in space.iter() {
        if let Some(p) = trial.param(name) {
            crate::distributions::check_distribution_compatibility(name, &p.distribution, dist)?;
            out.push((name.to_string(), p.internal, p.distribution.clone()));
            continue;
        }
        let internal = if let Some(v) = fixed.and_then(|f| f.get(name)) {
            let value = ParamValue::from_json_value(v).with_context(|| format!("fixed parameter {name}"))?;
            dist.to_internal(&value).with_context(|| format!("fixed parameter {name}"))?
        } else if dist.single() {
            dist.to_internal(&dist.single_value())?
        } else if let Some(&v) =
            relative.get(name).filter(|_| relative_space.iter().any(|(n, d)| n == name && d == dist))
            && dist.contains(v)
        {
            v
        } else {
            sampler.sample_independent(study, trial, name, dist)?
        };
        if internal.is_nan() {
            bail!("sampler {} proposed NaN for {name}", sampler.name());
        }
        out.push((name.to_string(), internal, dist.clone()));
    }
    Ok(out)
}
