//! SVG plots of the agentic benchmark, rendered with `plotters`.
//!
//! Three kinds: an empirical CDF ([`cdf_svg`], e.g. TTFT per router), line
//! plots with markers ([`lines_svg`], e.g. completion time or hit rate vs
//! offered load) and grouped bars ([`grouped_bars_svg`], e.g. KV demand per
//! backend for each router). All are 1000x600, share one frame (title, axes,
//! legend in a panel right of the chart so it never covers data) and one
//! style per series index: ten colors, then the same ten dashed with hollow
//! markers. Non-finite values are skipped; an input with nothing to draw
//! still gives an SVG, one that says "no data".
//!
//! plotters is built without a font engine: text goes into the SVG as
//! `<text>` for the viewer to render, and layout uses a width estimate.

use std::ops::Range;
use std::path::Path;

use anyhow::Result;
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One named series of (x, y) points.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points in drawing order; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
}

const SIZE: (u32, u32) = (1000, 600);
/// matplotlib's tab10.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];
/// Longest label drawn in full; longer ones end in "…".
const MAX_LABEL: usize = 40;
/// Font sizes as plotters takes them (the SVG gets them divided by 1.24).
const TITLE_PT: f64 = 24.0;
const TEXT_PT: f64 = 16.0;
/// Most points drawn per CDF curve; larger samples are thinned evenly.
const CDF_POINTS: usize = 800;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Color and whether the series is in the second (dashed, hollow) cycle.
fn style(i: usize) -> (RGBColor, bool) {
    (PALETTE[i % PALETTE.len()], (i / PALETTE.len()) % 2 == 1)
}

fn font(pt: f64) -> TextStyle<'static> {
    ("sans-serif", pt).into_font().color(&BLACK)
}

/// `label` cut to `max` characters, the last one then "…".
fn clip(label: &str, max: usize) -> String {
    if label.chars().count() <= max {
        label.to_owned()
    } else {
        label.chars().take(max - 1).chain(['…']).collect()
    }
}

/// Legend texts, marking series with no finite point.
fn legend(series: &[Series]) -> Vec<String> {
    let drawn = |s: &Series| s.points.iter().any(|(x, y)| x.is_finite() && y.is_finite());
    let text = |s: &Series| match drawn(s) {
        true => clip(&s.label, MAX_LABEL),
        false => format!("{} (no data)", clip(&s.label, MAX_LABEL - 10)),
    };
    series.iter().map(text).collect()
}

/// Estimated width in pixels of `text` at [`TEXT_PT`] (sans-serif, generous).
fn text_px(text: &str) -> u32 {
    (text.chars().count() as f64 * TEXT_PT / 1.24 * 0.58).ceil() as u32
}

/// Short tick text: up to 4 significant digits, no trailing zeros, k/M/G/T
/// from 10^4 up.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 || !(1e-3..1e15).contains(&a) {
        return if a == 0.0 {
            "0".into()
        } else {
            format!("{v:.2e}")
        };
    }
    let (div, suffix) = [(1e12_f64, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(d, _)| a >= d.max(1e4))
        .unwrap_or((1.0, ""));
    let decimals = (3 - (a / div).log10().floor() as i32).max(0) as usize;
    let s = format!("{:.decimals$}", v / div);
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s}{suffix}")
}

/// Min and max of the finite values, if any.
fn bounds(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    vals.filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((f64::min(lo, v), f64::max(hi, v))),
        })
}

/// `lo..hi` widened by 5% each side (never below 0 for non-negative data),
/// or to a unit-wide range when the data is a single value.
fn padded((lo, hi): (f64, f64)) -> Range<f64> {
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let d = (lo.abs() * 0.1).max(0.5);
        return if lo >= 0.0 {
            (lo - d).max(0.0)..hi + d
        } else {
            lo - d..hi + d
        };
    }
    let d = (hi - lo) * 0.05;
    let low = if lo >= 0.0 { (lo - d).max(0.0) } else { lo - d };
    low..hi + d
}

enum Swatch {
    Line { markers: bool },
    Bar,
}

/// Opens `path`, draws the title and (if `labels` is non-empty) a legend
/// panel on the right; returns the area left for the chart.
fn frame<'a>(path: &'a Path, title: &str, labels: &[String], swatch: Swatch) -> Result<Area<'a>> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let area = root.titled(title, font(TITLE_PT))?;
    if labels.is_empty() {
        return Ok(area);
    }
    let widest = labels.iter().map(|l| text_px(l)).max().unwrap_or(0);
    let (chart, panel) = area.split_horizontally(SIZE.0 - (widest + 60).clamp(120, 360));
    let (_, h) = panel.dim_in_pixel();
    let step = ((h as i32 - 40) / labels.len() as i32).clamp(8, 24);
    for (i, label) in labels.iter().enumerate() {
        let (color, alt) = style(i);
        let y = 20 + step / 2 + step * i as i32;
        match swatch {
            Swatch::Bar => {
                let fill = if alt {
                    color.mix(0.5).filled()
                } else {
                    color.filled()
                };
                panel.draw(&Rectangle::new([(4, y - 6), (32, y + 6)], fill))?;
            }
            Swatch::Line { markers } => {
                let line = color.stroke_width(2);
                let segments: &[(i32, i32)] = if alt {
                    &[(0, 7), (11, 25), (29, 36)]
                } else {
                    &[(0, 36)]
                };
                for &(a, b) in segments {
                    panel.draw(&PathElement::new([(a, y), (b, y)], line))?;
                }
                if markers {
                    let mark = if alt {
                        color.stroke_width(2)
                    } else {
                        color.filled()
                    };
                    panel.draw(&Circle::new((18, y), 4, mark))?;
                }
            }
        }
        let text = font(TEXT_PT).pos(Pos::new(HPos::Left, VPos::Center));
        panel.draw_text(label, &text, (42, y))?;
    }
    Ok(chart)
}

