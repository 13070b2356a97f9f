//! The `hpo-gpu` command line: parse, call the library, print. Errors become one line on stderr
//! and a non-zero exit code; nothing panics across this boundary.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use hpo_gpu::cli;

#[derive(Parser)]
#[command(
    name = "hpo-gpu",
    version,
    args_override_self = true,
    about = "Hyperparameter search for BERT fine-tuning, many trials at once on one GPU"
)]
struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune one model and save it in the Hugging Face format.
    Train(cli::TrainArgs),
    /// Classify texts with a saved model.
    Predict(cli::PredictArgs),
    /// Run or continue a hyperparameter study (Optuna-compatible SQLite storage). Ctrl-C stores the
    /// running trials FAIL and queues them again; the same command goes on from there.
    Search(hpo_gpu::search_cmd::SearchArgs),
    /// Create trials and print their parameters as JSON, like `optuna ask`.
    Ask(hpo_gpu::study::cli::AskArgs),
    /// Report a trial's result, like `optuna tell`.
    Tell(hpo_gpu::study::cli::TellArgs),
    /// List a study's trials.
    Trials(hpo_gpu::study::cli::TrialsArgs),
    /// Show a study's best trial.
    Best(hpo_gpu::study::cli::BestArgs),
    /// Plot a study (history, intermediate values, importances, slices, parallel coordinates).
    Plot(hpo_gpu::report::cli::PlotArgs),
    /// Write a self-contained HTML report of a study.
    Report(hpo_gpu::report::cli::ReportArgs),
    /// Parameter importances of a study (PED-ANOVA or fANOVA, as Optuna computes them).
    Importance(hpo_gpu::report::cli::ImportanceArgs),
    /// Upload a model folder to the Hugging Face Hub.
    Push(hpo_gpu::push::cli::PushArgs),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    hpo_gpu::tune_allocator();
    if let Some(t) = cli.threads {
        if t == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global()?;
    }
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Train(a) => cli::run_train(&a, &mut out),
        Command::Predict(a) => cli::run_predict(&a, &mut out),
        Command::Search(a) => {
            hpo_gpu::study::interrupt::install()?;
            hpo_gpu::search_cmd::run_search(&a, &mut out)
        }
        Command::Ask(a) => hpo_gpu::study::cli::run_ask(&a, &mut out),
        Command::Tell(a) => hpo_gpu::study::cli::run_tell(&a, &mut out),
        Command::Trials(a) => hpo_gpu::study::cli::run_trials(&a, &mut out),
        Command::Best(a) => hpo_gpu::study::cli::run_best(&a, &mut out),
        Command::Plot(a) => hpo_gpu::report::cli::run_plot(&a, &mut out),
        Command::Report(a) => hpo_gpu::report::cli::run_report(&a, &mut out),
        Command::Importance(a) => hpo_gpu::report::cli::run_importance(&a, &mut out),
        Command::Push(a) => hpo_gpu::push::cli::run_push(&a, &mut out),
    }
}

/// The parser with negative numbers accepted as values everywhere: without this clap reads
/// `--values -0.5` or `--weight-decay -1` as an unknown flag `-0`/`-1` instead of handing the
/// number to the option (which then accepts it, or says which range it must be in).
fn command() -> clap::Command {
    fn allow_negative(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| if a.get_action().takes_values() { a.allow_negative_numbers(true) } else { a })
            .mut_subcommands(allow_negative)
    }
    allow_negative(Cli::command())
}

fn main() {
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli)));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("error: {}", format_chain(&e));
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("error: internal error (a bug in hpo-gpu; please report it with the command you ran)");
            std::process::exit(101);
        }
    }
}

/// "outer: inner: innermost" on one line. A message from a library that spans several lines
/// (a parser's snippet with a caret) is folded into that line rather than breaking the rule.
fn format_chain(e: &anyhow::Error) -> String {
    let fold =
        |msg: String| msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    e.chain().map(|c| fold(c.to_string())).collect::<Vec<_>>().join(": ")
}
