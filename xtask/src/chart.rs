//! The resume benchmark's chart: TTFT against history length, one line per way of getting the
//! first token, drawn with plotters into an RGB buffer and written as a PNG.
//!
//! Text is drawn by plotters' pure-Rust `ab_glyph` backend from a TrueType font registered at
//! run time (its `ttf` feature would need fontconfig), so a machine without the font gets an
//! error saying which file to install, not an unlabelled chart.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use plotters::prelude::*;

/// Where DejaVu Sans lives on Debian/Ubuntu, Fedora and Arch; `AGENTKV_BENCH_FONT` comes first.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
const FONT_ENV: &str = "AGENTKV_BENCH_FONT";
/// The family name the chart's text asks plotters for.
const FAMILY: &str = "sans-serif";

pub const WIDTH: u32 = 960;
pub const HEIGHT: u32 = 600;

/// One line of the chart.
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    /// (history tokens, TTFT ms); points whose TTFT is not a positive number are left out.
    pub points: Vec<(f64, f64)>,
    /// Where each point's value is written: under it rather than over it (so that two close
    /// lines keep their labels apart).
    pub values_below: bool,
}

/// Registers the chart font with plotters once per process.
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let registered = FONT.get_or_init(|| {
        let from_env = std::env::var_os(FONT_ENV).map(PathBuf::from);
        let candidates: Vec<PathBuf> = from_env
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        let Some(path) = candidates.iter().find(|p| p.is_file()) else {
            let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            return Err(format!(
                "no font for the chart's text: none of {} exists; install DejaVu Sans \
                 (Debian/Ubuntu: fonts-dejavu-core) or set {FONT_ENV} to a .ttf file",
                tried.join(", ")
            ));
        };
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        // plotters keeps fonts for the life of the process; this runs once.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a TrueType font plotters can use", path.display()))?;
        Ok(path.clone())
    });
    registered.as_ref().map(|_| ()).map_err(|e| anyhow!("{e}"))
}

/// Draws the chart into an RGB8 buffer of `WIDTH` x `HEIGHT`.
pub fn render_rgb(title: &str, series: &[Series]) -> Result<Vec<u8>> {
    ensure_font()?;
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|&(x, y)| x.is_finite() && y.is_finite() && y > 0.0)
        .collect();
    if points.is_empty() {
        bail!("nothing to draw: no series has a positive TTFT");
    }
    // Room right of the last point for its value.
    let x_max = points.iter().map(|p| p.0).fold(0.0, f64::max) * 1.12;
    let y_min = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min) / 2.0;
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max) * 2.0;

    let mut buf = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 22))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("history (tokens)")
            .y_desc("time to first token (ms, log scale)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 17))
            .draw()?;
        for s in series {
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|&(x, y)| x.is_finite() && y.is_finite() && y > 0.0)
                .collect();
            if pts.is_empty() {
                continue;
            }
            let color = s.color;
            let dy = if s.values_below { 8 } else { -22 };
            let value_style = TextStyle::from((FAMILY, 14).into_font()).color(&color);
            chart.draw_series(pts.iter().map(|&(x, y)| {
                EmptyElement::at((x, y))
                    + Text::new(format!("{y:.0}"), (6, dy), value_style.clone())
            }))?;
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(3)).point_size(5))?
                .label(s.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FAMILY, 16))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(buf)
}

/// Draws the chart and writes it to `path` as a PNG.
pub fn write_png(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    let rgb = render_rgb(title, series)?;
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .with_context(|| format!("writing {}", path.display()))?;
    writer
        .write_image_data(&rgb)
        .with_context(|| format!("writing {}", path.display()))?;
    writer
        .finish()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: RGBColor = RGBColor(200, 30, 30);
    const B: RGBColor = RGBColor(30, 90, 200);

    fn series() -> Vec<Series> {
        vec![
            Series {
                label: "(a) re-prefill".into(),
                color: A,
                points: vec![(256.0, 3000.0), (1024.0, 11000.0), (4096.0, 45000.0)],
                values_below: false,
            },
            Series {
                label: "(b) warm resume".into(),
                color: B,
                points: vec![(256.0, 250.0), (1024.0, 280.0), (4096.0, f64::NAN)],
                values_below: true,
            },
        ]
    }

    fn font_or_skip() -> bool {
        match ensure_font() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("skipped: {e}");
                false
            }
        }
    }

    #[test]
    fn chart_draws_both_series_and_text() {
        if !font_or_skip() {
            return;
        }
        let rgb = render_rgb("TTFT", &series()).expect("drawn");
        assert_eq!(rgb.len(), (WIDTH * HEIGHT * 3) as usize);
        let pixels: Vec<&[u8]> = rgb.chunks_exact(3).collect();
        let count = |c: RGBColor| pixels.iter().filter(|p| **p == [c.0, c.1, c.2]).count();
        // A line 3 px wide across a good part of the plot, plus its legend sample.
        assert!(count(A) > 500, "series (a) drawn: {} pixels", count(A));
        assert!(count(B) > 500, "series (b) drawn: {} pixels", count(B));
        // Labels, ticks and the legend's text and border are dark grey to black.
        let dark = pixels.iter().filter(|p| p.iter().all(|&v| v < 90)).count();
        assert!(dark > 2000, "text and axes drawn: {dark} dark pixels");
    }

    #[test]
    fn png_file_is_written() {
        if !font_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("chart.png");
        write_png(&path, "TTFT", &series()).expect("written");
        let decoder = png::Decoder::new(std::fs::File::open(&path).expect("open"));
        let reader = decoder.read_info().expect("a PNG");
        let info = reader.info();
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        assert_eq!(info.color_type, png::ColorType::Rgb);
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        if !font_or_skip() {
            return;
        }
        let empty = [Series {
            label: "x".into(),
            color: A,
            points: vec![(1.0, f64::NAN), (2.0, 0.0)],
            values_below: false,
        }];
        let err = render_rgb("x", &empty).expect_err("no positive point");
        assert!(err.to_string().contains("nothing to draw"), "{err}");
    }
}
