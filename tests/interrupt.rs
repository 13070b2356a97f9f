//! Stopping `hpo-gpu search` with SIGINT (Ctrl-C) or SIGTERM: the running trials are stored FAIL
//! with the signal as the reason and queued again, the process exits with 128 + the signal, and
//! the same command goes on from there (src/study/interrupt.rs).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hpo_gpu::study::TrialState;
use hpo_gpu::study::storage::Storage;

/// The signals a search handles back to their defaults in the child, as in a terminal: the test
/// may itself run with SIGINT or SIGHUP ignored (a background job of a script, `nohup`), and the
/// search rightly keeps signals it was started with ignored.
fn with_default_signals(cmd: &mut Command) -> &mut Command {
    // SAFETY: signal(2) is async-signal-safe, as pre_exec requires; it only resets dispositions.
    unsafe {
        cmd.pre_exec(|| {
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                if libc::signal(signal, libc::SIG_DFL) == libc::SIG_ERR {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
    }
}

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

/// A running `hpo-gpu search` whose stderr is read on a thread of its own, so that its epoch lines
/// never fill the pipe (a full pipe would block the signal thread's last line, and the exit).
struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: String,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start hpo-gpu");
        let stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines, stderr: String::new() }
    }

    /// Returns once `n` trials have started (then training is under way in them).
    fn wait_for_started(&mut self, n: usize) {
        let mut seen = 0;
        while seen < n {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no {n} trials started within 60 s:\n{}", self.stderr));
            seen += usize::from(line.starts_with("trial ") && line.contains(" started"));
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
        // Inside training, not on the start's storage write.
        std::thread::sleep(Duration::from_millis(300));
    }

    fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("a pid fits in i32");
        // SAFETY: kill(2) on our own child process, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().expect("poll hpo-gpu").is_none()
    }

    /// The exit code and all of stderr; a child still running 60 s after the signal is killed
    /// and the test fails, rather than hanging on a signal that did not stop it.
    fn finish(mut self) -> (Option<i32>, String) {
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("poll hpo-gpu") {
                break status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("hpo-gpu did not exit within 60 s of the signal:\n{}", self.stderr);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader ends at the pipe's end, which the exit closed.
        for line in self.lines.iter() {
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
        (status.code(), self.stderr)
    }
}

/// Starts `cmd`, waits until `started` trials have started, sends `signal`; the exit code and
/// stderr.
fn stop_after_start(cmd: Command, started: usize, signal: i32) -> (Option<i32>, String) {
    let mut running = Running::start(cmd);
    running.wait_for_started(started);
    running.signal(signal);
    running.finish()
}

fn trials(dir: &Path) -> Vec<hpo_gpu::study::FrozenTrial> {
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
