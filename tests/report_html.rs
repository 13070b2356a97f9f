//! The plots and the HTML report on a realistic study run by the real search driver (30 trials,
//! 3 epochs, some pruned, one failed), on hostile names, on empty studies and on bad input.
//!
//! `cargo test --test report_html -- --ignored regenerate_docs` rewrites the committed examples
//! under docs/report/ (then run scripts/screenshot_report.sh for the screenshot).

mod fake_trainer;
mod report_common;

use std::path::Path;

use hpo_gpu::cli::report::{ImportanceArgs, PlotArgs, ReportArgs, run_importance, run_plot, run_report};
use hpo_gpu::cli::study::StudySelect;
use hpo_gpu::distributions::{CategoricalDistribution, Distribution, FloatDistribution, ParamValue};
use hpo_gpu::report::html::{self, epoch_metrics};
use hpo_gpu::report::plots::{self, PlotKind};
use hpo_gpu::report::{Importances, StudySnapshot};
use hpo_gpu::study::storage::{NewTrial, Storage};
use hpo_gpu::trial::{StudyDirection, TrialState, UtcDateTime};
use report_common::{temp_db, write_demo_study};

fn select(url: &str, name: &str) -> StudySelect {
    StudySelect { storage: url.to_string(), study_name: Some(name.to_string()) }
}

#[test]
fn demo_study_report_has_summary_best_trial_table_and_plots() {
    let (dir, url) = temp_db();
    write_demo_study(&url, "transformers_optuna_study").unwrap();
    let s = StudySnapshot::load(&url, "transformers_optuna_study").unwrap();
    let (complete, pruned, failed) =
        (s.count(TrialState::Complete), s.count(TrialState::Pruned), s.count(TrialState::Fail));
    assert_eq!(complete + pruned, 30);
    assert_eq!(failed, 1);
    assert!(pruned >= 3, "the median pruner should stop some of the slow learners: {pruned} pruned");
    let best = s.best_trial().unwrap().clone();
    assert!(best.value().unwrap() > 0.88);
    assert_eq!(epoch_metrics(&best).len(), 3);
    assert_eq!(epoch_metrics(&best)[2].metrics.get("eval_accuracy").copied(), best.value());

    let out = dir.path().join("out/report.html");
    let mut log = Vec::new();
    run_report(
        &ReportArgs { study: select(&url, "transformers_optuna_study"), out: out.clone(), seed: 0 },
        &mut log,
    )
    .unwrap();
    assert!(String::from_utf8(log).unwrap().contains("31 trials"));
    let page = std::fs::read_to_string(&out).unwrap();

    // Self-contained: no scripts, no external resources.
    assert!(page.starts_with("<!DOCTYPE html>"));
    for banned in ["<script", "src=", "href=", "@import", "url("] {
        assert!(!page.contains(banned), "report contains {banned:?}");
    }
    assert_eq!(page.matches("<svg ").count(), PlotKind::ALL.len());
    for kind in PlotKind::ALL {
        assert!(page.contains(&format!("<figure id=\"{}\">", kind.file_stem())));
    }
    // Summary and best trial.
    assert!(page.contains("<h1>Study transformers_optuna_study</h1>"));
    assert!(page.contains(&format!("{complete} complete · {pruned} pruned · 1 fail")));
    assert!(page.contains(&format!("<div class=\"v\">{:.4}</div>", best.value().unwrap())));
    assert!(page.contains(&format!("Trial <b>#{}</b> reached", best.number)));
    assert!(page.contains("2026-11-28 08:00:02 UTC"), "time span starts at the first trial");
    // Trial table: one row per trial, the failed trial's reason, epoch metrics, durations.
    assert_eq!(page.matches("<tr class=\"best\">").count(), 1);
    assert_eq!(page.matches("<span class=\"badge ").count(), 31);
    assert!(page.contains("simulated CUDA out of memory"));
    assert!(page.contains("<b>3</b> acc "));
    assert!(page.contains("min"), "trial durations of minutes are shown in minutes");
    // Importance table: learning_rate dominates this objective for both evaluators.
    let imps = Importances::compute(&s, 0);
    for list in [imps.ped_anova.as_ref().unwrap(), imps.fanova.as_ref().unwrap()] {
        assert_eq!(list[0].param, "learning_rate", "{list:?}");
    }
    assert!(page.contains("<tr><td>learning_rate</td>"));
}

