//! The training engine: T slots train T trials at once, one micro-batch per slot per tick. Every
//! training run goes through here — `hpo-gpu train` is one slot, a search one or many — on any
//! [`ArrayBackend`] (the CPU reference, the GPU).
//!
//! Each slot is an independent stream with the Trainer's semantics (see `src/train.rs`): its own
//! seeded epoch order, position, optimizer step counter and linear schedule. A trial with batch
//! size b takes b/m micro-batches of m examples per optimizer step ([`MicroBatch::Fixed`]), or
//! the whole batch at once ([`MicroBatch::WholeBatch`]); the epoch's last, short batch of L < b
//! examples takes ceil(L/m) micro-batches (the last possibly short) and every example of a batch
//! is scaled by 1/(its batch's length), so the accumulated gradient is the batch-mean loss's.
//! Only summation order depends on m: results agree to rounding.
//!
//! After its last micro-batch of an epoch a slot is evaluated, its best epoch's weights kept (per
//! `TrainConfig::best_by`) and the host asked whether to go on. A slot whose trial finished, was
//! pruned or failed (a non-finite loss, gradient norm or eval logits: that trial only) takes the
//! host's next trial in the same tick, so it trains again from the next tick on.
//!
//! Out of memory: a backend `OutOfMemory` error changes nothing; the scheduler frees the last
//! slot (its trial, if any, ends as `Evicted`), shrinks the backend and retries the op.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};

use super::{ArrayBackend, ArrayError, ArrayResult, SlotEval, SlotMicroBatch, SlotOptimizerStep};
use crate::cpu::adamw::linear_schedule;
use crate::cpu::bert::{Batch, Dropout, DropoutProbs};
use crate::cpu::philox::DropoutRng;
use crate::data::batch::TokenizedSplit;
use crate::train::{EpochOrder, StepPlan, TrainConfig};
use crate::trial::ParamSet;
use crate::trial::protocol::{
    EpochMetrics, EpochProgress, TrainResult, TrialEnd, TrialHost, TrialRunner, Verdict,
};

/// A trial to train in a slot.
#[derive(Clone, Debug)]
pub struct ArrayTrial {
    pub cfg: TrainConfig,
    /// Starting parameters (P values).
    pub initial_params: Vec<f32>,
    pub dropout: DropoutProbs,
    /// Dropout generator stream (trials run alone or in a study use 0).
    pub dropout_stream: u32,
    pub train: Arc<TokenizedSplit>,
    pub eval: Arc<TokenizedSplit>,
}

/// Turns a host's trial (number and parameters) into what a slot trains.
pub trait TrialBuilder {
    /// An error fails the trial with it as the reason.
    fn build(&mut self, number: u64, params: &ParamSet) -> Result<ArrayTrial>;
}

/// Examples per slot per tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MicroBatch {
    /// m examples; m must divide every trial's batch size (a GPU array sizes its buffers by m).
    Fixed(usize),
    /// Each slot's whole optimizer batch in one pass (the CPU reference's fastest way).
    WholeBatch,
}

/// Scheduler settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArrayOptions {
    pub micro_batch: MicroBatch,
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArrayStats {
    pub ticks: u64,
    pub trials_started: u64,
    /// Slots left at the end (fewer than at the start after out-of-memory shrinking).
    pub slots: usize,
}

/// One slot's training stream.
struct Slot {
    /// The host's trial number.
    number: u64,
    trial: ArrayTrial,
    plan: StepPlan,
    order: EpochOrder,
    /// The current epoch's example order.
    epoch_order: Vec<usize>,
    /// 1-based current epoch.
    epoch: usize,
    /// Next example of `epoch_order` to train on.
    pos: usize,
    /// First example of the current optimizer batch.
    batch_start: usize,
    /// Optimizer steps taken (over all epochs): the schedule's step index.
    steps_done: u64,
    /// Micro-batches run since the trial was loaded: the dropout generator's step.
    micro_batches: u32,
    /// Sum of per-example losses of the current optimizer batch.
    batch_loss: f64,
    /// Sum of this epoch's batch-mean losses.
    epoch_loss: f64,
    lr: f64,
    epoch_started: Instant,
    epochs: Vec<EpochMetrics>,
    best_score: Option<f64>,
    best_epoch: usize,
}

