//! Parameter importances, as Optuna 5.0 computes them: fANOVA (`FanovaImportanceEvaluator`) and
//! PED-ANOVA (`PedAnovaImportanceEvaluator`, Optuna's default), normalised to sum to 1 as
//! `optuna.importance.get_param_importances(normalize=True)` does.
//!
//! fANOVA is implemented here rather than with the `fanova` crate (sile/fanova 0.3, the one
//! optuna-dashboard uses) because that crate computes something different from Optuna's evaluator:
//! it takes each feature's range from the data instead of the distribution's bounds, feeds a
//! categorical as one ordinal column where Optuna one-hot encodes it and measures the variance of
//! the whole group, and averages NaN from bootstrap trees whose leaves all hold the same value
//! (Optuna skips those trees). What is below follows Optuna's `_fanova` step by step: a random
//! forest as scikit-learn's `RandomForestRegressor(n_estimators=64, max_depth=64,
//! min_samples_split=2, min_samples_leaf=1)` (bootstrap samples, every feature considered at
//! every split, squared-error criterion, thresholds midway between neighbouring values), then
//! per tree the variance of each parameter's marginal over the search-space bounds, as a fraction
//! of the tree's total variance, averaged over trees. The forest's random numbers differ from
//! scikit-learn's, so values agree with Optuna's to within the forest's noise, not bit for bit.
//!
//! PED-ANOVA is a line-by-line port of `optuna/importance/_ped_anova/` (quantile filter,
//! regimes, grid-discretised Scott-bandwidth Parzen estimators, Pearson divergence).

use std::collections::BTreeSet;

use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use crate::distributions::{Distribution, FloatDistribution, IntDistribution};
use crate::search::sampler::truncnorm::log_gauss_mass;
use crate::trial::{FrozenTrial, StudyDirection, TrialState};

/// One parameter's importance.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamImportance {
    pub param: String,
    pub importance: f64,
}

/// `FanovaImportanceEvaluator(n_trees=64, max_depth=64, seed=...)`.
#[derive(Clone, Debug, PartialEq)]
pub struct FanovaOptions {
    pub n_trees: usize,
    pub max_depth: usize,
    /// Seeds the forest, so that a report is reproducible.
    pub seed: u64,
}

impl Default for FanovaOptions {
    fn default() -> Self {
        FanovaOptions { n_trees: 64, max_depth: 64, seed: 0 }
    }
}

/// `PedAnovaImportanceEvaluator(target_quantile=0.1, region_quantile=1.0, evaluate_on_local=True)`.
#[derive(Clone, Debug, PartialEq)]
pub struct PedAnovaOptions {
    pub target_quantile: f64,
    pub region_quantile: f64,
    pub evaluate_on_local: bool,
}

impl Default for PedAnovaOptions {
    fn default() -> Self {
        PedAnovaOptions { target_quantile: 0.1, region_quantile: 1.0, evaluate_on_local: true }
    }
}

/// Which evaluator to run.
#[derive(Clone, Debug, PartialEq)]
pub enum Evaluator {
    Fanova(FanovaOptions),
    PedAnova(PedAnovaOptions),
}

impl Evaluator {
    /// The evaluator's name as Optuna's class is called.
    pub fn name(&self) -> &'static str {
        match self {
            Evaluator::Fanova(_) => "FanovaImportanceEvaluator",
            Evaluator::PedAnova(_) => "PedAnovaImportanceEvaluator",
        }
    }

    /// A short label for plots and tables.
    pub fn label(&self) -> &'static str {
        match self {
            Evaluator::Fanova(_) => "fANOVA",
            Evaluator::PedAnova(_) => "PED-ANOVA",
        }
    }
}

/// `get_param_importances(study, evaluator=..., normalize=True)`: importances that sum to 1
/// (equal shares when all are 0), most important first. Empty when no trial is complete.
pub fn param_importances(
    trials: &[FrozenTrial],
    direction: StudyDirection,
    evaluator: &Evaluator,
) -> Result<Vec<ParamImportance>> {
    let raw = match evaluator {
        Evaluator::Fanova(opts) => fanova(trials, opts)?,
        Evaluator::PedAnova(opts) => ped_anova(trials, direction, opts)?,
    };
    Ok(normalize(raw))
}

/// Optuna's normalisation: divide by the sum, or give every parameter `1/n` when the sum is 0.
pub fn normalize(raw: Vec<ParamImportance>) -> Vec<ParamImportance> {
    let sum: f64 = raw.iter().map(|p| p.importance).sum();
    let n = raw.len() as f64;
    let mut out: Vec<ParamImportance> = raw
        .into_iter()
        .map(|p| ParamImportance {
            importance: if sum == 0.0 { 1.0 / n } else { p.importance / sum },
            param: p.param,
        })
        .collect();
    sort_by_importance(&mut out);
    out
}

