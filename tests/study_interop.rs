//! Interop with the real `optuna` package (Python): our databases load in Optuna with the same
//! trials, best trial and intermediate values, and its plots run on them; a study started by
//! Python Optuna (including an enqueued trial and a crashed worker) is continued by our driver
//! and read back by Python; the schema is the one Optuna creates.
//!
//! Python comes from `$HPO_GPU_PYTHON` or `<repo>/.venv/bin/python`; without it (or without
//! optuna) these tests print SKIP and pass. The plots additionally need matplotlib.

mod common_study;
mod fake_trainer;

use std::path::Path;
use std::time::Duration;

use common_study::{FakeRunner, python, run_python};
use hpo_gpu::search::pruner::MedianPruner;
use hpo_gpu::search::sampler::TpeSampler;
use hpo_gpu::search::sampler::tpe::TpeOptions;
use hpo_gpu::search::space::SearchSpace;
use hpo_gpu::study::driver::{DriverOptions, NoProgress, run_study};
use hpo_gpu::study::storage::Storage;
use hpo_gpu::trial::{FrozenTrial, StudyDirection, TrialState};
use serde_json::Value;

fn options(n: u64) -> DriverOptions {
    DriverOptions {
        heartbeat_interval: Duration::from_millis(200),
        grace_period: Duration::from_secs(2),
        poll_interval: Duration::from_millis(100),
        max_consecutive_failures: 100,
        ..DriverOptions::new(n)
    }
}

fn json_f64(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "inf" => f64::INFINITY,
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        Value::String(s) if s == "nan" => f64::NAN,
        v => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")),
    }
}

/// Asserts that Optuna's view of every trial equals ours.
fn assert_same_trials(ours: &[FrozenTrial], theirs: &Value) {
    let theirs = theirs["trials"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (t, p) in ours.iter().zip(theirs) {
        let n = t.number;
        assert_eq!(p["number"].as_u64(), Some(n));
        assert_eq!(p["state"].as_str(), Some(t.state.as_str()), "trial {n} state");
        match t.value() {
            Some(v) => assert_eq!(json_f64(&p["value"]), v, "trial {n} value"),
            None => assert!(p["value"].is_null(), "trial {n} value"),
        }
        assert_eq!(p["params"].as_object().unwrap().len(), t.params.len(), "trial {n} params");
        for param in &t.params {
            assert_eq!(p["params"][&param.name], param.value.to_json_value(), "trial {n} {}", param.name);
            // Optuna re-serialises its parsed distribution to exactly our text.
            assert_eq!(p["distributions"][&param.name].as_str(), Some(param.distribution.to_json().as_str()));
        }
        let iv = p["intermediate_values"].as_object().unwrap();
        assert_eq!(iv.len(), t.intermediate_values.len(), "trial {n} intermediate values");
        for (step, v) in &t.intermediate_values {
            let theirs = json_f64(&iv[&step.to_string()]);
            assert!(theirs == *v || (theirs.is_nan() && v.is_nan()), "trial {n} step {step}");
        }
        for (k, v) in &t.user_attrs {
            assert_eq!(&p["user_attrs"][k], v, "trial {n} user attr {k}");
        }
        assert_eq!(p["has_start"].as_bool(), Some(t.datetime_start.is_some()));
        assert_eq!(p["has_complete"].as_bool(), Some(t.datetime_complete.is_some()));
    }
}

fn assert_plots(report: &Value) {
    if let Some(reason) = report.get("plots_skipped") {
        eprintln!("SKIP plots: {reason} (pip install matplotlib)");
        return;
    }
    let plots = report["plots"].as_array().unwrap();
    assert_eq!(plots.len(), 3);
    for p in plots {
        let len = std::fs::metadata(p.as_str().unwrap()).unwrap().len();
        assert!(len > 5_000, "{p} is only {len} bytes");
    }
    let imp = report["importances"].as_object().unwrap();
    assert_eq!(imp.len(), 3, "importances for the 3 parameters: {imp:?}");
}

fn db_path(url: &str) -> &str {
    url.trim_start_matches("sqlite:///")
}

#[test]
fn optuna_loads_a_study_written_by_hpo_gpu() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:///{}", dir.path().join("ours.db").display());
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.create_study("transformers_optuna_study", StudyDirection::Maximize, true).unwrap();
    storage.set_study_user_attr(study.study_id, "model", &serde_json::json!("prajjwal1/bert-tiny")).unwrap();
    let mut runner = FakeRunner::new(3);
    runner.fail_trials = vec![2, 9];
    let mut sampler = TpeSampler::new(TpeOptions { seed: Some(4), ..TpeOptions::default() });
    run_study(
        &mut storage,
        &study,
        &SearchSpace::recipe_default(),
        &mut sampler,
        &mut MedianPruner::default(),
        &options(16),
        &mut runner,
        &mut NoProgress,
    )
    .unwrap();
    let trials = storage.trials(study.study_id, None).unwrap();
    let states: Vec<TrialState> = trials.iter().map(|t| t.state).collect();
    assert!(states.contains(&TrialState::Complete));
    assert!(states.contains(&TrialState::Pruned), "{states:?}");
    assert!(states.contains(&TrialState::Fail), "{states:?}");
    let plot_dir = dir.path().join("plots");
    std::fs::create_dir(&plot_dir).unwrap();
    let out =
        run_python(&py, "check_hpo_study.py", &[db_path(&url), &study.name, plot_dir.to_str().unwrap()]);
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["direction"], "MAXIMIZE");
    assert_eq!(report["user_attrs"]["model"], "prajjwal1/bert-tiny");
    assert_same_trials(&trials, &report);
    let best = storage.best_trial(&study).unwrap().unwrap();
    assert_eq!(report["best"]["number"].as_u64(), Some(best.number));
    assert_eq!(report["best"]["value"].as_f64(), best.value());
    match report.get("dataframe_rows") {
        Some(rows) => assert_eq!(rows.as_u64(), Some(trials.len() as u64)),
        None => eprintln!("SKIP trials_dataframe: {}", report["dataframe_skipped"]),
    }
    assert_plots(&report);
    // Loading ran no migration: the schema markers are untouched.
    let conn = rusqlite::Connection::open(db_path(&url)).unwrap();
    let rev: String = conn.query_row("SELECT version_num FROM alembic_version", [], |r| r.get(0)).unwrap();
    assert_eq!(rev, "v3.2.0.a");
}