impl Slot {
    fn new(number: u64, mut trial: ArrayTrial) -> Self {
        let plan = StepPlan::new(&trial.cfg, trial.train.len());
        let mut order = EpochOrder::new(trial.train.len(), trial.cfg.seed);
        let epoch_order = order.next_epoch().to_vec();
        trial.initial_params = Vec::new();
        let lr = trial.cfg.learning_rate;
        Slot {
            number,
            trial,
            plan,
            order,
            epoch_order,
            epoch: 1,
            pos: 0,
            batch_start: 0,
            steps_done: 0,
            micro_batches: 0,
            batch_loss: 0.0,
            epoch_loss: 0.0,
            lr,
            epoch_started: Instant::now(),
            epochs: Vec::new(),
            best_score: None,
            best_epoch: 0,
        }
    }

    fn examples(&self) -> usize {
        self.epoch_order.len()
    }

    fn batch_end(&self) -> usize {
        (self.batch_start + self.trial.cfg.batch_size).min(self.examples())
    }

    /// The next micro-batch: packed examples, their loss scale and dropout.
    fn micro_batch(&self, micro_batch: MicroBatch) -> (Batch, f32, Dropout) {
        let m = match micro_batch {
            MicroBatch::Fixed(m) => m,
            MicroBatch::WholeBatch => self.trial.cfg.batch_size,
        };
        let end = (self.pos + m).min(self.batch_end());
        let batch = self.trial.train.packed_batch(&self.epoch_order[self.pos..end]);
        let scale = 1.0 / (self.batch_end() - self.batch_start) as f32;
        let rng = DropoutRng {
            seed: self.trial.cfg.seed,
            stream: self.trial.dropout_stream,
            step: self.micro_batches,
        };
        (batch, scale, Dropout::new(self.trial.dropout, rng))
    }
}

/// Why a trial cannot run in this array, if it cannot.
fn unfit(trial: &ArrayTrial, micro_batch: MicroBatch, param_len: usize) -> Option<String> {
    if let Err(e) = trial.cfg.validate() {
        return Some(format!("{e:#}"));
    }
    if trial.train.is_empty() || trial.eval.is_empty() {
        return Some("training needs a non-empty train and eval split".to_string());
    }
    if let MicroBatch::Fixed(m) = micro_batch
        && !trial.cfg.batch_size.is_multiple_of(m)
    {
        return Some(format!(
            "batch size {} is not a multiple of the trial array's micro-batch size {m}",
            trial.cfg.batch_size
        ));
    }
    if trial.initial_params.len() != param_len {
        return Some(format!(
            "{} initial parameters for an array of models with {param_len}",
            trial.initial_params.len()
        ));
    }
    None
}

/// Backend work items name their slot.
trait SlotWork {
    fn slot(&self) -> usize;
}
impl SlotWork for SlotMicroBatch<'_> {
    fn slot(&self) -> usize {
        self.slot
    }
}
impl SlotWork for SlotOptimizerStep {
    fn slot(&self) -> usize {
        self.slot
    }
}
impl SlotWork for SlotEval<'_> {
    fn slot(&self) -> usize {
        self.slot
    }
}

/// The scheduler's state besides the backend and host.
struct Array<'a> {
    slots: Vec<Option<Slot>>,
    micro_batch: MicroBatch,
    trials: &'a mut dyn TrialBuilder,
    stats: ArrayStats,
}

