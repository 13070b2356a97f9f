//! Study plots drawn with plotters, to PNG files and to SVG text (the HTML report inlines the
//! SVG): optimization history, intermediate values, parameter importances, slice plots and
//! parallel coordinates — the plots of `optuna.visualization`, readable at a glance.
//!
//! Text is drawn with the DejaVu Sans font compiled into the binary (the `dejavu` crate), so PNGs
//! render the same on a machine without any system fonts.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use plotters::coord::Shift;
use plotters::element::{Circle, DashedPathElement, EmptyElement, PathElement, Rectangle, Text};
use plotters::prelude::{
    BitMapBackend, ChartBuilder, ChartContext, Color, CoordTranslate, DrawingArea, DrawingBackend,
    IntoDrawingArea, IntoFont, LineSeries, RGBColor, SVGBackend, ShapeStyle, TextStyle, WHITE,
};
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use super::importance::ParamImportance;
use super::{ImportanceResult, Importances, StudySnapshot};
use crate::distributions::Distribution;
use crate::trial::{FrozenTrial, StudyDirection, TrialState};

const FONT: &str = "sans-serif";
const BLACK: RGBColor = RGBColor(30, 30, 30);
const GRID: RGBColor = RGBColor(228, 228, 228);
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const RED: RGBColor = RGBColor(214, 39, 40);
const GREY: RGBColor = RGBColor(150, 150, 150);
const TAB10: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(31, 70, 120),
    RGBColor(120, 160, 60),
];

/// The plots, in the order the report shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlotKind {
    OptimizationHistory,
    IntermediateValues,
    ParamImportances,
    Slice,
    ParallelCoordinate,
}

impl PlotKind {
    pub const ALL: [PlotKind; 5] = [
        PlotKind::OptimizationHistory,
        PlotKind::IntermediateValues,
        PlotKind::ParamImportances,
        PlotKind::Slice,
        PlotKind::ParallelCoordinate,
    ];

    /// File name without extension (as Optuna's `plot_*` function names).
    pub fn file_stem(self) -> &'static str {
        match self {
            PlotKind::OptimizationHistory => "optimization_history",
            PlotKind::IntermediateValues => "intermediate_values",
            PlotKind::ParamImportances => "param_importances",
            PlotKind::Slice => "slice",
            PlotKind::ParallelCoordinate => "parallel_coordinate",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            PlotKind::OptimizationHistory => "Optimization history",
            PlotKind::IntermediateValues => "Intermediate values",
            PlotKind::ParamImportances => "Hyperparameter importances",
            PlotKind::Slice => "Slice plot",
            PlotKind::ParallelCoordinate => "Parallel coordinates",
        }
    }

    /// Canvas size in pixels for this study.
    fn size(self, snapshot: &StudySnapshot) -> (u32, u32) {
        let n_params = plotted_params(snapshot).len().max(1) as u32;
        match self {
            PlotKind::OptimizationHistory | PlotKind::IntermediateValues => (960, 540),
            PlotKind::ParamImportances => (960, (170 + 70 * n_params).max(360)),
            PlotKind::Slice => {
                let cols = n_params.min(3);
                let rows = n_params.div_ceil(3);
                (cols.max(2) * 400, rows * 360 + 70)
            }
            PlotKind::ParallelCoordinate => ((300 + 200 * n_params).max(960), 560),
        }
    }
}

/// Plots show at most this many parameters: the canvas grows with each one.
pub const MAX_PLOTTED_PARAMS: usize = 24;

/// The parameters the slice and parallel-coordinate plots show (the first
/// [`MAX_PLOTTED_PARAMS`] in first-seen order).
fn plotted_params(s: &StudySnapshot) -> Vec<String> {
    let mut names = s.param_names();
    names.truncate(MAX_PLOTTED_PARAMS);
    names
}

/// ` (first 24 of 30 parameters)` when the study has more parameters than the plots show.
fn truncation_note(s: &StudySnapshot) -> String {
    let total = s.param_names().len();
    if total > MAX_PLOTTED_PARAMS {
        format!(" (first {MAX_PLOTTED_PARAMS} of {total} parameters)")
    } else {
        String::new()
    }
}

/// Registers the embedded DejaVu fonts with plotters (once per process).
fn register_fonts() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
                .and_then(|_| register_font(FONT, FontStyle::Bold, dejavu::sans::bold()))
                .map_err(|_| "the embedded DejaVu Sans font could not be loaded".to_string())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// plotters' errors hold backend errors that are not always `'static`; keep their message.
trait PlotResult<T> {
    fn plot(self) -> Result<T>;
}

impl<T, E: Display> PlotResult<T> for std::result::Result<T, E> {
    fn plot(self) -> Result<T> {
        self.map_err(|e| anyhow!("drawing failed: {e}"))
    }
}

/// Draws `kind` as SVG text.
pub fn render_svg(kind: PlotKind, snapshot: &StudySnapshot, importances: &Importances) -> Result<String> {
    register_fonts()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, kind.size(snapshot)).into_drawing_area();
        draw(kind, &root, snapshot, importances)?;
        root.present().plot()?;
    }
    Ok(svg)
}

