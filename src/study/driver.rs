//! The search driver: ask a trial, train it through a [`TrialRunner`], report every epoch, let the
//! pruner decide, tell the result — until the study holds `n_trials` finished trials.
//!
//! What is stored per trial (readable by Optuna, its plots and optuna-dashboard):
//! - parameters as Optuna stores them; the objective of each epoch as the intermediate value at
//!   step = epoch number (1, 2, ...), so trials with different batch sizes are comparable;
//! - user attributes per epoch n: `epoch_{n}_train_loss`, `epoch_{n}_eval_loss`,
//!   `epoch_{n}_eval_accuracy`, `epoch_{n}_runtime` (seconds of that epoch) — flat keys, so
//!   `study.trials_dataframe()` gives one column each;
//! - COMPLETE with the final objective; PRUNED with the last reported value (as Optuna's `tell`
//!   does); FAIL with the reason in the system attribute `fail_reason` (a runner error, a NaN
//!   objective), after which the study goes on.
//!
//! `n_trials` is a study total: the driver stops when COMPLETE + PRUNED trials in the study reach
//! it, counting trials from earlier runs and other workers; FAIL trials do not count. A worker only
//! starts a trial while COMPLETE + PRUNED + live RUNNING trials (those with heartbeats) are below
//! the target, checked in the transaction that starts it, so several workers together run exactly
//! `n_trials` trials. Restarting after a crash resumes: RUNNING trials whose heartbeat is older
//! than the grace period become FAIL and their parameters are re-queued (WAITING), and the
//! re-queued trials run first. While other workers' live trials could still complete the study, a
//! worker waits for them (and takes over their trials if they go stale).

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::storage::{StartOutcome, Storage, StorageLocation, TrialCounts, best_of};
use super::{FrozenTrial, ParamSet, StudyRef, TrialParam, TrialState};
use crate::search::pruner::Pruner;
use crate::search::pyjson::float_repr;
use crate::search::sampler::{Sampler, StudyView, suggest_params};
use crate::search::space::SearchSpace;

/// What the runner reports after each epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    /// 1-based epoch number; the intermediate value's step.
    pub epoch: u32,
    /// The value being optimised (e.g. eval accuracy).
    pub objective: f64,
    pub train_loss: f64,
    pub eval_loss: f64,
    pub eval_accuracy: f64,
    /// Wall time of this epoch.
    pub seconds: f64,
}

/// The driver's answer to a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Prune,
}

/// Trains trials. The CPU trainer (and later the GPU trial array) implements this.
pub trait TrialRunner {
    /// Trains one trial with `params` (names as in the search space); calls `report` after every
    /// epoch and stops early when it returns [`Verdict::Prune`] (or an error). Returns the final
    /// objective value; an `Err` marks the trial FAIL with the error as its reason.
    fn run_trial(
        &mut self,
        trial_number: u64,
        params: &ParamSet,
        report: &mut dyn FnMut(&EpochReport) -> Result<Verdict>,
    ) -> Result<f64>;
}

/// Driver settings.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Stop when the study holds this many COMPLETE + PRUNED trials.
    pub n_trials: u64,
    /// Start no new trial after this much time (a running trial is not interrupted).
    pub timeout: Option<Duration>,
    /// How often a running trial's heartbeat is written.
    pub heartbeat_interval: Duration,
    /// A RUNNING trial whose heartbeat is older than this is stale (failed and re-queued).
    pub grace_period: Duration,
    /// How often a stale trial is re-queued at most (`None`: always), as Optuna's `max_retry`.
    pub max_retry: Option<u32>,
    /// Give up after this many trials in a row fail in this run (a broken configuration should
    /// not fill the study with failures).
    pub max_consecutive_failures: u32,
    /// How often to look again while waiting for other workers' trials.
    pub poll_interval: Duration,
    /// With a seed, the sampler is reseeded from (seed, trial number) before each trial, so a
    /// study's proposals depend only on the seed and the history, also across restarts.
    pub seed: Option<u64>,
}

impl DriverOptions {
    pub fn new(n_trials: u64) -> Self {
        DriverOptions {
            n_trials,
            timeout: None,
            heartbeat_interval: Duration::from_secs(10),
            grace_period: Duration::from_secs(60),
            max_retry: Some(3),
            max_consecutive_failures: 5,
            poll_interval: Duration::from_secs(2),
            seed: None,
        }
    }
}

