//! Issue 7: SIGKILL `hpo-gpu search` and `hpo-gpu train --from-study` at random moments (during
//! trials, on storage writes, while the model folder is written) and check that nothing stored is
//! lost. The checks live in scripts/kill9_search.py (also run by hand with more kills); this runs
//! it on the test binary with 20 kills and a 6-trial study, every other search start running the
//! trial array (`--slots 3`: three trials RUNNING in one process when the kill lands).

mod common;

#[test]
fn twenty_kills_lose_no_completed_trial_and_no_export() {
    let Some(python) = common::python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(python)
        .arg(common::repo().join("scripts/kill9_search.py"))
        .args(["--bin", env!("CARGO_BIN_EXE_hpo-gpu"), "--kills", "20", "--n-trials", "6", "--seed", "3"])
        .args(["--slots", "3"])
        .arg("--workdir")
        .arg(dir.path().join("work"))
        .arg("--require-optuna")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kill9 failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("kill9: all checks passed"), "{stdout}");
    assert!(stdout.contains("kills: 20 ("), "{stdout}");
    let array_starts = stdout
        .lines()
        .find_map(|l| l.strip_prefix("search starts with --slots 3: "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<u32>().ok());
    assert!(array_starts.is_some_and(|n| n >= 3), "the trial array was killed too few times:\n{stdout}");
}