/// Where `kind` puts its marks and its legend for this study (drawn, then thrown away): what the
/// layout tests hold to "no legend over data, no mark on the frame".
pub fn layout(kind: PlotKind, snapshot: &StudySnapshot, importances: &Importances) -> Result<Layout> {
    register_fonts()?;
    let mut svg = String::new();
    let root = SVGBackend::with_string(&mut svg, kind.size(snapshot)).into_drawing_area();
    draw(kind, &root, snapshot, importances)
}

/// Draws `kind` into a PNG file.
pub fn render_png(
    kind: PlotKind,
    snapshot: &StudySnapshot,
    importances: &Importances,
    path: &Path,
) -> Result<()> {
    register_fonts()?;
    let root = BitMapBackend::new(path, kind.size(snapshot)).into_drawing_area();
    draw(kind, &root, snapshot, importances).with_context(|| format!("{}", path.display()))?;
    root.present().plot().with_context(|| format!("{}: cannot write the PNG", path.display()))
}

/// Writes every plot as `<stem>.png` and `<stem>.svg` into `out_dir` (created if needed) and
/// returns the files written.
pub fn write_all(
    snapshot: &StudySnapshot,
    importances: &Importances,
    out_dir: &Path,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create the directory", out_dir.display()))?;
    let mut written = Vec::new();
    for kind in PlotKind::ALL {
        let png = out_dir.join(format!("{}.png", kind.file_stem()));
        render_png(kind, snapshot, importances, &png)?;
        written.push(png);
        let svg_path = out_dir.join(format!("{}.svg", kind.file_stem()));
        let svg = render_svg(kind, snapshot, importances)?;
        std::fs::write(&svg_path, svg).with_context(|| format!("{}: cannot write", svg_path.display()))?;
        written.push(svg_path);
    }
    Ok(written)
}

fn draw<DB: DrawingBackend>(
    kind: PlotKind,
    root: &DrawingArea<DB, Shift>,
    snapshot: &StudySnapshot,
    importances: &Importances,
) -> Result<Layout> {
    root.fill(&WHITE).plot()?;
    match kind {
        PlotKind::OptimizationHistory => optimization_history(root, snapshot),
        PlotKind::IntermediateValues => intermediate_values(root, snapshot),
        PlotKind::ParamImportances => param_importances(root, importances),
        PlotKind::Slice => slice(root, snapshot),
        PlotKind::ParallelCoordinate => parallel_coordinate(root, snapshot),
    }
}

fn font(size: f64) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).color(&BLACK)
}

fn title_font() -> TextStyle<'static> {
    TextStyle::from((FONT, 22.0).into_font().style(FontStyle::Bold)).color(&BLACK)
}

/// A rectangle in canvas pixels (y grows downwards).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelRect {
    pub left: i32,
    pub top: i32,
    pub right: i32,
    pub bottom: i32,
}

impl PixelRect {
    /// Whether a disc of `radius` around (x, y) reaches into the rectangle.
    pub fn touches(&self, x: i32, y: i32, radius: i32) -> bool {
        x + radius >= self.left
            && x - radius <= self.right
            && y + radius >= self.top
            && y - radius <= self.bottom
    }

    /// Whether the disc lies inside, clear of the edges by at least one pixel.
    pub fn holds_clear(&self, x: i32, y: i32, radius: i32) -> bool {
        x - radius > self.left && x + radius < self.right && y - radius > self.top && y + radius < self.bottom
    }
}

/// A data mark: a point, or the end of a bar, with the radius it is drawn with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub x: i32,
    pub y: i32,
    pub radius: i32,
}

/// Where a plot put its data and its legend.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// The plotting areas inside the axes (one per panel of a slice plot).
    pub frames: Vec<PixelRect>,
    /// Every data mark.
    pub marks: Vec<Mark>,
    /// The legend's box, where the plot has one.
    pub legend: Option<PixelRect>,
}

impl Layout {
    /// Adds `chart`'s plotting area as a frame and a mark of `radius` at each point.
    fn add<DB: DrawingBackend, CT: CoordTranslate>(
        &mut self,
        chart: &ChartContext<'_, DB, CT>,
        points: impl IntoIterator<Item = CT::From>,
        radius: i32,
    ) {
        let (x, y) = chart.plotting_area().get_pixel_range();
        let frame = PixelRect { left: x.start, top: y.start, right: x.end - 1, bottom: y.end - 1 };
        if !self.frames.contains(&frame) {
            self.frames.push(frame);
        }
        self.marks.extend(points.into_iter().map(|p| {
            let (x, y) = chart.as_coord_spec().translate(&p);
            Mark { x, y, radius }
        }));
    }
}

/// How a legend entry is drawn.
#[derive(Clone, Copy)]
enum Swatch {
    Line(RGBColor, u32),
    Dashed(RGBColor),
    Dot(RGBColor),
    Ring(RGBColor),
    Bar(RGBColor),
}