/// Something the driver did, for progress displays.
#[derive(Clone, Debug)]
pub enum StudyEvent<'a> {
    /// RUNNING trials found stale were marked FAIL (and re-queued when allowed).
    StaleTrialsFailed {
        numbers: &'a [u64],
    },
    TrialStarted {
        number: u64,
        params: &'a ParamSet,
        retry_of: Option<u64>,
    },
    Epoch {
        number: u64,
        report: &'a EpochReport,
        prune: bool,
    },
    TrialFinished {
        number: u64,
        state: TrialState,
        value: Option<f64>,
        reason: Option<&'a str>,
        counts: TrialCounts,
        best: Option<(u64, f64)>,
    },
    /// The result could not be stored (e.g. another worker already failed the trial as stale).
    TellFailed {
        number: u64,
        error: &'a str,
    },
    /// Other workers' trials may complete the study; waiting for them. A trial whose heartbeat
    /// stops for `grace` is taken over (e.g. one left RUNNING by a crashed earlier run).
    Waiting {
        finished: u64,
        running: u64,
        grace: Duration,
    },
}

/// Receives [`StudyEvent`]s.
pub trait Progress {
    fn event(&mut self, event: &StudyEvent);
}

/// Ignores events.
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&mut self, _: &StudyEvent) {}
}

/// Why [`run_study`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    TargetReached,
    Timeout,
}

/// The result of [`run_study`].
#[derive(Clone, Debug)]
pub struct StudyOutcome {
    pub stop: StopReason,
    /// Trials this call ran (any final state).
    pub trials_run: u64,
    pub counts: TrialCounts,
    pub best: Option<FrozenTrial>,
}

/// Writes heartbeats for one trial from its own connection until dropped.
struct HeartbeatThread {
    stop: Option<mpsc::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl HeartbeatThread {
    fn start(storage: &Storage, trial_id: i64, interval: Duration) -> Result<Option<Self>> {
        // An in-memory database is private to its connection: nobody else can see it stale.
        if *storage.location() == StorageLocation::Memory {
            return Ok(None);
        }
        let mut conn = storage.reopen().context("opening a heartbeat connection")?;
        let (tx, rx) = mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                // A failed beat is retried at the next interval; only a long outage makes the
                // trial stale, which is the correct outcome then.
                let _ = conn.record_heartbeat(trial_id);
            }
        });
        Ok(Some(HeartbeatThread { stop: Some(tx), handle: Some(handle) }))
    }
}