/// Most important first; equal importances by name, so the order is deterministic.
fn sort_by_importance(v: &mut [ParamImportance]) {
    v.sort_by(|a, b| b.importance.total_cmp(&a.importance).then_with(|| a.param.cmp(&b.param)));
}

fn complete(trials: &[FrozenTrial]) -> impl Iterator<Item = &FrozenTrial> {
    trials.iter().filter(|t| t.state == TrialState::Complete)
}

/// Optuna's `intersection_search_space` over COMPLETE trials: parameters present in every one of
/// them with one and the same distribution, sorted by name.
fn intersection_search_space(trials: &[FrozenTrial]) -> Vec<(String, Distribution)> {
    let mut space: Option<Vec<(String, Distribution)>> = None;
    for t in complete(trials) {
        let own: Vec<(String, Distribution)> =
            t.params.iter().map(|p| (p.name.clone(), p.distribution.clone())).collect();
        space = Some(match space {
            None => own,
            Some(prev) => {
                prev.into_iter().filter(|(n, d)| own.iter().any(|(m, e)| m == n && e == d)).collect()
            }
        });
    }
    let mut space = space.unwrap_or_default();
    space.sort_by(|a, b| a.0.cmp(&b.0));
    space
}

// ---------------------------------------------------------------------------------------------
// fANOVA
// ---------------------------------------------------------------------------------------------

/// `FanovaImportanceEvaluator.evaluate`: unnormalised importances, most important first.
///
/// Fails when every tree of the forest has zero variance (all complete trials share one value),
/// as Optuna does ("Encountered zero total variance in all trees").
pub fn fanova(trials: &[FrozenTrial], opts: &FanovaOptions) -> Result<Vec<ParamImportance>> {
    if opts.n_trees == 0 || opts.max_depth == 0 {
        bail!("fANOVA needs at least one tree of depth at least 1");
    }
    let space = intersection_search_space(trials);
    let (single, varying): (Vec<_>, Vec<_>) = space.into_iter().partition(|(_, d)| d.single());
    let zeros = |names: &mut dyn Iterator<Item = String>| -> Vec<ParamImportance> {
        let mut v: Vec<_> = names.map(|param| ParamImportance { param, importance: 0.0 }).collect();
        sort_by_importance(&mut v);
        v
    };
    if varying.is_empty() {
        return Ok(zeros(&mut single.into_iter().map(|(n, _)| n)));
    }
    let rows: Vec<&FrozenTrial> = complete(trials)
        .filter(|t| varying.iter().all(|(n, _)| t.param(n).is_some()))
        .filter(|t| t.value().is_some_and(f64::is_finite))
        .collect();
    if rows.len() <= 1 {
        return Ok(zeros(&mut single.into_iter().chain(varying).map(|(n, _)| n)));
    }

    // `_SearchSpaceTransform(transform_log=False, transform_step=False)`: raw values within
    // [low, high]; a categorical becomes one [0, 1] column per choice.
    let mut bounds: Vec<(f64, f64)> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (_, d) in &varying {
        match d {
            Distribution::Categorical(c) => {
                groups.push((bounds.len()..bounds.len() + c.choices.len()).collect());
                bounds.extend(std::iter::repeat_n((0.0, 1.0), c.choices.len()));
            }
            Distribution::Float(f) => {
                groups.push(vec![bounds.len()]);
                bounds.push((f.low, f.high));
            }
            Distribution::Int(i) => {
                groups.push(vec![bounds.len()]);
                bounds.push((i.low as f64, i.high as f64));
            }
        }
    }
    let mut x: Vec<Vec<f64>> = Vec::with_capacity(rows.len());
    let mut y: Vec<f64> = Vec::with_capacity(rows.len());
    for t in &rows {
        let mut row = vec![0.0; bounds.len()];
        for ((name, d), cols) in varying.iter().zip(&groups) {
            let Some(p) = t.param(name) else { continue };
            match d {
                Distribution::Categorical(_) => {
                    let idx = p.internal as usize;
                    if p.internal < 0.0 || idx >= cols.len() {
                        bail!(
                            "trial {}: parameter {name} has choice index {} out of range",
                            t.number,
                            p.internal
                        );
                    }
                    row[cols[idx]] = 1.0;
                }
                _ => match p.value.as_f64() {
                    Some(v) => row[cols[0]] = v,
                    None => bail!("trial {}: parameter {name} = {} is not a number", t.number, p.value),
                },
            }
        }
        x.push(row);
        y.push(t.value().unwrap_or(f64::NAN));
    }

    let mut rng = StdRng::seed_from_u64(opts.seed);
    let trees: Vec<FanovaTree> = (0..opts.n_trees)
        .map(|_| {
            let sample: Vec<usize> = (0..x.len()).map(|_| rng.random_range(0..x.len())).collect();
            let tree = RegressionTree::fit(&x, &y, sample, opts.max_depth, &mut rng);
            FanovaTree::new(tree, &bounds)
        })
        .collect();
    if trees.iter().all(|t| t.variance <= 0.0) {
        bail!(
            "fANOVA cannot assess importances: the forest has zero variance (all {} complete trials \
             have the same objective value)",
            rows.len()
        );
    }
    let mut out: Vec<ParamImportance> = varying
        .iter()
        .zip(&groups)
        .map(|((name, _), cols)| {
            let fractions: Vec<f64> = trees
                .iter()
                .filter(|t| t.variance > 0.0)
                .map(|t| t.marginal_variance(cols).max(0.0) / t.variance)
                .collect();
            ParamImportance {
                param: name.clone(),
                importance: fractions.iter().sum::<f64>() / fractions.len() as f64,
            }
        })
        .chain(single.into_iter().map(|(param, _)| ParamImportance { param, importance: 0.0 }))
        .collect();
    sort_by_importance(&mut out);
    Ok(out)
}