/// A legend drawn to the right of the axes, so it never covers data, whatever the study holds.
#[derive(Default)]
struct Legend(Vec<(String, Swatch)>);

const LEGEND_ROW: i32 = 24;

impl Legend {
    fn push(&mut self, label: impl Into<String>, swatch: Swatch) {
        self.0.push((label.into(), swatch));
    }

    fn width<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<i32> {
        let mut widest = 0;
        for (label, _) in &self.0 {
            widest = widest.max(root.estimate_text_size(label, &font(14.0)).plot()?.0);
        }
        Ok(widest as i32 + 52)
    }

    /// The right margin a chart leaves for this legend.
    fn margin<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<u32> {
        Ok(if self.0.is_empty() { 16 } else { (self.width(root)? + 32) as u32 })
    }

    /// Draws the legend with its top-left corner at (`left`, `top`).
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        left: i32,
        top: i32,
    ) -> Result<Option<PixelRect>> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let bounds = PixelRect {
            left,
            top,
            right: left + self.width(root)?,
            bottom: top + LEGEND_ROW * self.0.len() as i32 + 10,
        };
        let corners = [(bounds.left, bounds.top), (bounds.right, bounds.bottom)];
        root.draw(&Rectangle::new(corners, WHITE.filled())).plot()?;
        root.draw(&Rectangle::new(corners, GREY.stroke_width(1))).plot()?;
        for (i, (label, swatch)) in self.0.iter().enumerate() {
            let (x, y) = (left + 22, top + 5 + LEGEND_ROW * i as i32 + LEGEND_ROW / 2);
            let across = vec![(x - 12, y), (x + 12, y)];
            match *swatch {
                Swatch::Line(c, width) => root.draw(&PathElement::new(across, c.stroke_width(width))),
                Swatch::Dashed(c) => root.draw(&DashedPathElement::new(across, 5, 3, c.stroke_width(2))),
                Swatch::Dot(c) => root.draw(&Circle::new((x, y), 5, c.filled())),
                Swatch::Ring(c) => root.draw(&Circle::new((x, y), 5, c.stroke_width(2))),
                Swatch::Bar(c) => root.draw(&Rectangle::new([(x - 8, y - 6), (x + 8, y + 6)], c.filled())),
            }
            .plot()?;
            let style = font(14.0).pos(Pos::new(HPos::Left, VPos::Center));
            root.draw(&Text::new(label.clone(), (x + 20, y), style)).plot()?;
        }
        Ok(Some(bounds))
    }

    /// Draws the legend beside `chart`'s plotting area, level with its top.
    fn draw_beside<DB: DrawingBackend, CT: CoordTranslate>(
        &self,
        root: &DrawingArea<DB, Shift>,
        chart: &ChartContext<'_, DB, CT>,
    ) -> Result<Option<PixelRect>> {
        let (x, y) = chart.plotting_area().get_pixel_range();
        self.draw(root, x.end + 16, y.start)
    }
}

/// A readable tick label: up to 4 significant digits, exponent form for very small or large.
pub fn fmt_num(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { v.to_string() };
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.1e}");
        return s.replace(".0e", "e");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

/// `lo..hi` widened by `frac` of its width on both sides (a unit range around a single value).
fn padded(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * lo.abs().max(1.0) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * frac;
    (lo - d, hi + d)
}

fn min_max(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values.into_iter().filter(|v| v.is_finite()).fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// A message in the middle of an empty plot.
fn empty_plot<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    message: &str,
) -> Result<Layout> {
    let (w, h) = root.dim_in_pixel();
    root.draw(&Text::new(title.to_string(), (20, 16), title_font())).plot()?;
    let style = font(17.0).pos(Pos::new(HPos::Center, VPos::Center)).color(&GREY);
    root.draw(&Text::new(message.to_string(), (w as i32 / 2, h as i32 / 2), style)).plot()?;
    Ok(Layout::default())
}

/// Viridis-like colour ramp, `t` in [0, 1] (0 = dark purple, 1 = yellow).
fn ramp(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 } * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Light to dark blue, `t` in [0, 1] (1 = dark: the best trials stand out on white).
fn blues(t: f64) -> RGBColor {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(mix(190.0, 8.0), mix(212.0, 48.0), mix(235.0, 107.0))
}

fn value_label(direction: StudyDirection) -> String {
    match direction {
        StudyDirection::Maximize => "Objective value (higher is better)".into(),
        StudyDirection::Minimize => "Objective value (lower is better)".into(),
    }
}

/// A trial's plotted value: the objective of a COMPLETE trial; for a PRUNED one, the value Optuna
/// stored (its last reported intermediate value).
fn plotted_value(t: &FrozenTrial) -> Option<f64> {
    match t.state {
        TrialState::Complete => t.value(),
        TrialState::Pruned => t.value().or_else(|| t.intermediate_values.values().next_back().copied()),
        _ => None,
    }
    .filter(|v| v.is_finite())
}

