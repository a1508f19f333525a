//! Small PNG charts for the lab's reports: grouped bars (a distribution per series) and a
//! timeline of marks. Pixels are drawn here (rectangles, lines, a 3×5 digit font for the axis
//! figures) and encoded with the `png` crate; words go in the report's caption, next to the
//! colour legend, so no font files are needed.

use std::path::Path;

pub type Rgb = [u8; 3];

/// Colours for series and marks, distinct on white.
pub const PALETTE: [(&str, Rgb); 6] = [
    ("blue", [31, 119, 180]),
    ("orange", [255, 127, 14]),
    ("green", [44, 160, 44]),
    ("red", [214, 39, 40]),
    ("purple", [148, 103, 189]),
    ("grey", [127, 127, 127]),
];

const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [40, 40, 40];
const GRID: Rgb = [225, 225, 225];

/// An RGB raster.
#[derive(Debug, Clone)]
pub struct Canvas {
    pub w: usize,
    pub h: usize,
    px: Vec<u8>,
}

impl Canvas {
    pub fn new(w: usize, h: usize) -> Canvas {
        Canvas { w, h, px: WHITE.repeat(w * h) }
    }

    pub fn get(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.w + x) * 3;
        [self.px[i], self.px[i + 1], self.px[i + 2]]
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0.min(y1)..y0.max(y1) {
            for x in x0.min(x1)..x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    /// Digits, `.`, `-` and `%` in a 3×5 font scaled by `s`, left edge at `x`, top at `y`.
    pub fn text(&mut self, x: i64, y: i64, s: i64, text: &str, c: Rgb) {
        for (i, ch) in text.chars().enumerate() {
            let Some(rows) = glyph(ch) else { continue };
            let gx = x + i as i64 * 4 * s;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        self.rect(
                            gx + col * s,
                            y + r as i64 * s,
                            gx + (col + 1) * s,
                            y + (r as i64 + 1) * s,
                            c,
                        );
                    }
                }
            }
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut enc = png::Encoder::new(file, self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(std::io::Error::other)?;
        writer.write_image_data(&self.px).map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    }
}

fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        '%' => [0b101, 0b001, 0b010, 0b100, 0b101],
        _ => return None,
    })
}

const W: usize = 720;
const H: usize = 360;
const LEFT: i64 = 50;
const RIGHT: i64 = 20;
const TOP: i64 = 20;
const BOTTOM: i64 = 40;

/// A "nice" axis maximum ≥ `v` (1, 2 or 5 × a power of ten) and its tick step.
fn nice(v: f64) -> (f64, f64) {
    let v = v.max(1.0);
    let p = 10f64.powf(v.log10().floor());
    if v <= p {
        (p, p / 5.0)
    } else if v <= 2.0 * p {
        (2.0 * p, p / 2.0)
    } else if v <= 5.0 * p {
        (5.0 * p, p)
    } else {
        (10.0 * p, 2.0 * p)
    }
}

/// Grouped bars: `groups` along the x axis (labelled by their index + 1 under the axis),
/// one bar per series in each group, series coloured in `PALETTE` order.
pub fn grouped_bars(series: &[Vec<f64>]) -> Canvas {
    let mut c = Canvas::new(W, H);
    let groups = series.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let max = series.iter().flatten().copied().fold(0.0, f64::max);
    let (top, step) = nice(max);
    let (x0, x1, y0, y1) = (LEFT, W as i64 - RIGHT, H as i64 - BOTTOM, TOP);
    let y_of = |v: f64| y0 - ((v / top) * (y0 - y1) as f64).round() as i64;
    let mut t = 0.0;
    while t <= top + 1e-9 {
        c.rect(x0, y_of(t), x1, y_of(t) + 1, GRID);
        let label = fmt_num(t);
        c.text(x0 - 6 - label.len() as i64 * 8, y_of(t) - 5, 2, &label, INK);
        t += step;
    }
    let gw = (x1 - x0) / groups as i64;
    let bw = ((gw - 10) / series.len().max(1) as i64).max(1);
    for (s, values) in series.iter().enumerate() {
        let colour = PALETTE[s % PALETTE.len()].1;
        for (g, v) in values.iter().enumerate() {
            let bx = x0 + g as i64 * gw + 5 + s as i64 * bw;
            c.rect(bx, y_of(*v), bx + bw - 1, y0, colour);
        }
    }
    for g in 0..groups {
        c.text(x0 + g as i64 * gw + gw / 2 - 4, y0 + 10, 2, &format!("{}", g + 1), INK);
    }
    c.rect(x0, y0, x1, y0 + 2, INK);
    c.rect(x0 - 2, y1, x0, y0, INK);
    c
}