const LEAF: usize = usize::MAX;

#[derive(Clone, Debug)]
struct TreeNode {
    /// Split column, or [`LEAF`].
    feature: usize,
    threshold: f64,
    left: usize,
    right: usize,
    /// Mean target of the node's samples (the prediction at a leaf).
    value: f64,
}

/// A CART regression tree as scikit-learn's `DecisionTreeRegressor` builds it (depth first,
/// nodes numbered in preorder).
#[derive(Clone, Debug)]
struct RegressionTree {
    nodes: Vec<TreeNode>,
}

impl RegressionTree {
    /// `sample` holds row indices with repeats (a bootstrap sample); a repeat weighs like a
    /// scikit-learn sample weight.
    fn fit(x: &[Vec<f64>], y: &[f64], sample: Vec<usize>, max_depth: usize, rng: &mut StdRng) -> Self {
        let mut tree = RegressionTree { nodes: Vec::new() };
        tree.build(x, y, sample, 0, max_depth, rng);
        tree
    }

    fn build(
        &mut self,
        x: &[Vec<f64>],
        y: &[f64],
        mut sample: Vec<usize>,
        depth: usize,
        max_depth: usize,
        rng: &mut StdRng,
    ) -> usize {
        let n = sample.len() as f64;
        let sum: f64 = sample.iter().map(|&i| y[i]).sum();
        let mean = sum / n;
        let impurity = sample.iter().map(|&i| (y[i] - mean).powi(2)).sum::<f64>() / n;
        let id = self.nodes.len();
        self.nodes.push(TreeNode { feature: LEAF, threshold: 0.0, left: LEAF, right: LEAF, value: mean });
        let distinct_rows = sample.iter().collect::<BTreeSet<_>>().len();
        if depth >= max_depth || distinct_rows < 2 || impurity <= f64::EPSILON {
            return id;
        }
        // Every feature, in random order (max_features=1.0); the first strictly best split wins.
        let mut features: Vec<usize> = (0..x[0].len()).collect();
        features.shuffle(rng);
        let mut best: Option<(f64, usize, f64)> = None; // (proxy improvement, feature, threshold)
        for &f in &features {
            sample.sort_by(|&a, &b| x[a][f].total_cmp(&x[b][f]));
            let mut left_sum = 0.0;
            for (k, pair) in sample.windows(2).enumerate() {
                left_sum += y[pair[0]];
                let (lo, hi) = (x[pair[0]][f], x[pair[1]][f]);
                if hi <= lo + 1e-7 {
                    continue;
                }
                let n_left = (k + 1) as f64;
                let right_sum = sum - left_sum;
                let proxy = left_sum * left_sum / n_left + right_sum * right_sum / (n - n_left);
                if best.is_none_or(|(b, _, _)| proxy > b) {
                    let mut threshold = lo / 2.0 + hi / 2.0;
                    if threshold == hi || !threshold.is_finite() {
                        threshold = lo;
                    }
                    best = Some((proxy, f, threshold));
                }
            }
        }
        let Some((_, feature, threshold)) = best else { return id };
        let (left, right): (Vec<usize>, Vec<usize>) =
            sample.into_iter().partition(|&i| x[i][feature] <= threshold);
        let left_id = self.build(x, y, left, depth + 1, max_depth, rng);
        let right_id = self.build(x, y, right, depth + 1, max_depth, rng);
        let node = &mut self.nodes[id];
        node.feature = feature;
        node.threshold = threshold;
        node.left = left_id;
        node.right = right_id;
        id
    }
}

/// One tree prepared for Optuna's `_FanovaTree` computations over the search-space bounds.
struct FanovaTree {
    tree: RegressionTree,
    bounds: Vec<(f64, f64)>,
    /// Total variance of the tree's prediction over the bounds (leaf values weighted by volume).
    variance: f64,
    /// Sorted distinct split thresholds per column.
    splits: Vec<Vec<f64>>,
}