fn optimization_history<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    s: &StudySnapshot,
) -> Result<Layout> {
    let title = PlotKind::OptimizationHistory.title();
    let complete: Vec<(f64, f64)> = s
        .trials
        .iter()
        .filter(|t| t.state == TrialState::Complete)
        .filter_map(|t| Some((t.number as f64, plotted_value(t)?)))
        .collect();
    let pruned: Vec<(f64, f64)> = s
        .trials
        .iter()
        .filter(|t| t.state == TrialState::Pruned)
        .filter_map(|t| Some((t.number as f64, plotted_value(t)?)))
        .collect();
    let Some((lo, hi)) = min_max(complete.iter().chain(&pruned).map(|p| p.1)) else {
        return empty_plot(root, title, "No complete or pruned trials yet");
    };
    let (y0, y1) = padded(lo, hi, 0.08);
    let last = s.trials.iter().map(|t| t.number).max().unwrap_or(0) as f64;
    let mut best_line: Vec<(f64, f64)> = Vec::new();
    for &(x, v) in &complete {
        let best = match best_line.last() {
            Some(&(_, b)) if !s.direction.better(v, b) => b,
            _ => v,
        };
        if let Some(&(_, prev)) = best_line.last() {
            best_line.push((x, prev));
        }
        best_line.push((x, best));
    }
    // Half a trial each side, and at least 2% of the width: no point on the frame however many.
    let x_pad = (0.02 * (last + 1.0)).max(0.5);
    if let Some(&(_, b)) = best_line.last() {
        best_line.push((last + x_pad, b));
    }
    let mut legend = Legend::default();
    legend.push("Best value so far", Swatch::Line(RED, 2));
    legend.push("Complete trial", Swatch::Dot(BLUE));
    if !pruned.is_empty() {
        legend.push("Pruned trial (last reported value)", Swatch::Ring(GREY));
    }

    let mut chart = ChartBuilder::on(root)
        .caption(format!("{title} — study {}", s.study.name), title_font())
        .margin(16)
        .margin_right(legend.margin(root)?)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(-x_pad..last + x_pad, y0..y1)
        .plot()?;
    chart
        .configure_mesh()
        .x_desc("Trial number")
        .y_desc(value_label(s.direction))
        .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-9 { format!("{x:.0}") } else { String::new() })
        .y_label_formatter(&|y| fmt_num(*y))
        .label_style(font(14.0))
        .axis_desc_style(font(16.0))
        .light_line_style(WHITE)
        .bold_line_style(GRID)
        .draw()
        .plot()?;
    chart.draw_series(LineSeries::new(best_line, RED.stroke_width(2))).plot()?;
    chart.draw_series(complete.iter().map(|&p| Circle::new(p, 5, BLUE.filled()))).plot()?;
    chart.draw_series(pruned.iter().map(|&p| Circle::new(p, 5, GREY.stroke_width(2)))).plot()?;
    let mut layout = Layout::default();
    layout.add(&chart, complete.iter().chain(&pruned).copied(), 6);
    layout.legend = legend.draw_beside(root, &chart)?;
    Ok(layout)
}

