//! The search driver: ask trials, have a [`TrialRunner`] train them (as many at once as it has
//! slots), store every epoch, let the pruner decide, tell each result — until the study holds
//! `n_trials` finished trials.
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
//!
//! The runner asks for as many trials at once as it has free slots (`ask_batch`, so constant liar
//! sees the others as RUNNING); one thread beats every running trial's heartbeat, and each trial
//! is told as it ends. A trial the runner evicts (out of device memory) is FAILed and re-queued.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::StudyRef;
use super::interrupt;
use super::storage::{StartOutcome, Storage, StorageLocation, TrialCounts, best_of};
use crate::pyjson::float_repr;
use crate::search::pruner::Pruner;
use crate::search::sampler::{Sampler, StudyView, suggest_params};
use crate::search::space::SearchSpace;
use crate::trial::protocol::{EpochMetrics, TrialEnd, TrialHost, TrialRunner, Verdict};
use crate::trial::{FrozenTrial, ParamSet, StudyDirection, TrialState};

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
        metrics: &'a EpochMetrics,
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

/// Writes heartbeats for this worker's running trials from its own connection until dropped, and
/// has a signal (Ctrl-C) fail them from another ([`interrupt`]).
struct HeartbeatThread {
    trials: Arc<Mutex<Vec<i64>>>,
    stop: Option<mpsc::Sender<()>>,
    handle: Option<JoinHandle<()>>,
    _interrupt: interrupt::Registration,
}

impl HeartbeatThread {
    fn start(storage: &Storage, study_id: i64, opts: &DriverOptions) -> Result<Option<Self>> {
        // An in-memory database is private to its connection: nobody else can see it stale.
        if *storage.location() == StorageLocation::Memory {
            return Ok(None);
        }
        let interval = opts.heartbeat_interval;
        let mut conn = storage.reopen().context("opening a heartbeat connection")?;
        let on_signal = storage.reopen().context("opening a connection for stopping on a signal")?;
        let trials: Arc<Mutex<Vec<i64>>> = Arc::default();
        let beating = trials.clone();
        let (tx, rx) = mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                let ids = beating.lock().map(|t| t.clone()).unwrap_or_default();
                for id in ids {
                    // A failed beat is retried at the next interval; only a long outage makes
                    // the trial stale, which is the correct outcome then.
                    let _ = conn.record_heartbeat(id);
                }
            }
        });
        let _interrupt = interrupt::register(on_signal, study_id, trials.clone(), opts.max_retry);
        Ok(Some(HeartbeatThread { trials, stop: Some(tx), handle: Some(handle), _interrupt }))
    }

    fn add(&self, trial_id: i64) {
        if let Ok(mut t) = self.trials.lock() {
            t.push(trial_id);
        }
    }

    fn remove(&self, trial_id: i64) {
        if let Ok(mut t) = self.trials.lock() {
            t.retain(|id| *id != trial_id);
        }
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
    let mut choose = |trial: &FrozenTrial, trials: &[FrozenTrial]| {
        if let Some(seed) = opts.seed {
            sampler.reseed(trial_seed(seed, trial.number));
        }
        let view = StudyView { study_name: &study.name, direction, trials };
        let filtered = pruner.and_then(|p| p.filter_trials_for_sampler(&view, trial));
        let view = match &filtered {
            Some(ts) => StudyView { trials: ts, ..view },
            None => view,
        };
        suggest_params(sampler, &view, trial, space)
            .with_context(|| format!("sampling parameters for trial {}", trial.number))
    };
    // One transaction: start, read the history, sample, store the parameters.
    storage.start_trial_with_params(study.study_id, opts.target, opts.heartbeat, &mut choose)
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

fn epoch_attrs(m: &EpochMetrics) -> Vec<(String, String)> {
    let n = m.epoch;
    vec![
        (format!("epoch_{n}_train_loss"), float_repr(m.train_loss)),
        (format!("epoch_{n}_eval_loss"), float_repr(m.eval_loss)),
        (format!("epoch_{n}_eval_accuracy"), float_repr(m.eval_accuracy)),
        (format!("epoch_{n}_runtime"), float_repr(m.seconds())),
    ]
}

/// A trial this worker started and has not told yet.
struct LiveTrial {
    trial: FrozenTrial,
    /// The last epoch reported.
    last_step: Option<usize>,
    /// The pruner stopped it.
    pruned: bool,
}

/// What [`StudyContext::ask_trials`] got.
enum Asked {
    Started(Vec<(FrozenTrial, ParamSet)>),
    /// Nothing to start now (other trials may still end the study).
    Blocked,
    Stop(StopReason),
}

/// The study side of [`run_study`]: asking, reporting epochs, telling results, heartbeats and the
/// failure streak.
struct StudyContext<'a> {
    storage: &'a mut Storage,
    study: &'a StudyRef,
    direction: StudyDirection,
    space: &'a SearchSpace,
    sampler: &'a mut dyn Sampler,
    pruner: &'a mut dyn Pruner,
    opts: &'a DriverOptions,
    progress: &'a mut dyn Progress,
    heartbeat: Option<HeartbeatThread>,
    started: Instant,
    trials_run: u64,
    consecutive_failures: u32,
    last_failure: String,
    announced_wait: bool,
}