/// Writes a titled SVG that says "no data".
fn no_data(path: &Path, title: &str) -> Result<()> {
    let area = frame(path, title, &[], Swatch::Bar)?;
    let (w, h) = area.dim_in_pixel();
    let text = font(TITLE_PT).pos(Pos::new(HPos::Center, VPos::Center));
    area.draw_text("no data", &text, (w as i32 / 2, h as i32 / 2))?;
    area.present()?;
    Ok(())
}

/// Axes with labels, then each series as a line (with markers if asked).
fn draw_xy<X>(
    area: &Area<'_>,
    x: X,
    y: Range<f64>,
    (x_label, y_label): (&str, &str),
    series: &[Series],
    markers: bool,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(75)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| fmt_num(*v))
        .y_label_formatter(&|v| fmt_num(*v))
        .label_style(font(TEXT_PT))
        .axis_desc_style(font(TEXT_PT))
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let (color, alt) = style(i);
        let pts = || {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
        };
        let line = color.stroke_width(2);
        if alt {
            chart.draw_series(DashedLineSeries::new(pts(), 10, 6, line))?;
        } else {
            chart.draw_series(LineSeries::new(pts(), line))?;
        }
        if markers {
            let mark = if alt {
                color.stroke_width(2)
            } else {
                color.filled()
            };
            chart.draw_series(pts().map(|p| Circle::new(p, 4, mark)))?;
        }
    }
    area.present()?;
    Ok(())
}

/// Empirical CDF plot: for each (label, samples) draws the CDF of the samples (x = value, y = fraction 0..1). x axis optionally log scale when max/min > 100. Used for "TTFT CDF per router" (values in seconds).
pub fn cdf_svg(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let curves: Vec<Series> = series
        .iter()
        .map(|(label, samples)| {
            let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
            v.sort_by(f64::total_cmp);
            let n = v.len();
            let stride = n.div_ceil(CDF_POINTS).max(1);
            // Step function through every stride-th sample and the last one.
            let mut points = Vec::with_capacity(2 * CDF_POINTS + 2);
            let mut prev = 0.0;
            for i in (stride - 1..n)
                .step_by(stride)
                .chain((!n.is_multiple_of(stride)).then(|| n - 1))
            {
                let frac = (i + 1) as f64 / n as f64;
                points.extend([(v[i], prev), (v[i], frac)]);
                prev = frac;
            }
            Series {
                label: label.clone(),
                points,
            }
        })
        .collect();
    let Some((lo, hi)) = bounds(curves.iter().flat_map(|s| s.points.iter().map(|p| p.0))) else {
        return no_data(path, title);
    };
    let area = frame(
        path,
        title,
        &legend(&curves),
        Swatch::Line { markers: false },
    )?;
    let axes = (x_label, "fraction of samples");
    if lo > 0.0 && hi / lo > 100.0 {
        let x = (lo / 1.2..hi * 1.2).log_scale();
        draw_xy(&area, x, 0.0..1.02, axes, &curves, false)
    } else {
        draw_xy(&area, padded((lo, hi)), 0.0..1.02, axes, &curves, false)
    }
}

/// Line plot with markers: y vs x for each series (e.g. "workflow completion time vs offered load", "hit rate vs offered load").
pub fn lines_svg(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let (Some(xs), Some(ys)) = (bounds(finite().map(|p| p.0)), bounds(finite().map(|p| p.1)))
    else {
        return no_data(path, title);
    };
    let area = frame(path, title, &legend(series), Swatch::Line { markers: true })?;
    draw_xy(
        &area,
        padded(xs),
        padded(ys),
        (x_label, y_label),
        series,
        true,
    )
}

