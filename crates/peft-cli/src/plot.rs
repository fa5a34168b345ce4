//! Loss curves as SVG and PNG (`peft compare`, and `peft train` at the end of a run). The PNG
//! text uses an embedded DejaVu Sans, so that no system font is needed.

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One named curve of `(step, value)` points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const SIZE: (u32, u32) = (800, 500);

fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    anyhow::ensure!(ok, "the embedded plot font does not load");
    Ok(())
}

/// Writes the chart to `stem.svg` and `stem.png` (each written whole, then renamed).
pub fn write_loss_chart(stem: &Path, title: &str, series: &[Series]) -> Result<()> {
    register_font()?;
    let svg_path = stem.with_extension("svg");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, title, series)
            .with_context(|| format!("cannot draw {}", svg_path.display()))?;
    }
    peft_models::io::write_atomic(&svg_path, svg.as_bytes())?;

    let png_path = stem.with_extension("png");
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        draw(&root, title, series)
            .with_context(|| format!("cannot draw {}", png_path.display()))?;
    }
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let writer = encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(&rgb).map(|_| w))
        .with_context(|| format!("cannot encode {}", png_path.display()))?;
    writer
        .finish()
        .with_context(|| format!("cannot encode {}", png_path.display()))?;
    peft_models::io::write_atomic(&png_path, &bytes)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    series: &[Series],
) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    let x_max = points().map(|p| p.0).fold(1f64, f64::max);
    let y_max = points()
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max);
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..(y_max * 1.05).max(1e-6))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("loss")
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