impl<'a> StudyContext<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        storage: &'a mut Storage,
        study: &'a StudyRef,
        space: &'a SearchSpace,
        sampler: &'a mut dyn Sampler,
        pruner: &'a mut dyn Pruner,
        opts: &'a DriverOptions,
        progress: &'a mut dyn Progress,
    ) -> Result<Self> {
        let heartbeat = HeartbeatThread::start(storage, study.study_id, opts)?;
        Ok(StudyContext {
            direction: study.direction()?,
            storage,
            study,
            space,
            sampler,
            pruner,
            opts,
            progress,
            heartbeat,
            started: Instant::now(),
            trials_run: 0,
            consecutive_failures: 0,
            last_failure: String::new(),
            announced_wait: false,
        })
    }

    /// Starts up to `k` trials. With `wait`, a study that cannot start one now because other
    /// workers' trials may complete it is polled (taking over their trials if they go stale)
    /// until a trial starts or the study stops; without, that is `Asked::Blocked`.
    fn ask_trials(&mut self, k: usize, wait: bool) -> Result<Asked> {
        loop {
            if self.opts.timeout.is_some_and(|t| self.started.elapsed() >= t) {
                return Ok(Asked::Stop(StopReason::Timeout));
            }
            let stale = self.storage.fail_stale_trials(
                self.study.study_id,
                self.opts.grace_period,
                self.opts.max_retry,
            )?;
            if !stale.is_empty() {
                self.progress.event(&StudyEvent::StaleTrialsFailed { numbers: &stale });
            }
            let ask_opts =
                AskOptions { target: Some(self.opts.n_trials), heartbeat: true, seed: self.opts.seed };
            let trials = ask_batch(
                self.storage,
                self.study,
                self.space,
                self.sampler,
                Some(&*self.pruner),
                k,
                &ask_opts,
            )?;
            if trials.is_empty() {
                let counts = self.storage.trial_counts(self.study.study_id)?;
                let finished = counts.finished_ok();
                if finished >= self.opts.n_trials {
                    return Ok(Asked::Stop(StopReason::TargetReached));
                }
                if !wait {
                    return Ok(Asked::Blocked);
                }
                if !self.announced_wait {
                    let grace = self.opts.grace_period;
                    self.progress.event(&StudyEvent::Waiting { finished, running: counts.running, grace });
                    self.announced_wait = true;
                }
                std::thread::sleep(self.opts.poll_interval);
                continue;
            }
            self.announced_wait = false;
            let mut started = Vec::with_capacity(trials.len());
            for trial in trials {
                self.trials_run += 1;
                if let Some(h) = &self.heartbeat {
                    h.add(trial.trial_id);
                }
                let params = space_params(&trial, self.space)?;
                let retry_of = trial.system_attrs.get("failed_trial").and_then(|v| v.as_u64());
                self.progress.event(&StudyEvent::TrialStarted {
                    number: trial.number,
                    params: &params,
                    retry_of,
                });
                started.push((trial, params));
            }
            return Ok(Asked::Started(started));
        }
    }

    /// Stores an epoch's report and asks the pruner.
    fn report(&mut self, live: &mut LiveTrial, m: &EpochMetrics) -> Result<Verdict> {
        if m.epoch == 0 || live.last_step.is_some_and(|s| m.epoch <= s) {
            bail!("epoch {} reported after epoch {:?}: epochs must count up from 1", m.epoch, live.last_step);
        }
        live.last_step = Some(m.epoch);
        let trial = &live.trial;
        self.storage.report(trial.trial_id, m.epoch as i64, m.objective(), &epoch_attrs(m))?;
        let decision = {
            let trials = self.storage.study_trials(self.study.study_id)?;
            let me = trials
                .iter()
                .find(|t| t.trial_id == trial.trial_id)
                .with_context(|| format!("trial {} vanished from the study", trial.number))?;
            let view = StudyView { study_name: &self.study.name, direction: self.direction, trials };
            self.pruner.prune(&view, me)?
        };
        for (key, value) in &decision.system_attrs {
            self.storage.set_trial_system_attr(trial.trial_id, key, &float_repr(*value))?;
        }
        self.progress.event(&StudyEvent::Epoch { number: trial.number, metrics: m, prune: decision.prune });
        if decision.prune {
            live.pruned = true;
            Ok(Verdict::Prune)
        } else {
            Ok(Verdict::Continue)
        }
    }

    /// Tells the trial's result: PRUNED (with the last reported value) when the pruner stopped
    /// it, else COMPLETE with `result`'s value, or FAIL with the error (or a NaN value) as reason.
    /// Errors after `max_consecutive_failures` failures in a row.
    fn tell(&mut self, live: &LiveTrial, result: Result<f64>) -> Result<()> {
        let (state, values, reason): (TrialState, Option<f64>, Option<String>) = if live.pruned {
            let stored = self.storage.trial(live.trial.trial_id)?;
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
        self.store(live, state, values, reason.as_deref())?;
        if state == TrialState::Fail {
            self.consecutive_failures += 1;
            self.last_failure = reason.unwrap_or_default();
        } else {
            self.consecutive_failures = 0;
        }
        if self.consecutive_failures >= self.opts.max_consecutive_failures.max(1) {
            bail!(
                "stopping the study: {} trials in a row failed; the last failed with: {}",
                self.consecutive_failures,
                self.last_failure
            );
        }
        Ok(())
    }

    /// FAILs a trial its worker had to drop (not its parameters' fault) and queues its
    /// parameters again; not counted as a failure in a row.
    fn tell_evicted(&mut self, live: &LiveTrial, reason: &str) -> Result<()> {
        self.store(live, TrialState::Fail, None, Some(reason))?;
        self.storage.requeue_trial(self.study.study_id, &live.trial)
    }

    fn store(
        &mut self,
        live: &LiveTrial,
        state: TrialState,
        values: Option<f64>,
        reason: Option<&str>,
    ) -> Result<()> {
        let trial = &live.trial;
        let attrs: Vec<(String, String)> =
            reason.iter().map(|r| ("fail_reason".to_string(), crate::pyjson::string_literal(r))).collect();
        let vals = values.map(|v| vec![v]);
        if let Err(e) = self.storage.set_trial_state(trial.trial_id, state, vals.as_deref(), &attrs) {
            self.progress.event(&StudyEvent::TellFailed { number: trial.number, error: &format!("{e:#}") });
        }
        // Only now: a signal before the state is stored still fails the trial.
        if let Some(h) = &self.heartbeat {
            h.remove(trial.trial_id);
        }
        let counts = self.storage.trial_counts(self.study.study_id)?;
        let best = best_of(self.storage.study_trials(self.study.study_id)?, self.direction)
            .and_then(|t| Some((t.number, t.value()?)));
        self.progress.event(&StudyEvent::TrialFinished {
            number: trial.number,
            state,
            value: values,
            reason,
            counts,
            best,
        });
        Ok(())
    }

    fn outcome(self, stop: StopReason) -> Result<StudyOutcome> {
        let trials_run = self.trials_run;
        drop(self.heartbeat);
        let counts = self.storage.trial_counts(self.study.study_id)?;
        let best = self.storage.best_trial(self.study)?;
        Ok(StudyOutcome { stop, trials_run, counts, best })
    }
}