#[test]
fn plot_command_writes_png_and_svg_for_every_plot() {
    let (dir, url) = temp_db();
    write_demo_study(&url, "demo").unwrap();
    let out = dir.path().join("plots");
    let mut log = Vec::new();
    run_plot(&PlotArgs { study: select(&url, "demo"), out: out.clone(), seed: 0 }, &mut log).unwrap();
    let listed = String::from_utf8(log).unwrap();
    assert_eq!(listed.lines().count(), 2 * PlotKind::ALL.len());
    for kind in PlotKind::ALL {
        let png = std::fs::read(out.join(format!("{}.png", kind.file_stem()))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{}", kind.file_stem());
        assert!(png.len() > 10_000, "{} is only {} bytes", kind.file_stem(), png.len());
        let svg = std::fs::read_to_string(out.join(format!("{}.svg", kind.file_stem()))).unwrap();
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("<text"), "{} has no text", kind.file_stem());
    }
    let history = std::fs::read_to_string(out.join("optimization_history.svg")).unwrap();
    assert!(history.contains("Best value so far") && history.contains("Pruned trial"));
    let slice = std::fs::read_to_string(out.join("slice.svg")).unwrap();
    assert!(
        slice.contains("learning_rate (log scale)")
            && slice.contains("per_device_train_batch_size (categorical)")
    );
    let intermediate = std::fs::read_to_string(out.join("intermediate_values.svg")).unwrap();
    assert!(intermediate.contains("Pruned trial (stopped early)") && intermediate.contains("Best trial (#"));

    let mut json = Vec::new();
    let args = ImportanceArgs {
        study: select(&url, "demo"),
        evaluator: hpo_gpu::cli::report::EvaluatorArg::PedAnova,
        seed: 0,
        json: true,
    };
    run_importance(&args, &mut json).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let total: f64 = v.as_object().unwrap().values().map(|x| x.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-12, "{v}");
}

/// Names and values from the database are escaped everywhere they appear.
#[test]
fn hostile_names_are_escaped() {
    let (dir, url) = temp_db();
    let mut storage = Storage::open(&url).unwrap();
    let name = "<script>alert('study')</script>";
    let study = storage.create_study(name, StudyDirection::Minimize, false).unwrap();
    let x = Distribution::Float(FloatDistribution::new(0.0, 1.0, false, None).unwrap());
    let c = Distribution::Categorical(
        CategoricalDistribution::new(vec![
            ParamValue::Str("<img src=x onerror=alert(1)>".into()),
            ParamValue::Str("b&b".into()),
        ])
        .unwrap(),
    );
    for i in 0..6 {
        let mut t = NewTrial::new(if i == 5 { TrialState::Fail } else { TrialState::Complete });
        if i < 5 {
            t.values = Some(vec![f64::from(i) * 0.1]);
        }
        t.params = vec![
            ("a<b&\"c\"".into(), f64::from(i) / 5.0, x.clone()),
            ("choice".into(), f64::from(i % 2), c.clone()),
        ];
        t.user_attrs = vec![("epoch_1_eval_accuracy".into(), "0.5".into())];
        if i == 5 {
            t.system_attrs = vec![("fail_reason".into(), "\"</td><script>x()</script>\"".into())];
        }
        storage.create_trial(study.study_id, &t).unwrap();
    }
    let s = StudySnapshot::load(&url, name).unwrap();
    let imps = Importances::compute(&s, 0);
    let page = html::render(&s, &imps, UtcDateTime::now()).unwrap();
    assert!(!page.contains("<script"), "unescaped script tag");
    assert!(!page.contains("<img"), "unescaped img tag");
    assert!(page.contains("&lt;script&gt;alert(&#39;study&#39;)&lt;/script&gt;"));
    assert!(page.contains("a&lt;b&amp;&quot;c&quot;"));
    assert!(page.contains("&lt;/td&gt;&lt;script&gt;x()&lt;/script&gt;"));
    // Plots render these names too (plotters escapes SVG text).
    plots::write_all(&s, &imps, &dir.path().join("p")).unwrap();
    let svg = std::fs::read_to_string(dir.path().join("p/slice.svg")).unwrap();
    assert!(svg.contains("a&lt;b&amp;&quot;c&quot;") && !svg.contains("<img"));
}

