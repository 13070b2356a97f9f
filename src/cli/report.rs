//! Command-line pieces for `hpo-gpu plot`, `hpo-gpu report` and `hpo-gpu importance`: clap
//! argument structs plus `run_*` functions that write to any `Write` (main.rs only dispatches).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::cli::study::StudySelect;
use crate::report::importance::{Evaluator, FanovaOptions, PedAnovaOptions, param_importances};
use crate::report::{Importances, StudySnapshot, html, plots};

/// `hpo-gpu plot`: write the study's plots as PNG and SVG.
#[derive(Args, Clone, Debug)]
pub struct PlotArgs {
    #[command(flatten)]
    pub study: StudySelect,
    /// Directory for the plot files (created if needed).
    #[arg(long, default_value = "plots")]
    pub out: PathBuf,
    /// Seed of the fANOVA random forest.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `hpo-gpu report`: write a self-contained HTML report of the study.
#[derive(Args, Clone, Debug)]
pub struct ReportArgs {
    #[command(flatten)]
    pub study: StudySelect,
    /// The HTML file to write.
    #[arg(long, default_value = "study_report.html")]
    pub out: PathBuf,
    /// Seed of the fANOVA random forest.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Importance evaluator flag values.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvaluatorArg {
    /// Optuna's default, PedAnovaImportanceEvaluator.
    PedAnova,
    /// FanovaImportanceEvaluator (random forest, 64 trees, max depth 64).
    Fanova,
}

/// `hpo-gpu importance`: print parameter importances, as `optuna.importance.get_param_importances`.
#[derive(Args, Clone, Debug)]
pub struct ImportanceArgs {
    #[command(flatten)]
    pub study: StudySelect,
    #[arg(long, value_enum, default_value = "ped-anova")]
    pub evaluator: EvaluatorArg,
    /// Seed of the fANOVA random forest.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object `{"param": importance, ...}` instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Refuses an output path that cannot be created because it, or a folder above it, is an
/// existing file; checked before the study is read so the error is the first thing said.
fn check_out_path(out: &Path, must_be_dir: bool) -> Result<()> {
    if must_be_dir && out.exists() && !out.is_dir() {
        bail!("--out {}: exists and is not a directory", out.display());
    }
    if !must_be_dir && out.is_dir() {
        bail!("--out {}: is a directory; give the path of the HTML file to write", out.display());
    }
    if let Some(file) = out.ancestors().skip(1).find(|a| a.exists()).filter(|a| !a.is_dir()) {
        bail!("--out {}: {} is a file, not a directory", out.display(), file.display());
    }
    Ok(())
}

pub fn run_plot(args: &PlotArgs, out: &mut dyn Write) -> Result<()> {
    check_out_path(&args.out, true)?;
    let (mut storage, study) = args.study.open()?;
    let snapshot = StudySnapshot::from_storage(&mut storage, study)?;
    let importances = Importances::compute(&snapshot, args.seed);
    let files = plots::write_all(&snapshot, &importances, &args.out)?;
    for f in &files {
        writeln!(out, "{}", f.display())?;
    }
    Ok(())
}

pub fn run_report(args: &ReportArgs, out: &mut dyn Write) -> Result<()> {
    check_out_path(&args.out, false)?;
    let (mut storage, study) = args.study.open()?;
    let snapshot = StudySnapshot::from_storage(&mut storage, study)?;
    let importances = Importances::compute(&snapshot, args.seed);
    html::write_report(&snapshot, &importances, &args.out)?;
    writeln!(
        out,
        "wrote {} ({} trials of study {:?})",
        args.out.display(),
        snapshot.trials.len(),
        snapshot.study.name
    )?;
    Ok(())
}

pub fn run_importance(args: &ImportanceArgs, out: &mut dyn Write) -> Result<()> {
    let (mut storage, study) = args.study.open()?;
    let snapshot = StudySnapshot::from_storage(&mut storage, study)?;
    let evaluator = match args.evaluator {
        EvaluatorArg::PedAnova => Evaluator::PedAnova(PedAnovaOptions::default()),
        EvaluatorArg::Fanova => {
            Evaluator::Fanova(FanovaOptions { seed: args.seed, ..FanovaOptions::default() })
        }
    };
    let imps = param_importances(&snapshot.trials, snapshot.direction, &evaluator)
        .with_context(|| format!("{} on study {:?}", evaluator.label(), snapshot.study.name))?;
    if args.json {
        let map: serde_json::Map<String, serde_json::Value> =
            imps.iter().map(|p| (p.param.clone(), json!(p.importance))).collect();
        writeln!(out, "{}", serde_json::Value::Object(map))?;
    } else {
        let width = imps.iter().map(|p| p.param.len()).max().unwrap_or(9).max(9);
        writeln!(out, "{:width$}  {} importance", "parameter", evaluator.label())?;
        for p in &imps {
            writeln!(out, "{:width$}  {:.4}", p.param, p.importance)?;
        }
    }
    Ok(())
}
