//! The fan-out plot: time for every reader to finish, in units of S/B,
//! against cluster size, for btfs, the central server and libtorrent, with
//! the physical limit (1.0) drawn in.

use std::path::Path;

use plotters::prelude::*;

/// DejaVu Sans (Debian's fonts-dejavu-core, which .ci/run installs).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One system's value in a point.
type Get = fn(&(usize, f64, f64, f64)) -> f64;

/// `points`: (nodes, btfs, HTTP, libtorrent), each × S/B.
pub(crate) fn fanout(png: &Path, points: &[(usize, f64, f64, f64)]) -> Result<(), String> {
    let font = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e}"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| format!("{FONT}: not a font"))?;
    if let Some(dir) = png.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let (lo, hi) = (
        points.iter().map(|p| p.0).min().unwrap_or(3) as f64 - 0.5,
        points.iter().map(|p| p.0).max().unwrap_or(8) as f64 + 0.5,
    );
    let top = points
        .iter()
        .flat_map(|p| [p.1, p.2, p.3])
        .fold(2.0f64, f64::max)
        * 1.1;
    let root = BitMapBackend::new(png, (900, 560)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Fan-out: one writer, N−1 readers of one file",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(lo..hi, 0.0..top)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("nodes (N)")
        .y_desc("time for every reader / (S/B)")
        .x_labels(points.len().max(2))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(e)?;
    let series: [(&str, RGBColor, Get); 3] = [
        ("btfs", RGBColor(200, 30, 30), |p| p.1),
        ("central HTTP", RGBColor(60, 60, 60), |p| p.2),
        ("libtorrent swarm", RGBColor(30, 90, 200), |p| p.3),
    ];
    for (name, color, get) in series {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| get(p) > 0.0)
            .map(|p| (p.0 as f64, get(p)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))
            .map_err(e)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(
                pts.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )
            .map_err(e)?;
    }
    chart
        .draw_series(LineSeries::new(
            vec![(lo, 1.0), (hi, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(e)?
        .label("S/B: one link carries the file once")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
