//! The search driver with a fake trainer: completes, failures, NaN objectives, pruning, resume
//! after a crash, batched asks, seeded reproducibility and TPE actually optimising.

mod common_study;
mod fake_trainer;

use std::collections::HashSet;
use std::time::Duration;

use common_study::{FakeRunner, score};
use hpo_gpu::distributions::{Distribution, FloatDistribution, ParamValue};
use hpo_gpu::search::pruner::{MedianPruner, NopPruner, Pruner};
use hpo_gpu::search::sampler::tpe::TpeOptions;
use hpo_gpu::search::sampler::{RandomSampler, Sampler, TpeSampler};
use hpo_gpu::search::space::SearchSpace;
use hpo_gpu::study::driver::{AskOptions, DriverOptions, NoProgress, StopReason, ask_batch, run_study};
use hpo_gpu::study::storage::{NewTrial, StartOutcome, Storage};
use hpo_gpu::trial::{FrozenTrial, StudyDirection, TrialState};

fn temp_db() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:///{}", dir.path().join("study.db").display());
    (dir, url)
}

fn fast_options(n_trials: u64) -> DriverOptions {
    DriverOptions {
        heartbeat_interval: Duration::from_millis(50),
        grace_period: Duration::from_secs(2),
        poll_interval: Duration::from_millis(20),
        ..DriverOptions::new(n_trials)
    }
}

fn tpe(seed: u64) -> TpeSampler {
    TpeSampler::new(TpeOptions { seed: Some(seed), ..TpeOptions::default() })
}