fn intermediate_values<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    s: &StudySnapshot,
) -> Result<Layout> {
    let title = PlotKind::IntermediateValues.title();
    let curves: Vec<&FrozenTrial> = s.trials.iter().filter(|t| !t.intermediate_values.is_empty()).collect();
    let values = curves.iter().flat_map(|t| t.intermediate_values.values().copied());
    let Some((lo, hi)) = min_max(values) else {
        return empty_plot(root, title, "No trial has reported intermediate values");
    };
    let steps = curves.iter().flat_map(|t| t.intermediate_values.keys().copied());
    let (s0, s1) = steps.clone().fold((i64::MAX, i64::MIN), |(a, b), k| (a.min(k), b.max(k)));
    let x_pad = (0.03 * (s1 as f64 - s0 as f64)).max(0.15);
    let (x0, x1) = (s0 as f64 - x_pad, s1 as f64 + x_pad);
    let (y0, y1) = padded(lo, hi, 0.08);
    let best = s.best_trial().map(|t| t.number);
    let is_best = |t: &FrozenTrial| Some(t.number) == best && t.state == TrialState::Complete;
    // A complete trial's colour: its place among the curves.
    let colour = |i: usize| TAB10[i % TAB10.len()];
    let mut legend = Legend::default();
    if let Some(t) = curves.iter().find(|t| is_best(t)) {
        legend.push(format!("Best trial (#{})", t.number), Swatch::Line(RED, 3));
    }
    if let Some(i) = curves.iter().position(|t| t.state == TrialState::Complete && !is_best(t)) {
        legend.push("Complete trial", Swatch::Line(colour(i), 2));
    }
    for (state, label) in [
        (TrialState::Pruned, "Pruned trial (stopped early)"),
        (TrialState::Fail, "Failed trial"),
        (TrialState::Running, "Running trial"),
    ] {
        if curves
            .iter()
            .any(|t| t.state == state || (state == TrialState::Running && t.state == TrialState::Waiting))
        {
            legend.push(label, Swatch::Dashed(unfinished_colour(state)));
        }
    }

    let mut chart = ChartBuilder::on(root)
        .caption(format!("{title} — one curve per trial"), title_font())
        .margin(16)
        .margin_right(legend.margin(root)?)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, y0..y1)
        .plot()?;
    let n_steps = s1.saturating_sub(s0).saturating_add(1).clamp(2, 12) as usize;
    chart
        .configure_mesh()
        .x_desc("Step (epoch)")
        .y_desc("Intermediate value (reported each epoch)")
        .x_labels(n_steps)
        .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-9 { format!("{x:.0}") } else { String::new() })
        .y_label_formatter(&|y| fmt_num(*y))
        .label_style(font(14.0))
        .axis_desc_style(font(16.0))
        .light_line_style(WHITE)
        .bold_line_style(GRID)
        .draw()
        .plot()?;

    let points = |t: &FrozenTrial| -> Vec<(f64, f64)> {
        t.intermediate_values.iter().filter(|(_, v)| v.is_finite()).map(|(&k, &v)| (k as f64, v)).collect()
    };
    // Draw order: pruned and failed underneath, complete on top, the best trial last.
    let mut layout = Layout::default();
    for pass in 0..3 {
        for (i, t) in curves.iter().enumerate() {
            let group = match t.state {
                _ if is_best(t) => 2,
                TrialState::Complete => 1,
                _ => 0,
            };
            if group != pass {
                continue;
            }
            let pts = points(t);
            if t.state == TrialState::Complete {
                let (color, width) = if is_best(t) { (RED, 3) } else { (colour(i), 2) };
                chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(width))).plot()?;
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).plot()?;
            } else {
                let color = unfinished_colour(t.state);
                let style = ShapeStyle::from(color).stroke_width(2);
                chart
                    .draw_series(std::iter::once(DashedPathElement::new(pts.clone(), 7, 5, style)))
                    .plot()?;
                chart
                    .draw_series(
                        pts.iter().map(|&p| {
                            EmptyElement::at(p) + Rectangle::new([(-4, -4), (4, 4)], color.filled())
                        }),
                    )
                    .plot()?;
            }
            layout.add(&chart, pts, 4);
        }
    }
    layout.legend = legend.draw_beside(root, &chart)?;
    Ok(layout)
}

/// The colour of a trial's dashed curve when it did not complete.
fn unfinished_colour(state: TrialState) -> RGBColor {
    match state {
        TrialState::Pruned => GREY,
        TrialState::Fail => RED.mix(0.6).to_rgba().into_rgb(),
        _ => BLUE.mix(0.5).to_rgba().into_rgb(),
    }
}

trait IntoRgb {
    fn into_rgb(self) -> RGBColor;
}

impl IntoRgb for plotters::style::RGBAColor {
    /// Flattens a translucent colour onto white.
    fn into_rgb(self) -> RGBColor {
        let blend = |c: u8| (c as f64 * self.3 + 255.0 * (1.0 - self.3)).round() as u8;
        RGBColor(blend(self.0), blend(self.1), blend(self.2))
    }
}

