//! `loss.png`: a plot of the training losses in a run's `metrics.csv`.
//!
//! Text (title, axis labels, tick labels, legend) is drawn with DejaVu Sans embedded in the
//! binary (the `dejavu` crate), so the plot reads the same on every machine, one without any
//! system font included; no font is looked up at run time.

use crate::core::item::Frame;
use crate::io::grid::write_png_atomic;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Why [`plot_metrics`] wrote no plot. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The metrics file is missing or not a regular file.
    #[error("{}: not a regular file", .0.display())]
    NotAFile(PathBuf),
    /// The metrics file cannot be read, or the PNG cannot be written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The metrics file holds nothing to plot.
    #[error("{}: {source}", path.display())]
    Metrics { path: PathBuf, source: MetricsError },
    /// Drawing the plot (to be written to `path`) failed.
    #[error("{}: drawing failed: {source}", path.display())]
    Draw { path: PathBuf, source: DrawError },
}

/// What is wrong with the text of a metrics CSV (no file name: [`PlotError::Metrics`] adds it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    /// No header line.
    #[error("empty file (no header line)")]
    Empty,
    /// The header (given) has no `step` column.
    #[error("no `step` column in the header `{0}`")]
    NoStep(String),
    /// The header (given) has none of the loss columns.
    #[error("none of the columns d_loss, g_loss, penalty in the header `{0}`")]
    NoLosses(String),
    /// No row has a value in a loss column.
    #[error("no rows with values to plot")]
    NoRows,
}

/// An error of the plotting library.
pub type DrawError = Box<dyn std::error::Error + Send + Sync>;

/// Size of the plot in pixels (width, height).
pub const PLOT_SIZE: (u32, u32) = (1000, 600);

/// Family name the embedded font is registered under with plotters.
const FAMILY: &str = "sans-serif";

/// Registers the embedded DejaVu Sans with plotters, once per process. Returns whether it
/// could be registered (always, unless the font data were damaged: the curves are then drawn
/// without text).
fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, dejavu::sans::regular()).is_ok())
}

/// One curve: its name, colour and points (step, value).
struct Series {
    name: &'static str,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Reads the curves to plot from the text of a metrics CSV. Errors are sentences without the
/// file name (the caller adds it).
fn read_series(text: &str) -> Result<Vec<Series>, MetricsError> {
    let mut lines = text.lines();
    let header = lines.by_ref().find(|l| !l.trim().is_empty()).ok_or(MetricsError::Empty)?;
    let cols: Vec<&str> = header.split(',').map(|c| c.trim()).collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let step = col("step").ok_or_else(|| MetricsError::NoStep(header.to_string()))?;
    let wanted: [(&'static str, RGBColor); 3] =
        [("d_loss", RGBColor(31, 119, 180)), ("g_loss", RGBColor(214, 39, 40)), ("penalty", RGBColor(44, 160, 44))];
    let mut series: Vec<(usize, Series)> =
        wanted.iter().filter_map(|&(name, colour)| col(name).map(|i| (i, Series { name, colour, points: vec![] }))).collect();
    if series.is_empty() {
        return Err(MetricsError::NoLosses(header.to_string()));
    }
    for line in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(|f| f.trim()).collect();
        let value = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).filter(|v| v.is_finite());
        let Some(x) = value(step) else { continue };
        for (i, s) in &mut series {
            if let Some(y) = value(*i) {
                s.points.push((x, y));
            }
        }
    }
    // The penalty is plotted only when it is used (not all zero).
    series.retain(|(_, s)| s.name != "penalty" || s.points.iter().any(|&(_, y)| y != 0.0));
    let series: Vec<Series> = series.into_iter().map(|(_, s)| s).collect();
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(MetricsError::NoRows);
    }
    Ok(series)
}

/// The `fid` column (sample quality from an eval stage) as points (step, FID); empty when the
/// file has no such column or no values in it.
fn read_fid(text: &str) -> Vec<(f64, f64)> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else { return vec![] };
    let cols: Vec<&str> = header.split(',').map(|c| c.trim()).collect();
    let (Some(step), Some(fid)) = (cols.iter().position(|c| *c == "step"), cols.iter().position(|c| *c == "fid")) else {
        return vec![];
    };
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(|f| f.trim()).collect();
            let v = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).filter(|v| v.is_finite());
            Some((v(step)?, v(fid)?))
        })
        .collect()
}

