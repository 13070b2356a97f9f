//! Command-line pieces for `hpo-gpu ask`, `tell`, `trials` and `best`: clap argument structs plus
//! `run_*` functions that write to any `Write`, so `main.rs` only dispatches and tests call them
//! directly. They work on any Optuna-schema SQLite study, including ones Python created.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::{Map, Value, json};

use crate::pyjson;
use crate::search::pruner::{
    HyperbandPruner, MedianPruner, NopPruner, PercentilePruner, Pruner, SuccessiveHalvingPruner,
};
use crate::search::sampler::tpe::TpeOptions;
use crate::search::sampler::{RandomSampler, Sampler, TpeSampler};
use crate::search::space::SearchSpace;
use crate::study::StudyRef;
use crate::study::driver::{AskOptions, DriverOptions, ask_batch};
use crate::study::storage::{Storage, best_of};
use crate::trial::{FrozenTrial, StudyDirection, TrialState};

/// The recipe's storage URL.
pub const DEFAULT_STORAGE: &str = "sqlite:///optuna_trials.db";

/// `--storage` and `--study-name`, shared by all study commands.
#[derive(Args, Clone, Debug)]
pub struct StudyArgs {
    /// Database URL: sqlite:///relative/path.db, sqlite:////absolute/path.db, or a PostgreSQL server
    /// postgresql://user:password@host:port/database (password also from PGPASSWORD / ~/.pgpass)
    #[arg(long, default_value = DEFAULT_STORAGE)]
    pub storage: String,
    /// Name of the study.
    #[arg(long)]
    pub study_name: String,
}

/// `--storage` and `--study-name` of the commands that read a study (`trials`, `best`, `plot`,
/// `report`, `importance`): the recipe's database, and the only study in it unless one is named.
#[derive(Args, Clone, Debug)]
pub struct StudySelect {
    /// Database URL: sqlite:///relative/path.db, sqlite:////absolute/path.db, or a PostgreSQL server
    /// postgresql://user:password@host:port/database (password also from PGPASSWORD / ~/.pgpass)
    #[arg(long, default_value = DEFAULT_STORAGE)]
    pub storage: String,
    /// Name of the study (default: the only study in the database).
    #[arg(long)]
    pub study_name: Option<String>,
}

impl StudySelect {
    /// Opens the database (which must exist) and the study: the named one, or the only one.
    pub fn open(&self) -> Result<(Storage, StudyRef)> {
        let mut storage = Storage::open_existing(&self.storage)?;
        let study = match &self.study_name {
            Some(name) => storage.load_study(name)?,
            None => {
                let mut studies = storage.studies()?;
                match studies.len() {
                    0 => bail!("{} holds no study yet (hpo-gpu search creates one)", self.storage),
                    1 => studies.remove(0),
                    n => {
                        let names: Vec<&str> = studies.iter().map(|s| s.name.as_str()).collect();
                        bail!(
                            "{} holds {n} studies ({}); name one with --study-name",
                            self.storage,
                            names.join(", ")
                        )
                    }
                }
            }
        };
        Ok((storage, study))
    }
}

/// Sampler choice for `ask` (and `search`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    /// Optuna's TPESampler defaults (multivariate, constant liar).
    Tpe,
    /// Uniform random search.
    Random,
}

impl SamplerKind {
    /// Builds the sampler; `seed` makes it reproducible.
    pub fn build(self, seed: Option<u64>) -> Box<dyn Sampler> {
        match self {
            SamplerKind::Tpe => Box::new(TpeSampler::new(TpeOptions { seed, ..TpeOptions::default() })),
            SamplerKind::Random => Box::new(RandomSampler::new(seed)),
        }
    }
}

/// Study direction flag values.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectionArg {
    Minimize,
    Maximize,
}

impl From<DirectionArg> for StudyDirection {
    fn from(d: DirectionArg) -> Self {
        match d {
            DirectionArg::Minimize => StudyDirection::Minimize,
            DirectionArg::Maximize => StudyDirection::Maximize,
        }
    }
}

/// Pruner choice for `search`; each uses Optuna's defaults, on per-epoch intermediate values.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrunerKind {
    /// Never prune.
    None,
    /// MedianPruner: 5 start-up trials, no warm-up.
    Median,
    /// PercentilePruner with --pruner-percentile (default 25).
    Percentile,
    /// SuccessiveHalvingPruner: min_resource auto, reduction factor 4.
    SuccessiveHalving,
    /// HyperbandPruner: min_resource 1, max_resource auto, reduction factor 3.
    Hyperband,
}