impl FanovaTree {
    fn new(tree: RegressionTree, bounds: &[(f64, f64)]) -> Self {
        let mut leaves: Vec<(f64, f64)> = Vec::new(); // (value, volume)
        let mut stack = vec![(0usize, bounds.to_vec())];
        while let Some((id, cell)) = stack.pop() {
            let node = &tree.nodes[id];
            if node.feature == LEAF {
                leaves.push((node.value, cell.iter().map(|(lo, hi)| hi - lo).product()));
            } else {
                let (mut l, mut r) = (cell.clone(), cell);
                l[node.feature].1 = node.threshold;
                r[node.feature].0 = node.threshold;
                stack.push((node.left, l));
                stack.push((node.right, r));
            }
        }
        let variance = weighted_variance(&leaves);
        let mut splits: Vec<Vec<f64>> = vec![Vec::new(); bounds.len()];
        for node in tree.nodes.iter().filter(|n| n.feature != LEAF) {
            splits[node.feature].push(node.threshold);
        }
        for s in &mut splits {
            s.sort_by(f64::total_cmp);
            s.dedup();
        }
        FanovaTree { tree, bounds: bounds.to_vec(), variance, splits }
    }

    /// `_FanovaTree.get_marginal_variance(features)`: the variance, over the cells the tree's
    /// splits cut `features`' box into, of the prediction averaged over all other columns.
    fn marginal_variance(&self, features: &[usize]) -> f64 {
        let grids: Vec<Vec<(f64, f64)>> = features
            .iter()
            .map(|&f| {
                let (lo, hi) = self.bounds[f];
                let mut edges = vec![lo];
                edges.extend(self.splits[f].iter().copied());
                edges.push(hi);
                edges.windows(2).map(|w| (0.5 * (w[0] + w[1]), w[1] - w[0])).collect()
            })
            .collect();
        let mut points: Vec<(f64, f64)> = Vec::new(); // (marginal prediction, cell size)
        let mut index = vec![0usize; features.len()];
        let mut point = vec![f64::NAN; self.bounds.len()];
        'cells: loop {
            let mut size = 1.0;
            for (k, &f) in features.iter().enumerate() {
                let (mid, width) = grids[k][index[k]];
                point[f] = mid;
                size *= width;
            }
            points.push((self.marginal_prediction(&point), size));
            for k in (0..features.len()).rev() {
                index[k] += 1;
                if index[k] < grids[k].len() {
                    continue 'cells;
                }
                index[k] = 0;
            }
            break;
        }
        weighted_variance(&points)
    }

    /// The tree's prediction at `point` (NaN = marginalised column), averaged uniformly over the
    /// marginalised columns' bounds.
    fn marginal_prediction(&self, point: &[f64]) -> f64 {
        let mut ranges = self.bounds.clone();
        let (total, weight) = self.marginal_walk(0, point, &mut ranges, 1.0);
        if weight > 0.0 { total / weight } else { 0.0 }
    }

    /// (sum of leaf value x weight, sum of weights) under `id`, where a leaf's weight is the share
    /// of the marginalised columns' box its cell covers. `ranges` is restored before returning.
    fn marginal_walk(&self, id: usize, point: &[f64], ranges: &mut [(f64, f64)], share: f64) -> (f64, f64) {
        let node = &self.tree.nodes[id];
        if node.feature == LEAF {
            return (node.value * share, share);
        }
        let f = node.feature;
        if !point[f].is_nan() {
            let next = if point[f] <= node.threshold { node.left } else { node.right };
            return self.marginal_walk(next, point, ranges, share);
        }
        let (lo, hi) = ranges[f];
        let width = hi - lo;
        let t = node.threshold.clamp(lo, hi);
        let left_share = if width > 0.0 { (t - lo) / width } else { 0.5 };
        ranges[f] = (lo, t);
        let (left_total, left_weight) = self.marginal_walk(node.left, point, ranges, share * left_share);
        ranges[f] = (t, hi);
        let (right_total, right_weight) =
            self.marginal_walk(node.right, point, ranges, share * (1.0 - left_share));
        ranges[f] = (lo, hi);
        (left_total + right_total, left_weight + right_weight)
    }
}

/// numpy's `average((v - average(v, w))**2, w)`; 0 when the weights sum to 0.
fn weighted_variance(points: &[(f64, f64)]) -> f64 {
    let w: f64 = points.iter().map(|p| p.1).sum();
    if w <= 0.0 {
        return 0.0;
    }
    let mean = points.iter().map(|(v, pw)| v * pw).sum::<f64>() / w;
    points.iter().map(|(v, pw)| (v - mean).powi(2) * pw).sum::<f64>() / w
}

// ---------------------------------------------------------------------------------------------
// PED-ANOVA
// ---------------------------------------------------------------------------------------------