/// Grouped bar chart: one group per label (e.g. router name), one bar per backend index inside the group, heights = values (e.g. KV demand per backend). Legend or x tick labels name groups; bars colored by backend index.
pub fn grouped_bars_svg(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[(String, Vec<f64>)],
) -> Result<()> {
    let Some((lo, hi)) = bounds(groups.iter().flat_map(|(_, v)| v.iter().copied())) else {
        return no_data(path, title);
    };
    let bars = groups.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let backends: Vec<String> = (0..bars).map(|j| format!("backend {j}")).collect();
    let area = frame(path, title, &backends, Swatch::Bar)?;

    // Group names under the axis: level if they fit their slot, else rotated.
    let names: Vec<String> = groups.iter().map(|(l, _)| clip(l, MAX_LABEL)).collect();
    let widest = names.iter().map(|l| text_px(l)).max().unwrap_or(0);
    let slot = (area.dim_in_pixel().0.saturating_sub(100)) / groups.len() as u32;
    let rotate = widest + 8 > slot;
    let n = groups.len() as f64;
    let y = padded((lo.min(0.0), hi.max(0.0)));
    let mut chart = ChartBuilder::on(&area)
        .margin(12)
        .x_label_area_size(if rotate { widest + 12 } else { 40 })
        .y_label_area_size(75)
        .build_cartesian_2d(-0.5..n - 0.5, y.clone())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_label)
        .y_label_formatter(&|v| fmt_num(*v))
        .label_style(font(TEXT_PT))
        .axis_desc_style(font(TEXT_PT))
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;

    let width = 0.8 / bars.max(1) as f64;
    for (g, (_, values)) in groups.iter().enumerate() {
        let left = g as f64 - 0.4;
        chart.draw_series(
            values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(j, &v)| {
                    let (color, alt) = style(j);
                    let fill = if alt {
                        color.mix(0.5).filled()
                    } else {
                        color.filled()
                    };
                    let x0 = left + width * j as f64;
                    Rectangle::new([(x0 + width * 0.08, 0.0), (x0 + width * 0.92, v)], fill)
                }),
        )?;
    }
    let text = if rotate {
        font(TEXT_PT)
            .transform(FontTransform::Rotate270)
            .pos(Pos::new(HPos::Right, VPos::Center))
    } else {
        font(TEXT_PT).pos(Pos::new(HPos::Center, VPos::Top))
    };
    let plot = chart.plotting_area();
    for (g, name) in names.iter().enumerate() {
        plot.draw(
            &(EmptyElement::at((g as f64, y.start))
                + Text::new(name.clone(), (0, 8), text.clone())),
        )?;
    }
    area.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(path: &Path) {
        let svg = std::fs::read_to_string(path).expect("svg written");
        assert!(
            svg.starts_with("<svg") || svg.starts_with("<?xml"),
            "{svg:.80}"
        );
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn renders_every_plot_and_empty_inputs() {
        let dir = std::env::temp_dir().join(format!("agentlb-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cdf: Vec<(String, Vec<f64>)> = (0..12)
            .map(|i| {
                let s = (1..=300)
                    .map(|k| 0.001 * (i + 1) as f64 * k as f64)
                    .chain([f64::NAN]);
                (format!("vllm-router cache_aware ×{i}"), s.collect())
            })
            .collect();
        let lines: Vec<Series> = (0..3)
            .map(|i| Series {
                label: format!("router {i}"),
                points: vec![(1.0, i as f64), (2.0, f64::INFINITY), (4.0, 2.0 * i as f64)],
            })
            .collect();
        let bars = vec![
            ("a".to_owned(), vec![1.0, 2.0, f64::NAN]),
            ("b".to_owned(), vec![3.0]),
        ];
        cdf_svg(&dir.join("cdf.svg"), "TTFT", "seconds", &cdf).expect("cdf");
        lines_svg(&dir.join("lines.svg"), "t", "load", "s", &lines).expect("lines");
        grouped_bars_svg(&dir.join("bars.svg"), "kv", "tokens", &bars).expect("bars");
        cdf_svg(
            &dir.join("e1.svg"),
            "t",
            "x",
            &[("a".into(), vec![f64::NAN])],
        )
        .expect("empty cdf");
        lines_svg(&dir.join("e2.svg"), "t", "x", "y", &[]).expect("empty lines");
        grouped_bars_svg(&dir.join("e3.svg"), "t", "y", &[]).expect("empty bars");
        for f in ["cdf", "lines", "bars", "e1", "e2", "e3"] {
            check(&dir.join(format!("{f}.svg")));
        }
        let empty = std::fs::read_to_string(dir.join("e2.svg")).expect("read");
        assert!(empty.contains("no data"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn legend_marks_empty_series_and_clips() {
        let s = |label: &str, points| Series {
            label: label.into(),
            points,
        };
        let l = legend(&[
            s("a", vec![(1.0, f64::NAN)]),
            s(&"x".repeat(50), vec![(1.0, 2.0)]),
        ]);
        assert_eq!(l[0], "a (no data)");
        assert!(l[1].ends_with('…') && l[1].chars().count() == MAX_LABEL);
    }

    #[test]
    fn tick_numbers_are_short() {
        assert_eq!(fmt_num(0.30000000000000004), "0.3");
        assert_eq!(fmt_num(1234.4), "1234");
        assert_eq!(fmt_num(0.00125), "0.00125");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(450_000.0), "450k");
        assert_eq!(fmt_num(-2.5e6), "-2.5M");
        assert_eq!(fmt_num(1e-5), "1.00e-5");
    }
}