#[test]
fn study_runs_to_n_trials_with_failures_recorded() {
    let (_dir, url) = temp_db();
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.create_study("transformers_optuna_study", StudyDirection::Maximize, true).unwrap();
    let space = SearchSpace::recipe_default();
    let mut runner = FakeRunner::new(3);
    let mut opts = fast_options(25);
    opts.max_consecutive_failures = 100;
    let mut sampler = tpe(1);
    let out = run_study(
        &mut storage,
        &study,
        &space,
        &mut sampler,
        &mut NopPruner,
        &opts,
        &mut runner,
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(out.stop, StopReason::TargetReached);
    let trials = storage.trials(study.study_id, None).unwrap();
    let complete: Vec<&FrozenTrial> = trials.iter().filter(|t| t.state == TrialState::Complete).collect();
    let failed: Vec<&FrozenTrial> = trials.iter().filter(|t| t.state == TrialState::Fail).collect();
    assert_eq!(complete.len(), 25, "FAIL trials do not count towards n_trials");
    assert_eq!(out.trials_run as usize, trials.len());
    assert_eq!(
        trials.iter().map(|t| t.number).collect::<Vec<_>>(),
        (0..trials.len() as u64).collect::<Vec<_>>()
    );
    for t in &failed {
        let reason = t.system_attrs["fail_reason"].as_str().unwrap();
        assert!(reason.contains("simulated CUDA out of memory") || reason.contains("NaN"), "{reason}");
        assert!(t.values.is_none());
    }
    for t in &complete {
        let lr = t.param("learning_rate").unwrap().value.as_f64().unwrap();
        let bs = t.param("per_device_train_batch_size").unwrap().value.as_i64().unwrap();
        let wd = t.param("weight_decay").unwrap().value.as_f64().unwrap();
        let s = score(lr, bs, wd);
        assert!((t.value().unwrap() - s).abs() < 1e-12);
        assert_eq!(t.intermediate_values.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(t.intermediate_values[&3], t.value().unwrap());
        assert_eq!(t.user_attrs["epoch_3_eval_accuracy"].as_f64().unwrap(), t.value().unwrap());
        assert!(
            (t.user_attrs["epoch_1_train_loss"].as_f64().unwrap() - (1.0 - t.intermediate_values[&1])).abs()
                < 1e-12
        );
        assert_eq!(t.user_attrs["epoch_2_runtime"].as_f64().unwrap(), 0.02);
        assert!(t.datetime_complete.unwrap() >= t.datetime_start.unwrap());
    }
    let best = out.best.unwrap();
    let max = complete.iter().map(|t| t.value().unwrap()).fold(f64::MIN, f64::max);
    assert_eq!(best.value().unwrap(), max);
    // Running again with the same target does nothing: the study is complete.
    let out = run_study(
        &mut storage,
        &study,
        &space,
        &mut sampler,
        &mut NopPruner,
        &opts,
        &mut runner,
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(out.trials_run, 0);
    // TPE beats the start-up phase: the best value after start-up is near the optimum 0.95.
    assert!(max > 0.9, "best {max}");
}

#[test]
fn a_broken_configuration_stops_the_study() {
    let mut storage = Storage::open("sqlite:///:memory:").unwrap();
    let study = storage.create_study("s", StudyDirection::Maximize, false).unwrap();
    // Every trial fails: weight_decay is always above 0.28.
    let space = SearchSpace::new(vec![(
        "weight_decay".into(),
        Distribution::Float(FloatDistribution::new(0.29, 0.3, false, None).unwrap()),
    )])
    .unwrap();
    let err = run_study(
        &mut storage,
        &study,
        &space,
        &mut RandomSampler::new(Some(0)),
        &mut NopPruner,
        &fast_options(10),
        &mut FakeRunner::new(1),
        &mut NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("5 trials in a row failed") && err.contains("simulated CUDA out of memory"),
        "{err}"
    );
    assert_eq!(storage.trial_counts(study.study_id).unwrap().fail, 5);
}

#[test]
fn median_pruner_prunes_bad_trials_with_their_last_value() {
    let mut storage = Storage::open("sqlite:///:memory:").unwrap();
    let study = storage.create_study("s", StudyDirection::Maximize, false).unwrap();
    let space = SearchSpace::recipe_default();
    let mut runner = FakeRunner::new(4);
    let mut pruner = MedianPruner::default();
    let mut opts = fast_options(30);
    opts.max_consecutive_failures = 100;
    run_study(
        &mut storage,
        &study,
        &space,
        &mut RandomSampler::new(Some(3)),
        &mut pruner,
        &opts,
        &mut runner,
        &mut NoProgress,
    )
    .unwrap();
    let trials = storage.trials(study.study_id, None).unwrap();
    let pruned: Vec<&FrozenTrial> = trials.iter().filter(|t| t.state == TrialState::Pruned).collect();
    assert!(!pruned.is_empty(), "random search on this objective must prune some trials");
    for t in &pruned {
        let last = t.last_step().unwrap();
        assert!(last < 4, "a pruned trial stopped early");
        assert_eq!(t.value(), Some(t.intermediate_values[&last]));
        let epochs_run = runner.runs.iter().find(|(n, _)| *n == t.number).unwrap().1;
        assert_eq!(i64::from(epochs_run), last);
    }
    // No trial is pruned before 5 trials completed (n_startup_trials).
    let first_pruned = pruned.iter().map(|t| t.number).min().unwrap();
    let completed_before =
        trials.iter().filter(|t| t.number < first_pruned && t.state == TrialState::Complete).count();
    assert!(completed_before >= 5, "{completed_before}");
    let c = storage.trial_counts(study.study_id).unwrap();
    assert_eq!(c.finished_ok(), 30);
}

#[test]
fn restart_after_crash_fails_stale_trial_and_reruns_its_params() {
    let (_dir, url) = temp_db();
    let space = SearchSpace::recipe_default();
    let (study, crashed_params) = {
        // A worker completes two trials, starts a third and "crashes" (drops everything).
        let mut storage = Storage::open(&url).unwrap();
        let study = storage.create_study("s", StudyDirection::Maximize, false).unwrap();
        let mut runner = FakeRunner::new(2);
        run_study(
            &mut storage,
            &study,
            &space,
            &mut tpe(5),
            &mut NopPruner,
            &fast_options(2),
            &mut runner,
            &mut NoProgress,
        )
        .unwrap();
        let mut sampler = tpe(6);
        let opts = AskOptions { target: None, heartbeat: true, seed: None };
        let started = ask_batch(&mut storage, &study, &space, &mut sampler, None, 1, &opts).unwrap();
        storage.report(started[0].trial_id, 1, 0.6, &[]).unwrap();
        (study, started[0].params.clone())
    };
    // Make its heartbeat old, as if the process died a while ago.
    let conn = rusqlite::Connection::open(url.trim_start_matches("sqlite:///")).unwrap();
    conn.execute(
        "UPDATE trial_heartbeats SET heartbeat = '2001-01-01 00:00:00.000000' WHERE trial_id = 3",
        [],
    )
    .unwrap();

    let mut storage = Storage::open(&url).unwrap();
    let mut runner = FakeRunner::new(2);
    let out = run_study(
        &mut storage,
        &study,
        &space,
        &mut tpe(7),
        &mut NopPruner,
        &fast_options(5),
        &mut runner,
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(out.stop, StopReason::TargetReached);
    let trials = storage.trials(study.study_id, None).unwrap();
    let crashed = &trials[2];
    assert_eq!(crashed.state, TrialState::Fail);
    assert!(crashed.system_attrs["fail_reason"].as_str().unwrap().contains("stale heartbeat"));
    // The re-queued copy (trial 3) ran first, with the crashed trial's parameters.
    let retry = &trials[3];
    assert_eq!(retry.state, TrialState::Complete);
    assert_eq!(retry.params, crashed_params);
    assert_eq!(retry.system_attrs["failed_trial"], serde_json::json!(2));
    assert_eq!(runner.params_seen[0].0, 3);
    let c = storage.trial_counts(study.study_id).unwrap();
    assert_eq!((c.complete, c.fail, c.running, c.waiting), (5, 1, 0, 0));
}

#[test]
fn a_live_trial_of_another_worker_is_waited_for_not_duplicated() {
    let (_dir, url) = temp_db();
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.create_study("s", StudyDirection::Maximize, false).unwrap();
    // 1 of 2 trials done; another worker's trial is RUNNING with a fresh heartbeat, then its
    // heartbeat stops: after the grace period it is failed and re-run here.
    let mut t = NewTrial::new(TrialState::Complete);
    t.values = Some(vec![0.7]);
    storage.create_trial(study.study_id, &t).unwrap();
    let StartOutcome::Started(other) = storage.start_trial(study.study_id, None, true).unwrap() else {
        panic!()
    };
    let mut opts = fast_options(2);
    opts.grace_period = Duration::from_millis(600);
    let start = std::time::Instant::now();
    let mut runner = FakeRunner::new(1);
    run_study(
        &mut storage,
        &study,
        &SearchSpace::recipe_default(),
        &mut tpe(1),
        &mut NopPruner,
        &opts,
        &mut runner,
        &mut NoProgress,
    )
    .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(600), "waited for the grace period");
    assert_eq!(storage.trial(other.trial_id).unwrap().state, TrialState::Fail);
    let c = storage.trial_counts(study.study_id).unwrap();
    assert_eq!((c.complete, c.fail), (2, 1));
}

#[test]
fn ask_batch_gives_distinct_proposals_via_constant_liar() {
    let mut storage = Storage::open("sqlite:///:memory:").unwrap();
    let study = storage.create_study("s", StudyDirection::Maximize, false).unwrap();
    let space = SearchSpace::recipe_default();
    run_study(
        &mut storage,
        &study,
        &space,
        &mut tpe(2),
        &mut NopPruner,
        &fast_options(12),
        &mut FakeRunner::new(1),
        &mut NoProgress,
    )
    .unwrap();
    let opts = AskOptions { heartbeat: true, ..AskOptions::default() };
    let batch = ask_batch(&mut storage, &study, &space, &mut tpe(3), None, 16, &opts).unwrap();
    assert_eq!(batch.len(), 16);
    let lrs: HashSet<u64> =
        batch.iter().map(|t| t.param("learning_rate").unwrap().internal.to_bits()).collect();
    assert_eq!(lrs.len(), 16, "16 distinct learning rates");
    assert!(batch.iter().all(|t| t.state == TrialState::Running && t.params.len() == 3));
    // The target caps a batch: 12 finished + 16 live running, target 30 → 2 more.
    let capped = AskOptions { target: Some(30), heartbeat: true, seed: None };
    assert_eq!(ask_batch(&mut storage, &study, &space, &mut tpe(4), None, 10, &capped).unwrap().len(), 2);
}

#[test]
fn seeded_studies_are_reproducible() {
    let run = |seed: u64| -> Vec<Vec<ParamValue>> {
        let mut storage = Storage::open("sqlite:///:memory:").unwrap();
        let study = storage.create_study("s", StudyDirection::Maximize, false).unwrap();
        let mut opts = fast_options(15);
        opts.seed = Some(seed);
        opts.max_consecutive_failures = 100;
        run_study(
            &mut storage,
            &study,
            &SearchSpace::recipe_default(),
            &mut TpeSampler::new(TpeOptions::default()),
            &mut NopPruner,
            &opts,
            &mut FakeRunner::new(1),
            &mut NoProgress,
        )
        .unwrap();
        storage
            .trials(study.study_id, None)
            .unwrap()
            .iter()
            .map(|t| t.params.iter().map(|p| p.value.clone()).collect())
            .collect()
    };
    let a = run(11);
    assert_eq!(a, run(11));
    assert_ne!(a, run(12));
}

#[test]
fn tpe_beats_random_on_a_smooth_objective() {
    // Minimise (x - 0.3)^2 + (log10 y + 3)^2 with 40 trials, 5 seeds each.
    let space = SearchSpace::new(vec![
        ("x".into(), Distribution::Float(FloatDistribution::new(0.0, 1.0, false, None).unwrap())),
        ("y".into(), Distribution::Float(FloatDistribution::new(1e-6, 1.0, true, None).unwrap())),
    ])
    .unwrap();
    let best = |sampler: &mut dyn Sampler| -> f64 {
        let mut storage = Storage::open("sqlite:///:memory:").unwrap();
        let study = storage.create_study("s", StudyDirection::Minimize, false).unwrap();
        let mut best = f64::INFINITY;
        for _ in 0..40 {
            let t = ask_batch(&mut storage, &study, &space, sampler, None, 1, &AskOptions::default())
                .unwrap()
                .remove(0);
            let x = t.param("x").unwrap().internal;
            let y = t.param("y").unwrap().internal;
            let v = (x - 0.3).powi(2) + (y.log10() + 3.0).powi(2);
            best = best.min(v);
            storage.set_trial_state(t.trial_id, TrialState::Complete, Some(&[v]), &[]).unwrap();
        }
        best
    };
    let mut tpe_total = 0.0;
    let mut random_total = 0.0;
    for seed in 0..5 {
        tpe_total += best(&mut tpe(seed));
        random_total += best(&mut RandomSampler::new(Some(seed)));
    }
    assert!(tpe_total < random_total / 2.0, "tpe {tpe_total} vs random {random_total}");
}

#[test]
fn pruner_trait_objects_work_in_the_driver() {
    // A pruner that prunes every trial at epoch 2: states and values follow Optuna's tell.
    struct PruneAtTwo;
    impl Pruner for PruneAtTwo {
        fn name(&self) -> &str {
            "PruneAtTwo"
        }
        fn prune(
            &mut self,
            _: &hpo_gpu::search::sampler::StudyView,
            t: &FrozenTrial,
        ) -> anyhow::Result<hpo_gpu::search::pruner::PruneDecision> {
            Ok(hpo_gpu::search::pruner::PruneDecision {
                prune: t.last_step() == Some(2),
                system_attrs: vec![("seen".into(), 2.0)],
            })
        }
    }
    let mut storage = Storage::open("sqlite:///:memory:").unwrap();
    let study = storage.create_study("s", StudyDirection::Maximize, false).unwrap();
    let space = SearchSpace::new(vec![(
        "learning_rate".into(),
        Distribution::Float(FloatDistribution::new(1e-5, 5e-5, true, None).unwrap()),
    )])
    .unwrap();
    let mut runner = FakeRunner::new(5);
    run_study(
        &mut storage,
        &study,
        &space,
        &mut tpe(0),
        &mut PruneAtTwo,
        &fast_options(3),
        &mut runner,
        &mut NoProgress,
    )
    .unwrap();
    for t in storage.trials(study.study_id, None).unwrap() {
        assert_eq!(t.state, TrialState::Pruned);
        assert_eq!(t.value(), Some(t.intermediate_values[&2]));
        assert_eq!(t.system_attrs["seen"], serde_json::json!(2.0));
    }
    assert!(runner.runs.iter().all(|&(_, epochs)| epochs == 2));
}
