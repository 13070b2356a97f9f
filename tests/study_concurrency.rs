//! Several workers on one SQLite study: 4 real processes running the driver, and 4 threads with
//! their own connections asking and telling. Trial numbers must be unique and gap-free, the study
//! must end with exactly n_trials finished trials, and no report or tell may be lost.

mod common;
mod common_study;
mod fake_trainer;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use common_study::FakeRunner;
use hpo_gpu::search::pruner::NopPruner;
use hpo_gpu::search::sampler::TpeSampler;
use hpo_gpu::search::sampler::tpe::TpeOptions;
use hpo_gpu::search::space::SearchSpace;
use hpo_gpu::study::driver::{AskOptions, DriverOptions, NoProgress, ask_batch, run_study};
use hpo_gpu::study::storage::Storage;
use hpo_gpu::trial::{StudyDirection, TrialState};

const WORKER_URL: &str = "HPO_GPU_TEST_WORKER_URL";
const WORKER_SEED: &str = "HPO_GPU_TEST_WORKER_SEED";
const N_TRIALS: u64 = 24;

/// The body of one worker process; a no-op unless started by `four_processes_share_one_study`.
#[test]
fn worker_process() {
    let Ok(url) = std::env::var(WORKER_URL) else { return };
    let seed: u64 = std::env::var(WORKER_SEED).unwrap().parse().unwrap();
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.create_study("shared", StudyDirection::Maximize, true).unwrap();
    let mut runner = FakeRunner::new(2);
    runner.sleep = Duration::from_millis(15);
    let opts = DriverOptions {
        heartbeat_interval: Duration::from_millis(100),
        grace_period: Duration::from_secs(20),
        poll_interval: Duration::from_millis(20),
        max_consecutive_failures: 100,
        ..DriverOptions::new(N_TRIALS)
    };
    let mut sampler = TpeSampler::new(TpeOptions { seed: Some(seed), ..TpeOptions::default() });
    let out = run_study(
        &mut storage,
        &study,
        &SearchSpace::recipe_default(),
        &mut sampler,
        &mut NopPruner,
        &opts,
        &mut runner,
        &mut NoProgress,
    )
    .unwrap();
    println!("\nWORKER_RAN={}", out.trials_run);
}

#[test]
fn four_processes_share_one_study() {
    if std::env::var(WORKER_URL).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:///{}", dir.path().join("shared.db").display());
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..4)
        .map(|i| {
            Command::new(&exe)
                .args(["worker_process", "--exact", "--nocapture", "--test-threads=1"])
                .env(WORKER_URL, &url)
                .env(WORKER_SEED, i.to_string())
                .output_spawn()
        })
        .collect();
    let mut ran_total = 0u64;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "worker failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let ran: u64 = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("WORKER_RAN="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no summary in worker output:\n{stdout}"));
        ran_total += ran;
    }
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.load_study("shared").unwrap();
    let trials = storage.trials(study.study_id, None).unwrap();
    let numbers: Vec<u64> = trials.iter().map(|t| t.number).collect();
    assert_eq!(numbers, (0..trials.len() as u64).collect::<Vec<_>>(), "unique, gap-free trial numbers");
    assert_eq!(ran_total as usize, trials.len(), "every trial was run by exactly one worker");
    let c = storage.trial_counts(study.study_id).unwrap();
    assert_eq!(c.finished_ok(), N_TRIALS, "exactly n_trials finished trials: {c:?}");
    assert_eq!((c.running, c.waiting), (0, 0));
    for t in trials.iter().filter(|t| t.state == TrialState::Complete) {
        assert_eq!(t.intermediate_values.len(), 2, "trial {} lost a report", t.number);
        assert_eq!(t.value(), Some(t.intermediate_values[&2]));
    }
}

trait SpawnPiped {
    fn output_spawn(&mut self) -> std::process::Child;
}

impl SpawnPiped for Command {
    fn output_spawn(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
    }
}

#[test]
fn four_threads_ask_and_tell_on_separate_connections() {
    if std::env::var(WORKER_URL).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:///{}", dir.path().join("threads.db").display());
    Storage::open(&url).unwrap().create_study("s", StudyDirection::Minimize, false).unwrap();
    let handles: Vec<_> = (0..4u64)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut storage = Storage::open(&url).unwrap();
                let study = storage.load_study("s").unwrap();
                let mut sampler = TpeSampler::new(TpeOptions { seed: Some(w), ..TpeOptions::default() });
                let space = SearchSpace::recipe_default();
                let mut told = Vec::new();
                for _ in 0..15 {
                    let t = ask_batch(
                        &mut storage,
                        &study,
                        &space,
                        &mut sampler,
                        None,
                        1,
                        &AskOptions::default(),
                    )
                    .unwrap()
                    .remove(0);
                    let v = t.param("weight_decay").unwrap().internal;
                    storage.report(t.trial_id, 1, v, &[]).unwrap();
                    storage.set_trial_state(t.trial_id, TrialState::Complete, Some(&[v]), &[]).unwrap();
                    told.push(t.number);
                }
                told
            })
        })
        .collect();
    let mut all = HashSet::new();
    for h in handles {
        for n in h.join().unwrap() {
            assert!(all.insert(n), "trial number {n} handed out twice");
        }
    }
    assert_eq!(all, (0..60).collect::<HashSet<u64>>());
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.load_study("s").unwrap();
    for t in storage.trials(study.study_id, None).unwrap() {
        assert_eq!(t.state, TrialState::Complete);
        assert_eq!(t.value(), Some(t.param("weight_decay").unwrap().internal));
        assert_eq!(t.intermediate_values.len(), 1);
    }
}