/// The study flags of `hpo-gpu search`, to be flattened next to the model/data/training flags.
/// Defaults are the recipe's: study `transformers_optuna_study` in `sqlite:///optuna_trials.db`,
/// maximize, 5 trials, TPE, loaded if it exists.
#[derive(Args, Clone, Debug)]
pub struct SearchStudyArgs {
    /// Name of the study (created, or continued if it exists).
    #[arg(long, default_value = "transformers_optuna_study")]
    pub study_name: String,
    /// Database URL: sqlite:///relative/path.db, sqlite:////absolute/path.db, or a PostgreSQL server
    /// postgresql://user:password@host:port/database (password also from PGPASSWORD / ~/.pgpass)
    #[arg(long, default_value = DEFAULT_STORAGE)]
    pub storage: String,
    #[arg(long, value_enum, default_value = "maximize")]
    pub direction: DirectionArg,
    /// Run until the study holds this many COMPLETE + PRUNED trials (FAIL trials do not count;
    /// trials from earlier runs and other workers do).
    #[arg(long, default_value_t = 5)]
    pub n_trials: u64,
    /// Start no new trial after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    #[arg(long, value_enum, default_value = "tpe")]
    pub sampler: SamplerKind,
    /// Seed of the sampler (reproducible proposals for a given history).
    #[arg(long)]
    pub sampler_seed: Option<u64>,
    #[arg(long, value_enum, default_value = "median")]
    pub pruner: PrunerKind,
    /// Percentile kept by --pruner percentile.
    #[arg(long, default_value_t = 25.0)]
    pub pruner_percentile: f64,
    /// Search space file (.toml or .json); default: the recipe's space.
    #[arg(long)]
    pub space: Option<PathBuf>,
    /// Seconds between heartbeats of a running trial (Optuna's `heartbeat_interval`).
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_interval: f64,
    /// A RUNNING trial without a heartbeat for this many seconds is stale: it is marked FAIL and
    /// its parameters re-queued (Optuna's `grace_period`). A restart after a crash waits this long.
    #[arg(long, default_value_t = 60.0)]
    pub grace_period: f64,
    /// How often a stale trial's parameters are re-queued at most (Optuna's `max_retry`).
    #[arg(long, default_value_t = 3)]
    pub failed_trial_max_retry: u32,
}

/// Everything `search` needs besides the trainer.
pub struct PreparedStudy {
    pub storage: Storage,
    pub study: StudyRef,
    pub space: SearchSpace,
    /// Notes to show the user (e.g. a `high` lowered to fit `step`).
    pub warnings: Vec<String>,
    pub sampler: Box<dyn Sampler>,
    pub pruner: Box<dyn Pruner>,
    pub options: DriverOptions,
}

impl SearchStudyArgs {
    /// Opens the storage, creates or loads the study, reads the space and builds sampler,
    /// pruner and driver options.
    pub fn prepare(&self) -> Result<PreparedStudy> {
        let (space, warnings) = self.search_space()?;
        if self.n_trials == 0 {
            bail!("--n-trials must be at least 1");
        }
        let timeout = match self.timeout {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
            Some(t) => bail!("--timeout must be a positive number of seconds, got {t}"),
        };
        let (heartbeat_interval, grace_period) = self.heartbeat_settings()?;
        let pruner: Box<dyn Pruner> = match self.pruner {
            PrunerKind::None => Box::new(NopPruner),
            PrunerKind::Median => Box::new(MedianPruner::default()),
            PrunerKind::Percentile => Box::new(
                PercentilePruner::new(self.pruner_percentile, 5, 0, 1, 1).context("--pruner-percentile")?,
            ),
            PrunerKind::SuccessiveHalving => Box::new(SuccessiveHalvingPruner::default()),
            PrunerKind::Hyperband => Box::new(HyperbandPruner::default()),
        };
        let mut storage = Storage::open(&self.storage)?;
        let study = storage.create_study(&self.study_name, self.direction.into(), true)?;
        let source = match &self.space {
            Some(path) => format!("--space {}", path.display()),
            None => "the default search space (no --space)".to_string(),
        };
        check_space_matches_study(&mut storage, &study, &space, &source)?;
        let mut options = DriverOptions::new(self.n_trials);
        options.timeout = timeout;
        options.heartbeat_interval = heartbeat_interval;
        options.grace_period = grace_period;
        options.max_retry = Some(self.failed_trial_max_retry);
        options.poll_interval = options.poll_interval.min(heartbeat_interval);
        options.seed = self.sampler_seed;
        Ok(PreparedStudy {
            storage,
            study,
            space,
            warnings,
            sampler: self.sampler.build(self.sampler_seed),
            pruner,
            options,
        })
    }
}

