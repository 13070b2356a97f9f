//! The engine's scheduling on the CPU backend: a slot trains exactly as the Trainer's loop written
//! out plainly (`Fixture::train_alone`) does, slots with different batch sizes do not disturb each other, ticks and optimizer steps happen when they
//! should, freed slots refill at once, a diverging trial fails alone, out-of-memory shrinks the array.

mod common;
mod fake_trainer;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use anyhow::Result;
use hpo_gpu::cli::pipeline::{ModelDataArgs, prepare};
use hpo_gpu::config::BertConfig;
use hpo_gpu::cpu::adamw::{AdamState, AdamW, clip_grad_norm, linear_schedule};
use hpo_gpu::cpu::bert::{self, Dropout, DropoutProbs};
use hpo_gpu::cpu::philox::DropoutRng;
use hpo_gpu::data::batch::TokenizedSplit;
use hpo_gpu::model::BertModel;
use hpo_gpu::model::layout::ParamLayout;
use hpo_gpu::ops::host::HostOps;
use hpo_gpu::train::{EpochOrder, StepPlan, TrainConfig, evaluate_params};
use hpo_gpu::trial::ParamSet;
use hpo_gpu::trial::protocol::{EpochMetrics, TrialEnd, TrialHost, TrialRunner, Verdict};
use hpo_gpu::trial_array::device::DeviceArrayBackend;
use hpo_gpu::trial_array::reference_backend::ReferenceBackend;
use hpo_gpu::trial_array::schedule::{ArrayOptions, ArrayTrial, MicroBatch, TrialBuilder, run_array};
use hpo_gpu::trial_array::{
    ArrayBackend, ArrayError, ArrayResult, SlotEval, SlotMicroBatch, SlotOptimizerStep,
};

/// 61 training examples (not a multiple of 8: the short last batch is exercised), 20 eval.
struct Fixture {
    _dir: tempfile::TempDir,
    config: BertConfig,
    train: Arc<TokenizedSplit>,
    eval: Arc<TokenizedSplit>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path());
    let data = common::tiny_data(dir.path());
    let args = ModelDataArgs {
        model: model.display().to_string(),
        random_init: true,
        tokenizer: None,
        dataset: data.display().to_string(),
        eval_dataset: None,
        train_split: "train".into(),
        eval_split: "test".into(),
        text_column: "text".into(),
        label_column: "label".into(),
        labels: None,
        train_samples: 61,
        eval_samples: 20,
        data_seed: 42,
        max_length: 16,
    };
    let p = prepare(&args).unwrap();
    assert_eq!((p.train.len(), p.eval.len()), (61, 20));
    Fixture { _dir: dir, config: p.config, train: Arc::new(p.train), eval: Arc::new(p.eval) }
}

impl Fixture {
    fn config(&self, dropout: bool) -> BertConfig {
        let mut c = self.config.clone();
        if !dropout {
            c.hidden_dropout_prob = 0.0;
            c.attention_probs_dropout_prob = 0.0;
        }
        c
    }

    /// Trial `number` with `cfg`.
    fn trial(&self, number: u64, cfg: TrainConfig, dropout: bool) -> (u64, ArrayTrial) {
        let config = self.config(dropout);
        let trial = ArrayTrial {
            initial_params: BertModel::random_init(&config, 5).params,
            dropout: DropoutProbs::from_config(&config),
            dropout_stream: 0,
            cfg,
            train: self.train.clone(),
            eval: self.eval.clone(),
        };
        (number, trial)
    }