const PED_N_STEPS: usize = 50;
const PED_PRIOR_WEIGHT: f64 = 1.0;
const PED_MIN_TRIALS_IN_REGIME: usize = 2;

/// `PedAnovaImportanceEvaluator.evaluate` (single objective, no `target`): unnormalised
/// importances, most important first.
pub fn ped_anova(
    trials: &[FrozenTrial],
    direction: StudyDirection,
    opts: &PedAnovaOptions,
) -> Result<Vec<ParamImportance>> {
    if !(0.0 < opts.target_quantile
        && opts.target_quantile < opts.region_quantile
        && opts.region_quantile <= 1.0)
    {
        bail!(
            "PED-ANOVA needs 0 < target_quantile < region_quantile <= 1, got {} and {}",
            opts.target_quantile,
            opts.region_quantile
        );
    }
    // `_resolve_params`: every parameter of a complete trial, conditional ones included.
    let params: BTreeSet<&str> =
        complete(trials).flat_map(|t| t.params.iter().map(|p| p.name.as_str())).collect();
    let zeros = || {
        let mut v: Vec<_> =
            params.iter().map(|p| ParamImportance { param: p.to_string(), importance: 0.0 }).collect();
        sort_by_importance(&mut v);
        v
    };
    let filtered: Vec<&FrozenTrial> = complete(trials)
        .filter(|t| t.values.as_ref().is_some_and(|v| v.iter().all(|x| x.is_finite())))
        .collect();
    if filtered.len() <= 1 {
        return Ok(zeros());
    }
    let target_trials = top_quantile(&filtered, opts.target_quantile, direction);
    let region_trials = top_quantile(&filtered, opts.region_quantile, direction);
    if target_trials.is_empty() {
        return Ok(zeros());
    }
    let quantile = target_trials.len() as f64 / region_trials.len() as f64;
    let target_ids: BTreeSet<i64> = target_trials.iter().map(|t| t.trial_id).collect();
    let mut out = Vec::with_capacity(params.len());
    for &name in &params {
        let mut importance = 0.0;
        for (dist, region_regime) in partition_by_regime(name, &region_trials) {
            let target_regime: Vec<&FrozenTrial> =
                region_regime.iter().copied().filter(|t| target_ids.contains(&t.trial_id)).collect();
            let alpha = target_regime.len() as f64 / target_trials.len() as f64;
            let beta = region_regime.len() as f64 / region_trials.len() as f64;
            if let Some(dist) = dist
                && !dist.single()
                && !target_regime.is_empty()
            {
                importance += alpha * alpha / beta
                    * pearson_divergence(name, dist, &target_regime, &region_regime, opts.evaluate_on_local)?;
            }
        }
        out.push(ParamImportance { param: name.to_string(), importance: importance * quantile * quantile });
    }
    sort_by_importance(&mut out);
    Ok(out)
}

/// `_QuantileFilter.filter`: trials whose loss is at most the `ceil(q n)`-th smallest.
fn top_quantile<'a>(
    trials: &[&'a FrozenTrial],
    quantile: f64,
    direction: StudyDirection,
) -> Vec<&'a FrozenTrial> {
    if quantile == 1.0 {
        return trials.to_vec();
    }
    let sign = if direction == StudyDirection::Minimize { 1.0 } else { -1.0 };
    let loss = |t: &FrozenTrial| sign * t.value().unwrap_or(f64::NAN);
    let mut sorted: Vec<f64> = trials.iter().map(|t| loss(t)).collect();
    sorted.sort_by(f64::total_cmp);
    let cutoff_index = ((quantile * trials.len() as f64).ceil() as usize).saturating_sub(1);
    let cutoff = sorted[cutoff_index.min(sorted.len() - 1)];
    trials.iter().copied().filter(|t| loss(t) <= cutoff).collect()
}

/// `_partition_by_regime`: trials grouped by the parameter's distribution (`None` = the trial
/// lacks the parameter), in order of first appearance, dropping groups under 2 trials.
fn partition_by_regime<'a>(
    name: &str,
    trials: &[&'a FrozenTrial],
) -> Vec<(Option<&'a Distribution>, Vec<&'a FrozenTrial>)> {
    let mut regimes: Vec<(Option<&'a Distribution>, Vec<&'a FrozenTrial>)> = Vec::new();
    for &t in trials {
        let d = t.param(name).map(|p| &p.distribution);
        match regimes.iter_mut().find(|(k, _)| *k == d) {
            Some((_, v)) => v.push(t),
            None => regimes.push((d, vec![t])),
        }
    }
    regimes.retain(|(_, v)| v.len() >= PED_MIN_TRIALS_IN_REGIME);
    regimes
}