fn param_importances<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    imps: &Importances,
) -> Result<Layout> {
    let title = PlotKind::ParamImportances.title();
    // Parameters in PED-ANOVA order (Optuna's default evaluator), else fANOVA's.
    let order: Vec<String> = match (&imps.ped_anova, &imps.fanova) {
        (Ok(v), _) if !v.is_empty() => v.iter().map(|p| p.param.clone()).collect(),
        (_, Ok(v)) if !v.is_empty() => v.iter().map(|p| p.param.clone()).collect(),
        _ => Vec::new(),
    };
    if order.is_empty() {
        let why = [&imps.ped_anova, &imps.fanova]
            .iter()
            .find_map(|r| r.as_ref().err().cloned())
            .unwrap_or_else(|| "no complete trials yet".into());
        return empty_plot(root, title, &format!("Importances unavailable: {why}"));
    }
    let mut order = order;
    order.truncate(MAX_PLOTTED_PARAMS);
    let n = order.len();
    let series: [(&str, RGBColor, &ImportanceResult); 2] = [
        ("PED-ANOVA (Optuna's default)", BLUE, &imps.ped_anova),
        ("fANOVA (random forest, 64 trees)", ORANGE, &imps.fanova),
    ];
    let value_of =
        |list: &[ParamImportance], name: &str| list.iter().find(|p| p.param == name).map(|p| p.importance);
    let max = series
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok())
        .flat_map(|v| v.iter().map(|p| p.importance))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let label_width = order.iter().map(|s| s.chars().count()).max().unwrap_or(4) as u32 * 9 + 24;
    let mut legend = Legend::default();
    for (label, color, result) in &series {
        if result.is_ok() {
            legend.push(*label, Swatch::Bar(*color));
        }
    }

    let (w, _) = root.dim_in_pixel();
    let mut chart = ChartBuilder::on(root)
        .caption(format!("{title} (normalised, each evaluator sums to 1)"), title_font())
        .margin(16)
        .margin_right(legend.margin(root)?)
        .x_label_area_size(48)
        .y_label_area_size(label_width.min(w / 3))
        .build_cartesian_2d(0.0..(max * 1.18).min(1.1), -0.5..n as f64 - 0.5)
        .plot()?;
    chart
        .configure_mesh()
        .x_desc("Importance")
        .y_labels(0)
        .x_label_formatter(&|x| fmt_num(*x))
        .label_style(font(14.0))
        .axis_desc_style(font(16.0))
        .light_line_style(WHITE)
        .bold_line_style(GRID)
        .draw()
        .plot()?;
    // Row i from the top holds the i-th most important parameter.
    let row_y = |i: usize| (n - 1 - i) as f64;
    let mut layout = Layout::default();
    for (k, (_, color, result)) in series.iter().enumerate() {
        let Ok(list) = result else { continue };
        let offset = if k == 0 { 0.18 } else { -0.18 };
        let bars: Vec<(f64, f64)> = order
            .iter()
            .enumerate()
            .filter_map(|(i, name)| Some((value_of(list, name)?, row_y(i) + offset)))
            .collect();
        let color = *color;
        chart
            .draw_series(
                bars.iter().map(|&(v, y)| Rectangle::new([(0.0, y - 0.16), (v, y + 0.16)], color.filled())),
            )
            .plot()?;
        layout.add(&chart, bars.iter().copied(), 6);
        chart
            .draw_series(bars.iter().map(|&(v, y)| {
                EmptyElement::at((v, y))
                    + Text::new(format!("{v:.3}"), (6, 0), font(13.0).pos(Pos::new(HPos::Left, VPos::Center)))
            }))
            .plot()?;
    }
    for (i, name) in order.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(0.0, row_y(i)));
        let style = font(15.0).pos(Pos::new(HPos::Right, VPos::Center));
        root.draw(&Text::new(name.clone(), (px - 10, py), style)).plot()?;
    }
    let notes: Vec<String> =
        series.iter().filter_map(|(label, _, r)| r.as_ref().err().map(|e| format!("{label}: {e}"))).collect();
    for (i, note) in notes.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(0.0, n as f64 - 0.5));
        root.draw(&Text::new(note.clone(), (px + 8, py + 8 + 18 * i as i32), font(13.0).color(&RED)))
            .plot()?;
    }
    layout.legend = legend.draw_beside(root, &chart)?;
    Ok(layout)
}

/// How a parameter is placed on an axis.
enum Scale {
    Linear,
    /// Plotted as log10 of the value.
    Log,
    /// Plotted at the choice index, labelled with the choice.
    Categorical(Vec<String>),
}

impl Scale {
    fn of(d: &Distribution) -> Self {
        match d {
            Distribution::Float(f) if f.log => Scale::Log,
            Distribution::Int(i) if i.log => Scale::Log,
            Distribution::Categorical(c) => {
                Scale::Categorical(c.choices.iter().map(|c| c.to_string()).collect())
            }
            _ => Scale::Linear,
        }
    }

    /// The plotted coordinate of a trial's parameter.
    fn coord(&self, t: &FrozenTrial, name: &str) -> Option<f64> {
        let p = t.param(name)?;
        match self {
            Scale::Categorical(_) => Some(p.internal),
            Scale::Log => p.value.as_f64().filter(|v| *v > 0.0).map(f64::log10),
            Scale::Linear => p.value.as_f64(),
        }
    }

    fn tick_label(&self, x: f64) -> String {
        match self {
            Scale::Linear => fmt_num(x),
            Scale::Log => fmt_num(10f64.powf(x)),
            Scale::Categorical(c) => {
                if (x - x.round()).abs() < 1e-9 && x >= 0.0 {
                    c.get(x.round() as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            }
        }
    }
}

/// The distribution of `name` in the study's latest trial that has it.
fn distribution_of<'a>(s: &'a StudySnapshot, name: &str) -> Option<&'a Distribution> {
    s.trials.iter().rev().find_map(|t| t.param(name).map(|p| &p.distribution))
}

