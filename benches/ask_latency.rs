//! Latency of one TPE `ask` (sample all parameters of the recipe's space) with 100 and 1,000
//! finished trials in the history: in memory (the sampler alone) and through SQLite (start the
//! trial, load the study, sample, store the parameters); and, when HPO_GPU_POSTGRES_URL names a
//! PostgreSQL server, one `ask` + `tell` (FAIL, so the history stays the same) through it.
//! scripts/bench_ask_vs_optuna.py times Optuna's TPESampler on the same history and prints the
//! ratio.
//!
//! History: trial i has learning_rate 10^(-6 + 2 frac(0.618034 i)), batch size [16, 32, 64, 128][i % 4],
//! weight_decay 0.3 frac(0.414214 i), and a value from a fixed smooth function of them.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hpo_gpu::distributions::ParamValue;
use hpo_gpu::search::sampler::tpe::TpeOptions;
use hpo_gpu::search::sampler::{StudyView, TpeSampler, suggest_params};
use hpo_gpu::search::space::SearchSpace;
use hpo_gpu::study::driver::{AskOptions, ask};
use hpo_gpu::study::storage::{NewTrial, StartOutcome, Storage};
use hpo_gpu::trial::{FrozenTrial, StudyDirection, TrialState};

fn frac(x: f64) -> f64 {
    x - x.floor()
}

/// The deterministic history shared with scripts/bench_ask_vs_optuna.py.
fn history_trial(i: usize, space: &SearchSpace) -> NewTrial {
    let lr = 10f64.powf(-6.0 + 2.0 * frac(0.618034 * i as f64));
    let bs = [16i64, 32, 64, 128][i % 4];
    let wd = 0.3 * frac(0.414214 * i as f64);
    let value = 0.5
        + 0.45
            * (1.0
                - ((lr.log10() + 4.5).powi(2)
                    + ((bs as f64).log2() - 5.0).powi(2) / 4.0
                    + (wd - 0.1).powi(2) * 25.0)
                    / 3.0)
                .max(0.0);
    let mut t = NewTrial::new(TrialState::Complete);
    t.values = Some(vec![value]);
    for (name, dist) in space.iter() {
        let v = match name {
            "learning_rate" => ParamValue::Float(lr),
            "per_device_train_batch_size" => ParamValue::Int(bs),
            _ => ParamValue::Float(wd),
        };
        t.params.push((name.to_string(), dist.to_internal(&v).unwrap(), dist.clone()));
    }
    t
}

fn build_study(url: &str, n: usize) -> (Storage, hpo_gpu::study::StudyRef, Vec<FrozenTrial>) {
    let space = SearchSpace::recipe_default();
    let mut storage = Storage::open(url).unwrap();
    let study = storage.create_study("bench", StudyDirection::Maximize, false).unwrap();
    for i in 0..n {
        storage.create_trial(study.study_id, &history_trial(i, &space)).unwrap();
    }
    let trials = storage.trials(study.study_id, None).unwrap();
    (storage, study, trials)
}

/// A new, empty database `name` on the server at `server` (a `postgresql://…/db` URL): its URL.
fn fresh_postgres_database(server: &str, name: &str) -> String {
    let mut admin =
        postgres::Client::connect(server, postgres::NoTls).expect("connect to HPO_GPU_POSTGRES_URL");
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let (base, _) = server.rsplit_once('/').expect("a URL ending in /database");
    format!("{base}/{name}")
}

fn bench_ask(c: &mut Criterion) {
    let space = SearchSpace::recipe_default();
    let mut group = c.benchmark_group("tpe_ask");
    for n in [100usize, 1000] {
        // In memory: the sampler on a loaded history, for a fresh RUNNING trial.
        let (mut storage, study, trials) = build_study("sqlite:///:memory:", n);
        let StartOutcome::Started(current) = storage.start_trial(study.study_id, None, false).unwrap() else {
            panic!("no trial")
        };
        let mut history = trials.clone();
        history.push(current.clone());
        let mut sampler = TpeSampler::new(TpeOptions { seed: Some(0), ..TpeOptions::default() });
        group.bench_function(BenchmarkId::new("memory", n), |b| {
            b.iter(|| {
                let view =
                    StudyView { study_name: "bench", direction: StudyDirection::Maximize, trials: &history };
                black_box(suggest_params(&mut sampler, &view, &current, &space).unwrap())
            })
        });

        // Through SQLite: ask (start, load, sample, store), then delete the trial through a
        // second connection so that every iteration sees the same history.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.db");
        let url = format!("sqlite:///{}", path.display());
        let (mut storage, study, _) = build_study(&url, n);
        let cleanup = rusqlite::Connection::open(&path).unwrap();
        cleanup.pragma_update(None, "synchronous", "NORMAL").unwrap(); // as Storage's own connections
        let mut sampler = TpeSampler::new(TpeOptions { seed: Some(0), ..TpeOptions::default() });
        group.bench_function(BenchmarkId::new("sqlite", n), |b| {
            b.iter(|| {
                let StartOutcome::Started(t) =
                    ask(&mut storage, &study, &space, &mut sampler, None, &AskOptions::default()).unwrap()
                else {
                    panic!("no trial")
                };
                assert_eq!(t.number as usize, n);
                let tx = cleanup.unchecked_transaction().unwrap();
                for sql in
                    ["DELETE FROM trial_params WHERE trial_id = ?1", "DELETE FROM trials WHERE trial_id = ?1"]
                {
                    tx.prepare_cached(sql).unwrap().execute([t.trial_id]).unwrap();
                }
                tx.commit().unwrap();
                black_box(t.number)
            })
        });
    }
    if let Ok(server) = std::env::var("HPO_GPU_POSTGRES_URL") {
        for n in [100usize, 1000] {
            let url = fresh_postgres_database(&server, &format!("bench_ask_{n}"));
            let (mut storage, study, _) = build_study(&url, n);
            let mut sampler = TpeSampler::new(TpeOptions { seed: Some(0), ..TpeOptions::default() });
            group.bench_function(BenchmarkId::new("postgres", n), |b| {
                b.iter(|| {
                    let StartOutcome::Started(t) =
                        ask(&mut storage, &study, &space, &mut sampler, None, &AskOptions::default())
                            .unwrap()
                    else {
                        panic!("no trial")
                    };
                    storage.set_trial_state(t.trial_id, TrialState::Fail, None, &[]).unwrap();
                    black_box(t.number)
                })
            });
        }
    }
    group.finish();

    // Where the SQLite time goes: loading the history, and one start + finish round trip.
    let mut group = c.benchmark_group("sqlite_parts");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:///{}", dir.path().join("parts.db").display());
    let (mut storage, study, _) = build_study(&url, 1000);
    group.bench_function("load_1000_trials", |b| {
        b.iter(|| black_box(storage.trials(study.study_id, None).unwrap().len()))
    });
    group.bench_function("start_and_fail_trial", |b| {
        b.iter(|| {
            let StartOutcome::Started(t) = storage.start_trial(study.study_id, None, false).unwrap() else {
                panic!("no trial")
            };
            storage.set_trial_state(t.trial_id, TrialState::Fail, None, &[]).unwrap();
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_ask
}
criterion_main!(benches);