#[test]
fn nop_pruner_is_the_default_for_ask() {
    // `ask` with a pruner that filters nothing behaves as without one.
    let mut storage = Storage::open("sqlite:///:memory:").unwrap();
    let study = storage.create_study("s", StudyDirection::Minimize, false).unwrap();
    let mut sampler = TpeSampler::new(TpeOptions { seed: Some(1), ..TpeOptions::default() });
    let space = SearchSpace::recipe_default();
    let t =
        ask_batch(&mut storage, &study, &space, &mut sampler, Some(&NopPruner), 2, &AskOptions::default())
            .unwrap();
    assert_eq!(t.iter().map(|t| t.number).collect::<Vec<_>>(), vec![0, 1]);
}

/// Issue 7: four `hpo-gpu search` processes run a 100-trial study (about 25 trials each) on one
/// SQLite file (two of them running the trial array, `--slots 3`) while a fifth process asks and
/// tells through the CLI. Every trial number is unique, every trial was run by exactly one
/// process, every tell is stored, and no worker ever sees
/// "database is locked".
#[test]
fn four_search_processes_and_a_cli_asker_share_one_study() {
    if std::env::var(WORKER_URL).is_ok() {
        return;
    }
    const TARGET: u64 = 100;
    const ASKS: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path());
    let data = common::tiny_data(dir.path());
    // A path with a space in it: URLs are taken as they are.
    let url = format!("sqlite:///{}", dir.path().join("shared study.db").display());
    let exe = env!("CARGO_BIN_EXE_hpo-gpu");
    let n_trials = TARGET.to_string();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            // Two of the workers run the trial array: up to three trials in flight per process.
            let slots = if w < 2 { "1" } else { "3" };
            Command::new(exe)
                .args(["search", "--model"])
                .arg(&model)
                .args(["--random-init", "--dataset"])
                .arg(&data)
                .args(["--train-samples", "0", "--eval-samples", "0", "--max-length", "16", "--epochs", "1"])
                .args(["--device", "cpu", "--pruner", "none", "--study-name", "shared", "--storage", &url])
                .args(["--n-trials", &n_trials, "--heartbeat-interval", "1", "--grace-period", "30"])
                .args(["--slots", slots])
                .output_spawn()
        })
        .collect();
    let space = r#"{"learning_rate": {"name": "FloatDistribution", "attributes": {"low": 1e-06, "high": 0.0001, "log": true, "step": null}}}"#;
    let mut told = Vec::new();
    for i in 0..ASKS {
        let ask = Command::new(exe)
            .args(["ask", "--storage", &url, "--study-name", "shared", "--direction", "maximize"])
            .args(["--search-space", space])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&ask.stdout);
        assert!(ask.status.success(), "ask failed: {}", String::from_utf8_lossy(&ask.stderr));
        let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let number = line["number"].as_u64().unwrap();
        let value = 0.25 + i as f64 / 1000.0;
        let tell = Command::new(exe)
            .args(["tell", "--storage", &url, "--study-name", "shared", "--trial-number"])
            .arg(number.to_string())
            .arg("--values")
            .arg(value.to_string())
            .output()
            .unwrap();
        assert!(tell.status.success(), "tell failed: {}", String::from_utf8_lossy(&tell.stderr));
        told.push((number, value));
    }
    let mut run_by: Vec<HashSet<u64>> = Vec::new();
    for child in workers {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "worker failed:\n{stderr}");
        assert!(!stderr.contains("locked"), "a worker saw a locked database:\n{stderr}");
        let started: HashSet<u64> = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("trial ")?.split_once(" started")?.0.parse().ok())
            .collect();
        assert!(!started.is_empty(), "a worker ran no trial:\n{stderr}");
        eprintln!("worker ran {} trials", started.len());
        run_by.push(started);
    }
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.load_study("shared").unwrap();
    let trials = storage.trials(study.study_id, None).unwrap();
    let numbers: Vec<u64> = trials.iter().map(|t| t.number).collect();
    assert_eq!(numbers, (0..trials.len() as u64).collect::<Vec<_>>(), "unique, gap-free trial numbers");
    let mut owner = std::collections::HashMap::new();
    for (w, set) in run_by.iter().enumerate() {
        for n in set {
            assert!(owner.insert(*n, w).is_none(), "trial {n} run by two workers");
        }
    }
    for (n, _) in &told {
        assert!(owner.insert(*n, 4).is_none(), "asked trial {n} was also run by a worker");
    }
    assert_eq!(owner.len(), trials.len(), "every trial belongs to exactly one process");
    for (n, v) in &told {
        let t = &trials[*n as usize];
        assert_eq!((t.state, t.value()), (TrialState::Complete, Some(*v)), "tell of trial {n} lost");
    }
    for t in trials.iter().filter(|t| owner[&t.number] < 4) {
        assert_eq!(t.state, TrialState::Complete, "worker trial {} ended {:?}", t.number, t.state);
        assert_eq!(t.intermediate_values.len(), 1, "worker trial {} lost its epoch report", t.number);
    }
    let finished = storage.trial_counts(study.study_id).unwrap().finished_ok();
    assert!((TARGET..=TARGET + ASKS).contains(&finished), "{finished} finished trials");
}