/// `lo..hi` widened by `below` and `above` times its length (or by 1 when `lo == hi`).
fn padded(lo: f64, hi: f64, below: f64, above: f64) -> std::ops::Range<f64> {
    if hi > lo {
        let r = hi - lo;
        (lo - r * below)..(hi + r * above)
    } else {
        (lo - 1.0)..(hi + 1.0)
    }
}

/// Size of the plot with a FID panel under the losses.
pub const PLOT_SIZE_WITH_FID: (u32, u32) = (1000, 900);

/// Colour of the FID curve.
const FID_COLOUR: RGBColor = RGBColor(148, 103, 189);

/// Draws the curves into an RGB buffer of [`PLOT_SIZE`] (or, with FID points, of
/// [`PLOT_SIZE_WITH_FID`]: losses above, FID below); with `text` false no text at all is drawn
/// (no font needed).
fn draw(buf: &mut [u8], series: &[Series], fid: &[(f64, f64)], title: &str, text: bool) -> Result<(), DrawError> {
    let size = if fid.is_empty() { PLOT_SIZE } else { PLOT_SIZE_WITH_FID };
    let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
    root.fill(&WHITE)?;
    if fid.is_empty() {
        return draw_panel(&root, series, None, title, "loss", text);
    }
    let (top, bottom) = root.split_vertically(560);
    // Both panels on one step axis (the FID points are at some of the logged steps).
    let steps = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).chain(fid.iter().map(|p| p.0));
    let span = steps.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    draw_panel(&top, series, Some(span), title, "loss", text)?;
    let fid_series = [Series { name: "FID", colour: FID_COLOUR, points: fid.to_vec() }];
    draw_panel(&bottom, &fid_series, Some(span), "Sample quality (eval stage)", "FID", text)?;
    root.present()?;
    Ok(())
}

/// One chart of `series` against the generator step on `area`, with a legend.
fn draw_panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    series: &[Series],
    x_span: Option<(f64, f64)>,
    title: &str,
    y_desc: &str,
    text: bool,
) -> Result<(), DrawError> {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    // Headroom at the top keeps the legend (upper right) off the curves.
    let top = if text { 0.25 } else { 0.05 };
    if let Some((a, b)) = x_span {
        (x0, x1) = (a, b);
    }
    // A flat curve (one evaluation, say) gets a range of ±5% around its value.
    if y1 == y0 {
        let d = (y0.abs() * 0.05).max(1e-3);
        (y0, y1) = (y0 - d, y1 + d);
    }
    let (xr, yr) = (padded(x0, x1, 0.02, 0.02), padded(y0, y1, 0.05, top));
    let mut builder = ChartBuilder::on(area);
    builder.margin(20);
    if text {
        builder.caption(title, (FAMILY, 26)).x_label_area_size(55).y_label_area_size(75);
    }
    let mut chart = builder.build_cartesian_2d(xr, yr)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("generator step")
            .y_desc(y_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 18))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(200, 200, 200))
            .draw()?;
    } else {
        let (xs, ys) = (chart.x_range(), chart.y_range());
        chart.draw_series(std::iter::once(Rectangle::new([(xs.start, ys.start), (xs.end, ys.end)], BLACK.stroke_width(1))))?;
    }
    for s in series {
        let colour = s.colour;
        let style = colour.stroke_width(2);
        let ann = chart.draw_series(LineSeries::new(s.points.iter().copied(), style))?;
        if text {
            ann.label(s.name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3)));
        }
        if s.points.len() == 1 {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FAMILY, 16))
            .draw()?;
    }
    area.present()?;
    Ok(())
}