/// [`TrialHost`] over a study.
struct StudyHost<'a> {
    cx: StudyContext<'a>,
    live: BTreeMap<u64, LiveTrial>,
    stop: Option<StopReason>,
    /// The last ask started nothing; ask again only when one of ours ends or we are idle (each
    /// ask is a database transaction, and a tick can be milliseconds).
    blocked: bool,
}

impl TrialHost for StudyHost<'_> {
    fn next_trials(&mut self, free_slots: usize, idle: bool) -> Result<Vec<(u64, ParamSet)>> {
        if self.stop.is_some() || free_slots == 0 || (self.blocked && !idle) {
            return Ok(Vec::new());
        }
        // An idle runner waits here for other workers' trials, as long as they may still
        // complete the study.
        match self.cx.ask_trials(free_slots, idle)? {
            Asked::Started(started) => {
                self.blocked = false;
                Ok(started
                    .into_iter()
                    .map(|(trial, params)| {
                        let number = trial.number;
                        self.live.insert(number, LiveTrial { trial, last_step: None, pruned: false });
                        (number, params)
                    })
                    .collect())
            }
            Asked::Blocked => {
                self.blocked = true;
                Ok(Vec::new())
            }
            Asked::Stop(reason) => {
                self.stop = Some(reason);
                Ok(Vec::new())
            }
        }
    }

    fn on_epoch(&mut self, number: u64, metrics: &EpochMetrics) -> Result<Verdict> {
        let live =
            self.live.get_mut(&number).with_context(|| format!("trial {number} is not running here"))?;
        self.cx.report(live, metrics)
    }

    fn on_end(&mut self, number: u64, end: TrialEnd) -> Result<()> {
        let live =
            self.live.remove(&number).with_context(|| format!("trial {number} is not running here"))?;
        self.blocked = false;
        match end {
            TrialEnd::Finished { result, .. } => self.cx.tell(&live, Ok(result.objective)),
            TrialEnd::Failed { reason } => self.cx.tell(&live, Err(anyhow::anyhow!(reason))),
            TrialEnd::Evicted { reason } => self.cx.tell_evicted(&live, &reason),
        }
    }
}

