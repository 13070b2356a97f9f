//! The study report: one self-contained HTML file (inline CSS and SVG, no scripts, no network)
//! with the study summary, the best trial, parameter importances, the plots and a table of every
//! trial with its per-epoch metrics.
//!
//! Every piece of text that comes from the database (study and parameter names, categorical
//! choices, attribute values, failure reasons) is escaped; the SVG plots escape their own text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use super::plots::{self, fmt_num};
use super::{ImportanceResult, Importances, StudySnapshot};
use crate::distributions::ParamValue;
use crate::trial::{FrozenTrial, TrialState, UtcDateTime};

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One epoch's metrics from a trial's user attributes (`epoch_{n}_{metric}`, written by the
/// search driver).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochMetrics {
    pub epoch: u32,
    /// metric name (e.g. `eval_accuracy`) -> value, sorted by name.
    pub metrics: BTreeMap<String, f64>,
}

/// The per-epoch metrics stored on a trial, by epoch.
pub fn epoch_metrics(trial: &FrozenTrial) -> Vec<EpochMetrics> {
    let mut by_epoch: BTreeMap<u32, BTreeMap<String, f64>> = BTreeMap::new();
    for (key, value) in &trial.user_attrs {
        let Some(rest) = key.strip_prefix("epoch_") else { continue };
        let Some((n, metric)) = rest.split_once('_') else { continue };
        let (Ok(n), Some(v)) = (n.parse::<u32>(), value.as_f64()) else { continue };
        by_epoch.entry(n).or_default().insert(metric.to_string(), v);
    }
    by_epoch.into_iter().map(|(epoch, metrics)| EpochMetrics { epoch, metrics }).collect()
}

/// `12.3 s`, `4 min 05 s`, `2 h 03 min`.
pub fn fmt_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "—".into();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1} s");
    }
    let s = seconds.round() as u64;
    if s < 3600 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} min", s / 3600, s / 60 % 60)
    }
}

fn fmt_time(t: UtcDateTime) -> String {
    let text = t.format();
    format!("{} UTC", text.split('.').next().unwrap_or(&text))
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.4}"),
        Some(v) => v.to_string(),
        None => "—".into(),
    }
}

/// A short label for a metric name in the epoch column.
fn metric_label(name: &str) -> String {
    match name {
        "eval_accuracy" => "acc".into(),
        "eval_loss" => "eval loss".into(),
        "train_loss" => "train loss".into(),
        other => other.replace('_', " "),
    }
}

fn epoch_line(e: &EpochMetrics) -> String {
    let mut parts: Vec<String> = Vec::new();
    for key in ["eval_accuracy", "eval_loss", "train_loss"] {
        if let Some(v) = e.metrics.get(key) {
            parts.push(format!("{} {:.4}", metric_label(key), v));
        }
    }
    for (k, v) in &e.metrics {
        if !matches!(k.as_str(), "eval_accuracy" | "eval_loss" | "train_loss" | "runtime") {
            parts.push(format!("{} {}", metric_label(k), fmt_num(*v)));
        }
    }
    if let Some(r) = e.metrics.get("runtime") {
        parts.push(fmt_duration(*r));
    }
    format!("<b>{}</b> {}", e.epoch, escape(&parts.join(" · ")))
}

/// A parameter value for the trial table: floats to 4 significant digits (3 in exponent form).
fn short_value(v: &ParamValue) -> String {
    match v {
        ParamValue::Float(x) if x.is_finite() && *x != 0.0 && !(1e-3..1e5).contains(&x.abs()) => {
            let text = format!("{x:.2e}");
            match text.split_once('e') {
                Some((mantissa, exp)) => {
                    format!("{}e{exp}", mantissa.trim_end_matches('0').trim_end_matches('.'))
                }
                None => text,
            }
        }
        ParamValue::Float(x) => fmt_num(*x),
        other => other.to_string(),
    }
}

/// Metric columns in reading order: losses, accuracy, then anything else, runtime last.
fn metric_order(names: &mut [String]) {
    let rank = |m: &str| match m {
        "train_loss" => 0,
        "eval_loss" => 1,
        "eval_accuracy" => 2,
        "runtime" => 4,
        _ => 3,
    };
    names.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
}