#[test]
fn hpo_gpu_continues_a_study_started_by_python_optuna() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("theirs.db");
    let db_s = db.to_str().unwrap();
    let name = "transformers_optuna_study";
    // Python: 6 trials with TPE, then a worker that crashes inside a trial (with heartbeats),
    // then one enqueued parameter set.
    run_python(&py, "python_study.py", &[db_s, name, "6", "--crash"]);
    run_python(&py, "python_study.py", &[db_s, name, "6", "--enqueue"]);
    std::thread::sleep(Duration::from_millis(2200)); // let the crashed trial's heartbeat go stale

    let mut storage = Storage::open_path(&db).unwrap();
    let study = storage.load_study(name).unwrap();
    let before = storage.trials(study.study_id, None).unwrap();
    assert_eq!(before.len(), 8);
    assert_eq!(before[6].state, TrialState::Running);
    assert_eq!(before[7].state, TrialState::Waiting);
    let mut runner = FakeRunner::new(3);
    let mut sampler = TpeSampler::new(TpeOptions { seed: Some(9), ..TpeOptions::default() });
    run_study(
        &mut storage,
        &study,
        &SearchSpace::recipe_default(),
        &mut sampler,
        &mut hpo_gpu::search::pruner::NopPruner,
        &options(12),
        &mut runner,
        &mut NoProgress,
    )
    .unwrap();
    let trials = storage.trials(study.study_id, None).unwrap();
    // The crashed trial is FAIL; the enqueued trial ran with its fixed params first, then the
    // re-queued copy of the crashed trial with the same params.
    assert_eq!(trials[6].state, TrialState::Fail);
    assert!(trials[6].system_attrs["fail_reason"].as_str().unwrap().contains("stale heartbeat"));
    let enq = &trials[7];
    assert_eq!(enq.state, TrialState::Complete);
    assert_eq!(enq.param("learning_rate").unwrap().value.as_f64(), Some(5e-5));
    assert_eq!(enq.param("per_device_train_batch_size").unwrap().value.as_i64(), Some(64));
    assert_eq!(enq.param("weight_decay").unwrap().value.as_f64(), Some(0.05));
    let retry = &trials[8];
    assert_eq!(retry.system_attrs["failed_trial"], serde_json::json!(6));
    assert_eq!(retry.params, trials[6].params);
    assert_eq!(runner.params_seen[0].0, 7);
    assert_eq!(runner.params_seen[1].0, 8);
    let c = storage.trial_counts(study.study_id).unwrap();
    assert_eq!((c.finished_ok(), c.running, c.waiting), (12, 0, 0));
    drop(storage);

    // Python continues our continuation with its own TPE, then reads everything back.
    run_python(&py, "python_study.py", &[db_s, name, "14"]);
    let mut storage = Storage::open_path(&db).unwrap();
    let trials = storage.trials(study.study_id, None).unwrap();
    assert_eq!(trials.iter().filter(|t| t.state == TrialState::Complete).count(), 14);
    let plot_dir = dir.path().join("plots");
    std::fs::create_dir(&plot_dir).unwrap();
    let out = run_python(&py, "check_hpo_study.py", &[db_s, name, plot_dir.to_str().unwrap()]);
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_same_trials(&trials, &report);
    let best = storage.best_trial(&study).unwrap().unwrap();
    assert_eq!(report["best"]["number"].as_u64(), Some(best.number));
    assert_plots(&report);
}

/// Normalised `sqlite_master` entries: (type, name, sql with whitespace collapsed).
fn schema_of(path: &Path) -> Vec<(String, String, String)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name")
        .unwrap();
    stmt.query_map([], |r| {
        let sql: String = r.get(2)?;
        Ok((r.get(0)?, r.get(1)?, sql.split_whitespace().collect::<Vec<_>>().join(" ")))
    })
    .unwrap()
    .collect::<rusqlite::Result<_>>()
    .unwrap()
}

#[test]
fn schema_is_the_one_optuna_creates() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs.db");
    run_python(&py, "make_empty_optuna_db.py", &[theirs.to_str().unwrap()]);
    let ours = dir.path().join("ours.db");
    let mut storage = Storage::open_path(&ours).unwrap();
    storage.create_study("empty", StudyDirection::Maximize, false).unwrap();
    drop(storage);
    assert_eq!(schema_of(&ours), schema_of(&theirs));
    let rows = |p: &Path| -> (i64, String, String, String) {
        let c = rusqlite::Connection::open(p).unwrap();
        c.query_row(
            "SELECT v.schema_version, v.library_version, a.version_num, d.direction \
             FROM version_info v, alembic_version a, study_directions d",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
    };
    assert_eq!(rows(&ours), rows(&theirs));
}