fn pearson_divergence(
    name: &str,
    dist: &Distribution,
    target: &[&FrozenTrial],
    region: &[&FrozenTrial],
    evaluate_on_local: bool,
) -> Result<f64> {
    let (pe_top, grid_size) = ScottParzen::on_grid(name, dist, target)?;
    let pdf_top: Vec<f64> = (0..grid_size).map(|g| pe_top.pdf(g) + 1e-12).collect();
    let pdf_local: Vec<f64> = if evaluate_on_local {
        let (pe_local, _) = ScottParzen::on_grid(name, dist, region)?;
        (0..grid_size).map(|g| pe_local.pdf(g) + 1e-12).collect()
    } else {
        vec![1.0 / grid_size as f64; grid_size]
    };
    Ok(pdf_local.iter().zip(&pdf_top).map(|(l, t)| l * (t / l - 1.0).powi(2)).sum())
}

/// `ScottParzenEstimator` over grid indices `0..grid_size`.
enum ScottParzen {
    /// Mixture weights and one row of choice probabilities per kernel.
    Categorical { weights: Vec<f64>, probs: Vec<Vec<f64>> },
    /// Mixture of discrete truncated normals on the integers `0..=high` (step 1).
    Numerical { weights: Vec<f64>, mus: Vec<f64>, sigmas: Vec<f64>, high: f64 },
}

impl ScottParzen {
    /// `build_parzen_estimator_on_grid`: returns the estimator and the grid size.
    fn on_grid(name: &str, dist: &Distribution, trials: &[&FrozenTrial]) -> Result<(Self, usize)> {
        let counts = match dist {
            Distribution::Categorical(c) => {
                let mut counts = vec![0usize; c.choices.len()];
                for t in trials {
                    let idx = t.param(name).map(|p| p.internal).unwrap_or(f64::NAN);
                    if !(idx >= 0.0 && (idx as usize) < counts.len()) {
                        bail!("trial {}: parameter {name} has choice index {idx} out of range", t.number);
                    }
                    counts[idx as usize] += 1;
                }
                counts
            }
            Distribution::Float(_) | Distribution::Int(_) => count_numerical_in_grid(name, dist, trials)?,
        };
        let grid_size = counts.len();
        let observations: Vec<usize> = (0..grid_size).filter(|&i| counts[i] > 0).collect();
        let obs_weights: Vec<f64> = observations.iter().map(|&i| counts[i] as f64).collect();
        let mut weights = if observations.is_empty() {
            vec![1.0]
        } else {
            let mut w = obs_weights.clone();
            w.push(PED_PRIOR_WEIGHT);
            w
        };
        let total: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= total);
        let estimator = match dist {
            Distribution::Categorical(_) => {
                let probs = if observations.is_empty() {
                    vec![vec![1.0 / grid_size as f64; grid_size]]
                } else {
                    let n_kernels = observations.len() + 1;
                    let mut rows = vec![vec![PED_PRIOR_WEIGHT / n_kernels as f64; grid_size]; n_kernels];
                    for (row, &o) in rows.iter_mut().zip(&observations) {
                        row[o] += 1.0;
                    }
                    for row in &mut rows {
                        let s: f64 = row.iter().sum();
                        let s = if s == 0.0 { 1.0 } else { s };
                        row.iter_mut().for_each(|p| *p /= s);
                    }
                    rows
                };
                ScottParzen::Categorical { weights, probs }
            }
            _ => {
                let obs: Vec<f64> = observations.iter().map(|&o| o as f64).collect();
                let (low, high) = (0.0, (grid_size - 1) as f64);
                let mut mus = Vec::with_capacity(obs.len() + 1);
                let mut sigmas = Vec::with_capacity(obs.len() + 1);
                if !obs.is_empty() {
                    let mut cum = Vec::with_capacity(obs.len());
                    let mut acc = 0.0;
                    for w in &obs_weights {
                        acc += w;
                        cum.push(acc);
                    }
                    let wsum = acc;
                    let mean = obs.iter().zip(&obs_weights).map(|(o, w)| o * w).sum::<f64>() / wsum;
                    let var = obs.iter().zip(&obs_weights).map(|(o, w)| (o - mean).powi(2) * w).sum::<f64>()
                        / (wsum - 1.0).max(1.0);
                    // numpy searchsorted, side="left" then side="right"; `//` on integer counts.
                    let q1_idx = cum.partition_point(|&c| c < (wsum / 4.0).floor());
                    let q3_idx = cum.partition_point(|&c| c <= (wsum * 3.0 / 4.0).floor());
                    let iqr = obs[q3_idx.min(obs.len() - 1)] - obs[q1_idx.min(obs.len() - 1)];
                    let sigma = 1.059 * (iqr / 1.34).min(var.sqrt()) * wsum.powf(-0.2);
                    let sigma_min = 0.5 / 1.64;
                    mus.extend(obs.iter().copied());
                    sigmas.extend(std::iter::repeat_n(sigma.max(sigma_min), obs.len()));
                }
                mus.push((low + high) / 2.0);
                sigmas.push(high - low + 1.0);
                ScottParzen::Numerical { weights, mus, sigmas, high }
            }
        };
        Ok((estimator, grid_size))
    }

    fn pdf(&self, x: usize) -> f64 {
        let terms: Vec<f64> = match self {
            ScottParzen::Categorical { weights, probs } => {
                weights.iter().zip(probs).map(|(w, row)| w.ln() + row[x].ln()).collect()
            }
            ScottParzen::Numerical { weights, mus, sigmas, high } => {
                let x = x as f64;
                weights
                    .iter()
                    .zip(mus.iter().zip(sigmas))
                    .map(|(w, (mu, sigma))| {
                        w.ln() + log_gauss_mass((x - 0.5 - mu) / sigma, (x + 0.5 - mu) / sigma)
                            - log_gauss_mass((-0.5 - mu) / sigma, (high + 0.5 - mu) / sigma)
                    })
                    .collect()
            }
        };
        let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let max = if max == f64::NEG_INFINITY { 0.0 } else { max };
        (terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln() + max).exp()
    }
}