impl SearchStudyArgs {
    /// The `--space` file's space, or the recipe's.
    pub fn search_space(&self) -> Result<(SearchSpace, Vec<String>)> {
        match &self.space {
            Some(path) => SearchSpace::from_file(path),
            None => Ok((SearchSpace::recipe_default(), Vec::new())),
        }
    }

    /// `--heartbeat-interval` and `--grace-period`, checked.
    fn heartbeat_settings(&self) -> Result<(Duration, Duration)> {
        let seconds = |flag: &str, v: f64| -> Result<Duration> {
            if v.is_finite() && v > 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                bail!("--{flag} must be a positive number of seconds, got {v}")
            }
        };
        let heartbeat_interval = seconds("heartbeat-interval", self.heartbeat_interval)?;
        let grace_period = seconds("grace-period", self.grace_period)?;
        if grace_period <= heartbeat_interval {
            bail!(
                "--grace-period ({} s) must be longer than --heartbeat-interval ({} s), or live trials \
                 would be taken for crashed ones",
                self.grace_period,
                self.heartbeat_interval
            );
        }
        Ok((heartbeat_interval, grace_period))
    }

    /// Checks every flag that can be checked without opening the database (the space file, the
    /// counts, the storage URL and its directory), so a search fails on a typo before it spends
    /// time loading data and before it creates a database or study.
    pub fn check(&self) -> Result<()> {
        self.search_space()?;
        if self.n_trials == 0 {
            bail!("--n-trials must be at least 1");
        }
        if let Some(t) = self.timeout
            && !(t.is_finite() && t > 0.0)
        {
            bail!("--timeout must be a positive number of seconds, got {t}");
        }
        if self.pruner == PrunerKind::Percentile {
            PercentilePruner::new(self.pruner_percentile, 5, 0, 1, 1).context("--pruner-percentile")?;
        }
        self.heartbeat_settings()?;
        if let crate::study::storage::StorageLocation::File(path) =
            crate::study::storage::parse_storage_url(&self.storage)?
        {
            crate::study::storage::check_database_directory(&self.storage, &path)?;
        }
        Ok(())
    }
}

/// Refuses a space whose distributions the study's trials cannot share (Optuna's
/// `check_distribution_compatibility`) before any trial is created: otherwise the new trial would
/// fail while sampling and stay RUNNING in the study. `source` names the flag the space came from.
fn check_space_matches_study(
    storage: &mut Storage,
    study: &StudyRef,
    space: &SearchSpace,
    source: &str,
) -> Result<()> {
    let trials = storage.trials(study.study_id, None)?;
    for (name, dist) in space.iter() {
        if let Some(stored) = trials.iter().find_map(|t| t.param(name)) {
            crate::distributions::check_distribution_compatibility(name, &stored.distribution, dist)
                .with_context(|| {
                    format!("{source} does not match study {:?} in {}", study.name, storage.url())
                })?;
        }
    }
    Ok(())
}

/// `hpo-gpu ask`: create trials and print their parameters, like `optuna ask`. Prints one JSON
/// line per trial: `{"number": 3, "params": {"x": 0.25}}`. Report results with `hpo-gpu tell`.
#[derive(Args, Clone, Debug)]
pub struct AskArgs {
    #[command(flatten)]
    pub study: StudyArgs,
    /// Search space as JSON, Optuna's form: {"x": {"name": "FloatDistribution", "attributes":
    /// {"low": 0, "high": 1}}, ...}.
    #[arg(long)]
    pub search_space: String,
    #[arg(long, value_enum, default_value = "tpe")]
    pub sampler: SamplerKind,
    /// Seed the sampler (mixed with each trial number, so concurrent askers still differ).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Create the study with this direction if it does not exist (and check it if it does).
    #[arg(long, value_enum)]
    pub direction: Option<DirectionArg>,
    /// How many trials to ask for at once (they get distinct proposals).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
}