fn slice<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &StudySnapshot) -> Result<Layout> {
    let title = PlotKind::Slice.title();
    let names = plotted_params(s);
    let complete: Vec<&FrozenTrial> =
        s.trials.iter().filter(|t| t.state == TrialState::Complete && plotted_value(t).is_some()).collect();
    if names.is_empty() || complete.is_empty() {
        return empty_plot(root, title, "No complete trials yet");
    }
    let (w, _) = root.dim_in_pixel();
    root.draw(&Text::new(
        format!("{title} — objective against each hyperparameter{}", truncation_note(s)),
        (16, 14),
        title_font(),
    ))
    .plot()?;
    root.draw(&Text::new(
        "Complete trials; colour = trial number (dark = early, yellow = late)".to_string(),
        (w as i32 - 16, 20),
        font(14.0).pos(Pos::new(HPos::Right, VPos::Top)),
    ))
    .plot()?;
    let body = root.margin(52, 0, 0, 0);
    let cols = names.len().clamp(2, 3);
    let rows = names.len().div_ceil(3);
    let cells = body.split_evenly((rows, cols));
    let (v0, v1) = min_max(complete.iter().filter_map(|t| plotted_value(t))).unwrap_or((0.0, 1.0));
    let (y0, y1) = padded(v0, v1, 0.08);
    let max_number = complete.iter().map(|t| t.number).max().unwrap_or(1).max(1) as f64;

    let mut layout = Layout::default();
    for (i, (name, cell)) in names.iter().zip(cells.iter()).enumerate() {
        let Some(dist) = distribution_of(s, name) else { continue };
        let scale = Scale::of(dist);
        let points: Vec<(f64, f64, f64)> = complete
            .iter()
            .filter_map(|t| Some((scale.coord(t, name)?, plotted_value(t)?, t.number as f64 / max_number)))
            .collect();
        let (x0, x1) = match (&scale, dist) {
            (Scale::Categorical(c), _) => (-0.5, c.len() as f64 - 0.5),
            (Scale::Log, Distribution::Float(f)) => padded(f.low.log10(), f.high.log10(), 0.04),
            (Scale::Log, Distribution::Int(d)) => {
                padded((d.low as f64).log10(), (d.high as f64).log10(), 0.04)
            }
            (_, Distribution::Float(f)) => padded(f.low, f.high, 0.04),
            (_, Distribution::Int(d)) => padded(d.low as f64, d.high as f64, 0.04),
            _ => (0.0, 1.0),
        };
        let x_desc = match &scale {
            Scale::Log => format!("{name} (log scale)"),
            Scale::Categorical(_) => format!("{name} (categorical)"),
            Scale::Linear => name.clone(),
        };
        let mut chart = ChartBuilder::on(cell)
            .margin(12)
            .x_label_area_size(46)
            .y_label_area_size(if i % cols == 0 { 66 } else { 50 })
            .build_cartesian_2d(x0..x1, y0..y1)
            .plot()?;
        let n_labels = match &scale {
            Scale::Categorical(_) => 0,
            _ => 5,
        };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(if i % cols == 0 { "Objective value" } else { "" })
            .x_labels(n_labels)
            .y_labels(6)
            .x_label_formatter(&|x| scale.tick_label(*x))
            .y_label_formatter(&|y| fmt_num(*y))
            .label_style(font(13.0))
            .axis_desc_style(font(15.0))
            .light_line_style(WHITE)
            .bold_line_style(GRID)
            .draw()
            .plot()?;
        if let Scale::Categorical(choices) = &scale {
            for (k, c) in choices.iter().enumerate() {
                let (px, py) = chart.backend_coord(&(k as f64, y0));
                let style = font(13.0).pos(Pos::new(HPos::Center, VPos::Top));
                root.draw(&Text::new(c.clone(), (px, py + 6), style)).plot()?;
            }
        }
        chart
            .draw_series(points.iter().map(|&(x, y, t)| {
                EmptyElement::at((x, y))
                    + Circle::new((0, 0), 5, ramp(t).filled())
                    + Circle::new((0, 0), 5, BLACK.mix(0.35).stroke_width(1))
            }))
            .plot()?;
        layout.add(&chart, points.iter().map(|&(x, y, _)| (x, y)), 6);
    }
    Ok(layout)
}