/// A timeline from 0 to `end` seconds: each mark a vertical line at its time, in its colour,
/// spanning its lane (lanes stacked top to bottom), with seconds under the axis.
pub fn timeline(end: f64, lanes: usize, marks: &[(f64, usize, Rgb)]) -> Canvas {
    let mut c = Canvas::new(W, H / 2);
    let h = c.h as i64;
    let (x0, x1, y0, y1) = (LEFT, W as i64 - RIGHT, h - BOTTOM, TOP);
    let end = end.max(1e-3);
    let x_of = |t: f64| x0 + ((t / end).clamp(0.0, 1.0) * (x1 - x0) as f64).round() as i64;
    let (_, step) = nice(end);
    let mut t = 0.0;
    while t <= end + 1e-9 {
        c.rect(x_of(t), y1, x_of(t) + 1, y0, GRID);
        let label = fmt_num(t);
        c.text(x_of(t) - label.len() as i64 * 4, y0 + 10, 2, &label, INK);
        t += step;
    }
    let lane_h = ((y0 - y1) / lanes.max(1) as i64).max(1);
    for (t, lane, colour) in marks {
        let x = x_of(*t);
        let top = y1 + *lane as i64 * lane_h;
        c.rect(x - 1, top + 2, x + 2, top + lane_h - 2, *colour);
    }
    c.rect(x0, y0, x1, y0 + 2, INK);
    c
}

fn fmt_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 { format!("{v:.0}") } else { format!("{v:.1}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_drawn_to_scale_in_their_series_colour() {
        let c = grouped_bars(&[vec![10.0, 0.0], vec![5.0, 20.0]]);
        let (x0, y0) = (LEFT, H as i64 - BOTTOM);
        let gw = (W as i64 - RIGHT - x0) / 2;
        let bw = (gw - 10) / 2;
        // Series 0, group 0: 10 of an axis topping at 20 → half the height.
        let mid = (y0 + TOP) / 2;
        let x = (x0 + 5 + bw / 2) as usize;
        assert_eq!(c.get(x, (mid + 3) as usize), PALETTE[0].1);
        assert_eq!(c.get(x, (mid - 3) as usize), WHITE);
        // Series 1, group 1: the full height.
        let x = (x0 + gw + 5 + bw + bw / 2) as usize;
        assert_eq!(c.get(x, (TOP + 2) as usize), PALETTE[1].1);
    }

    #[test]
    fn timeline_marks_sit_at_their_time_and_a_png_is_written() {
        let red = PALETTE[3].1;
        let c = timeline(10.0, 2, &[(5.0, 1, red)]);
        let x = (LEFT + (W as i64 - RIGHT - LEFT) / 2) as usize;
        let h = (H / 2) as i64;
        let lane_h = (h - BOTTOM - TOP) / 2;
        assert_eq!(c.get(x, (TOP + lane_h + lane_h / 2) as usize), red, "lane 1");
        assert_ne!(c.get(x, (TOP + lane_h / 2) as usize), red, "not lane 0");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.png");
        c.save(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), W as u32);
    }

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice(17.0).0, 20.0);
        assert_eq!(nice(3.0).0, 5.0);
        assert_eq!(nice(100.0).0, 100.0);
        assert_eq!(nice(0.0).0, 1.0);
    }
}