impl Array<'_> {
    fn active(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.slots[i].is_some()).collect()
    }

    fn slot(&mut self, i: usize) -> &mut Slot {
        self.slots[i].as_mut().expect("an active slot")
    }

    /// Frees slot `i` and tells the host how its trial ended.
    fn end(&mut self, host: &mut dyn TrialHost, i: usize, end: TrialEnd) -> Result<()> {
        if let Some(s) = self.slots[i].take() {
            host.on_end(s.number, end)?;
        }
        Ok(())
    }

    /// Frees the last slot after an out-of-memory error (evicting its trial) and shrinks the backend.
    fn shrink(&mut self, backend: &mut dyn ArrayBackend, host: &mut dyn TrialHost, why: &str) -> Result<()> {
        let t = self.slots.len();
        if t <= 1 {
            bail!("{}: out of device memory with a single trial-array slot: {why}", backend.describe());
        }
        let reason = format!("evicted from the trial array, which shrank from {t} to {} slots: {why}", t - 1);
        self.end(host, t - 1, TrialEnd::Evicted { reason })?;
        self.slots.truncate(t - 1);
        backend.shrink(t - 1).map_err(anyhow::Error::from)?;
        Ok(())
    }

    /// Runs `op` on `work`, shrinking the array and dropping evicted slots' items on
    /// out-of-memory. Returns (slot, result) pairs.
    fn call<W: SlotWork, T>(
        &mut self,
        backend: &mut dyn ArrayBackend,
        host: &mut dyn TrialHost,
        mut work: Vec<W>,
        mut op: impl FnMut(&mut dyn ArrayBackend, &[W]) -> ArrayResult<Vec<T>>,
    ) -> Result<Vec<(usize, T)>> {
        loop {
            if work.is_empty() {
                return Ok(Vec::new());
            }
            match op(backend, &work) {
                Ok(out) => {
                    if out.len() != work.len() {
                        bail!(
                            "{}: the backend returned {} results for {} slots",
                            backend.describe(),
                            out.len(),
                            work.len()
                        );
                    }
                    return Ok(work.iter().map(|w| w.slot()).zip(out).collect());
                }
                Err(ArrayError::OutOfMemory(why)) => {
                    self.shrink(backend, host, &why)?;
                    let t = self.slots.len();
                    work.retain(|w| w.slot() < t);
                }
                Err(ArrayError::Other(e)) => return Err(e),
            }
        }
    }

    /// Puts the host's next trials into free slots, until they are full or the host has none.
    fn fill(&mut self, backend: &mut dyn ArrayBackend, host: &mut dyn TrialHost) -> Result<()> {
        loop {
            let free: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].is_none()).collect();
            if free.is_empty() {
                return Ok(());
            }
            let idle = free.len() == self.slots.len();
            let trials = host.next_trials(free.len(), idle)?;
            if trials.is_empty() {
                return Ok(());
            }
            if trials.len() > free.len() {
                bail!("the host gave {} trials for {} free slots", trials.len(), free.len());
            }
            for ((number, params), i) in trials.into_iter().zip(free) {
                let trial = match self.trials.build(number, &params) {
                    Ok(trial) => trial,
                    Err(e) => {
                        host.on_end(number, TrialEnd::Failed { reason: format!("{e:#}") })?;
                        continue;
                    }
                };
                if let Some(reason) = unfit(&trial, self.micro_batch, backend.param_len()) {
                    host.on_end(number, TrialEnd::Failed { reason })?;
                    continue;
                }
                if i >= self.slots.len() {
                    // The array shrank while placing this batch of trials.
                    let reason =
                        "evicted from the trial array before it started: out of device memory".into();
                    host.on_end(number, TrialEnd::Evicted { reason })?;
                    continue;
                }
                match backend.load_slot(i, &trial.initial_params) {
                    Ok(()) => {
                        self.slots[i] = Some(Slot::new(number, trial));
                        self.stats.trials_started += 1;
                    }
                    Err(ArrayError::OutOfMemory(why)) => {
                        let reason = format!("evicted from the trial array before it started: {why}");
                        host.on_end(number, TrialEnd::Evicted { reason })?;
                        self.shrink(backend, host, &why)?;
                    }
                    Err(ArrayError::Other(e)) => {
                        host.on_end(number, TrialEnd::Failed { reason: format!("{e:#}") })?;
                    }
                }
            }
        }
    }

    /// One micro-batch for every active slot, then the optimizer steps and epoch ends it brings.
    fn tick(&mut self, backend: &mut dyn ArrayBackend, host: &mut dyn TrialHost) -> Result<()> {
        self.stats.ticks += 1;
        let micro_batch = self.micro_batch;
        let active = self.active();
        let prepared: Vec<(usize, Batch, f32, Dropout)> = active
            .iter()
            .map(|&i| {
                let (b, scale, d) = self.slots[i].as_ref().expect("active").micro_batch(micro_batch);
                (i, b, scale, d)
            })
            .collect();
        let work: Vec<SlotMicroBatch> = prepared
            .iter()
            .map(|(i, b, scale, d)| SlotMicroBatch { slot: *i, batch: b, loss_scale: *scale, dropout: *d })
            .collect();
        // Sized before the call: the array may shrink in it.
        let mut examples = vec![0usize; self.slots.len()];
        for (i, b, _, _) in &prepared {
            examples[*i] = b.seqs.len();
        }
        let losses = self.call(backend, host, work, |b, w| b.forward_backward(w))?;
        for (i, loss) in losses {
            let s = self.slot(i);
            s.pos += examples[i];
            s.micro_batches = s.micro_batches.wrapping_add(1);
            if !loss.is_finite() {
                let reason = format!(
                    "training diverged: the loss is {loss} at epoch {}, optimizer step {}",
                    s.epoch,
                    s.steps_done + 1
                );
                self.end(host, i, TrialEnd::Failed { reason })?;
                continue;
            }
            s.batch_loss += loss;
        }

        // Optimizer steps for the slots whose batch is complete.
        let stepping: Vec<SlotOptimizerStep> = self
            .active()
            .into_iter()
            .filter_map(|i| {
                let s = self.slots[i].as_ref().expect("active");
                (s.pos == s.batch_end()).then(|| {
                    let c = &s.trial.cfg;
                    let lr =
                        linear_schedule(c.learning_rate, s.steps_done, s.plan.total_steps, s.plan.warmup);
                    SlotOptimizerStep { slot: i, lr, adamw: c.optimizer(), max_grad_norm: c.max_grad_norm }
                })
            })
            .collect();
        let mut lrs = vec![0.0f64; self.slots.len()];
        for w in &stepping {
            lrs[w.slot] = w.lr;
        }
        let norms = self.call(backend, host, stepping, |b, w| b.optimizer_step(w))?;
        for (i, norm) in norms {
            let s = self.slot(i);
            if !norm.is_finite() {
                let reason = format!(
                    "training diverged: the gradient norm is {norm} at epoch {}, optimizer step {}",
                    s.epoch,
                    s.steps_done + 1
                );
                self.end(host, i, TrialEnd::Failed { reason })?;
                continue;
            }
            let len = s.pos - s.batch_start;
            let batch_loss = s.batch_loss / len as f64;
            s.epoch_loss += batch_loss;
            s.batch_loss = 0.0;
            s.batch_start = s.pos;
            s.steps_done += 1;
            s.lr = lrs[i];
            let progress = EpochProgress {
                epoch: s.epoch,
                epochs: s.trial.cfg.epochs,
                done: s.pos,
                examples: s.examples(),
                loss: batch_loss,
            };
            host.on_progress(s.number, &progress);
        }

        // Epoch ends: evaluate every slot that finished its epoch in one call.
        let ending: Vec<usize> = self
            .active()
            .into_iter()
            .filter(|&i| {
                let s = self.slots[i].as_ref().expect("active");
                s.pos == s.examples()
            })
            .collect();
        if ending.is_empty() {
            return Ok(());
        }
        let mut train_seconds = vec![0.0f64; self.slots.len()];
        for &i in &ending {
            train_seconds[i] = self.slots[i].as_ref().expect("active").epoch_started.elapsed().as_secs_f64();
        }
        let evals: Vec<(usize, Arc<TokenizedSplit>, usize)> = ending
            .iter()
            .map(|&i| {
                let s = self.slots[i].as_ref().expect("active");
                (i, s.trial.eval.clone(), s.trial.cfg.eval_batch_size)
            })
            .collect();
        let work: Vec<SlotEval> =
            evals.iter().map(|(i, split, bs)| SlotEval { slot: *i, split, batch_size: *bs }).collect();
        let t0 = Instant::now();
        let results = self.call(backend, host, work, |b, w| b.evaluate(w))?;
        let eval_seconds = t0.elapsed().as_secs_f64();
        for (i, (eval_loss, eval_accuracy)) in results {
            if !eval_loss.is_finite() {
                let reason = "the model produced non-finite logits".to_string();
                self.end(host, i, TrialEnd::Failed { reason })?;
                continue;
            }
            let train_seconds = train_seconds[i];
            let s = self.slot(i);
            let (n, tokens) = (s.trial.train.len() as f64, s.trial.train.tokens() as f64);
            let metrics = EpochMetrics {
                epoch: s.epoch,
                train_loss: s.epoch_loss / s.plan.steps_per_epoch as f64,
                eval_loss,
                eval_accuracy,
                learning_rate: s.lr,
                train_seconds,
                eval_seconds,
                train_examples_per_second: n / train_seconds,
                eval_examples_per_second: s.trial.eval.len() as f64 / eval_seconds,
                train_tokens_per_second: tokens / train_seconds,
            };
            let score = s.trial.cfg.best_by.score(eval_loss, eval_accuracy);
            let improved = s.best_score.is_none_or(|b| score > b);
            if improved {
                s.best_score = Some(score);
                s.best_epoch = s.epoch;
            }
            s.epochs.push(metrics.clone());
            let number = s.number;
            if improved {
                backend.keep_best(i).map_err(anyhow::Error::from)?;
            }
            let verdict = match host.on_epoch(number, &metrics) {
                Ok(v) => v,
                Err(e) => {
                    self.end(host, i, TrialEnd::Failed { reason: format!("{e:#}") })?;
                    continue;
                }
            };
            let s = self.slot(i);
            if verdict == Verdict::Prune || s.epoch == s.trial.cfg.epochs {
                backend.restore_best(i).map_err(anyhow::Error::from)?;
                let params = backend.read_params(i).map_err(anyhow::Error::from)?;
                let s = self.slots[i].as_ref().expect("active");
                let mut result = TrainResult {
                    epochs: s.epochs.clone(),
                    best_epoch: s.best_epoch,
                    objective: 0.0,
                    pruned: verdict == Verdict::Prune,
                };
                result.objective = s.trial.cfg.objective.value(&result.epochs, result.best_epoch);
                self.end(host, i, TrialEnd::Finished { result, params })?;
            } else {
                s.epoch += 1;
                s.epoch_order = s.order.next_epoch().to_vec();
                s.pos = 0;
                s.batch_start = 0;
                s.epoch_loss = 0.0;
                s.epoch_started = Instant::now();
            }
        }
        Ok(())
    }
}

