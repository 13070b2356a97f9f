//! Stopping `hpo-gpu search` with SIGINT (Ctrl-C) or SIGTERM: the running trials are stored FAIL
//! with the signal as the reason and queued again, the process exits with 128 + the signal, and
//! the same command goes on from there (src/study/interrupt.rs).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::running::{Running, stop_after_start, with_default_signals};

use hpo_gpu::study::storage::Storage;
use hpo_gpu::trial::TrialState;

/// `search` on the tiny model and data, with trials long enough (many epochs) to be stopped in.
fn search(dir: &Path, epochs: &str, slots: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hpo-gpu"));
    with_default_signals(&mut cmd);
    cmd.arg("search")
        .arg("--model")
        .arg(common::tiny_model(dir))
        .args(["--random-init", "--dataset"])
        .arg(common::tiny_data(dir))
        .args(["--train-samples", "0", "--eval-samples", "0", "--max-length", "16", "--epochs", epochs])
        .args(["--device", "cpu", "--pruner", "none", "--study-name", "s", "--n-trials", "3"])
        .args(["--sampler-seed", "5", "--slots", slots])
        .arg("--storage")
        .arg(format!("sqlite:///{}", dir.join("study.db").display()));
    cmd
}

fn trials(dir: &Path) -> Vec<hpo_gpu::trial::FrozenTrial> {
    let mut storage = Storage::open(&format!("sqlite:///{}", dir.join("study.db").display())).unwrap();
    let study = storage.load_study("s").unwrap();
    storage.trials(study.study_id, None).unwrap()
}

#[test]
fn ctrl_c_fails_the_running_trial_queues_it_again_and_the_rerun_finishes_the_study() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (code, stderr) = stop_after_start(search(dir, "5000", "1"), 1, libc::SIGINT);
    assert_eq!(code, Some(130), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        "SIGINT (Ctrl-C): stopped; running trials [0] stored FAIL and queued again (within \
         --failed-trial-max-retry): run the same command to go on"
    );
    let after = trials(dir);
    assert_eq!(after.iter().map(|t| t.state).collect::<Vec<_>>(), [TrialState::Fail, TrialState::Waiting]);
    assert_eq!(
        after[0].system_attrs["fail_reason"],
        serde_json::json!("interrupted: the worker received SIGINT (Ctrl-C)")
    );
    assert_eq!(after[1].system_attrs["failed_trial"], serde_json::json!(0));
    assert_eq!(after[1].params, after[0].params, "the queued retry has the stopped trial's parameters");

    // The same command (fewer epochs, to be quick) goes on: the retry first, then new trials.
    let rerun = search(dir, "1", "1").output().unwrap();
    let rerun_err = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{rerun_err}");
    assert!(rerun_err.contains("trial 1 started (retry of trial 0)"), "{rerun_err}");
    let done = trials(dir);
    let states: Vec<TrialState> = done.iter().map(|t| t.state).collect();
    assert_eq!(states, [TrialState::Fail, TrialState::Complete, TrialState::Complete, TrialState::Complete]);
}

#[test]
fn sigterm_fails_every_trial_of_a_trial_array() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (code, stderr) = stop_after_start(search(dir, "5000", "3"), 3, libc::SIGTERM);
    assert_eq!(code, Some(143), "{stderr}");
    assert!(
        stderr.contains("SIGTERM: stopped; running trials [0, 1, 2] stored FAIL and queued again"),
        "{stderr}"
    );
    let after = trials(dir);
    let failed: Vec<u64> = after.iter().filter(|t| t.state == TrialState::Fail).map(|t| t.number).collect();
    let queued: Vec<u64> =
        after.iter().filter(|t| t.state == TrialState::Waiting).map(|t| t.number).collect();
    assert_eq!((failed, queued), (vec![0, 1, 2], vec![3, 4, 5]));
    assert!(after.iter().all(|t| t.state != TrialState::Running));
    for t in after.iter().filter(|t| t.state == TrialState::Fail) {
        assert_eq!(
            t.system_attrs["fail_reason"],
            serde_json::json!("interrupted: the worker received SIGTERM")
        );
    }
}

#[test]
fn a_search_started_under_nohup_ignores_sighup_and_still_stops_on_ctrl_c() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let search = search(dir, "5000", "1");
    // `trap '' HUP` is what nohup does: SIGHUP ignored, inherited by the program it execs.
    let mut cmd = Command::new("sh");
    with_default_signals(&mut cmd)
        .arg("-c")
        .arg("trap '' HUP; exec \"$0\" \"$@\"")
        .arg(search.get_program())
        .args(search.get_args());
    let mut running = Running::start(cmd);
    running.wait_for_started(1);
    running.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert!(running.still_running(), "SIGHUP stopped a search started with SIGHUP ignored");
    running.signal(libc::SIGINT);
    let (code, rest) = running.finish();
    assert_eq!(code, Some(130), "{rest}");
    assert!(rest.contains("SIGINT (Ctrl-C): stopped; running trials [0] stored FAIL"), "{rest}");
}
