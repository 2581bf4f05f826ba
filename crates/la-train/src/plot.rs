//! PNG pictures of a run: training curves and confusion matrices, drawn with plotters into a
//! pixel buffer and encoded with the image crate. The font is compiled in (assets/), so no
//! system font is needed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::record::EpochRecord;
use crate::study::CurvePoint;
use crate::{Error, Result};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Makes the compiled-in font plotters' "sans-serif" (for other pictures drawn with plotters).
pub fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is a fixed, valid asset; a failure here would be a build defect.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn draw_error<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        reason: format!("cannot draw: {e}"),
    }
}

/// Writes an RGB buffer as a PNG, atomically.
pub fn save_png(path: &Path, buffer: Vec<u8>, width: u32, height: u32) -> Result<()> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(&buffer, width, height, image::ExtendedColorType::Rgb8)
        .map_err(draw_error(path))?;
    la_core::write_atomically(path, &bytes)?;
    Ok(())
}

use image::ImageEncoder;

/// One named, coloured line of a panel.
type Line<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

/// Loss, accuracy and learning rate against epochs, side by side.
pub fn training_curves(path: &Path, history: &[EpochRecord]) -> Result<()> {
    register_font();
    let (width, height) = (1500u32, 450u32);
    let mut buffer = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error(path))?;
        let panels = root.split_evenly((1, 3));
        let x_max = history.last().map_or(1.0, |r| r.epoch as f64).max(1.0);
        let series = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
            history
                .iter()
                .filter_map(|r| f(r).map(|v| (r.epoch as f64, v)))
                .collect()
        };
        let plots: [(&str, Vec<Line>); 3] = [
            (
                "loss",
                vec![
                    ("train", series(&|r| Some(r.train_loss)), BLUE),
                    ("validation", series(&|r| r.val_loss), RED),
                ],
            ),
            (
                "top-1 accuracy",
                vec![
                    ("train", series(&|r| Some(r.train_top1)), BLUE),
                    ("validation", series(&|r| r.val_top1), RED),
                ],
            ),
            (
                "learning rate (end of epoch)",
                vec![("lr", series(&|r| Some(r.lr)), GREEN)],
            ),
        ];
        for (area, (title, lines)) in panels.iter().zip(plots.iter()) {
            let values = lines.iter().flat_map(|(_, s, _)| s.iter().map(|p| p.1));
            let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
            let (lo, hi) = if lo.is_finite() {
                (lo.min(0.0), if hi > lo { hi * 1.05 } else { lo + 1.0 })
            } else {
                (0.0, 1.0)
            };
            let mut chart = ChartBuilder::on(area)
                .caption(*title, ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..x_max, lo..hi)
                .map_err(draw_error(path))?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(draw_error(path))?;
            for (name, points, color) in lines {
                let color = *color;
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(draw_error(path))?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(draw_error(path))?;
            }
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 14))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(draw_error(path))?;
        }
        root.present().map_err(draw_error(path))?;
    }
    save_png(path, buffer, width, height)
}

/// A study's validation curves: per setting, the mean top-1 (%) over its seeds as a line
/// and one standard deviation either side as a band. `curves` holds (label, points of
/// (epoch, mean, std)).
pub fn study_curves(path: &Path, curves: &[(String, Vec<CurvePoint>)]) -> Result<()> {
    register_font();
    let (width, height) = (1000u32, 620u32);
    let mut buffer = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error(path))?;
        let points = curves.iter().flat_map(|(_, p)| p.iter());
        let x_max = points.clone().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
        let (lo, hi) = points.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1 - p.2), b.max(p.1 + p.2))
        });
        let (lo, hi) = if lo.is_finite() {
            let pad = ((hi - lo) * 0.05).max(0.5);
            (lo - pad, hi + pad)
        } else {
            (0.0, 100.0)
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "validation top-1 (%): mean and one standard deviation over seeds",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.8f64..x_max + 0.2, lo..hi)
            .map_err(draw_error(path))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(draw_error(path))?;
        for (i, (label, points)) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let band: Vec<(f64, f64)> = points
                .iter()
                .map(|&(e, m, s)| (e as f64, m + s))
                .chain(points.iter().rev().map(|&(e, m, s)| (e as f64, m - s)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(
                    band,
                    color.mix(0.15).filled(),
                )))
                .map_err(draw_error(path))?;
            let line: Vec<(f64, f64)> = points.iter().map(|&(e, m, _)| (e as f64, m)).collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                .map_err(draw_error(path))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(draw_error(path))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_error(path))?;
        root.present().map_err(draw_error(path))?;
    }
    save_png(path, buffer, width, height)
}

/// A confusion matrix (rows: true class, columns: predicted) as a heat map with counts.
pub fn confusion_matrix(path: &Path, matrix: &[Vec<u64>], classes: &[String]) -> Result<()> {
    register_font();
    let k = matrix.len().max(1);
    let cell = (600 / k as u32).clamp(12, 60);
    let label_space = 140u32;
    let (width, height) = (
        label_space + cell * k as u32 + 20,
        label_space + cell * k as u32 + 20,
    );
    let mut buffer = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error(path))?;
        let max = matrix.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
        let font_size = (cell as f64 * 0.35).clamp(8.0, 16.0);
        for (i, row) in matrix.iter().enumerate() {
            for (j, &count) in row.iter().enumerate() {
                let x0 = (label_space + j as u32 * cell) as i32;
                let y0 = (label_space + i as u32 * cell) as i32;
                let t = count as f64 / max;
                let shade = (255.0 * (1.0 - t)) as u8;
                let color = RGBColor(shade, shade, 255);
                root.draw(&Rectangle::new(
                    [(x0, y0), (x0 + cell as i32, y0 + cell as i32)],
                    color.filled(),
                ))
                .map_err(draw_error(path))?;
                if cell >= 24 {
                    let text_color = if t > 0.5 { WHITE } else { BLACK };
                    root.draw(&Text::new(
                        count.to_string(),
                        (x0 + 3, y0 + cell as i32 / 3),
                        ("sans-serif", font_size).into_font().color(&text_color),
                    ))
                    .map_err(draw_error(path))?;
                }
            }
        }
        let short = |s: &str| s.chars().take(16).collect::<String>();
        for (i, name) in classes.iter().enumerate().take(k) {
            let y = (label_space + i as u32 * cell + cell / 3) as i32;
            root.draw(&Text::new(
                short(name),
                (4, y),
                ("sans-serif", font_size).into_font(),
            ))
            .map_err(draw_error(path))?;
            let x = (label_space + i as u32 * cell + cell / 3) as i32;
            let style = ("sans-serif", font_size)
                .into_font()
                .transform(FontTransform::Rotate270);
            root.draw(&Text::new(short(name), (x, label_space as i32 - 4), style))
                .map_err(draw_error(path))?;
        }
        root.draw(&Text::new(
            "true \u{2193}  predicted \u{2192}",
            (4, 4),
            ("sans-serif", 14).into_font(),
        ))
        .map_err(draw_error(path))?;
        root.present().map_err(draw_error(path))?;
    }
    save_png(path, buffer, width, height)
}