/// Trains the host's trials on `backend` until the host has no more and every slot is free;
/// `trials` turns each into what a slot trains.
pub fn run_array(
    backend: &mut dyn ArrayBackend,
    trials: &mut dyn TrialBuilder,
    host: &mut dyn TrialHost,
    opts: &ArrayOptions,
) -> Result<ArrayStats> {
    if opts.micro_batch == MicroBatch::Fixed(0) {
        bail!("the trial array's micro-batch size must be at least 1");
    }
    if backend.slots() == 0 {
        bail!("{}: the trial array has no slots", backend.describe());
    }
    let mut array = Array {
        slots: (0..backend.slots()).map(|_| None).collect(),
        micro_batch: opts.micro_batch,
        trials,
        stats: ArrayStats::default(),
    };
    loop {
        array.fill(backend, host)?;
        if array.active().is_empty() {
            break;
        }
        array.tick(backend, host)?;
    }
    array.stats.slots = array.slots.len();
    Ok(array.stats)
}

/// The engine as a [`TrialRunner`]: a backend, what turns a host's trials into slot trials, and
/// the scheduler's settings.
pub struct Engine<'a> {
    pub backend: Box<dyn ArrayBackend + 'a>,
    pub trials: Box<dyn TrialBuilder + 'a>,
    pub options: ArrayOptions,
}

impl TrialRunner for Engine<'_> {
    fn run_trials(&mut self, host: &mut dyn TrialHost) -> Result<()> {
        run_array(self.backend.as_mut(), self.trials.as_mut(), host, &self.options)?;
        Ok(())
    }
}