/// Plots the losses of a run's metrics CSV into a PNG.
///
/// `csv` is a metrics file whose first line is a header naming the columns (at least `step`
/// and one of `d_loss`, `g_loss`, `penalty`; other columns, in any order, are ignored, e.g.
/// `step,elapsed_s,d_loss,g_loss,penalty,grad_norm,img_per_s`). `d_loss` and `g_loss` are drawn
/// against `step`, and `penalty` too when it is not all zero; empty, unparsable, NaN and
/// infinite values are skipped. The plot is a [`PLOT_SIZE`] (1000×600) RGB PNG with a title
/// (`title`, or else naming the run folder, the folder of `csv`), axis labels and a legend, written atomically
/// to `out` (temporary file + rename). Its text uses the embedded DejaVu Sans. When the CSV has values in a `fid` column (an eval stage's),
/// they get their own panel under the losses and the picture is [`PLOT_SIZE_WITH_FID`].
///
/// Errors, each naming the file: `csv` is not a file or cannot be read
/// ([`PlotError::NotAFile`], [`PlotError::Io`]), has no header, no `step` column, none of the
/// loss columns, or no value to plot ([`PlotError::Metrics`]); drawing fails
/// ([`PlotError::Draw`]); `out` cannot be written ([`PlotError::Io`]).
pub fn plot_metrics(csv: &Path, out: &Path, title: Option<&str>) -> Result<(), PlotError> {
    if !std::fs::metadata(csv).is_ok_and(|m| m.is_file()) {
        return Err(PlotError::NotAFile(csv.to_path_buf()));
    }
    let mut text = String::new();
    {
        use std::io::Read;
        let io = |source| PlotError::Io { path: csv.to_path_buf(), source };
        let f = std::fs::File::open(csv).map_err(io)?;
        f.take(1 << 30).read_to_string(&mut text).map_err(io)?;
    }
    let series = read_series(&text).map_err(|source| PlotError::Metrics { path: csv.to_path_buf(), source })?;
    let run = csv.canonicalize().ok().and_then(|p| p.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()));
    let title = match (title, run) {
        (Some(t), _) => t.to_string(),
        (None, Some(r)) => format!("Training losses: {r}"),
        (None, None) => "Training losses".to_string(),
    };
    let fid = read_fid(&text);
    let (w, h) = if fid.is_empty() { PLOT_SIZE } else { PLOT_SIZE_WITH_FID };
    let mut buf = vec![0u8; (w * h * 3) as usize];
    draw(&mut buf, &series, &fid, &title, font_available()).map_err(|source| PlotError::Draw { path: out.to_path_buf(), source })?;
    let frame = Frame { step: 0, width: w, height: h, rgb: buf };
    write_png_atomic(&frame, out).map_err(|source| PlotError::Io { path: out.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "step,elapsed_s,d_loss,g_loss,penalty,grad_norm,img_per_s\n";

    fn metrics(rows: usize, penalty: bool) -> String {
        let mut s = CSV.to_string();
        for i in 1..=rows {
            let t = i as f64;
            let pen = if penalty { 0.5 / t } else { 0.0 };
            s += &format!("{},{:.2},{:.4},{:.4},{pen:.4},1.0,100\n", i * 100, t * 0.5, 1.4 - 0.6 * (t / 10.0).sin().abs(), 0.7 + 1.0 / t);
        }
        s
    }

    fn colours(path: &Path) -> usize {
        let img = image::open(path).unwrap().to_rgb8();
        let mut seen = std::collections::HashSet::new();
        for p in img.pixels() {
            seen.insert(p.0);
        }
        seen.len()
    }

    #[test]
    fn plot_is_written_with_size_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("metrics.csv");
        std::fs::write(&csv, metrics(60, true)).unwrap();
        let out = dir.path().join("loss.png");
        plot_metrics(&csv, &out, None).unwrap();
        let img = image::open(&out).unwrap();
        assert_eq!((img.width(), img.height()), PLOT_SIZE);
        assert!(colours(&out) > 3);
        // Nothing but the plot and the CSV in the folder (no temporary file left).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn fid_values_get_their_own_panel() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("metrics.csv");
        let mut text = "step,elapsed_s,d_loss,g_loss,penalty,grad_norm,img_per_s,fid,kid,is\n".to_string();
        for i in 1..=40 {
            let fid = if i % 10 == 0 { format!("{:.2}", 100.0 / i as f64) } else { String::new() };
            text += &format!("{},1,1.2,0.8,0.1,1,100,{fid},,\n", i * 50);
        }
        std::fs::write(&csv, &text).unwrap();
        assert_eq!(read_fid(&text), vec![(500.0, 10.0), (1000.0, 5.0), (1500.0, 3.33), (2000.0, 2.5)]);
        let out = dir.path().join("loss.png");
        plot_metrics(&csv, &out, None).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), PLOT_SIZE_WITH_FID);
        // The FID curve is drawn in the lower panel only; the losses in the upper one.
        let has = |c: [u8; 3], rows: std::ops::Range<u32>| rows.into_iter().any(|y| (0..img.width()).any(|x| img.get_pixel(x, y).0 == c));
        assert!(has([148, 103, 189], 560..900) && !has([148, 103, 189], 0..560));
        assert!(has([31, 119, 180], 0..560) && !has([31, 119, 180], 560..900));
        // Without values in the column: the plain plot.
        std::fs::write(&csv, metrics(5, true)).unwrap();
        plot_metrics(&csv, &out, None).unwrap();
        let img = image::open(&out).unwrap();
        assert_eq!((img.width(), img.height()), PLOT_SIZE);
    }

    #[test]
    fn columns_are_found_by_name_and_bad_values_skipped() {
        let text = "img_per_s,g_loss,step,extra,d_loss\n\
                    1,2.0,10,x,0.5\n\
                    1,NaN,20,x,0.6\n\
                    1,,30,x,inf\n\
                    1,2.5,oops,x,0.7\n\
                    1,3.0,40\n\
                    \n";
        let s = read_series(text).unwrap();
        let names: Vec<_> = s.iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["d_loss", "g_loss"]);
        assert_eq!(s[0].points, vec![(10.0, 0.5), (20.0, 0.6)]);
        assert_eq!(s[1].points, vec![(10.0, 2.0), (40.0, 3.0)]);
        // The penalty is left out when all zero, kept otherwise.
        let s = read_series(&metrics(5, false)).unwrap();
        assert_eq!(s.len(), 2);
        let s = read_series(&metrics(5, true)).unwrap();
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("loss.png");
        let missing = dir.path().join("missing.csv");
        assert!(plot_metrics(&missing, &out, None).unwrap_err().to_string().contains("missing.csv"));
        for (name, text, says) in [
            ("empty.csv", "", "empty"),
            ("nostep.csv", "d_loss,g_loss\n1,2\n", "`step`"),
            ("nolosses.csv", "step,img_per_s\n1,2\n", "d_loss"),
            ("norows.csv", CSV, "no rows"),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            let e = plot_metrics(&p, &out, None).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains(says), "{e}");
        }
        assert!(!out.exists());
        let csv = dir.path().join("metrics.csv");
        std::fs::write(&csv, metrics(3, false)).unwrap();
        let e = plot_metrics(&csv, &dir.path().join("no/such/loss.png"), None).unwrap_err().to_string();
        assert!(e.contains("loss.png"), "{e}");
    }

    /// Pixels of `img` in rows `rows` that are nearly black (text; the curves are coloured).
    fn dark_pixels(img: &image::RgbImage, rows: std::ops::Range<u32>) -> usize {
        rows.flat_map(|y| (0..img.width()).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 80)).count()
    }

    #[test]
    fn the_title_is_drawn_with_the_embedded_font() {
        // No font is looked up on the machine (plotters' ab_glyph backend draws only
        // registered fonts), so what this draws is what a machine without fonts gets.
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("metrics.csv");
        std::fs::write(&csv, metrics(30, true)).unwrap();
        let out = dir.path().join("loss.png");
        plot_metrics(&csv, &out, Some("Training losses: a title")).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        // The title sits in the top band (margin 20, 26 px text, above the plot area's frame
        // at y ≈ 50), centred: dark text pixels there, and only between its ends, about a
        // third of the width.
        let title = dark_pixels(&img, 12..46);
        assert!(title > 300, "{title} dark pixels in the title band");
        let cols: Vec<u32> = (0..img.width()).filter(|&x| (12..46).any(|y| img.get_pixel(x, y).0.iter().all(|&c| c < 80))).collect();
        let (first, last) = (cols[0], *cols.last().unwrap());
        assert!(first > 250 && last < 750 && last - first > 200, "title spans columns {first}..{last}");
        // Tick labels and axis descriptions too: dark pixels under the plot area.
        assert!(dark_pixels(&img, 545..600) > 200);
    }

    #[test]
    fn without_a_font_curves_are_still_drawn() {
        let series = read_series(&metrics(20, true)).unwrap();
        let (w, h) = PLOT_SIZE;
        let mut buf = vec![0u8; (w * h * 3) as usize];
        draw(&mut buf, &series, &[], "t", false).unwrap();
        // The d_loss colour appears somewhere.
        assert!(buf.chunks_exact(3).any(|p| p == [31, 119, 180]));
        // A single point is drawn as a dot.
        let one = read_series("step,d_loss\n5,1.0\n").unwrap();
        draw(&mut buf, &one, &[], "t", false).unwrap();
        assert!(buf.chunks_exact(3).any(|p| p == [31, 119, 180]));
    }

    #[test]
    fn text_with_an_unregistered_font_would_fail() {
        // Text does need a registered font (no system font is looked up), which is why the
        // plot registers the embedded one.
        let root_buf = &mut vec![0u8; 100 * 100 * 3];
        let root = BitMapBackend::with_buffer(root_buf, (100, 100)).into_drawing_area();
        let r = root.draw_text("x", &("pipe-no-such-font", 12).into_text_style(&root), (10, 10));
        assert!(r.is_err());
    }
}
