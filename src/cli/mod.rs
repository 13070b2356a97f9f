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

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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

/// Parses the command line as a user types it: a negative number in any float notation
/// (`-1.084750655768679e-05` as Python's `repr` prints it, `-.5`, `-5E+3`, `-inf`) is a value
/// of the option before it, not a flag. clap takes `-1`, `-0.5` and `-1.5e10` as values by
/// itself (`allow_negative_numbers`) but not an exponent with a sign or a leading dot, so such a
/// value is rewritten before clap sees it: to its plain decimal spelling when finite (the same
/// f64), or joined to its option (`--flag=-inf`) when it is the option's first value.
pub fn parse_args(args: Vec<std::ffi::OsString>) -> Result<Cli, clap::Error> {
    let mut cmd = command();
    cmd.build();
    let args = spell_negative_numbers(&cmd, args);
    Cli::from_arg_matches(&cmd.try_get_matches_from(args)?)
}

/// See [`parse_args`]. Only tokens in a value position (after an option that takes values) are
/// touched: a positional text such as `predict … -1e5` stays as typed.
fn spell_negative_numbers(root: &clap::Command, args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut command = root;
    // The option whose values follow (its index in `out`), how many it has had, and how many it
    // takes at most.
    let mut pending: Option<(usize, usize, usize)> = None;
    let mut tokens = args.into_iter();
    if let Some(program) = tokens.next() {
        out.push(program);
    }
    for token in tokens.by_ref() {
        let Some(text) = token.to_str() else {
            pending = None;
            out.push(token);
            continue;
        };
        if text == "--" {
            out.push(token);
            break;
        }
        let negative = text.strip_prefix('-').is_some_and(|rest| rest.parse::<f64>().is_ok());
        if let Some((option, values, most)) = pending.filter(|(_, values, most)| values < most) {
            if negative {
                let value: f64 = text.parse().unwrap_or(f64::NAN);
                if value.is_finite() {
                    out.push(format!("{value}").into());
                } else if values == 0 {
                    let joined = format!("{}={text}", out[option].to_string_lossy());
                    out[option] = joined.into();
                } else {
                    out.push(token);
                }
                pending = Some((option, values + 1, most));
                continue;
            }
            if !text.starts_with('-') {
                out.push(token);
                pending = Some((option, values + 1, most));
                continue;
            }
        }
        pending = None;
        if let Some(long) = text.strip_prefix("--") {
            let option =
                command.get_arguments().chain(root.get_arguments()).find(|a| a.get_long() == Some(long));
            if let Some(option) = option.filter(|a| a.get_action().takes_values()) {
                let most = option.get_num_args().map_or(1, |n| n.max_values());
                pending = Some((out.len(), 0, most));
            }
        } else if !text.starts_with('-')
            && let Some(sub) = command.find_subcommand(text)
        {
            command = sub;
        }
        out.push(token);
    }
    out.extend(tokens);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spelled(args: &[&str]) -> Vec<String> {
        let mut cmd = command();
        cmd.build();
        let args = args.iter().map(std::ffi::OsString::from).collect();
        spell_negative_numbers(&cmd, args).into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn negative_numbers_in_any_notation_are_values() {
        assert_eq!(
            spelled(&[
                "hpo-gpu",
                "tell",
                "--values",
                "-1.084750655768679e-05",
                "-.5",
                "-5E+3",
                "--trial-number",
                "1"
            ]),
            [
                "hpo-gpu",
                "tell",
                "--values",
                "-0.00001084750655768679",
                "-0.5",
                "-5000",
                "--trial-number",
                "1"
            ]
        );
        // The exact f64 survives the respelling.
        assert_eq!("-0.00001084750655768679".parse::<f64>().unwrap(), -1.084750655768679e-05);
        assert_eq!(
            spelled(&["hpo-gpu", "--threads", "2", "train", "--learning-rate", "-inf", "--seed", "3"]),
            ["hpo-gpu", "--threads", "2", "train", "--learning-rate=-inf", "--seed", "3"]
        );
        // Not in a value position: a positional text stays as typed, so does what follows `--`.
        assert_eq!(
            spelled(&["hpo-gpu", "predict", "--model", "m", "-1e5", "--", "-2e-3"]),
            ["hpo-gpu", "predict", "--model", "m", "-1e5", "--", "-2e-3"]
        );
        let cli = parse_args(
            ["hpo-gpu", "train", "--weight-decay", "-2.5e-1"].iter().map(std::ffi::OsString::from).collect(),
        )
        .unwrap();
        let Command::Train(args) = cli.command else { panic!("not train") };
        assert_eq!(args.hyper.weight_decay, -0.25);
    }
}
