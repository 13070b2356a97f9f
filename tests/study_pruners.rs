//! Pruning decisions compared with Optuna 5.0's pruners on the same histories.
//!
//! The expected rows come from tests/interop/pruner_reference.py: per configuration, the step at
//! which each of 24 trials was pruned (0 = completed) and how many `completed_rung_*` system
//! attributes the successive-halving family stored on it. Our driver runs the same trials
//! (values reported per step, pruner asked after every report) and must decide identically.

mod fake_trainer;

use anyhow::Result;
use hpo_gpu::search::pruner::{
    HyperbandPruner, MedianPruner, PercentilePruner, Pruner, SuccessiveHalvingPruner,
};
use hpo_gpu::search::sampler::RandomSampler;
use hpo_gpu::search::space::SearchSpace;
use hpo_gpu::study::driver::{DriverOptions, NoProgress, run_study};
use hpo_gpu::study::storage::Storage;
use hpo_gpu::trial::protocol::{EpochMetrics, TrialHost, TrialRunner, Verdict};
use hpo_gpu::trial::{ParamSet, StudyDirection, TrialState};

const T: u64 = 24;
const N: u32 = 9;

fn value(i: u64, s: u32) -> f64 {
    if i == 5 && s == 3 {
        return f64::NAN;
    }
    ((i * 7919 + u64::from(s) * 104729) % 1000) as f64 / 1000.0 * 0.5 + 0.5 * f64::from(s) / f64::from(N)
}

struct StepRunner;

impl TrialRunner for StepRunner {
    fn run_trials(&mut self, host: &mut dyn TrialHost) -> Result<()> {
        fake_trainer::one_at_a_time(host, |number, params, report| self.run_trial(number, params, report))
    }
}

impl StepRunner {
    fn run_trial(
        &mut self,
        n: u64,
        _: &ParamSet,
        report: &mut dyn FnMut(&EpochMetrics) -> Result<Verdict>,
    ) -> Result<f64> {
        for s in 1..=N {
            let v = value(n, s);
            let r = fake_trainer::epoch(s, v, v, v, 0.0);
            if report(&r)? == Verdict::Prune {
                return Ok(v);
            }
        }
        Ok(value(n, N))
    }
}

#[rustfmt::skip]
const EXPECTED: &[(&str, &str, [u32; 24], [usize; 24])] = &[
    ("median", "maximize", [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 4, 4, 7, 7, 0, 1, 1, 1, 1, 1, 1, 1, 4, 4], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    ("median_custom", "minimize", [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    ("percentile25", "maximize", [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 4, 4, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    ("sh_auto", "maximize", [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4], [0, 2, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2]),
    ("sh_rf2", "minimize", [0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 4, 4, 8, 0, 0, 0, 2, 2, 2, 2, 2], [3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 1, 1, 1, 1, 1]),
    ("hyperband", "maximize", [0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 3, 0, 3, 3, 1, 1, 3, 1, 3, 1, 1, 1, 3, 0], [3, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 3, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3]),
    ("hyperband_auto", "minimize", [0, 0, 0, 0, 3, 0, 3, 3, 3, 3, 1, 3, 9, 1, 9, 9, 1, 9, 0, 0, 3, 3, 1, 3], [0, 3, 2, 1, 2, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 2, 1, 1]),
];

fn make(name: &str) -> Box<dyn Pruner> {
    match name {
        "median" => Box::new(MedianPruner::default()),
        "median_custom" => Box::new(MedianPruner::new(2, 2, 2, 1).unwrap()),
        "percentile25" => Box::new(PercentilePruner::new(25.0, 3, 0, 1, 2).unwrap()),
        "sh_auto" => Box::new(SuccessiveHalvingPruner::default()),
        "sh_rf2" => Box::new(SuccessiveHalvingPruner::new(Some(1), 2, 1, 0).unwrap()),
        "hyperband" => Box::new(HyperbandPruner::new(1, Some(9), 3, 0).unwrap()),
        "hyperband_auto" => Box::new(HyperbandPruner::default()),
        other => panic!("{other}"),
    }
}

#[test]
fn pruning_decisions_match_optuna() {
    for (name, direction, pruned_at, rungs) in EXPECTED {
        let mut storage = Storage::open("sqlite:///:memory:").unwrap();
        let direction =
            if *direction == "maximize" { StudyDirection::Maximize } else { StudyDirection::Minimize };
        let study = storage.create_study(name, direction, false).unwrap();
        let mut pruner = make(name);
        let space = SearchSpace::new(vec![]).unwrap();
        let opts = DriverOptions::new(T);
        run_study(
            &mut storage,
            &study,
            &space,
            &mut RandomSampler::new(Some(0)),
            pruner.as_mut(),
            &opts,
            &mut StepRunner,
            &mut NoProgress,
        )
        .unwrap();
        let trials = storage.trials(study.study_id, None).unwrap();
        assert_eq!(trials.len(), T as usize, "{name}");
        let ours: Vec<u32> = trials
            .iter()
            .map(|t| match t.state {
                TrialState::Pruned => t.last_step().unwrap() as u32,
                TrialState::Complete => 0,
                other => panic!("{name}: trial {} is {other}", t.number),
            })
            .collect();
        assert_eq!(ours, pruned_at.to_vec(), "{name}: pruned-at steps");
        let our_rungs: Vec<usize> = trials
            .iter()
            .map(|t| t.system_attrs.keys().filter(|k| k.starts_with("completed_rung_")).count())
            .collect();
        assert_eq!(our_rungs, rungs.to_vec(), "{name}: completed rungs");
        // A pruned trial's value is its last intermediate value (NaN gives no value), as Optuna.
        for t in trials.iter().filter(|t| t.state == TrialState::Pruned) {
            let last = t.intermediate_values[&t.last_step().unwrap()];
            assert_eq!(
                t.value(),
                if last.is_nan() { None } else { Some(last) },
                "{name}: trial {}",
                t.number
            );
        }
    }
}
