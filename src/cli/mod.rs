//! The command line: every command's arguments (clap) and what it does. `main.rs` only parses,
//! runs and turns errors into one line.
//!
//! - `train`, `predict`: one model ([`train`], [`predict`]); `search`: a study trained by the
//!   engine ([`search`]); `ask`, `tell`, `trials`, `best`: a study's records ([`study`]); `plot`,
//!   `report`, `importance` ([`report`]); `push` ([`push`]).
//! - [`pipeline`]: the model and data flags every training command shares, and loading them.

pub mod pipeline;
pub mod predict;
pub mod push;
pub mod report;
pub mod search;
pub mod study;
pub mod train;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hpo-gpu",
    version,
    args_override_self = true,
    about = "Hyperparameter search for BERT fine-tuning, many trials at once on one GPU"
)]
pub struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Fine-tune one model and save it in the Hugging Face format.
    Train(train::TrainArgs),
    /// Classify texts with a saved model.
    Predict(predict::PredictArgs),
    /// Run or continue a hyperparameter study (Optuna-compatible SQLite storage). Ctrl-C stores the
    /// running trials FAIL and queues them again; the same command goes on from there.
    Search(search::SearchArgs),
    /// Create trials and print their parameters as JSON, like `optuna ask`.
    Ask(study::AskArgs),
    /// Report a trial's result, like `optuna tell`.
    Tell(study::TellArgs),
    /// List a study's trials.
    Trials(study::TrialsArgs),
    /// Show a study's best trial.
    Best(study::BestArgs),
    /// Plot a study (history, intermediate values, importances, slices, parallel coordinates).
    Plot(report::PlotArgs),
    /// Write a self-contained HTML report of a study.
    Report(report::ReportArgs),
    /// Parameter importances of a study (PED-ANOVA or fANOVA, as Optuna computes them).
    Importance(report::ImportanceArgs),
    /// Upload a model folder to the Hugging Face Hub.
    Push(push::PushArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::tune_allocator();
    if let Some(t) = cli.threads {
        if t == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global()?;
    }
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Train(a) => train::run_train(&a, &mut out),
        Command::Predict(a) => predict::run_predict(&a, &mut out),
        Command::Search(a) => {
            crate::study::interrupt::install()?;
            search::run_search(&a, &mut out)
        }
        Command::Ask(a) => study::run_ask(&a, &mut out),
        Command::Tell(a) => study::run_tell(&a, &mut out),
        Command::Trials(a) => study::run_trials(&a, &mut out),
        Command::Best(a) => study::run_best(&a, &mut out),
        Command::Plot(a) => report::run_plot(&a, &mut out),
        Command::Report(a) => report::run_report(&a, &mut out),
        Command::Importance(a) => report::run_importance(&a, &mut out),
        Command::Push(a) => push::run_push(&a, &mut out),
    }
}

/// The parser with negative numbers accepted as values everywhere: without this clap reads
/// `--values -0.5` or `--weight-decay -1` as an unknown flag `-0`/`-1` instead of handing the
/// number to the option (which then accepts it, or says which range it must be in).
pub fn command() -> clap::Command {
    fn allow_negative(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| if a.get_action().takes_values() { a.allow_negative_numbers(true) } else { a })
            .mut_subcommands(allow_negative)
    }
    allow_negative(Cli::command())
}