    /// The same trial through the Trainer's loop written out plainly — whole batches, one pass
    /// each, the dropout generator stepping per batch — the oracle the engine is held to: its
    /// epochs (without timings) and final (kept) parameters.
    fn train_alone(
        &self,
        cfg: &TrainConfig,
        dropout: bool,
        stop_after: Option<usize>,
    ) -> (Vec<EpochMetrics>, Vec<f32>) {
        let config = self.config(dropout);
        let layout = ParamLayout::new(&config);
        let decay = layout.decay_mask();
        let adamw = AdamW {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        };
        let mut params = BertModel::random_init(&config, 5).params;
        let mut adam = AdamState::new(layout.len);
        let plan = StepPlan::new(cfg, self.train.len());
        let mut order = EpochOrder::new(self.train.len(), cfg.seed);
        let (mut epochs, mut best, mut step) = (Vec::new(), None::<(f64, Vec<f32>)>, 0u64);
        for epoch in 1..=cfg.epochs {
            let (mut loss_sum, mut lr) = (0.0, cfg.learning_rate);
            for batch_examples in order.next_epoch().to_vec().chunks(cfg.batch_size) {
                let batch = self.train.packed_batch(batch_examples);
                let rng = DropoutRng { seed: cfg.seed, stream: 0, step: step as u32 };
                let fwd = bert::forward(
                    &config,
                    &layout,
                    &params,
                    &batch,
                    Some(Dropout::from_config(&config, rng)),
                );
                let mut grads = vec![0.0f32; layout.len];
                let scale = 1.0 / batch_examples.len() as f32;
                bert::backward(&config, &layout, &params, &batch, &fwd, scale, &mut grads);
                loss_sum += fwd.losses.iter().map(|l| *l as f64).sum::<f64>() / batch_examples.len() as f64;
                clip_grad_norm(&mut grads, cfg.max_grad_norm);
                lr = linear_schedule(cfg.learning_rate, step, plan.total_steps, plan.warmup);
                adamw.step(&mut params, &grads, &decay, &mut adam, lr);
                step += 1;
            }
            let (eval_loss, eval_accuracy) =
                evaluate_params(&config, &layout, &params, &self.eval, cfg.eval_batch_size).unwrap();
            let mut metrics = fake_trainer::epoch(epoch as u32, eval_accuracy, 0.0, eval_loss, 0.0);
            metrics.train_loss = loss_sum / plan.steps_per_epoch as f64;
            metrics.learning_rate = lr;
            epochs.push(metrics);
            let score = cfg.best_by.score(eval_loss, eval_accuracy);
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                best = Some((score, params.clone()));
            }
            if stop_after == Some(epoch) {
                break;
            }
        }
        (epochs, best.expect("at least one epoch").1)
    }
}

fn cfg(lr: f64, batch_size: usize, epochs: usize) -> TrainConfig {
    TrainConfig { learning_rate: lr, batch_size, epochs, weight_decay: 0.01, ..TrainConfig::default() }
}

/// The trials of a test by number, handed to slots as they are.
#[derive(Default)]
struct TestTrials(BTreeMap<u64, ArrayTrial>);

impl TrialBuilder for TestTrials {
    fn build(&mut self, number: u64, _params: &ParamSet) -> Result<ArrayTrial> {
        Ok(self.0[&number].clone())
    }
}

/// Hands out queued trials, prunes where told, records everything.
#[derive(Default)]
struct TestHost {
    trials: TestTrials,
    queue: VecDeque<u64>,
    /// key → prune after this epoch
    prune_after: BTreeMap<u64, usize>,
    epochs: BTreeMap<u64, Vec<EpochMetrics>>,
    ends: BTreeMap<u64, TrialEnd>,
    /// (free slots asked for, whether the array was idle)
    asks: Vec<(usize, bool)>,
}

impl TestHost {
    fn new(trials: Vec<(u64, ArrayTrial)>) -> Self {
        let queue = trials.iter().map(|(number, _)| *number).collect();
        TestHost { trials: TestTrials(trials.into_iter().collect()), queue, ..Default::default() }
    }

    fn finished(&self, key: u64) -> (&[EpochMetrics], &[f32]) {
        match &self.ends[&key] {
            TrialEnd::Finished { result, params } => (&result.epochs, params),
            other => panic!("trial {key} did not finish: {other:?}"),
        }
    }
}

impl TrialHost for TestHost {
    fn next_trials(&mut self, free_slots: usize, idle: bool) -> Result<Vec<(u64, ParamSet)>> {
        self.asks.push((free_slots, idle));
        let n = free_slots.min(self.queue.len());
        Ok(self.queue.drain(..n).map(|number| (number, ParamSet::new())).collect())
    }

    fn on_epoch(&mut self, key: u64, m: &EpochMetrics) -> Result<Verdict> {
        self.epochs.entry(key).or_default().push(m.clone());
        Ok(if self.prune_after.get(&key) == Some(&m.epoch) { Verdict::Prune } else { Verdict::Continue })
    }

    fn on_end(&mut self, key: u64, end: TrialEnd) -> Result<()> {
        assert!(self.ends.insert(key, end).is_none(), "trial {key} ended twice");
        Ok(())
    }
}

/// A backend call, as the recording wrapper saw it.
#[derive(Clone, Debug, PartialEq)]
enum Call {
    Load(usize),
    /// (slot, examples in its micro-batch)
    Forward(Vec<(usize, usize)>),
    Step(Vec<usize>),
    Eval(Vec<usize>),
}

/// Records every call; can fail one forward call with out-of-memory.
struct Recording {
    inner: ReferenceBackend,
    calls: Vec<Call>,
    oom_on_forward: Option<usize>,
    forwards: usize,
}