#[test]
fn empty_and_tiny_studies_still_render() {
    let (dir, url) = temp_db();
    let mut storage = Storage::open(&url).unwrap();
    storage.create_study("empty", StudyDirection::Maximize, false).unwrap();
    let one = storage.create_study("one", StudyDirection::Maximize, false).unwrap();
    let x = Distribution::Float(FloatDistribution::new(1e-6, 1e-4, true, None).unwrap());
    let mut t = NewTrial::new(TrialState::Complete);
    t.values = Some(vec![0.8]);
    t.params = vec![("learning_rate".into(), 3e-5, x)];
    storage.create_trial(one.study_id, &t).unwrap();
    storage.create_trial(one.study_id, &NewTrial::new(TrialState::Running)).unwrap();

    for name in ["empty", "one"] {
        let s = StudySnapshot::load(&url, name).unwrap();
        let imps = Importances::compute(&s, 0);
        let page = html::render(&s, &imps, UtcDateTime::now()).unwrap();
        assert_eq!(page.matches("<svg ").count(), PlotKind::ALL.len(), "{name}");
        let files = plots::write_all(&s, &imps, &dir.path().join(name)).unwrap();
        assert_eq!(files.len(), 10);
        if name == "empty" {
            assert!(page.contains("No trial has completed yet"));
            assert!(page.contains("Importances need at least two complete trials"));
        } else {
            assert!(page.contains("Trial <b>#0</b> reached <b>0.8000</b>"));
            assert!(page.contains("badge running"));
        }
    }
    let svg = std::fs::read_to_string(dir.path().join("empty/optimization_history.svg")).unwrap();
    assert!(svg.contains("No complete or pruned trials yet"));
}

#[test]
fn bad_storage_or_study_name_is_a_clear_error() {
    let (dir, url) = temp_db();
    write_demo_study(&url, "demo").unwrap();
    let out = dir.path().join("r.html");
    let err =
        run_report(&ReportArgs { study: select(&url, "nope"), out: out.clone(), seed: 0 }, &mut Vec::new())
            .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("nope") && msg.contains("demo"), "{msg}");
    let err = run_report(
        &ReportArgs { study: select("mysql://x/y", "demo"), out: out.clone(), seed: 0 },
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("unsupported database"), "{err:#}");
    let missing_dir = format!("sqlite:///{}/no/such/dir/x.db", dir.path().display());
    let err = run_plot(
        &PlotArgs { study: select(&missing_dir, "demo"), out: dir.path().join("p"), seed: 0 },
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
    // The report path's parent is a file: the error names the path.
    let blocked = dir.path().join("r.html/inner.html");
    std::fs::write(dir.path().join("r.html"), "x").unwrap();
    let err = run_report(&ReportArgs { study: select(&url, "demo"), out: blocked, seed: 0 }, &mut Vec::new())
        .unwrap_err();
    assert!(format!("{err:#}").contains("r.html"), "{err:#}");
    assert!(!out.with_file_name("nope").exists());
}