/// `hpo-gpu tell`: finish a trial created by `ask`, like `optuna tell`.
#[derive(Args, Clone, Debug)]
pub struct TellArgs {
    #[command(flatten)]
    pub study: StudyArgs,
    #[arg(long)]
    pub trial_number: u64,
    /// Objective value (required for complete; not allowed for pruned or fail).
    #[arg(long, num_args = 1..)]
    pub values: Vec<f64>,
    /// Final state; without it, a value means complete (a NaN value means fail).
    #[arg(long, value_enum)]
    pub state: Option<TellState>,
    /// Do nothing (instead of failing) when the trial is already finished.
    #[arg(long)]
    pub skip_if_finished: bool,
}

/// `--state` of `tell`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TellState {
    Complete,
    Pruned,
    Fail,
}

/// `hpo-gpu trials`: list a study's trials as a table, or JSON with `--json`.
#[derive(Args, Clone, Debug)]
pub struct TrialsArgs {
    #[command(flatten)]
    pub study: StudySelect,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `hpo-gpu best`: show the best COMPLETE trial as a table, or JSON with `--json`.
#[derive(Args, Clone, Debug)]
pub struct BestArgs {
    #[command(flatten)]
    pub study: StudySelect,
    /// Print a JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn open_study(args: &StudyArgs, create: Option<StudyDirection>) -> Result<(Storage, StudyRef)> {
    let mut storage =
        if create.is_some() { Storage::open(&args.storage)? } else { Storage::open_existing(&args.storage)? };
    let study = match create {
        Some(direction) => storage.create_study(&args.study_name, direction, true)?,
        None => storage.load_study(&args.study_name)?,
    };
    Ok((storage, study))
}

/// Runs `ask`: prints `{"number": N, "params": {...}}` per trial (Optuna's `ask` JSON output).
pub fn run_ask(args: &AskArgs, out: &mut dyn Write) -> Result<()> {
    let space = SearchSpace::from_optuna_json(&args.search_space)?;
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let (mut storage, study) = match open_study(&args.study, args.direction.map(Into::into)) {
        Ok(s) => s,
        Err(e) if args.direction.is_none() => {
            return Err(e.context("pass --direction minimize|maximize to create the study"));
        }
        Err(e) => return Err(e),
    };
    check_space_matches_study(&mut storage, &study, &space, "--search-space")?;
    let mut sampler = args.sampler.build(args.seed);
    let opts = AskOptions { target: None, heartbeat: false, seed: args.seed };
    let trials = ask_batch(&mut storage, &study, &space, sampler.as_mut(), Some(&NopPruner), args.n, &opts)?;
    for t in trials {
        let params: Vec<String> = space
            .iter()
            .filter_map(|(name, _)| t.param(name))
            .map(|p| format!("{}: {}", pyjson::string_literal(&p.name), p.value.to_py_json()))
            .collect();
        writeln!(out, "{{\"number\": {}, \"params\": {{{}}}}}", t.number, params.join(", "))?;
    }
    Ok(())
}

/// Runs `tell` with Optuna's rules: only a RUNNING (or WAITING) trial can be told; COMPLETE needs
/// a value; PRUNED stores the last intermediate value; a NaN value makes the trial FAIL.
pub fn run_tell(args: &TellArgs, out: &mut dyn Write) -> Result<()> {
    let (mut storage, study) = open_study(&args.study, None)?;
    study.direction()?; // single-objective studies only
    let trial = storage.trial_by_number(&study, args.trial_number)?;
    if trial.state.is_finished() {
        if args.skip_if_finished {
            writeln!(out, "trial {} is already {}; skipped", trial.number, trial.state)?;
            return Ok(());
        }
        bail!("cannot tell trial {}: it is already {}", trial.number, trial.state);
    }
    let value = match args.values.as_slice() {
        [] => None,
        [v] => Some(*v),
        vs => bail!("--values: the study has one objective, got {} values", vs.len()),
    };
    let (state, value, reason) = match (args.state, value) {
        (Some(TellState::Pruned), Some(_)) | (Some(TellState::Fail), Some(_)) => {
            bail!("--values must be omitted with --state pruned or fail")
        }
        (Some(TellState::Complete), None) | (None, None) => bail!("--values is required to complete a trial"),
        (Some(TellState::Complete) | None, Some(v)) if v.is_nan() => {
            (TrialState::Fail, None, Some("the objective value is NaN"))
        }
        (Some(TellState::Complete) | None, Some(v)) => (TrialState::Complete, Some(v), None),
        (Some(TellState::Pruned), None) => {
            let last = trial.last_step().map(|s| trial.intermediate_values[&s]).filter(|v| !v.is_nan());
            (TrialState::Pruned, last, None)
        }
        (Some(TellState::Fail), None) => (TrialState::Fail, None, None),
    };
    let attrs: Vec<(String, String)> =
        reason.map(|r| ("fail_reason".to_string(), pyjson::string_literal(r))).into_iter().collect();
    storage.set_trial_state(trial.trial_id, state, value.map(|v| vec![v]).as_deref(), &attrs)?;
    let shown = value.map(|v| format!(" with value {}", pyjson::float_repr(v))).unwrap_or_default();
    writeln!(out, "told trial {} {state}{shown}", trial.number)?;
    Ok(())
}

/// A trial as JSON (the `--json` output of `trials` and `best`).
pub fn trial_json(t: &FrozenTrial) -> Value {
    let params: Map<String, Value> =
        t.params.iter().map(|p| (p.name.clone(), p.value.to_json_value())).collect();
    let intermediate: Map<String, Value> =
        t.intermediate_values.iter().map(|(s, v)| (s.to_string(), finite_or_null(*v))).collect();
    json!({
        "number": t.number,
        "state": t.state.as_str(),
        "value": t.value().map(finite_or_null).unwrap_or(Value::Null),
        "params": params,
        "intermediate_values": intermediate,
        "user_attrs": t.user_attrs,
        "datetime_start": t.datetime_start.map(|d| d.format()),
        "datetime_complete": t.datetime_complete.map(|d| d.format()),
        "duration_seconds": t.duration_seconds(),
    })
}

fn finite_or_null(v: f64) -> Value {
    serde_json::Number::from_f64(v).map(Value::Number).unwrap_or(Value::Null)
}

fn format_value(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.6}")).unwrap_or_default()
}

