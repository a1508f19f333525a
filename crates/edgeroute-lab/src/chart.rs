//! The reports' charts, drawn with `plotters` into an RGB buffer and encoded as PNG.
//!
//! Two kinds: [`ttft_percentiles`] (time to first token as a percentile curve, one line per
//! series: x the TTFT in ms on a log scale, y the percentile of turns on a "nines" scale that
//! stretches the tail, p90, p99 and p99.9 equally far apart) and
//! [`timeline`] (what happened when: phases as shaded bands, faults as red lines, the clients'
//! decisions as ticks in one lane per kind). Text is drawn with DejaVu Sans, embedded in the
//! binary and registered with plotters' `ab_glyph` text renderer, so charts render the same on a
//! machine with no font installed.

use std::io;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// DejaVu Sans 2.37 (Bitstream Vera licence, see `assets/DejaVuSans-LICENSE.txt`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// The family every text style here asks for (and plotters' defaults use).
const FAMILY: &str = "sans-serif";

pub type Rgb = [u8; 3];

/// Series colours, distinct on white (matplotlib's tab10).
pub const PALETTE: [Rgb; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

/// Light fills for the timeline's phase bands.
const BANDS: [Rgb; 6] = [
    [222, 235, 247],
    [254, 240, 217],
    [229, 245, 224],
    [239, 237, 245],
    [236, 236, 236],
    [222, 243, 243],
];

const INK: RGBColor = RGBColor(40, 40, 40);
const FAULT: RGBColor = RGBColor(214, 39, 40);

const TITLE_PT: u32 = 22;
const DESC_PT: u32 = 16;
const LABEL_PT: u32 = 14;

fn rgb(c: Rgb) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

fn font(pt: u32) -> TextStyle<'static> {
    (FAMILY, pt).into_font().color(&INK)
}

fn draw_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("drawing a chart: {e}"))
}

/// Registers the embedded font with plotters, once per process.
fn register_font() -> io::Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok { Ok(()) } else { Err(io::Error::other("the embedded chart font does not parse")) }
}

/// A rendered chart: RGB pixels, row by row.
#[derive(Debug, Clone)]
pub struct Chart {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Chart {
    /// Draws with `f` on a white `width` × `height` area.
    fn render(
        width: u32,
        height: u32,
        f: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> io::Result<()>,
    ) -> io::Result<Chart> {
        register_font()?;
        let mut rgb = vec![255u8; width as usize * height as usize * 3];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
            f(&root)?;
            root.present().map_err(draw_err)?;
        }
        Ok(Chart { width, height, rgb })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// The colour at (`x`, `y`), from the top-left corner; panics outside the chart.
    pub fn pixel(&self, x: u32, y: u32) -> Rgb {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// The chart as a PNG file's bytes.
    pub fn to_png(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.width, self.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(io::Error::other)?;
        writer.write_image_data(&self.rgb).map_err(io::Error::other)?;
        writer.finish().map_err(io::Error::other)?;
        Ok(out)
    }

    pub fn save(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.to_png()?)
    }
}

/// An axis from `lo` to `hi`, linear or logarithmic, with its ticks (and grid lines) exactly at
/// `ticks`.
#[derive(Debug, Clone)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    ticks: Vec<f64>,
}

impl Axis {
    fn scale(&self, v: f64) -> f64 {
        if self.log { v.max(f64::MIN_POSITIVE).ln() } else { v }
    }
}