impl Recording {
    fn new(config: &BertConfig, slots: usize) -> Self {
        Recording {
            inner: ReferenceBackend::new(config, slots),
            calls: Vec::new(),
            oom_on_forward: None,
            forwards: 0,
        }
    }

    /// Ticks (1-based, counted by forward calls) in which `slot` stepped its optimizer, and the
    /// examples of each of its micro-batches.
    fn slot_history(&self, slot: usize) -> (Vec<usize>, Vec<usize>) {
        let (mut tick, mut steps, mut sizes) = (0, Vec::new(), Vec::new());
        for c in &self.calls {
            match c {
                Call::Forward(w) => {
                    tick += 1;
                    sizes.extend(w.iter().filter(|(s, _)| *s == slot).map(|(_, n)| *n));
                }
                Call::Step(s) if s.contains(&slot) => steps.push(tick),
                _ => {}
            }
        }
        (steps, sizes)
    }
}

impl ArrayBackend for Recording {
    fn describe(&self) -> String {
        "recording cpu".into()
    }
    fn slots(&self) -> usize {
        self.inner.slots()
    }
    fn param_len(&self) -> usize {
        self.inner.param_len()
    }
    fn load_slot(&mut self, slot: usize, params: &[f32]) -> ArrayResult<()> {
        self.calls.push(Call::Load(slot));
        self.inner.load_slot(slot, params)
    }
    fn forward_backward(&mut self, work: &[SlotMicroBatch<'_>]) -> ArrayResult<Vec<f64>> {
        self.forwards += 1;
        if self.oom_on_forward == Some(self.forwards) {
            return Err(ArrayError::OutOfMemory("simulated".into()));
        }
        self.calls.push(Call::Forward(work.iter().map(|w| (w.slot, w.batch.seqs.len())).collect()));
        self.inner.forward_backward(work)
    }
    fn optimizer_step(&mut self, work: &[SlotOptimizerStep]) -> ArrayResult<Vec<f64>> {
        self.calls.push(Call::Step(work.iter().map(|w| w.slot).collect()));
        self.inner.optimizer_step(work)
    }
    fn evaluate(&mut self, work: &[SlotEval<'_>]) -> ArrayResult<Vec<(f64, f64)>> {
        self.calls.push(Call::Eval(work.iter().map(|w| w.slot).collect()));
        self.inner.evaluate(work)
    }
    fn keep_best(&mut self, slot: usize) -> ArrayResult<()> {
        self.inner.keep_best(slot)
    }
    fn restore_best(&mut self, slot: usize) -> ArrayResult<()> {
        self.inner.restore_best(slot)
    }
    fn read_params(&mut self, slot: usize) -> ArrayResult<Vec<f32>> {
        self.inner.read_params(slot)
    }
    fn shrink(&mut self, slots: usize) -> ArrayResult<()> {
        self.inner.shrink(slots)
    }
}

fn run(
    backend: &mut dyn ArrayBackend,
    host: &mut TestHost,
    micro_batch: MicroBatch,
) -> hpo_gpu::trial_array::schedule::ArrayStats {
    let mut trials = std::mem::take(&mut host.trials);
    let stats = run_array(backend, &mut trials, host, &ArrayOptions { micro_batch }).unwrap();
    host.trials = trials;
    stats
}

const M2: MicroBatch = MicroBatch::Fixed(2);

/// Relative error of f32 vectors.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let a: Vec<f64> = a.iter().map(|v| *v as f64).collect();
    let b: Vec<f64> = b.iter().map(|v| *v as f64).collect();
    common::rel_err(&a, &b)
}

/// The numbers of an epoch that do not depend on timing.
fn numbers(m: &EpochMetrics) -> [f64; 5] {
    [m.epoch as f64, m.train_loss, m.eval_loss, m.eval_accuracy, m.learning_rate]
}

fn assert_epochs_close(got: &[EpochMetrics], want: &[EpochMetrics], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: epochs");
    for (g, w) in got.iter().zip(want) {
        for (x, y) in numbers(g).iter().zip(numbers(w)) {
            assert!((x - y).abs() <= tol * y.abs().max(1e-3), "{what}: epoch {} {x} vs {y}", w.epoch);
        }
    }
}

fn assert_epochs_identical(got: &[EpochMetrics], want: &[EpochMetrics], what: &str) {
    let g: Vec<_> = got.iter().map(numbers).collect();
    let w: Vec<_> = want.iter().map(numbers).collect();
    assert_eq!(g, w, "{what}");
}

#[test]
fn one_slot_equals_the_trainer_loop() {
    let fx = fixture();
    let c = cfg(2e-3, 8, 3);
    // Micro-batch = batch size: the same forward passes, losses and dropout masks as the plain Trainer loop, so
    // bit for bit equal, dropout on.
    let (want_epochs, want_params) = fx.train_alone(&c, true, None);
    let mut host = TestHost::new(vec![fx.trial(0, c.clone(), true)]);
    run(&mut ReferenceBackend::new(&fx.config, 1), &mut host, MicroBatch::Fixed(8));
    let (epochs, params) = host.finished(0);
    assert_epochs_identical(epochs, &want_epochs, "m = b, dropout on");
    assert_eq!(params, &want_params[..]);
    assert!(want_params != BertModel::random_init(&fx.config, 5).params, "training moved the weights");

    // m = 2: four micro-batches accumulate per step. Not bitwise: the per-example gradient
    // contributions are summed in another order (per micro-batch, then across), so equal to
    // rounding only. Dropout off, since the masks are drawn per micro-batch.
    let (want_epochs, want_params) = fx.train_alone(&c, false, None);
    let mut host = TestHost::new(vec![fx.trial(0, c, false)]);
    run(&mut ReferenceBackend::new(&fx.config, 1), &mut host, M2);
    let (epochs, params) = host.finished(0);
    assert_epochs_close(epochs, &want_epochs, 1e-5, "m = 2");
    let e = rel(params, &want_params);
    assert!(e <= 1e-5, "final parameters differ from the Trainer loop: rel err {e}");
    assert!(epochs[2].learning_rate > 0.0 && epochs[0].train_loss > epochs[2].train_loss);
}

fn mixed_trials(fx: &Fixture, dropout: bool) -> Vec<(u64, ArrayTrial)> {
    [(1e-3, 2), (3e-3, 4), (2e-3, 8), (5e-3, 8)]
        .iter()
        .enumerate()
        .map(|(k, &(lr, b))| fx.trial(k as u64, cfg(lr, b, 2), dropout))
        .collect()
}

#[test]
fn mixed_batch_sizes_train_as_if_alone() {
    let fx = fixture();
    let mut host = TestHost::new(mixed_trials(&fx, false));
    run(&mut ReferenceBackend::new(&fx.config, 4), &mut host, M2);
    for (key, t) in mixed_trials(&fx, false) {
        let (want_epochs, want_params) = fx.train_alone(&t.cfg, false, None);
        let (epochs, params) = host.finished(key);
        assert_epochs_close(epochs, &want_epochs, 1e-5, &format!("trial {key}"));
        let e = rel(params, &want_params);
        assert!(e <= 1e-5, "trial {key}: final parameters rel err {e}");
    }
    // With dropout, each slot equals the same trial alone in a one-slot array, bit for bit: slots
    // share nothing.
    let mut together = TestHost::new(mixed_trials(&fx, true));
    run(&mut ReferenceBackend::new(&fx.config, 4), &mut together, M2);
    for (key, t) in mixed_trials(&fx, true) {
        let mut alone = TestHost::new(vec![(key, t)]);
        run(&mut ReferenceBackend::new(&fx.config, 1), &mut alone, M2);
        let (e1, p1) = together.finished(key);
        let (e2, p2) = alone.finished(key);
        assert_epochs_identical(e1, e2, &format!("trial {key} with dropout"));
        assert_eq!(p1, p2, "trial {key} parameters with dropout");
    }
}

#[test]
fn ticks_and_optimizer_steps_per_slot() {
    let fx = fixture();
    // Batch sizes 2, 4, 8 for 1, 2, 2 epochs, m = 2, 61 examples: 31 micro-batches per epoch
    // (the last of one example); a fourth trial waits for the first to end.
    let trials = vec![
        fx.trial(0, cfg(1e-3, 2, 1), false),
        fx.trial(1, cfg(1e-3, 4, 2), false),
        fx.trial(2, cfg(1e-3, 8, 2), false),
        fx.trial(3, cfg(1e-3, 8, 1), false),
    ];
    let mut host = TestHost::new(trials);
    let mut backend = Recording::new(&fx.config, 3);
    run(&mut backend, &mut host, M2);

    let per_epoch_sizes: Vec<usize> = std::iter::repeat_n(2, 30).chain([1]).collect();
    // Slot 0: trial 0 (ticks 1–31, a step every tick), then trial 3 (ticks 32–62, b = 8).
    let (steps, sizes) = backend.slot_history(0);
    let steps_b8 = |from: usize| -> Vec<usize> { (1..=7).map(|s| from + 4 * s).chain([from + 31]).collect() };
    let want: Vec<usize> = (1..=31).chain(steps_b8(31)).collect();
    assert_eq!(steps, want);
    assert_eq!(sizes, [per_epoch_sizes.clone(), per_epoch_sizes.clone()].concat());
    // Slot 1: b = 4, two epochs: steps at every second tick and at the short last batch.
    let (steps, sizes) = backend.slot_history(1);
    let epoch = |from: usize| -> Vec<usize> { (1..=15).map(|s| from + 2 * s).chain([from + 31]).collect() };
    assert_eq!(steps, [epoch(0), epoch(31)].concat());
    assert_eq!(sizes.len(), 62);
    // Slot 2: b = 8: every fourth tick, and tick 31 (batch of 5 = micro-batches 2, 2, 1).
    let (steps, _) = backend.slot_history(2);
    assert_eq!(steps, [steps_b8(0), steps_b8(31)].concat());

    let forwards = backend.calls.iter().filter(|c| matches!(c, Call::Forward(_))).count();
    assert_eq!(forwards, 62);
    let evals: Vec<&Call> = backend.calls.iter().filter(|c| matches!(c, Call::Eval(_))).collect();
    assert_eq!(evals, [&Call::Eval(vec![0, 1, 2]), &Call::Eval(vec![0, 1, 2])]);
    assert_eq!(host.ends.len(), 4);
    for k in 0..4 {
        host.finished(k);
    }
    // The array asked for 3 trials when idle, then 1 for the slot freed at tick 31 (while the
    // others trained on), and once more when all were done.
    assert_eq!(host.asks, [(3, true), (1, false), (3, true)]);
}

#[test]
fn pruned_slot_takes_the_next_trial_at_once() {
    let fx = fixture();
    let next = fx.trial(9, cfg(4e-3, 4, 2), false);
    let mut trials = mixed_trials(&fx, false);
    trials.truncate(2);
    trials.push(next.clone());
    let mut host = TestHost::new(trials);
    host.prune_after.insert(1, 1);
    let mut backend = Recording::new(&fx.config, 2);
    run(&mut backend, &mut host, M2);

    let TrialEnd::Finished { result, .. } = &host.ends[&1] else { panic!("trial 1 did not finish") };
    assert!(result.pruned && result.epochs.len() == 1);
    // The eval that pruned trial 1 (slot 1) is followed by loading slot 1, before any forward.
    let first_eval = backend.calls.iter().position(|c| matches!(c, Call::Eval(_))).unwrap();
    assert_eq!(backend.calls[first_eval], Call::Eval(vec![0, 1]));
    assert_eq!(backend.calls[first_eval + 1], Call::Load(1));
    assert!(matches!(backend.calls[first_eval + 2], Call::Forward(ref w) if w.iter().any(|(s, _)| *s == 1)));

    // The new trial trains as if alone.
    let (want_epochs, want_params) = fx.train_alone(&next.1.cfg, false, None);
    let (epochs, params) = host.finished(9);
    assert_epochs_close(epochs, &want_epochs, 1e-5, "trial 9 after the pruned one");
    assert!(rel(params, &want_params) <= 1e-5);
    // The pruned trial kept its epoch-1 weights, as the Trainer loop stopped after epoch 1 keeps them.
    let (want_epochs, want_params) = fx.train_alone(&cfg(3e-3, 4, 2), false, Some(1));
    let (epochs, params) = host.finished(1);
    assert_epochs_close(epochs, &want_epochs, 1e-5, "pruned trial 1");
    assert!(rel(params, &want_params) <= 1e-5);
}

/// A trial whose loss diverges fails with a reason; the other slots' results are bit-identical to
/// a run without it (on the backend `make` builds).
fn diverging_slot_fails_alone(make: &dyn Fn(&BertConfig, usize) -> Box<dyn ArrayBackend>) {
    let fx = fixture();
    let others = |fx: &Fixture| -> Vec<(u64, ArrayTrial)> {
        let mut t = mixed_trials(fx, true);
        t.truncate(2);
        t
    };
    let mut with_bad = others(&fx);
    with_bad.push(fx.trial(7, cfg(1e3, 4, 2), true));
    let mut host = TestHost::new(with_bad);
    run(&mut *make(&fx.config, 3), &mut host, M2);
    match &host.ends[&7] {
        TrialEnd::Failed { reason } => {
            assert!(reason.contains("diverged") || reason.contains("non-finite"), "{reason}")
        }
        other => panic!("lr 1e3 should fail: {other:?}"),
    }
    let mut without = TestHost::new(others(&fx));
    run(&mut *make(&fx.config, 3), &mut without, M2);
    for k in 0..2 {
        let (e1, p1) = host.finished(k);
        let (e2, p2) = without.finished(k);
        assert_epochs_identical(e1, e2, &format!("trial {k}"));
        assert_eq!(p1, p2, "trial {k} parameters");
    }
}

#[test]
fn a_diverging_slot_fails_alone() {
    diverging_slot_fails_alone(&|c, t| Box::new(ReferenceBackend::new(c, t)));
}

#[test]
fn out_of_memory_shrinks_the_array_and_evicts_the_last_slot() {
    let fx = fixture();
    let trials = || {
        let mut t = mixed_trials(&fx, true);
        t.truncate(3);
        t
    };
    let mut backend = Recording::new(&fx.config, 3);
    backend.oom_on_forward = Some(5);
    let mut host = TestHost::new(trials());
    let stats = run(&mut backend, &mut host, M2);
    assert_eq!(stats.slots, 2);
    assert_eq!(backend.slots(), 2);
    match &host.ends[&2] {
        TrialEnd::Evicted { reason } => assert!(reason.contains("3 to 2 slots"), "{reason}"),
        other => panic!("trial 2 should be evicted: {other:?}"),
    }
    // The retried tick changed nothing for the others.
    let mut reference = TestHost::new(trials());
    run(&mut ReferenceBackend::new(&fx.config, 3), &mut reference, M2);
    for k in 0..2 {
        let (e1, p1) = host.finished(k);
        let (e2, p2) = reference.finished(k);
        assert_epochs_identical(e1, e2, &format!("trial {k}"));
        assert_eq!(p1, p2);
    }
}

#[test]
fn unfit_trials_fail_with_a_reason() {
    let fx = fixture();
    let mut host =
        TestHost::new(vec![fx.trial(0, cfg(1e-3, 6, 1), false), fx.trial(1, cfg(1e-3, 4, 1), false)]);
    run(&mut ReferenceBackend::new(&fx.config, 1), &mut host, MicroBatch::Fixed(4));
    match &host.ends[&0] {
        TrialEnd::Failed { reason } => {
            assert!(reason.contains("batch size 6") && reason.contains("micro-batch size 4"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    host.finished(1);
}

/// `search` with the given extra flags on the tiny model and data; returns the stored trials.
fn search_trials(dir: &std::path::Path, db: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let model = common::tiny_model(dir);
    let data = common::tiny_data(dir);
    let storage = format!("sqlite:///{}", dir.join(db).display());
    // Learning rates at which the tiny model learns, batch sizes 4–16 (micro-batch 4) and 1–3
    // epochs, so trials end at different ticks and freed slots refill.
    let space = dir.join("space.toml");
    std::fs::write(
        &space,
        "[learning_rate]\ntype = \"float\"\nlow = 1e-3\nhigh = 3e-2\nlog = true\n\n\
         [per_device_train_batch_size]\ntype = \"categorical\"\nchoices = [4, 8, 16]\n\n\
         [num_train_epochs]\ntype = \"int\"\nlow = 1\nhigh = 3\n",
    )
    .unwrap();
    let mut args = vec![
        "search",
        "--space",
        space.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--random-init",
        "--dataset",
        data.to_str().unwrap(),
        "--train-samples",
        "0",
        "--eval-samples",
        "0",
        "--max-length",
        "16",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--storage",
        &storage,
        "--n-trials",
        "6",
        "--sampler",
        "random",
        "--sampler-seed",
        "7",
        "--pruner",
        "none",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let o = common::hpo_gpu(&args);
    assert!(o.status.success(), "search {extra:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("best trial"));
    let o = common::hpo_gpu(&[
        "trials",
        "--storage",
        &storage,
        "--study-name",
        "transformers_optuna_study",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let trials: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    trials.as_array().unwrap().clone()
}

#[test]
fn search_with_slots_matches_one_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    // The random sampler reseeded per trial number proposes the same parameters either way, so
    // the two studies train the same trials; dropout is off because the array draws masks per
    // micro-batch (16 here), one slot alone per whole batch.
    let sequential = search_trials(tmp.path(), "one.db", &[]);
    let array = search_trials(tmp.path(), "array.db", &["--slots", "4"]);
    assert_eq!(array.len(), 6, "n_trials reached: {array:?}");
    assert_eq!(sequential.len(), 6);
    let distinct = |key: &str| -> std::collections::BTreeSet<String> {
        array.iter().map(|t| t["params"][key].to_string()).collect()
    };
    assert!(distinct("per_device_train_batch_size").len() > 1, "the trials mix batch sizes");
    assert!(distinct("num_train_epochs").len() > 1, "the trials end at different ticks");
    let values: std::collections::BTreeSet<String> = array.iter().map(|t| t["value"].to_string()).collect();
    assert!(values.len() > 1, "the trials learn different amounts: {values:?}");
    for (a, s) in array.iter().zip(&sequential) {
        assert_eq!(a["number"], s["number"]);
        assert_eq!(a["state"], "COMPLETE");
        assert_eq!(a["params"], s["params"], "same proposals");
        assert_eq!(a["value"], s["value"], "trial {}: objective", a["number"]);
        assert_eq!(a["intermediate_values"], s["intermediate_values"]);
        let epochs = a["params"]["num_train_epochs"].as_u64().unwrap();
        for epoch in 1..=epochs {
            for key in ["train_loss", "eval_loss"] {
                let k = format!("epoch_{epoch}_{key}");
                let (x, y) = (a["user_attrs"][&k].as_f64().unwrap(), s["user_attrs"][&k].as_f64().unwrap());
                assert!((x - y).abs() <= 1e-5 * y.abs(), "trial {} {k}: {x} vs {y}", a["number"]);
            }
        }
    }
}

#[test]
fn search_rejects_a_micro_batch_that_does_not_divide_the_batch_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(tmp.path());
    let data = common::tiny_data(tmp.path());
    let storage = format!("sqlite:///{}", tmp.path().join("s.db").display());
    let o = common::hpo_gpu(&[
        "search",
        "--model",
        model.to_str().unwrap(),
        "--random-init",
        "--dataset",
        data.to_str().unwrap(),
        "--storage",
        &storage,
        "--device",
        "cpu",
        "--slots",
        "4",
        "--micro-batch",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--micro-batch 5 does not divide the batch size 16"), "{err}");
}

/// A concurrent runner without a model: each round advances every running trial by one epoch
/// (objective = epoch / 10); the trial numbered `evict` is evicted at its first epoch, trials
/// with `learning_rate` above `fail_above` fail.
struct FakeArray {
    slots: usize,
    epochs: u32,
    evict: u64,
    fail_above: f64,
    max_running: usize,
    asks: Vec<usize>,
}

impl TrialRunner for FakeArray {
    fn run_trials(&mut self, host: &mut dyn TrialHost) -> Result<()> {
        let mut running: Vec<(u64, f64, u32)> = Vec::new();
        loop {
            let free = self.slots - running.len();
            if free > 0 {
                self.asks.push(free);
                for (n, p) in host.next_trials(free, running.is_empty())? {
                    running.push((n, p.get_f64("learning_rate")?.unwrap(), 0));
                }
            }
            if running.is_empty() {
                return Ok(());
            }
            self.max_running = self.max_running.max(running.len());
            let mut still = Vec::new();
            for (n, lr, e) in running.drain(..) {
                let epoch = e + 1;
                if n == self.evict && epoch == 1 {
                    let reason = "evicted: simulated out of memory".into();
                    host.on_end(n, TrialEnd::Evicted { reason })?;
                    continue;
                }
                if lr > self.fail_above {
                    host.on_end(n, TrialEnd::Failed { reason: "simulated divergence".into() })?;
                    continue;
                }
                let value = f64::from(epoch) / 10.0;
                let m = fake_trainer::epoch(epoch, value, 1.0, 1.0, 0.0);
                let pruned = host.on_epoch(n, &m)? == Verdict::Prune;
                if pruned || epoch == self.epochs {
                    let result = hpo_gpu::trial::protocol::TrainResult {
                        epochs: vec![m],
                        best_epoch: epoch as usize,
                        objective: value,
                        pruned,
                    };
                    host.on_end(n, TrialEnd::Finished { result, params: Vec::new() })?;
                } else {
                    still.push((n, lr, epoch));
                }
            }
            running = still;
        }
    }
}

#[test]
fn study_driver_for_the_array_counts_requeues_and_fails() {
    use hpo_gpu::search::pruner::NopPruner;
    use hpo_gpu::search::sampler::RandomSampler;
    use hpo_gpu::search::space::SearchSpace;
    use hpo_gpu::study::driver::{DriverOptions, NoProgress, StopReason, run_study};
    use hpo_gpu::study::storage::Storage;
    use hpo_gpu::trial::{StudyDirection, TrialState};

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:///{}", dir.path().join("s.db").display());
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.create_study("array", StudyDirection::Maximize, true).unwrap();
    let space = SearchSpace::recipe_default();
    let mut runner =
        FakeArray { slots: 3, epochs: 2, evict: 1, fail_above: 5e-5, max_running: 0, asks: Vec::new() };
    let mut opts = DriverOptions::new(7);
    opts.seed = Some(3);
    opts.max_consecutive_failures = 100;
    let out = run_study(
        &mut storage,
        &study,
        &space,
        &mut RandomSampler::new(Some(3)),
        &mut NopPruner,
        &opts,
        &mut runner,
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(out.stop, StopReason::TargetReached);
    assert_eq!(runner.max_running, 3, "three trials ran at once");
    assert_eq!(runner.asks[0], 3, "the first ask fills every slot");
    let trials = storage.trials(study.study_id, None).unwrap();
    let count = |s: TrialState| trials.iter().filter(|t| t.state == s).count();
    assert_eq!(count(TrialState::Complete), 7, "n_trials counts COMPLETE trials; FAIL ones do not");
    assert_eq!(count(TrialState::Running) + count(TrialState::Waiting), 0);
    assert_eq!(out.trials_run as usize, trials.len());
    for t in &trials {
        let lr = t.param("learning_rate").unwrap().value.as_f64().unwrap();
        match t.state {
            TrialState::Complete => {
                assert_eq!(t.value(), Some(0.2));
                assert_eq!(t.intermediate_values.len(), 2);
                assert!(lr <= 5e-5);
            }
            TrialState::Fail if t.number == 1 => {
                assert!(t.system_attrs["fail_reason"].as_str().unwrap().contains("evicted"));
            }
            TrialState::Fail => {
                assert_eq!(t.system_attrs["fail_reason"], "simulated divergence");
                assert!(lr > 5e-5);
            }
            s => panic!("trial {} ended {s:?}", t.number),
        }
    }
    // The evicted trial's parameters ran again as a later trial.
    let retry =
        trials.iter().find(|t| t.system_attrs.get("failed_trial").and_then(|v| v.as_u64()) == Some(1));
    let retry = retry.expect("trial 1 was re-queued");
    assert!(retry.number > 1);
    assert_eq!(retry.params, trials[1].params);
}

fn device_backend(config: &BertConfig, slots: usize) -> DeviceArrayBackend<HostOps> {
    DeviceArrayBackend::new(HostOps::new(config), config, slots, "host ops").unwrap()
}

/// The GPU backend's code path (the trial-array model in device ops, padded ticks, one call per
/// op over all slots) run on the host ops: the same trials as the CPU backend, dropout on.
#[test]
fn device_backend_on_host_ops_matches_the_cpu_backend() {
    let fx = fixture();
    let mut reference = TestHost::new(mixed_trials(&fx, true));
    run(&mut ReferenceBackend::new(&fx.config, 4), &mut reference, M2);
    let mut device = TestHost::new(mixed_trials(&fx, true));
    run(&mut device_backend(&fx.config, 4), &mut device, M2);
    for (key, _) in mixed_trials(&fx, true) {
        let (e1, p1) = device.finished(key);
        let (e2, p2) = reference.finished(key);
        assert_epochs_close(e1, e2, 1e-5, &format!("trial {key} on the device backend"));
        let e = rel(p1, p2);
        assert!(e <= 1e-5, "trial {key}: parameters rel err {e}");
    }
}

#[test]
fn device_backend_fails_a_diverging_slot_alone() {
    diverging_slot_fails_alone(&|c, t| Box::new(device_backend(c, t)));
}

/// `hpo-gpu train` trains through a one-slot engine with whole batches: on the CPU backend that
/// is exactly the Trainer's loop, and the device code path (host ops) is within rounding of it.
#[test]
fn one_slot_of_whole_batches_is_the_trainer() {
    let fx = fixture();
    let c = cfg(3e-3, 8, 2);
    let (want_epochs, want_params) = fx.train_alone(&c, true, None);
    let mut host = TestHost::new(vec![fx.trial(0, c.clone(), true)]);
    run(&mut ReferenceBackend::new(&fx.config, 1), &mut host, MicroBatch::WholeBatch);
    let (epochs, params) = host.finished(0);
    assert_eq!(host.epochs[&0].iter().map(|m| m.epoch).collect::<Vec<_>>(), [1, 2]);
    assert_epochs_identical(epochs, &want_epochs, "whole batches on the CPU backend");
    assert_eq!(params, &want_params[..]);
    let mut host = TestHost::new(vec![fx.trial(0, c, true)]);
    run(&mut device_backend(&fx.config, 1), &mut host, MicroBatch::WholeBatch);
    let (epochs, params) = host.finished(0);
    assert_epochs_close(epochs, &want_epochs, 1e-5, "whole batches on host ops");
    assert!(rel(params, &want_params) <= 1e-5);
}