/// Writes rows as a left-aligned text table with a header rule.
fn write_table(out: &mut dyn Write, header: &[String], rows: &[Vec<String>]) -> Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string()
    };
    writeln!(out, "{}", line(header))?;
    writeln!(out, "{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "))?;
    for row in rows {
        writeln!(out, "{}", line(row))?;
    }
    Ok(())
}

fn param_columns(trials: &[FrozenTrial]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for t in trials {
        for p in &t.params {
            if !names.contains(&p.name) {
                names.push(p.name.clone());
            }
        }
    }
    names
}

/// Runs `trials`: number, state, value, duration and every parameter, one row per trial.
pub fn run_trials(args: &TrialsArgs, out: &mut dyn Write) -> Result<()> {
    let (mut storage, study) = args.study.open()?;
    let trials = storage.trials(study.study_id, None)?;
    if args.json {
        let all: Vec<Value> = trials.iter().map(trial_json).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&all).context("serialising trials")?)?;
        return Ok(());
    }
    let names = param_columns(&trials);
    let mut header: Vec<String> = ["number", "state", "value", "duration_s"].map(String::from).to_vec();
    header.extend(names.iter().cloned());
    let rows: Vec<Vec<String>> = trials
        .iter()
        .map(|t| {
            let mut row = vec![
                t.number.to_string(),
                t.state.to_string(),
                format_value(t.value()),
                t.duration_seconds().map(|d| format!("{d:.1}")).unwrap_or_default(),
            ];
            row.extend(names.iter().map(|n| t.param(n).map(|p| p.value.to_string()).unwrap_or_default()));
            row
        })
        .collect();
    write_table(out, &header, &rows)
}

/// Runs `best`: the best COMPLETE trial's number, value, parameters and per-epoch values.
pub fn run_best(args: &BestArgs, out: &mut dyn Write) -> Result<()> {
    let (mut storage, study) = args.study.open()?;
    let direction = study.direction()?;
    let trials = storage.trials(study.study_id, Some(&[TrialState::Complete]))?;
    let Some(best) = best_of(&trials, direction) else {
        bail!("study {:?} has no COMPLETE trial yet", study.name);
    };
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&trial_json(best)).context("serialising the best trial")?
        )?;
        return Ok(());
    }
    let mut rows = vec![
        vec!["study".to_string(), format!("{} ({})", study.name, direction)],
        vec!["number".to_string(), best.number.to_string()],
        vec!["value".to_string(), format_value(best.value())],
    ];
    for p in &best.params {
        rows.push(vec![format!("params.{}", p.name), p.value.to_string()]);
    }
    for (step, v) in &best.intermediate_values {
        rows.push(vec![format!("intermediate[{step}]"), format!("{v:.6}")]);
    }
    write_table(out, &["field".to_string(), "value".to_string()], &rows)
}