fn parallel_coordinate<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    s: &StudySnapshot,
) -> Result<Layout> {
    let title = PlotKind::ParallelCoordinate.title();
    let names = plotted_params(s);
    let complete: Vec<&FrozenTrial> =
        s.trials.iter().filter(|t| t.state == TrialState::Complete && plotted_value(t).is_some()).collect();
    if complete.is_empty() {
        return empty_plot(root, title, "No complete trials yet");
    }
    // Axis 0 is the objective; each axis maps its coordinate range onto [0, 1].
    struct Axis {
        label: String,
        scale: Scale,
        lo: f64,
        hi: f64,
    }
    let mut axes: Vec<Axis> = Vec::new();
    let (v0, v1) = min_max(complete.iter().filter_map(|t| plotted_value(t))).unwrap_or((0.0, 1.0));
    axes.push(Axis { label: "Objective value".into(), scale: Scale::Linear, lo: v0, hi: v1 });
    for name in &names {
        let Some(dist) = distribution_of(s, name) else { continue };
        let scale = Scale::of(dist);
        let (lo, hi) = match &scale {
            Scale::Categorical(c) => (0.0, (c.len().max(2) - 1) as f64),
            _ => min_max(complete.iter().filter_map(|t| scale.coord(t, name))).unwrap_or((0.0, 1.0)),
        };
        let label = match scale {
            Scale::Log => format!("{name} (log)"),
            _ => name.clone(),
        };
        axes.push(Axis { label, scale, lo, hi });
    }
    let norm = |a: &Axis, v: f64| if a.hi > a.lo { (v - a.lo) / (a.hi - a.lo) } else { 0.5 };
    let n_axes = axes.len();

    let (w, _) = root.dim_in_pixel();
    root.draw(&Text::new(
        format!("{title} — one line per complete trial{}", truncation_note(s)),
        (16, 14),
        title_font(),
    ))
    .plot()?;
    let colour_note = match s.direction {
        StudyDirection::Maximize => "colour = objective value (dark blue = highest = best)",
        StudyDirection::Minimize => "colour = objective value (dark blue = lowest = best)",
    };
    root.draw(&Text::new(
        colour_note.to_string(),
        (w as i32 - 16, 20),
        font(14.0).pos(Pos::new(HPos::Right, VPos::Top)),
    ))
    .plot()?;
    let body = root.margin(90, 40, 60, 150);
    let mut chart =
        ChartBuilder::on(&body).build_cartesian_2d(0.0..(n_axes - 1).max(1) as f64, 0.0..1.0).plot()?;

    let goodness = |v: f64| {
        let t = if v1 > v0 { (v - v0) / (v1 - v0) } else { 1.0 };
        if s.direction == StudyDirection::Maximize { t } else { 1.0 - t }
    };
    let mut lines: Vec<(f64, Vec<(f64, f64)>)> = complete
        .iter()
        .filter_map(|t| {
            let v = plotted_value(t)?;
            let mut pts = vec![(0.0, norm(&axes[0], v))];
            for (k, (axis, name)) in axes[1..].iter().zip(&names).enumerate() {
                pts.push(((k + 1) as f64, norm(axis, axis.scale.coord(t, name)?)));
            }
            Some((goodness(v), pts))
        })
        .collect();
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (g, pts) in &lines {
        chart.draw_series(LineSeries::new(pts.clone(), blues(*g).stroke_width(2))).plot()?;
    }
    for (k, axis) in axes.iter().enumerate() {
        let x = k as f64;
        chart.draw_series(LineSeries::new(vec![(x, 0.0), (x, 1.0)], BLACK.stroke_width(2))).plot()?;
        let (px, top) = chart.backend_coord(&(x, 1.0));
        let name_style = font(15.0).pos(Pos::new(HPos::Center, VPos::Bottom));
        root.draw(&Text::new(axis.label.clone(), (px, top - 16), name_style)).plot()?;
        let ticks: Vec<f64> = match &axis.scale {
            Scale::Categorical(c) => (0..c.len()).map(|i| i as f64).collect(),
            _ if axis.hi > axis.lo => {
                (0..5).map(|i| axis.lo + (axis.hi - axis.lo) * i as f64 / 4.0).collect()
            }
            _ => vec![axis.lo],
        };
        for tick in ticks {
            let (tx, ty) = chart.backend_coord(&(x, norm(axis, tick)));
            root.draw(&PathElement::new(vec![(tx - 4, ty), (tx, ty)], BLACK.stroke_width(1))).plot()?;
            // A white box keeps the label readable over the lines that cross it.
            let label = axis.scale.tick_label(tick);
            let style = font(13.0).pos(Pos::new(HPos::Right, VPos::Center));
            let (lw, lh) = root.estimate_text_size(&label, &style).plot()?;
            let (lw, lh) = (lw as i32, lh as i32);
            let corners = [(tx - 10 - lw, ty - lh / 2 - 2), (tx - 5, ty + lh / 2 + 2)];
            root.draw(&Rectangle::new(corners, WHITE.mix(0.85).filled())).plot()?;
            root.draw(&Text::new(label, (tx - 7, ty), style)).plot()?;
        }
    }
    // No legend; each line ends on its axes by design (an axis spans its values), so no frame.
    Ok(Layout::default())
}

/// The SVG of every plot, for the HTML report. Fails only when drawing itself fails.
pub fn render_all_svg(
    snapshot: &StudySnapshot,
    importances: &Importances,
) -> Result<Vec<(PlotKind, String)>> {
    let mut out = Vec::new();
    for kind in PlotKind::ALL {
        let svg =
            render_svg(kind, snapshot, importances).with_context(|| format!("plot {}", kind.file_stem()))?;
        if !svg.starts_with("<svg") {
            bail!("plot {}: the SVG backend wrote no <svg> element", kind.file_stem());
        }
        out.push((kind, svg));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_format_compactly() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(0.8500000000000001), "0.85");
        assert_eq!(fmt_num(3e-5), "3e-5");
        assert_eq!(fmt_num(1.2345e-5), "1.2e-5");
        assert_eq!(fmt_num(128.0), "128");
        assert_eq!(fmt_num(0.123456), "0.1235");
        assert_eq!(fmt_num(-2.5), "-2.5");
    }

    #[test]
    fn ramp_spans_dark_to_yellow() {
        assert_eq!(ramp(0.0), RGBColor(68, 1, 84));
        assert_eq!(ramp(1.0), RGBColor(253, 231, 37));
        assert_eq!(ramp(f64::NAN), RGBColor(68, 1, 84));
        assert_eq!(padded(1.0, 1.0, 0.1), (0.9, 1.1));
    }
}