impl Ranged for Axis {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let (lo, hi) = (self.scale(self.lo), self.scale(self.hi));
        let share = if hi > lo { (self.scale(*v) - lo) / (hi - lo) } else { 0.5 };
        limit.0 + (share * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() { Vec::new() } else { self.ticks.clone() }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// One line of a [`ttft_percentiles`] chart: a name and its samples, ms.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub ttft_ms: Vec<f64>,
}

/// The `q` quantile of sorted `v` (nearest rank).
fn nearest_rank(v: &[f64], q: f64) -> Option<f64> {
    v.get(((v.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied()
}

/// Percentile `p` (0..1) on the nines scale: 0 → 0, 0.9 → 1, 0.99 → 2, 0.999 → 3.
fn nines(p: f64) -> f64 {
    -(1.0 - p).max(1e-12).log10()
}

/// The percentiles labelled on the y axis.
const PERCENTILE_TICKS: [(f64, &str); 8] = [
    (0.0, "0"),
    (0.5, "50"),
    (0.75, "75"),
    (0.9, "90"),
    (0.95, "95"),
    (0.99, "99"),
    (0.995, "99.5"),
    (0.999, "99.9"),
];

fn fmt_ms(v: f64) -> String {
    if v >= 10.0 || (v - v.round()).abs() < 1e-9 { format!("{v:.0}") } else { format!("{v:.1}") }
}

/// Ticks for a log axis over `lo..=hi`: 1-2-5 (or denser) × powers of ten, at least five when
/// the range allows.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    const MANTISSAS: [&[f64]; 4] = [
        &[1.0],
        &[1.0, 2.0, 5.0],
        &[1.0, 2.0, 3.0, 5.0, 7.0],
        &[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    ];
    let mut ticks = Vec::new();
    for m in MANTISSAS {
        ticks.clear();
        let mut decade = 10f64.powf(lo.log10().floor());
        while decade <= hi * 1.000_001 {
            for k in m {
                let t = decade * k;
                if t >= lo * 0.999_999 && t <= hi * 1.000_001 {
                    ticks.push(t);
                }
            }
            decade *= 10.0;
        }
        if ticks.len() >= 5 {
            break;
        }
    }
    ticks
}

/// Ticks from 0 to `end` every 1, 2 or 5 × a power of ten: 5 to 10 of them.
fn linear_ticks(end: f64) -> Vec<f64> {
    let step = round_125(end / 10.0, false);
    (0..).map(|k| k as f64 * step).take_while(|t| *t <= end * 1.000_001).collect()
}

/// The nearest 1-2-5 value at or below (`down`) or above `v`.
fn round_125(v: f64, down: bool) -> f64 {
    let decade = 10f64.powf(v.log10().floor());
    let steps = [1.0, 2.0, 5.0, 10.0].map(|k| k * decade);
    if down {
        steps.iter().rev().copied().find(|s| *s <= v * 1.000_001).unwrap_or(decade)
    } else {
        steps.iter().copied().find(|s| *s >= v * 0.999_999).unwrap_or(10.0 * decade)
    }
}

/// What marks a legend entry: a line (a series) or a filled box (a shaded band).
#[derive(Debug, Clone, Copy)]
enum Swatch {
    Line(RGBColor),
    Box(RGBColor),
}

const LEGEND_ROW_H: u32 = 24;
const LEGEND_PAD: u32 = 14;
const LEGEND_LEFT: i32 = 24;
const LEGEND_SWATCH_W: i32 = 26;

/// Columns and rows for `labels`: two columns when every label fits in half the width.
fn legend_layout(labels: &[String], width: u32) -> (usize, usize) {
    let col_w = (width as i32 - 2 * LEGEND_LEFT) / 2;
    let style = font(LABEL_PT);
    let fits = labels.iter().all(|l| {
        style.font.box_size(l).is_ok_and(|(w, _)| w as i32 + LEGEND_SWATCH_W + 24 <= col_w)
    });
    let cols = if fits && labels.len() > 1 { 2 } else { 1 };
    (cols, labels.len().div_ceil(cols))
}

fn legend_height(rows: usize) -> u32 {
    if rows == 0 { 0 } else { rows as u32 * LEGEND_ROW_H + 2 * LEGEND_PAD }
}

/// Draws the legend entries in `cols` columns, row by row, on `area` (the strip under a plot).
fn draw_legend(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    entries: &[(Swatch, String)],
    cols: usize,
) -> io::Result<()> {
    let (xr, _) = area.get_pixel_range();
    let col_w = (xr.end - xr.start - 2 * LEGEND_LEFT) / cols.max(1) as i32;
    for (i, (swatch, label)) in entries.iter().enumerate() {
        let x = LEGEND_LEFT + (i % cols.max(1)) as i32 * col_w;
        let y = LEGEND_PAD as i32 + (i / cols.max(1)) as i32 * LEGEND_ROW_H as i32;
        let mid = y + LEGEND_ROW_H as i32 / 2;
        match swatch {
            Swatch::Line(c) => area
                .draw(&PathElement::new(
                    vec![(x, mid), (x + LEGEND_SWATCH_W - 6, mid)],
                    c.stroke_width(4),
                ))
                .map_err(draw_err)?,
            Swatch::Box(c) => {
                let corners = [(x, mid - 8), (x + LEGEND_SWATCH_W - 8, mid + 8)];
                area.draw(&Rectangle::new(corners, c.filled())).map_err(draw_err)?;
                area.draw(&Rectangle::new(corners, RGBColor(150, 150, 150))).map_err(draw_err)?;
            }
        }
        let style = font(LABEL_PT).pos(Pos::new(HPos::Left, VPos::Center));
        area.draw(&Text::new(label.clone(), (x + LEGEND_SWATCH_W + 4, mid), style))
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Width of every chart, pixels.
pub const WIDTH: u32 = 960;
/// Height of a [`ttft_percentiles`] chart above its legend, pixels.
const PERCENTILES_PLOT_H: u32 = 480;

/// Time to first token as percentile curves, one line per series: x the TTFT (ms, log scale),
/// y the share of turns at or below it as a percentile on the nines scale (up to 99.9, or as
/// far as the largest series has samples for). The legend, under the plot, gives each series'
/// p50, p99 and count. [`WIDTH`] wide; as tall as the legend needs.
pub fn ttft_percentiles(title: &str, series: &[Series]) -> io::Result<Chart> {
    latency_percentiles(title, "time to first token (ms, log scale)", series)
}

/// [`ttft_percentiles`] for another latency (each series' `ttft_ms` holds it), `x_desc` naming
/// it on the x axis.
pub fn latency_percentiles(title: &str, x_desc: &str, series: &[Series]) -> io::Result<Chart> {
    register_font()?; // the legend's layout measures text
    let sorted: Vec<Vec<f64>> = series
        .iter()
        .map(|s| {
            let mut v: Vec<f64> = s.ttft_ms.iter().copied().filter(|t| t.is_finite()).collect();
            v.sort_by(f64::total_cmp);
            v
        })
        .collect();
    let all = sorted.iter().flatten().copied();
    let (min, max) = all.fold((f64::INFINITY, 0f64), |(lo, hi), t| (lo.min(t), hi.max(t)));
    let (lo, hi) = if min.is_finite() { (min.max(0.1), max.max(0.1)) } else { (1.0, 1000.0) };
    let lo = round_125(lo, true);
    let hi = round_125(hi, false).max(round_125(lo * 1.5, false));
    let most = sorted.iter().map(Vec::len).max().unwrap_or(0).max(2);
    // Up to the first labelled percentile at or past what the largest series resolves
    // (1 − 1/n): at least p90, at most p99.9.
    let resolved = (most as f64).log10().clamp(1.0, 3.0);
    let top = PERCENTILE_TICKS
        .iter()
        .map(|(p, _)| nines(*p))
        .find(|y| *y >= resolved - 1e-9)
        .unwrap_or(3.0);
    let yticks: Vec<(f64, &str)> = PERCENTILE_TICKS
        .iter()
        .map(|(p, l)| (nines(*p), *l))
        .filter(|(y, _)| *y <= top + 1e-9)
        .collect();
    let xticks = log_ticks(lo, hi);
    let legend: Vec<(Swatch, String)> = series
        .iter()
        .zip(&sorted)
        .enumerate()
        .map(|(i, (s, v))| {
            let label = match (nearest_rank(v, 0.5), nearest_rank(v, 0.99)) {
                (Some(p50), Some(p99)) => format!(
                    "{}: p50 {} ms, p99 {} ms, {} turns",
                    s.name,
                    fmt_ms(p50),
                    fmt_ms(p99),
                    v.len()
                ),
                _ => format!("{}: no answered turn", s.name),
            };
            (Swatch::Line(rgb(PALETTE[i % PALETTE.len()])), label)
        })
        .collect();
    let labels: Vec<String> = legend.iter().map(|(_, l)| l.clone()).collect();
    let (cols, rows) = legend_layout(&labels, WIDTH);
    let height = PERCENTILES_PLOT_H + legend_height(rows);
    Chart::render(WIDTH, height, |root| {
        root.fill(&WHITE).map_err(draw_err)?;
        let (top_area, bottom) = root.split_vertically(PERCENTILES_PLOT_H);
        let mut chart = ChartBuilder::on(&top_area)
            .caption(title, font(TITLE_PT))
            .margin(16)
            .margin_right(28)
            .x_label_area_size(56)
            .y_label_area_size(76)
            .build_cartesian_2d(
                Axis { lo, hi, log: true, ticks: xticks },
                Axis {
                    lo: 0.0,
                    hi: top,
                    log: false,
                    ticks: yticks.iter().map(|(y, _)| *y).collect(),
                },
            )
            .map_err(draw_err)?;
        let ylabel = |y: &f64| {
            yticks
                .iter()
                .find(|(t, _)| (t - y).abs() < 1e-9)
                .map_or_else(String::new, |(_, l)| (*l).to_owned())
        };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("percentile of turns (% at or below)")
            .x_label_formatter(&|v| fmt_ms(*v))
            .y_label_formatter(&ylabel)
            .label_style(font(LABEL_PT))
            .axis_desc_style(font(DESC_PT))
            .bold_line_style(RGBColor(220, 220, 220))
            .axis_style(INK)
            .draw()
            .map_err(draw_err)?;
        for (i, v) in sorted.iter().enumerate() {
            let colour = rgb(PALETTE[i % PALETTE.len()]);
            let n = v.len();
            let mut points = Vec::with_capacity(2 * n);
            let mut prev = 0.0;
            for (k, t) in v.iter().enumerate() {
                let t = t.clamp(lo, hi);
                let y = nines((k + 1) as f64 / n as f64).min(top);
                points.push((t, prev));
                points.push((t, y));
                prev = y;
            }
            chart.draw_series(LineSeries::new(points, colour.stroke_width(2))).map_err(draw_err)?;
        }
        draw_legend(&bottom, &legend, cols)
    })
}

/// One lane of a [`timeline`]: a kind of event and when each happened, seconds.
#[derive(Debug, Clone)]
pub struct Lane {
    pub name: String,
    pub times_s: Vec<f64>,
}

/// What a [`timeline`] shows.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub title: String,
    /// The x axis runs from 0 to this, seconds.
    pub end_s: f64,
    /// Phases: when each starts and its name; each lasts until the next one starts.
    pub phases: Vec<(f64, String)>,
    /// Faults, drawn as red lines across every lane, labelled in a lane of their own on top.
    pub faults: Vec<(f64, String)>,
    /// Events, a lane per kind (top to bottom, under the faults' lane), a tick per event.
    pub lanes: Vec<Lane>,
}

/// The timeline's lane colours: the palette without its red, which marks faults.
const LANE_COLOURS: [usize; 7] = [0, 1, 4, 2, 5, 6, 7];

/// A timeline: phases as shaded bands numbered above the plot (named in the legend under it),
/// faults as red lines across every lane, labelled in the top lane, and a lane of ticks per
/// kind of event, its name and count on the y axis. [`WIDTH`] wide.
pub fn timeline(t: &Timeline) -> io::Result<Chart> {
    register_font()?;
    let end = t.end_s.max(1e-3);
    let mut names = vec![format!("faults ({})", t.faults.len())];
    names.extend(t.lanes.iter().map(|l| format!("{} ({})", l.name, l.times_s.len())));
    let lanes = names.len();
    let legend: Vec<(Swatch, String)> = t
        .phases
        .iter()
        .enumerate()
        .map(|(i, (_, name))| {
            (Swatch::Box(rgb(BANDS[i % BANDS.len()])), format!("phase {}: {name}", i + 1))
        })
        .collect();
    let labels: Vec<String> = legend.iter().map(|(_, l)| l.clone()).collect();
    let (cols, rows) = legend_layout(&labels, WIDTH);
    let plot_h = 160 + 44 * lanes as u32;
    let height = plot_h + legend_height(rows);
    Chart::render(WIDTH, height, |root| {
        root.fill(&WHITE).map_err(draw_err)?;
        let (top_area, bottom) = root.split_vertically(plot_h);
        let body =
            top_area.margin(10, 0, 0, 0).titled(&t.title, font(TITLE_PT)).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&body)
            .margin(16)
            .margin_top(26)
            .margin_right(28)
            .x_label_area_size(52)
            .y_label_area_size(150)
            .build_cartesian_2d(
                Axis { lo: 0.0, hi: end, log: false, ticks: linear_ticks(end) },
                Axis {
                    lo: 0.0,
                    hi: lanes as f64,
                    log: false,
                    ticks: (0..lanes).map(|i| i as f64 + 0.5).collect(),
                },
            )
            .map_err(draw_err)?;
        let area = chart.plotting_area().clone();
        let lane_top = |k: usize| (lanes - k) as f64;
        // Phase bands under everything else, numbered above the plot.
        for (i, (start, _)) in t.phases.iter().enumerate() {
            let stop = t.phases.get(i + 1).map_or(end, |(s, _)| *s).min(end);
            area.draw(&Rectangle::new(
                [(*start, 0.0), (stop, lanes as f64)],
                rgb(BANDS[i % BANDS.len()]).filled(),
            ))
            .map_err(draw_err)?;
            let (x0, y0) = area.map_coordinate(&(*start, lanes as f64));
            let (x1, _) = area.map_coordinate(&(stop, lanes as f64));
            if x1 - x0 >= 16 {
                let style = font(LABEL_PT).pos(Pos::new(HPos::Center, VPos::Bottom));
                root.draw(&Text::new(format!("{}", i + 1), ((x0 + x1) / 2, y0 - 4), style))
                    .map_err(draw_err)?;
            }
        }
        let ylabel = |y: &f64| {
            let k = (lanes as f64 - 0.5 - y).round().max(0.0) as usize;
            names.get(k).cloned().unwrap_or_default()
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("time since the fleet started (s)")
            .x_label_formatter(&|v| fmt_ms(*v))
            .y_label_formatter(&ylabel)
            .label_style(font(LABEL_PT))
            .axis_desc_style(font(DESC_PT))
            .bold_line_style(RGBColor(205, 205, 205))
            .axis_style(INK)
            .draw()
            .map_err(draw_err)?;
        for k in 1..lanes {
            area.draw(&PathElement::new(
                vec![(0.0, lane_top(k)), (end, lane_top(k))],
                RGBColor(170, 170, 170),
            ))
            .map_err(draw_err)?;
        }
        // Faults: a red line across every lane (under the events' ticks, which stay visible)…
        for (at, _) in &t.faults {
            area.draw(&PathElement::new(
                vec![(*at, 0.0), (*at, lanes as f64)],
                FAULT.stroke_width(2),
            ))
            .map_err(draw_err)?;
        }
        // Events: a tick per event in its lane (lane 0 is the faults').
        for (k, lane) in t.lanes.iter().enumerate() {
            let colour = rgb(PALETTE[LANE_COLOURS[k % LANE_COLOURS.len()]]);
            let y = lane_top(k + 1);
            for s in &lane.times_s {
                area.draw(&PathElement::new(
                    vec![(*s, y - 0.82), (*s, y - 0.18)],
                    colour.stroke_width(2),
                ))
                .map_err(draw_err)?;
            }
        }
        // …labelled in the faults' lane beside it (on its left near the right edge; on a
        // second row when two would overlap).
        let (xr, _) = area.get_pixel_range();
        let mut row_ends: Vec<i32> = Vec::new();
        for (at, what) in &t.faults {
            let (x, y) = area.map_coordinate(&(*at, lane_top(0)));
            let (w, h) = font(LABEL_PT).font.box_size(what).map_err(draw_err)?;
            let (w, h) = (w as i32, h as i32);
            let left = if x + 6 + w > xr.end { x - 6 - w } else { x + 6 };
            let row = row_ends.iter().position(|e| *e + 8 < left).unwrap_or(row_ends.len());
            if row == row_ends.len() {
                row_ends.push(i32::MIN);
            }
            row_ends[row] = left + w;
            let style = font(LABEL_PT).color(&FAULT).pos(Pos::new(HPos::Left, VPos::Top));
            root.draw(&Text::new(what.clone(), (left, y + 5 + (h + 4) * row as i32), style))
                .map_err(draw_err)?;
        }
        draw_legend(&bottom, &legend, cols)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(png_bytes).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    /// Pixels that are not (nearly) white in the rows `y0..y1`.
    fn inked(c: &Chart, y0: u32, y1: u32) -> usize {
        inked_in(c, 0..c.width(), y0..y1)
    }

    fn inked_in(c: &Chart, xs: std::ops::Range<u32>, ys: std::ops::Range<u32>) -> usize {
        ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
            .filter(|(x, y)| c.pixel(*x, *y).iter().any(|v| *v < 200))
            .count()
    }

    fn sample() -> Vec<Series> {
        vec![
            Series {
                name: "edgeroute".into(),
                ttft_ms: (1..=400).map(|k| 20.0 + k as f64 / 4.0).collect(),
            },
            Series {
                name: "DNS-style".into(),
                ttft_ms: (1..=400).map(|k| 30.0 + k as f64).collect(),
            },
        ]
    }

    #[test]
    fn a_percentile_chart_renders_to_a_png_of_its_size_with_a_title() {
        let c = ttft_percentiles("Time to first token, steady", &sample()).unwrap();
        // Two short legend entries share one row.
        let (w, h) = (WIDTH, PERCENTILES_PLOT_H + LEGEND_ROW_H + 2 * LEGEND_PAD);
        assert_eq!((c.width(), c.height()), (w, h));
        let (dw, dh, pixels) = decode(&c.to_png().unwrap());
        assert_eq!((dw, dh), (w, h));
        assert_eq!(pixels.len(), (w * h * 3) as usize);
        // The title is ink centred in the top band; without one that is blank.
        assert!(inked_in(&c, 200..760, 0..40) > 200, "no title drawn");
        let untitled = ttft_percentiles("", &sample()).unwrap();
        assert_eq!(inked_in(&untitled, 200..760, 0..40), 0);
        // Both series' colours are on the chart, and the legend under the plot has ink.
        for colour in &PALETTE[..2] {
            let found = (0..h).any(|y| (0..w).any(|x| c.pixel(x, y) == *colour));
            assert!(found, "{colour:?}");
        }
        assert!(inked(&c, PERCENTILES_PLOT_H, h) > 200, "no legend");
        // Long names: a legend row each.
        let mut long = sample();
        long[0].name = "DNS-style (geo map, 30 s TTL), as a resolver would answer".into();
        let c = ttft_percentiles("t", &long).unwrap();
        assert_eq!(c.height(), PERCENTILES_PLOT_H + 2 * LEGEND_ROW_H + 2 * LEGEND_PAD);
    }

    #[test]
    fn a_timeline_renders_to_a_png_with_its_faults_and_a_legend() {
        let t = Timeline {
            title: "What happened when".into(),
            end_s: 12.0,
            phases: vec![(0.0, "steady".into()), (4.0, "drain".into()), (8.0, "kill".into())],
            faults: vec![(9.0, "tor-1 killed".into())],
            lanes: vec![
                Lane { name: "failover".into(), times_s: vec![9.1, 9.2] },
                Lane { name: "moved".into(), times_s: vec![4.5] },
            ],
        };
        let c = timeline(&t).unwrap();
        assert_eq!(c.width(), WIDTH);
        let (w, h, _) = decode(&c.to_png().unwrap());
        assert_eq!((w, h), (WIDTH, c.height()));
        assert!(inked(&c, 0, 40) > 200, "no title drawn");
        let red = [214, 39, 40];
        assert!((0..h).any(|y| (0..w).any(|x| c.pixel(x, y) == red)), "no fault line");
        // The legend, under the plot, names each phase (three: two rows of two columns).
        assert!(inked(&c, h - legend_height(2), h) > 200, "no phase legend");
    }

    #[test]
    fn log_axes_get_readable_ticks() {
        assert_eq!(log_ticks(10.0, 1000.0), vec![10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]);
        assert_eq!(log_ticks(20.0, 100.0), vec![20.0, 30.0, 50.0, 70.0, 100.0]);
        assert_eq!(round_125(17.0, false), 20.0);
        assert_eq!(round_125(17.0, true), 10.0);
        assert_eq!(round_125(420.0, false), 500.0);
        assert!((nines(0.99) - 2.0).abs() < 1e-9);
    }
}

#[cfg(test)]
mod samples {
    use super::*;

    /// `EDGEROUTE_CHART_SAMPLES=DIR cargo test -p edgeroute-lab chart::samples -- --ignored`
    /// renders one chart of each kind into DIR, to look at.
    #[test]
    #[ignore = "writes sample charts for a person to look at"]
    #[allow(clippy::disallowed_methods)] // A hand-run test asking where to write.
    fn render_samples() {
        let dir = std::env::var("EDGEROUTE_CHART_SAMPLES").unwrap_or_else(|_| "/tmp".into());
        let dir = Path::new(&dir);
        std::fs::create_dir_all(dir).unwrap();
        // Deterministic, skewed samples: a body and a tail.
        let dist = |base: f64, spread: f64, tail_every: usize, tail: f64| -> Vec<f64> {
            (0..1200)
                .map(|k| {
                    let u = ((k * 7919) % 1200) as f64 / 1200.0;
                    let t = base + spread * u * u;
                    if k % tail_every == 0 { t + tail * (1.0 + u) } else { t }
                })
                .collect()
        };
        let series = vec![
            Series {
                name: "DNS-style (geo map, 30 s TTL)".into(),
                ttft_ms: dist(40.0, 160.0, 25, 900.0),
            },
            Series { name: "central proxy".into(), ttft_ms: dist(55.0, 120.0, 60, 400.0) },
            Series { name: "edgeroute".into(), ttft_ms: dist(30.0, 60.0, 200, 150.0) },
            Series { name: "oracle".into(), ttft_ms: dist(28.0, 55.0, 400, 80.0) },
        ];
        ttft_percentiles("Time to first token, node death", &series)
            .unwrap()
            .save(&dir.join("sample-ttft.png"))
            .unwrap();
        let t = Timeline {
            title: "What happened when: phases, faults and the clients' decisions".into(),
            end_s: 41.3,
            phases: vec![
                (0.4, "steady traffic".into()),
                (9.8, "sim-qwen loaded on mtl-2".into()),
                (17.2, "tor-1 drained".into()),
                (24.9, "the busiest node will be killed".into()),
                (33.0, "every discovery replica stopped".into()),
            ],
            faults: vec![(27.3, "van-2 killed".into())],
            lanes: vec![
                Lane { name: "failover".into(), times_s: vec![27.4, 27.45, 27.6, 28.1] },
                Lane { name: "session moved".into(), times_s: vec![17.3, 17.5, 18.0, 18.9] },
                Lane { name: "hedged".into(), times_s: vec![5.0, 12.2, 29.9] },
                Lane { name: "node ejected".into(), times_s: vec![27.9, 28.0] },
            ],
        };
        timeline(&t).unwrap().save(&dir.join("sample-timeline.png")).unwrap();
    }
}