/// Runs the study until it holds `opts.n_trials` COMPLETE + PRUNED trials, or the timeout: asks
/// as many trials as the runner has room for in one batch (each sees the previous ones as
/// RUNNING: constant liar), keeps every running trial's heartbeat, reports epochs to the pruner
/// and tells results as trials end. Errors only for storage failures, a broken sampler, or
/// `max_consecutive_failures` failed trials in a row; a single trial's failure is stored and the
/// study goes on.
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
    let cx = StudyContext::new(storage, study, space, sampler, pruner, opts, progress)?;
    let mut host = StudyHost { cx, live: BTreeMap::new(), stop: None, blocked: false };
    runner.run_trials(&mut host)?;
    if let Some(number) = host.live.keys().next() {
        bail!("the trial runner returned while trial {number} was still running");
    }
    let stop = host.stop.unwrap_or(StopReason::TargetReached);
    host.cx.outcome(stop)
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
            StudyEvent::Epoch { number, metrics, prune } => writeln!(
                self.out,
                "trial {number} epoch {}: objective {:.4} train_loss {:.4} eval_loss {:.4} eval_accuracy {:.4} ({:.1} s){}",
                metrics.epoch,
                metrics.objective(),
                metrics.train_loss,
                metrics.eval_loss,
                metrics.eval_accuracy,
                metrics.seconds(),
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
    use crate::distributions::ParamValue;

    #[test]
    fn line_progress_prints_one_line_per_event() {
        let mut p = LineProgress { out: Vec::new(), n_trials: 5 };
        let mut params = ParamSet::new();
        params.insert("learning_rate", ParamValue::Float(2e-5));
        p.event(&StudyEvent::TrialStarted { number: 3, params: &params, retry_of: Some(1) });
        let metrics = EpochMetrics {
            epoch: 2,
            train_loss: 0.4,
            eval_loss: 0.45,
            eval_accuracy: 0.81,
            learning_rate: 1e-5,
            train_seconds: 10.0,
            eval_seconds: 2.5,
            train_examples_per_second: 250.0,
            eval_examples_per_second: 400.0,
            train_tokens_per_second: 60_000.0,
        };
        p.event(&StudyEvent::Epoch { number: 3, metrics: &metrics, prune: true });
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