/// Rewrites docs/report/: the example report and the PNG plots of the demo study.
#[test]
#[ignore = "writes the committed examples under docs/report"]
fn regenerate_docs() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/report");
    let (dir, url) = temp_db();
    write_demo_study(&url, "transformers_optuna_study").unwrap();
    let s = StudySnapshot::load(&url, "transformers_optuna_study").unwrap();
    let imps = Importances::compute(&s, 0);
    let mut shown = s.clone();
    shown.storage_url = "sqlite:///optuna_trials.db".into();
    let page = html::render(&shown, &imps, UtcDateTime::parse("2026-11-28 09:30:00").unwrap()).unwrap();
    std::fs::create_dir_all(docs.join("plots")).unwrap();
    std::fs::write(docs.join("example_report.html"), page).unwrap();
    for kind in PlotKind::ALL {
        plots::render_png(kind, &s, &imps, &docs.join(format!("plots/{}.png", kind.file_stem()))).unwrap();
    }
    // Keep the study for the dashboard screenshot (scripts/screenshot_report.sh --dashboard).
    let db = dir.path().join("study.db");
    std::fs::copy(&db, std::env::temp_dir().join("hpo_gpu_demo_study.db")).unwrap();
}

/// 30 parameters, an int parameter over the whole i64 range and steps at the ends of i64: the
/// plots stay bounded (24 parameters shown, with a note) and nothing overflows.
#[test]
fn wide_and_extreme_studies_render() {
    use hpo_gpu::distributions::IntDistribution;
    let (dir, url) = temp_db();
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.create_study("wide", StudyDirection::Minimize, false).unwrap();
    let x = Distribution::Float(FloatDistribution::new(0.0, 1.0, false, None).unwrap());
    let huge = Distribution::Int(IntDistribution::new(i64::MIN / 2, i64::MAX / 2, false, 1).unwrap());
    for i in 0..12u32 {
        let mut t = NewTrial::new(TrialState::Complete);
        t.values = Some(vec![f64::from(i)]);
        t.params =
            (0..30).map(|k| (format!("p{k:02}"), f64::from((i * 7 + k) % 10) / 10.0, x.clone())).collect();
        t.params.push(("huge".into(), f64::from(i) * 1e15, huge.clone()));
        t.intermediate_values = vec![(i64::MIN, 1.0), (i64::MAX, f64::from(i))];
        storage.create_trial(study.study_id, &t).unwrap();
    }
    let s = StudySnapshot::load(&url, "wide").unwrap();
    let imps = Importances::compute(&s, 0);
    assert_eq!(imps.ped_anova.as_ref().unwrap().len(), 31);
    plots::write_all(&s, &imps, &dir.path().join("p")).unwrap();
    let slice = std::fs::read_to_string(dir.path().join("p/slice.svg")).unwrap();
    assert!(slice.contains("(first 24 of 31 parameters)"));
    assert!(slice.contains("p23\n"), "p23 is shown");
    assert!(!slice.contains("p24"), "p24 is beyond the cap");
    let (w, h) = png_size(&dir.path().join("p/slice.png"));
    assert!(w <= 1200 && h <= 8 * 360 + 70, "{w}x{h}");
    let page = html::render(&s, &imps, UtcDateTime::now()).unwrap();
    assert!(page.contains("<th>p29</th>"), "the trial table lists every parameter");
}

fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    (u32::from_be_bytes(b[16..20].try_into().unwrap()), u32::from_be_bytes(b[20..24].try_into().unwrap()))
}

/// A study for the layout test: `values[i]` is trial i's objective (None: it failed), `pruned[i]`
/// whether it was pruned; every trial reports `epochs` intermediate values ending at its value.
fn layout_study(
    url: &str,
    name: &str,
    direction: StudyDirection,
    values: &[Option<f64>],
    pruned: &[usize],
    epochs: i64,
) -> StudySnapshot {
    let mut storage = Storage::open(url).unwrap();
    let study = storage.create_study(name, direction, false).unwrap();
    let lr = Distribution::Float(FloatDistribution::new(1e-6, 1e-4, true, None).unwrap());
    let wd = Distribution::Float(FloatDistribution::new(0.0, 0.3, false, None).unwrap());
    for (i, v) in values.iter().enumerate() {
        let state = match v {
            None => TrialState::Fail,
            Some(_) if pruned.contains(&i) => TrialState::Pruned,
            Some(_) => TrialState::Complete,
        };
        let mut t = NewTrial::new(state);
        let last = v.unwrap_or(0.3);
        let steps = if state == TrialState::Complete { epochs } else { (epochs / 2).max(1) };
        t.intermediate_values = (0..steps).map(|k| (k, last - 0.01 * (steps - 1 - k) as f64)).collect();
        t.values = (state == TrialState::Complete).then(|| vec![last]);
        let x = (i as f64 * 0.618).fract();
        t.params = vec![
            ("learning_rate".into(), 1e-6 * 100f64.powf(x), lr.clone()),
            ("weight_decay".into(), 0.3 * x, wd.clone()),
        ];
        storage.create_trial(study.study_id, &t).unwrap();
    }
    StudySnapshot::load(url, name).unwrap()
}