impl Drop for HeartbeatThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Mixes a study seed with a trial number (splitmix64), for per-trial sampler seeds.
pub fn trial_seed(seed: u64, number: u64) -> u64 {
    let mut z = seed ^ number.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How [`ask`] starts a trial.
#[derive(Clone, Copy, Debug, Default)]
pub struct AskOptions {
    /// Start nothing when COMPLETE + PRUNED + live RUNNING trials reach this.
    pub target: Option<u64>,
    /// Record the first heartbeat in the transaction that starts the trial.
    pub heartbeat: bool,
    /// Reseed the sampler from (seed, trial number) before sampling.
    pub seed: Option<u64>,
}

/// Starts a trial and fills in its parameters: Optuna's `study.ask()` for a fixed space. A
/// WAITING trial (re-queued or enqueued) is taken first; its stored or `fixed_params` values are
/// kept. Returns `TargetReached` instead when the target is reached.
pub fn ask(
    storage: &mut Storage,
    study: &StudyRef,
    space: &SearchSpace,
    sampler: &mut dyn Sampler,
    pruner: Option<&dyn Pruner>,
    opts: &AskOptions,
) -> Result<StartOutcome> {
    let direction = study.direction()?;
    let trial = match storage.start_trial(study.study_id, opts.target, opts.heartbeat)? {
        StartOutcome::Started(t) => t,
        reached => return Ok(reached),
    };
    if let Some(seed) = opts.seed {
        sampler.reseed(trial_seed(seed, trial.number));
    }
    let params = {
        let trials = storage.study_trials(study.study_id)?;
        let view = StudyView { study_name: &study.name, direction, trials };
        let filtered = pruner.and_then(|p| p.filter_trials_for_sampler(&view, &trial));
        let view = match &filtered {
            Some(ts) => StudyView { trials: ts, ..view },
            None => view,
        };
        suggest_params(sampler, &view, &trial, space)
            .with_context(|| format!("sampling parameters for trial {}", trial.number))?
    };
    let new: Vec<_> = params.into_iter().filter(|(name, _, _)| trial.param(name).is_none()).collect();
    if new.is_empty() {
        return Ok(StartOutcome::Started(trial));
    }
    storage.set_trial_params(trial.trial_id, &new)?;
    // The stored trial is the started one plus these params; no need to read it back.
    let mut trial = trial;
    for (name, internal, distribution) in new {
        let value = distribution.to_external(internal)?;
        trial.params.push(TrialParam { name, internal, value, distribution });
    }
    Ok(StartOutcome::Started(trial))
}

/// Asks `k` trials at once. Each sees the previous ones as RUNNING, so with constant liar (TPE's
/// default) the proposals differ. Stops early if the target is reached.
pub fn ask_batch(
    storage: &mut Storage,
    study: &StudyRef,
    space: &SearchSpace,
    sampler: &mut dyn Sampler,
    pruner: Option<&dyn Pruner>,
    k: usize,
    opts: &AskOptions,
) -> Result<Vec<FrozenTrial>> {
    let mut out = Vec::with_capacity(k);
    for _ in 0..k {
        match ask(storage, study, space, sampler, pruner, opts)? {
            StartOutcome::Started(t) => out.push(t),
            StartOutcome::TargetReached { .. } => break,
        }
    }
    Ok(out)
}

/// The params of `trial` restricted to `space`, in the space's order.
fn space_params(trial: &FrozenTrial, space: &SearchSpace) -> Result<ParamSet> {
    let mut set = ParamSet::new();
    for (name, _) in space.iter() {
        let p =
            trial.param(name).with_context(|| format!("trial {} has no parameter {name}", trial.number))?;
        set.insert(name, p.value.clone());
    }
    Ok(set)
}

fn epoch_attrs(r: &EpochReport) -> Vec<(String, String)> {
    let n = r.epoch;
    vec![
        (format!("epoch_{n}_train_loss"), float_repr(r.train_loss)),
        (format!("epoch_{n}_eval_loss"), float_repr(r.eval_loss)),
        (format!("epoch_{n}_eval_accuracy"), float_repr(r.eval_accuracy)),
        (format!("epoch_{n}_runtime"), float_repr(r.seconds)),
    ]
}

/// Runs the study until it holds `opts.n_trials` COMPLETE + PRUNED trials, or the timeout.
/// Errors only for storage failures, a broken sampler, or `max_consecutive_failures` failed
/// trials in a row; a single trial's failure is stored and the study goes on.
#[allow(clippy::too_many_arguments)]
pub fn run_study(
    storage: &mut Storage,
    study: &StudyRef,
    space: &SearchSpace,
    sampler: &mut dyn Sampler,
    pruner: &mut dyn Pruner,
    opts: &DriverOptions,
    runner: &mut dyn TrialRunner,
    progress: &mut dyn Progress,
) -> Result<StudyOutcome> {
    let direction = study.direction()?;
    let started = Instant::now();
    let mut trials_run = 0u64;
    let mut consecutive_failures = 0u32;
    let mut last_failure = String::new();
    let mut announced_wait = false;
    let stop = loop {
        if opts.timeout.is_some_and(|t| started.elapsed() >= t) {
            break StopReason::Timeout;
        }
        let stale = storage.fail_stale_trials(study.study_id, opts.grace_period, opts.max_retry)?;
        if !stale.is_empty() {
            progress.event(&StudyEvent::StaleTrialsFailed { numbers: &stale });
        }
        let ask_opts = AskOptions { target: Some(opts.n_trials), heartbeat: true, seed: opts.seed };
        let trial = match ask(storage, study, space, sampler, Some(&*pruner), &ask_opts)? {
            StartOutcome::Started(t) => t,
            StartOutcome::TargetReached { finished, running } => {
                if finished >= opts.n_trials {
                    break StopReason::TargetReached;
                }
                if !announced_wait {
                    progress.event(&StudyEvent::Waiting { finished, running, grace: opts.grace_period });
                    announced_wait = true;
                }
                std::thread::sleep(opts.poll_interval);
                continue;
            }
        };
        announced_wait = false;
        trials_run += 1;
        let params = space_params(&trial, space)?;
        let retry_of = trial.system_attrs.get("failed_trial").and_then(|v| v.as_u64());
        progress.event(&StudyEvent::TrialStarted { number: trial.number, params: &params, retry_of });

        let heartbeat = HeartbeatThread::start(storage, trial.trial_id, opts.heartbeat_interval)?;
        let mut pruned = false;
        let mut last_step: Option<u32> = None;
        let result = {
            let storage = &mut *storage;
            let pruner = &mut *pruner;
            let progress = &mut *progress;
            let pruned = &mut pruned;
            let last_step = &mut last_step;
            let mut report = |r: &EpochReport| -> Result<Verdict> {
                if r.epoch == 0 || last_step.is_some_and(|s| r.epoch <= s) {
                    bail!(
                        "epoch {} reported after epoch {:?}: epochs must count up from 1",
                        r.epoch,
                        last_step
                    );
                }
                *last_step = Some(r.epoch);
                storage.report(trial.trial_id, i64::from(r.epoch), r.objective, &epoch_attrs(r))?;
                let decision = {
                    let trials = storage.study_trials(study.study_id)?;
                    let me = trials
                        .iter()
                        .find(|t| t.trial_id == trial.trial_id)
                        .with_context(|| format!("trial {} vanished from the study", trial.number))?;
                    let view = StudyView { study_name: &study.name, direction, trials };
                    pruner.prune(&view, me)?
                };
                for (key, value) in &decision.system_attrs {
                    storage.set_trial_system_attr(trial.trial_id, key, &float_repr(*value))?;
                }
                progress.event(&StudyEvent::Epoch { number: trial.number, report: r, prune: decision.prune });
                if decision.prune {
                    *pruned = true;
                    Ok(Verdict::Prune)
                } else {
                    Ok(Verdict::Continue)
                }
            };
            runner.run_trial(trial.number, &params, &mut report)
        };
        drop(heartbeat);

        let (state, values, reason): (TrialState, Option<f64>, Option<String>) = if pruned {
            let stored = storage.trial(trial.trial_id)?;
            let last = stored.last_step().map(|s| stored.intermediate_values[&s]).filter(|v| !v.is_nan());
            (TrialState::Pruned, last, None)
        } else {
            match result {
                Ok(v) if v.is_nan() => {
                    (TrialState::Fail, None, Some("the objective value is NaN".to_string()))
                }
                Ok(v) => (TrialState::Complete, Some(v), None),
                Err(e) => (TrialState::Fail, None, Some(format!("{e:#}"))),
            }
        };
        let attrs: Vec<(String, String)> = reason
            .iter()
            .map(|r| ("fail_reason".to_string(), crate::search::pyjson::string_literal(r)))
            .collect();
        let vals = values.map(|v| vec![v]);
        if let Err(e) = storage.set_trial_state(trial.trial_id, state, vals.as_deref(), &attrs) {
            progress.event(&StudyEvent::TellFailed { number: trial.number, error: &format!("{e:#}") });
        }
        if state == TrialState::Fail {
            consecutive_failures += 1;
            last_failure = reason.clone().unwrap_or_default();
        } else {
            consecutive_failures = 0;
        }
        let counts = storage.trial_counts(study.study_id)?;
        let best = best_of(storage.study_trials(study.study_id)?, direction)
            .and_then(|t| Some((t.number, t.value()?)));
        progress.event(&StudyEvent::TrialFinished {
            number: trial.number,
            state,
            value: values,
            reason: reason.as_deref(),
            counts,
            best,
        });
        if consecutive_failures >= opts.max_consecutive_failures.max(1) {
            bail!(
                "stopping the study: {consecutive_failures} trials in a row failed; the last failed with: {last_failure}"
            );
        }
    };
    let counts = storage.trial_counts(study.study_id)?;
    let best = storage.best_trial(study)?;
    Ok(StudyOutcome { stop, trials_run, counts, best })
}

/// A plain progress display on stderr: one line per trial event, and per epoch.
pub struct LineProgress<W: std::io::Write> {
    pub out: W,
    pub n_trials: u64,
}

impl<W: std::io::Write> Progress for LineProgress<W> {
    fn event(&mut self, event: &StudyEvent) {
        let _ = match event {
            StudyEvent::StaleTrialsFailed { numbers } => {
                writeln!(self.out, "stale trials {numbers:?} marked FAIL and re-queued")
            }
            StudyEvent::TrialStarted { number, params, retry_of } => match retry_of {
                Some(orig) => writeln!(
                    self.out,
                    "trial {number} started (retry of trial {orig}): {}",
                    params.to_py_json()
                ),
                None => writeln!(self.out, "trial {number} started: {}", params.to_py_json()),
            },
            StudyEvent::Epoch { number, report, prune } => writeln!(
                self.out,
                "trial {number} epoch {}: objective {:.4} train_loss {:.4} eval_loss {:.4} eval_accuracy {:.4} ({:.1} s){}",
                report.epoch,
                report.objective,
                report.train_loss,
                report.eval_loss,
                report.eval_accuracy,
                report.seconds,
                if *prune { " -> pruned" } else { "" }
            ),
            StudyEvent::TrialFinished { number, state, value, reason, counts, best } => {
                let value = value.map(|v| format!(" value {v:.6}")).unwrap_or_default();
                let reason = reason.map(|r| format!(" ({r})")).unwrap_or_default();
                let best = best.map(|(n, v)| format!("; best: trial {n} = {v:.6}")).unwrap_or_default();
                writeln!(
                    self.out,
                    "trial {number} {state}{value}{reason} [{}/{} done, {} running, {} failed{best}]",
                    counts.finished_ok(),
                    self.n_trials,
                    counts.running,
                    counts.fail
                )
            }
            StudyEvent::TellFailed { number, error } => {
                writeln!(self.out, "trial {number}: result not stored: {error}")
            }
            StudyEvent::Waiting { finished, running, grace } => writeln!(
                self.out,
                "{finished}/{} trials done, {running} running elsewhere; waiting for them \
                 (a trial without a heartbeat for {} s is taken over)",
                self.n_trials,
                grace.as_secs()
            ),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::distributions::ParamValue;

    #[test]
    fn line_progress_prints_one_line_per_event() {
        let mut p = LineProgress { out: Vec::new(), n_trials: 5 };
        let mut params = ParamSet::new();
        params.insert("learning_rate", ParamValue::Float(2e-5));
        p.event(&StudyEvent::TrialStarted { number: 3, params: &params, retry_of: Some(1) });
        let report = EpochReport {
            epoch: 2,
            objective: 0.81,
            train_loss: 0.4,
            eval_loss: 0.45,
            eval_accuracy: 0.81,
            seconds: 12.5,
        };
        p.event(&StudyEvent::Epoch { number: 3, report: &report, prune: true });
        let counts = TrialCounts { running: 1, waiting: 0, complete: 2, pruned: 1, fail: 1 };
        p.event(&StudyEvent::TrialFinished {
            number: 3,
            state: TrialState::Pruned,
            value: Some(0.81),
            reason: None,
            counts,
            best: Some((0, 0.85)),
        });
        p.event(&StudyEvent::Waiting { finished: 4, running: 1, grace: Duration::from_secs(60) });
        let text = String::from_utf8(p.out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], r#"trial 3 started (retry of trial 1): {"learning_rate": 2e-05}"#);
        assert_eq!(
            lines[1],
            "trial 3 epoch 2: objective 0.8100 train_loss 0.4000 eval_loss 0.4500 eval_accuracy 0.8100 (12.5 s) -> pruned"
        );
        assert_eq!(
            lines[2],
            "trial 3 PRUNED value 0.810000 [3/5 done, 1 running, 1 failed; best: trial 0 = 0.850000]"
        );
        assert!(
            lines[3].starts_with("4/5 trials done, 1 running elsewhere") && lines[3].contains("60 s"),
            "{}",
            lines[3]
        );
    }

    #[test]
    fn trial_seeds_differ_per_trial_and_repeat_per_seed() {
        assert_eq!(trial_seed(7, 3), trial_seed(7, 3));
        assert_ne!(trial_seed(7, 3), trial_seed(7, 4));
        assert_ne!(trial_seed(7, 3), trial_seed(8, 3));
    }
}
