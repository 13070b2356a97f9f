//! Stopping a search with Ctrl-C (SIGINT), SIGTERM or SIGHUP: the worker's RUNNING trials are
//! stored FAIL with the signal as the reason and their parameters queued again (as a stale trial's
//! are, within `--failed-trial-max-retry`), then the process exits with 128 + the signal number.
//!
//! Without this a stopped worker's trials stay RUNNING — shown as running by Optuna and the
//! dashboard, and not counted or retried — until another worker finds them stale after the grace
//! period (60 s by default). Optuna itself fails the trial on KeyboardInterrupt.
//!
//! The signal is handled on a thread of its own (signal-hook), so training needs no cancellation
//! checks: the thread writes from its own database connection while training goes on, then ends
//! the process with `_exit` — to the study the same as a kill -9 right after a storage write, which
//! `scripts/kill9_search.py` shows to be safe. A second signal, or a database that does not answer
//! within [`CLEANUP_LIMIT`], ends the process at once; the trials then go stale as after a kill.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::storage::Storage;

/// How long the signal thread waits for the database before exiting anyway.
pub const CLEANUP_LIMIT: Duration = Duration::from_secs(5);

/// The running trials of this process's study, while a study runs.
struct Live {
    storage: Storage,
    study_id: i64,
    trial_ids: Arc<Mutex<Vec<i64>>>,
    max_retry: Option<u32>,
}

static LIVE: Mutex<Option<Live>> = Mutex::new(None);

/// Takes over SIGINT, SIGTERM and SIGHUP for the rest of the process (for `hpo-gpu search`),
/// except those the process was started with ignored: `nohup` ignores SIGHUP and a shell ignores
/// SIGINT for a background job, and a search started so must keep running as it would without us.
pub fn install() -> Result<()> {
    let wanted: Vec<i32> = [SIGINT, SIGTERM, SIGHUP].into_iter().filter(|&s| !ignored(s)).collect();
    let mut signals = Signals::new(wanted)?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Some(signal) = signals.forever().next() {
            stop(signal, &mut signals);
        }
    })?;
    Ok(())
}

/// While the returned guard lives, a signal fails the trials in `trial_ids` (kept current by the
/// caller) through `storage`, a connection of the signal thread's own.
pub fn register(
    storage: Storage,
    study_id: i64,
    trial_ids: Arc<Mutex<Vec<i64>>>,
    max_retry: Option<u32>,
) -> Registration {
    if let Ok(mut live) = LIVE.lock() {
        *live = Some(Live { storage, study_id, trial_ids, max_retry });
    }
    Registration(())
}

/// Unregisters the running study's trials when dropped (the study is over).
pub struct Registration(());

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut live) = LIVE.lock() {
            *live = None;
        }
    }
}

/// Whether `signal` is set to be ignored (inherited across exec, as `nohup` and shells do it).
fn ignored(signal: i32) -> bool {
    // SAFETY: with a null new action sigaction(2) only reads the current one into `current`, a
    // plain C struct for which all-zero bytes are a valid value.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0 && current.sa_sigaction == libc::SIG_IGN
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT (Ctrl-C)",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// Fails the registered trials (at most [`CLEANUP_LIMIT`], or until a second signal), says what
/// happened on stderr and exits.
fn stop(signal: i32, signals: &mut Signals) -> ! {
    let name = signal_name(signal);
    let (tx, rx) = std::sync::mpsc::channel();
    let reason = format!("interrupted: the worker received {name}");
    std::thread::spawn(move || {
        let _ = tx.send(fail_live_trials(&reason));
    });
    let started = std::time::Instant::now();
    let outcome = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(result) => break Some(result),
            Err(_) if started.elapsed() >= CLEANUP_LIMIT || signals.pending().next().is_some() => break None,
            Err(_) => {}
        }
    };
    match outcome {
        Some(Ok(Some(numbers))) if !numbers.is_empty() => eprintln!(
            "{name}: stopped; running trials {numbers:?} stored FAIL and queued again (within \
             --failed-trial-max-retry): run the same command to go on"
        ),
        Some(Ok(_)) => eprintln!("{name}: stopped; no trial of this worker was running"),
        Some(Err(e)) => eprintln!(
            "{name}: stopped; the running trials could not be stored FAIL ({e:#}): they stay RUNNING \
             until a worker finds them stale after --grace-period"
        ),
        None => eprintln!(
            "{name}: stopped without storing the running trials FAIL: they stay RUNNING until a worker \
             finds them stale after --grace-period"
        ),
    }
    // _exit, not exit: other threads may be inside the CUDA driver (a kernel launch), and exit's
    // handlers tear libraries down under them, which can crash the process instead of ending it
    // with this code (seen on the virtual device). The study needs nothing more, as after a kill -9
    // right after a storage write; stderr is unbuffered and stdout line-buffered, so every whole
    // line written is out.
    // SAFETY: _exit(2) ends the process at once; nothing runs after it.
    unsafe { libc::_exit(128 + signal) }
}

/// The numbers of the trials stored FAIL; None when no study is running.
fn fail_live_trials(reason: &str) -> Result<Option<Vec<u64>>> {
    let mut guard = LIVE.lock().map_err(|_| anyhow::anyhow!("the study registry is poisoned"))?;
    let Some(live) = guard.as_mut() else { return Ok(None) };
    let ids = live.trial_ids.lock().map(|t| t.clone()).unwrap_or_default();
    live.storage.fail_running_trials(live.study_id, &ids, reason, live.max_retry).map(Some)
}