/// `_count_numerical_param_in_grid`: histogram of the values on `min(n_steps, domain)` evenly
/// spaced grid points (in log space for log distributions).
fn count_numerical_in_grid(name: &str, dist: &Distribution, trials: &[&FrozenTrial]) -> Result<Vec<usize>> {
    let mut n_steps = PED_N_STEPS;
    let (low, high, log) = match dist {
        Distribution::Int(IntDistribution { low, high, log, step }) => {
            if *log {
                // In f64: an extreme stored range must not overflow i64 arithmetic.
                let log2_domain = (*high as f64 - *low as f64 + 1.0).ln() / 2f64.ln();
                n_steps = n_steps.min(log2_domain.ceil() as usize + 1);
            } else {
                n_steps =
                    n_steps.min(((*high as f64 - *low as f64) / *step as f64).round_ties_even() as usize + 1);
            }
            (*low as f64, *high as f64, *log)
        }
        Distribution::Float(FloatDistribution { low, high, log, step }) => {
            if let Some(step) = step {
                n_steps = n_steps.min(((high - low) / step).round_ties_even() as usize + 1);
            }
            (*low, *high, *log)
        }
        Distribution::Categorical(_) => bail!("parameter {name}: a categorical has no numeric grid"),
    };
    let (low, high) = if log { (low.ln(), high.ln()) } else { (low, high) };
    let step_size = (high - low) / (n_steps as f64 - 1.0);
    let mut counts = vec![0usize; n_steps];
    for t in trials {
        let Some(v) = t.param(name).and_then(|p| p.value.as_f64()) else {
            bail!("trial {}: parameter {name} is missing or not a number", t.number);
        };
        let v = if log { v.ln() } else { v };
        let idx = ((v - low) / step_size - 0.5).ceil();
        counts[idx.clamp(0.0, (n_steps - 1) as f64) as usize] += 1;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::distributions::{CategoricalDistribution, ParamValue};
    use crate::trial::TrialParam;

    fn trial(number: u64, value: f64, params: &[(&str, f64, &Distribution)]) -> FrozenTrial {
        FrozenTrial {
            trial_id: number as i64 + 1,
            number,
            state: TrialState::Complete,
            values: Some(vec![value]),
            datetime_start: None,
            datetime_complete: None,
            params: params
                .iter()
                .map(|(name, internal, d)| TrialParam {
                    name: name.to_string(),
                    internal: *internal,
                    value: d.to_external(*internal).unwrap_or(ParamValue::Float(*internal)),
                    distribution: (*d).clone(),
                })
                .collect(),
            user_attrs: BTreeMap::new(),
            system_attrs: BTreeMap::new(),
            intermediate_values: BTreeMap::new(),
        }
    }

    /// y = 10 x + 0.5 z (w unused) on a grid, plus a categorical that shifts y by 3 per choice.
    fn study() -> Vec<FrozenTrial> {
        let fx = Distribution::Float(FloatDistribution { low: 0.0, high: 1.0, log: false, step: None });
        let fw = Distribution::Float(FloatDistribution { low: 1e-3, high: 1.0, log: true, step: None });
        let cat = Distribution::Categorical(CategoricalDistribution {
            choices: vec![ParamValue::Int(1), ParamValue::Int(2), ParamValue::Int(3)],
        });
        let mut v = Vec::new();
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for n in 0..60 {
            let (x, z, w, c) = (next(), next(), 1e-3f64.powf(next()), (next() * 3.0).floor().min(2.0));
            v.push(trial(
                n,
                10.0 * x + 0.5 * z + 3.0 * c,
                &[("x", x, &fx), ("z", z, &fx), ("w", w, &fw), ("c", c, &cat)],
            ));
        }
        v
    }

    fn order(v: &[ParamImportance]) -> Vec<&str> {
        v.iter().map(|p| p.param.as_str()).collect()
    }

    #[test]
    fn fanova_ranks_and_values_like_optuna() {
        let imp = param_importances(
            &study(),
            StudyDirection::Minimize,
            &Evaluator::Fanova(FanovaOptions::default()),
        )
        .unwrap();
        assert_eq!(order(&imp), ["x", "c", "z", "w"], "{imp:?}");
        assert!((imp.iter().map(|p| p.importance).sum::<f64>() - 1.0).abs() < 1e-12);
        // Optuna 5.0 with scikit-learn 1.9, seeds 0, 1, 2 on the same trials: x 0.730 / 0.730 / 0.769,
        // c 0.263 / 0.260 / 0.225, z 0.007 / 0.009 / 0.003, w 0.001 / 0.002 / 0.002.
        assert!(imp[0].importance > 0.68 && imp[0].importance < 0.82, "{imp:?}");
        assert!(imp[1].importance > 0.17 && imp[1].importance < 0.31, "{imp:?}");
        assert!(imp[2].importance < 0.02 && imp[3].importance < 0.02, "{imp:?}");
    }

    #[test]
    fn ped_anova_equals_optuna_on_a_mixed_study() {
        let imp = param_importances(
            &study(),
            StudyDirection::Minimize,
            &Evaluator::PedAnova(PedAnovaOptions::default()),
        )
        .unwrap();
        // Optuna 5.0's get_param_importances(study) on the same 60 trials (tests/interop builds the
        // same study): PED-ANOVA is deterministic, so the values must agree to rounding.
        let optuna = [
            ("x", 0.8360044560864595),
            ("c", 0.07330072194611313),
            ("w", 0.06457810301730714),
            ("z", 0.026116718950120417),
        ];
        assert_eq!(order(&imp), optuna.map(|p| p.0), "{imp:?}");
        for (got, (_, want)) in imp.iter().zip(optuna) {
            assert!((got.importance - want).abs() < 1e-9, "{imp:?}");
        }
    }

    #[test]
    fn too_few_trials_give_equal_shares_and_constant_objective_fails_fanova() {
        let t = study();
        for ev in
            [Evaluator::Fanova(FanovaOptions::default()), Evaluator::PedAnova(PedAnovaOptions::default())]
        {
            let imp = param_importances(&t[..1], StudyDirection::Minimize, &ev).unwrap();
            assert_eq!(imp.len(), 4);
            assert!(imp.iter().all(|p| p.importance == 0.25), "{imp:?}");
            assert!(param_importances(&[], StudyDirection::Minimize, &ev).unwrap().is_empty());
        }
        let mut flat = t.clone();
        flat.iter_mut().for_each(|t| t.values = Some(vec![1.0]));
        let err = fanova(&flat, &FanovaOptions::default()).unwrap_err().to_string();
        assert!(err.contains("zero variance"), "{err}");
        let err = ped_anova(
            &t,
            StudyDirection::Minimize,
            &PedAnovaOptions { target_quantile: 0.5, region_quantile: 0.4, evaluate_on_local: true },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("target_quantile"), "{err}");
    }

    #[test]
    fn quantile_filter_keeps_ties_with_the_cutoff() {
        let fx = Distribution::Float(FloatDistribution { low: 0.0, high: 1.0, log: false, step: None });
        let trials: Vec<FrozenTrial> = (0..30).map(|n| trial(n, n as f64, &[("x", 0.5, &fx)])).collect();
        let refs: Vec<&FrozenTrial> = trials.iter().collect();
        // cutoff index ceil(0.1 * 30) - 1 = 2: the 3 best, and ties with the third are kept.
        assert_eq!(top_quantile(&refs, 0.1, StudyDirection::Minimize).len(), 3);
        let top = top_quantile(&refs, 0.1, StudyDirection::Maximize);
        assert_eq!(top.iter().map(|t| t.number).collect::<Vec<_>>(), [27, 28, 29]);
        let mut tied = trials.clone();
        tied[3].values = Some(vec![2.0]);
        let refs: Vec<&FrozenTrial> = tied.iter().collect();
        assert_eq!(top_quantile(&refs, 0.1, StudyDirection::Minimize).len(), 4);
    }

    #[test]
    fn numerical_grid_counts_follow_optuna() {
        let log_int = Distribution::Int(IntDistribution { low: 1, high: 100, log: true, step: 1 });
        let trials: Vec<FrozenTrial> = [1.0, 10.0, 100.0]
            .iter()
            .enumerate()
            .map(|(n, &v)| trial(n as u64, 0.0, &[("k", v, &log_int)]))
            .collect();
        let refs: Vec<&FrozenTrial> = trials.iter().collect();
        // ceil(log2(100)) + 1 = 8 grid points over [0, ln 100].
        let counts = count_numerical_in_grid("k", &log_int, &refs).unwrap();
        assert_eq!(counts, [1, 0, 0, 0, 1, 0, 0, 1]);
    }
}