/// Issue 18: no legend covers a plotted point, and no point sits on the frame, for small, pruned
/// and failed, and large studies in every plot kind. The recipe's study is the first: its fifth
/// trial (0.488, maximized) once sat under the legend in the lower right.
#[test]
fn legends_never_cover_data_and_no_point_sits_on_the_frame() {
    let (_dir, url) = temp_db();
    let recipe = [0.5, 0.47, 0.52, 0.45, 0.488].map(Some);
    let mut studies: Vec<(String, StudySnapshot)> = Vec::new();
    for n in 1..=5 {
        let name = format!("recipe-{n}");
        studies
            .push((name.clone(), layout_study(&url, &name, StudyDirection::Maximize, &recipe[..n], &[], 3)));
    }
    let mixed: Vec<Option<f64>> =
        (0..9).map(|i| if i == 4 { None } else { Some(0.9 - 0.07 * f64::from(i % 5)) }).collect();
    studies.push(("mixed".into(), layout_study(&url, "mixed", StudyDirection::Minimize, &mixed, &[1, 6], 4)));
    let large: Vec<Option<f64>> =
        (0..500).map(|i| Some(((f64::from(i) * 0.7548).fract() - 0.5).abs())).collect();
    studies.push((
        "large".into(),
        layout_study(&url, "large", StudyDirection::Minimize, &large, &[7, 99, 480], 3),
    ));

    for (name, s) in &studies {
        let imps = Importances::compute(s, 0);
        for kind in PlotKind::ALL {
            let layout = plots::layout(kind, s, &imps).unwrap();
            let svg = plots::render_svg(kind, s, &imps).unwrap();
            let width: i32 =
                svg.split("width=\"").nth(1).and_then(|w| w.split('"').next()).unwrap().parse().unwrap();
            if let Some(legend) = layout.legend {
                assert!(legend.right < width, "{name} {kind:?}: the legend leaves the canvas: {legend:?}");
                for m in &layout.marks {
                    assert!(
                        !legend.touches(m.x, m.y, m.radius),
                        "{name} {kind:?}: the legend {legend:?} covers {m:?}"
                    );
                }
                for frame in &layout.frames {
                    assert!(legend.left > frame.right, "{name} {kind:?}: the legend is inside the axes");
                }
            }
            // Bars grow from their axis and parallel-coordinate lines end on theirs, by design.
            if matches!(kind, PlotKind::ParamImportances | PlotKind::ParallelCoordinate) {
                continue;
            }
            for m in &layout.marks {
                assert!(
                    layout.frames.iter().any(|f| f.holds_clear(m.x, m.y, m.radius)),
                    "{name} {kind:?}: {m:?} touches the frame {:?}",
                    layout.frames
                );
            }
            let trials = s.trials.len();
            let plotted = s.trials.iter().filter(|t| t.state != TrialState::Fail).count();
            let expected = match kind {
                PlotKind::OptimizationHistory => plotted,
                PlotKind::IntermediateValues => s.trials.iter().map(|t| t.intermediate_values.len()).sum(),
                PlotKind::Slice => 2 * s.count(TrialState::Complete),
                _ => unreachable!(),
            };
            assert_eq!(layout.marks.len(), expected, "{name} {kind:?} ({trials} trials)");
            let has_legend = kind != PlotKind::Slice;
            assert_eq!(layout.legend.is_some(), has_legend, "{name} {kind:?}");
        }
    }
}