fn state_badge(state: TrialState) -> String {
    format!("<span class=\"badge {}\">{}</span>", state.as_str().to_ascii_lowercase(), state.as_str())
}

const CSS: &str = r#"
:root { --ink:#1e1e1e; --muted:#666; --line:#e3e3e3; --accent:#1f77b4; --best:#fff7d6; }
* { box-sizing: border-box; }
body { font-family: "DejaVu Sans", "Segoe UI", Helvetica, Arial, sans-serif; color: var(--ink);
       margin: 0; background: #f6f7f9; line-height: 1.45; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 34px 0 12px; border-bottom: 2px solid var(--line); padding-bottom: 6px; }
.sub { color: var(--muted); margin: 0 0 18px; font-size: 14px; word-break: break-all; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; }
.card.wide { grid-column: span 2; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: bold; margin-top: 2px; }
.card .v.small { font-size: 14px; font-weight: normal; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; overflow-wrap: anywhere; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.best td { background: var(--best); }
.params td:first-child { font-weight: bold; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 10px; font-size: 11px; font-weight: bold; color: #fff; }
.badge.complete { background: #2c8c3c; } .badge.pruned { background: #8a8a8a; }
.badge.fail { background: #c62828; } .badge.running { background: #1f77b4; } .badge.waiting { background: #b8860b; }
.epochs { font-size: 12px; color: #333; white-space: nowrap; }
.epochs div + div { margin-top: 2px; }
.reason { color: #c62828; font-size: 12px; white-space: normal; max-width: 420px; }
figure { background: #fff; border: 1px solid var(--line); border-radius: 8px; margin: 0 0 18px; padding: 10px; }
figure svg { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 13px; padding: 6px 4px 0; }
.two { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 18px; align-items: start; }
.scroll { overflow-x: auto; }
.note { color: var(--muted); font-size: 13px; }
.err { color: #c62828; font-size: 13px; }
footer { color: var(--muted); font-size: 12px; margin-top: 32px; }
"#;

/// Renders the report. `generated_at` is printed in the header (pass `UtcDateTime::now()`).
pub fn render(
    snapshot: &StudySnapshot,
    importances: &Importances,
    generated_at: UtcDateTime,
) -> Result<String> {
    let svgs = plots::render_all_svg(snapshot, importances)?;
    let s = snapshot;
    let names = s.param_names();
    let best = s.best_trial();
    let mut h = String::new();
    let name = escape(&s.study.name);

    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Study {name} — hpo-gpu report</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n\
         <h1>Study {name}</h1>\n<p class=\"sub\">hpo-gpu study report · generated {} · storage {}</p>\n",
        fmt_time(generated_at),
        escape(&s.storage_url)
    );

    // Summary cards.
    let card = |h: &mut String, k: &str, v: &str, small: bool| {
        let _ = writeln!(
            h,
            "<div class=\"card{}\"><div class=\"k\">{}</div><div class=\"v{}\">{}</div></div>",
            if k == "Time span" { " wide" } else { "" },
            escape(k),
            if small { " small" } else { "" },
            v
        );
    };
    h.push_str("<section class=\"cards\">\n");
    card(&mut h, "Direction", &escape(&s.direction.as_str().to_ascii_lowercase()), false);
    card(&mut h, "Trials", &s.trials.len().to_string(), false);
    let counts = [
        TrialState::Complete,
        TrialState::Pruned,
        TrialState::Fail,
        TrialState::Running,
        TrialState::Waiting,
    ]
    .iter()
    .filter(|st| s.count(**st) > 0)
    .map(|st| format!("{} {}", s.count(*st), st.as_str().to_ascii_lowercase()))
    .collect::<Vec<_>>()
    .join(" · ");
    card(&mut h, "By state", &escape(if counts.is_empty() { "no trials" } else { &counts }), true);
    card(&mut h, "Best value", &escape(&fmt_value(best.and_then(|t| t.value()))), false);
    card(&mut h, "Best trial", &best.map(|t| format!("#{}", t.number)).unwrap_or_else(|| "—".into()), false);
    match s.time_span() {
        Some((a, b)) => card(
            &mut h,
            "Time span",
            &escape(&format!("{} → {} ({})", fmt_time(a), fmt_time(b), fmt_duration(b.seconds_since(a)))),
            true,
        ),
        None => card(&mut h, "Time span", "—", true),
    }
    h.push_str("</section>\n");

    // Best trial.
    h.push_str("<h2>Best trial</h2>\n");
    match best {
        None => h.push_str("<p class=\"note\">No trial has completed yet.</p>\n"),
        Some(t) => {
            let _ = write!(
                h,
                "<p>Trial <b>#{}</b> reached <b>{}</b>{}.</p>\n<div class=\"two\">\n<table class=\"params\">\
                 <tr><th>Hyperparameter</th><th>Value</th></tr>\n",
                t.number,
                escape(&fmt_value(t.value())),
                t.duration_seconds().map(|d| format!(" in {}", escape(&fmt_duration(d)))).unwrap_or_default()
            );
            for p in &t.params {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td>{}</td></tr>",
                    escape(&p.name),
                    escape(&p.value.to_string())
                );
            }
            h.push_str("</table>\n");
            let epochs = epoch_metrics(t);
            if epochs.is_empty() {
                h.push_str("<p class=\"note\">No per-epoch metrics recorded.</p>\n");
            } else {
                let metric_names: Vec<String> = {
                    let mut v: Vec<String> = epochs.iter().flat_map(|e| e.metrics.keys().cloned()).collect();
                    v.sort();
                    v.dedup();
                    metric_order(&mut v);
                    v
                };
                h.push_str("<table><tr><th>Epoch</th>");
                for m in &metric_names {
                    let _ = write!(h, "<th>{}</th>", escape(&m.replace('_', " ")));
                }
                h.push_str("</tr>\n");
                for e in &epochs {
                    let _ = write!(h, "<tr><td class=\"num\">{}</td>", e.epoch);
                    for m in &metric_names {
                        let cell = match e.metrics.get(m) {
                            Some(v) if m == "runtime" => fmt_duration(*v),
                            Some(v) => format!("{v:.4}"),
                            None => "—".into(),
                        };
                        let _ = write!(h, "<td class=\"num\">{}</td>", escape(&cell));
                    }
                    h.push_str("</tr>\n");
                }
                h.push_str("</table>\n");
            }
            h.push_str("</div>\n");
        }
    }

    // Importances.
    h.push_str("<h2>Hyperparameter importances</h2>\n");
    h.push_str(&importance_table(importances));

    // Plots.
    h.push_str("<h2>Plots</h2>\n");
    for (kind, svg) in &svgs {
        let caption = match kind {
            plots::PlotKind::OptimizationHistory => {
                "Objective value of every trial; the red line is the best value found so far."
            }
            plots::PlotKind::IntermediateValues => {
                "The value each trial reported after every epoch. Pruned trials are dashed grey: the pruner stopped them early."
            }
            plots::PlotKind::ParamImportances => {
                "How much each hyperparameter explains the objective, by Optuna's two evaluators."
            }
            plots::PlotKind::Slice => "Objective value against each hyperparameter (complete trials).",
            plots::PlotKind::ParallelCoordinate => {
                "Each line is a complete trial through its hyperparameter values."
            }
        };
        let _ = write!(
            h,
            "<figure id=\"{}\">\n{}\n<figcaption><b>{}.</b> {}</figcaption>\n</figure>\n",
            kind.file_stem(),
            responsive_svg(svg, kind.title()),
            escape(kind.title()),
            escape(caption)
        );
    }

    // Trial table.
    h.push_str("<h2>All trials</h2>\n<div class=\"scroll\"><table>\n<tr><th>#</th><th>State</th>");
    for n in &names {
        let _ = write!(h, "<th>{}</th>", escape(n));
    }
    h.push_str("<th>Value</th><th>Duration</th><th>Per-epoch metrics</th></tr>\n");
    for t in &s.trials {
        let is_best = best.is_some_and(|b| b.trial_id == t.trial_id);
        let _ = write!(
            h,
            "<tr{}><td class=\"num\">{}</td><td>{}</td>",
            if is_best { " class=\"best\"" } else { "" },
            t.number,
            state_badge(t.state)
        );
        for n in &names {
            match t.param(n) {
                // Rounded for the table; the exact value shows on hover.
                Some(p) => {
                    let _ = write!(
                        h,
                        "<td class=\"num\" title=\"{}\">{}</td>",
                        escape(&p.value.to_string()),
                        escape(&short_value(&p.value))
                    );
                }
                None => h.push_str("<td class=\"num\">—</td>"),
            }
        }
        let _ = write!(
            h,
            "<td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"epochs\">",
            escape(&fmt_value(t.value())),
            escape(&t.duration_seconds().map(fmt_duration).unwrap_or_else(|| "—".into()))
        );
        for e in epoch_metrics(t) {
            let _ = write!(h, "<div>{}</div>", epoch_line(&e));
        }
        if let Some(reason) = t.system_attrs.get("fail_reason") {
            let text = match reason {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = write!(h, "<div class=\"reason\">{}</div>", escape(&text));
        }
        h.push_str("</td></tr>\n");
    }
    h.push_str("</table></div>\n");
    let _ = write!(
        h,
        "<footer>Generated by hpo-gpu {} from an Optuna-schema study; the same database opens in Optuna and \
         optuna-dashboard.</footer>\n</main>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION")
    );
    Ok(h)
}

fn importance_table(imps: &Importances) -> String {
    let mut params: Vec<String> = Vec::new();
    for list in [&imps.ped_anova, &imps.fanova].into_iter().filter_map(|r| r.as_ref().ok()) {
        for p in list {
            if !params.contains(&p.param) {
                params.push(p.param.clone());
            }
        }
    }
    let mut h = String::new();
    if params.is_empty() {
        h.push_str("<p class=\"note\">Importances need at least two complete trials.</p>\n");
    } else {
        h.push_str("<table><tr><th>Hyperparameter</th><th>PED-ANOVA</th><th>fANOVA</th></tr>\n");
        let cell = |r: &ImportanceResult, name: &str| match r {
            Ok(v) => v
                .iter()
                .find(|p| p.param == name)
                .map(|p| format!("{:.3}", p.importance))
                .unwrap_or("—".into()),
            Err(_) => "—".into(),
        };
        for p in &params {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                escape(p),
                cell(&imps.ped_anova, p),
                cell(&imps.fanova, p)
            );
        }
        h.push_str("</table>\n");
    }
    for (label, r) in [("PED-ANOVA", &imps.ped_anova), ("fANOVA", &imps.fanova)] {
        if let Err(e) = r {
            let _ = writeln!(h, "<p class=\"err\">{label}: {}</p>", escape(e));
        }
    }
    h.push_str(
        "<p class=\"note\">Normalised to sum to 1 per evaluator, as <code>optuna.importance.get_param_importances</code>. \
         PED-ANOVA (Optuna's default) measures what it takes to reach the top 10 % of trials; fANOVA measures how much \
         of the objective's variance each hyperparameter explains.</p>\n",
    );
    h
}

/// Makes plotters' fixed-size SVG scale with the page and labels it for screen readers.
fn responsive_svg(svg: &str, title: &str) -> String {
    match svg.strip_prefix("<svg ") {
        Some(rest) => format!("<svg role=\"img\" aria-label=\"{}\" {rest}", escape(title)),
        None => svg.to_string(),
    }
}

/// Loads nothing: renders `snapshot` to `path`.
pub fn write_report(snapshot: &StudySnapshot, importances: &Importances, path: &Path) -> Result<()> {
    let html = render(snapshot, importances, UtcDateTime::now())?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    }
    std::fs::write(path, html).with_context(|| format!("{}: cannot write the report", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(escape("<b a=\"x\">'&'</b>"), "&lt;b a=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/b&gt;");
    }

    #[test]
    fn table_values_are_short() {
        assert_eq!(short_value(&ParamValue::Float(6.8983650013547e-06)), "6.9e-6");
        assert_eq!(short_value(&ParamValue::Float(3.154004959491982e-05)), "3.15e-5");
        assert_eq!(short_value(&ParamValue::Float(0.11452544852984894)), "0.1145");
        assert_eq!(short_value(&ParamValue::Int(32)), "32");
        assert_eq!(short_value(&ParamValue::Str("adamw".into())), "adamw");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(fmt_duration(12.34), "12.3 s");
        assert_eq!(fmt_duration(245.0), "4 min 05 s");
        assert_eq!(fmt_duration(7380.0), "2 h 03 min");
        assert_eq!(fmt_duration(-1.0), "—");
    }
}
