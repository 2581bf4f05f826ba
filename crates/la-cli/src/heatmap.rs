//! Heat maps blended over images, written as PNG.

use std::path::Path;

use anyhow::{Context, Result};
use image::{imageops, ImageBuffer, Luma, Rgb, RgbImage};
use la_data::Image;

/// A blue-cyan-yellow-red colour for t in [0, 1] (the "jet" map).
fn jet(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let channel = |offset: f32| ((1.5 - (4.0 * t - offset).abs()).clamp(0.0, 1.0) * 255.0) as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// Upsamples `map` ([h][w] values in [0, 1]) bilinearly to the picture's size, colours it and
/// blends it over the picture with weight `alpha`; `marker` draws a cross at (row, col).
pub fn overlay(
    picture: &Image,
    map: &[Vec<f32>],
    alpha: f32,
    marker: Option<(usize, usize)>,
    out: &Path,
) -> Result<()> {
    let (mh, mw) = (map.len() as u32, map.first().map_or(0, |r| r.len()) as u32);
    let grey: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_fn(mw, mh, |x, y| {
        Luma([(map[y as usize][x as usize].clamp(0.0, 1.0) * 65535.0) as u16])
    });
    let (w, h) = (picture.width as u32, picture.height as u32);
    let up = imageops::resize(&grey, w, h, imageops::FilterType::Triangle);
    let mut img = RgbImage::new(w, h);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let base = picture.pixel(y as usize, x as usize);
        let heat = jet(up.get_pixel(x, y)[0] as f32 / 65535.0);
        let blend = |a: u8, b: u8| ((1.0 - alpha) * a as f32 + alpha * b as f32).round() as u8;
        *px = Rgb([
            blend(base[0], heat[0]),
            blend(base[1], heat[1]),
            blend(base[2], heat[2]),
        ]);
    }
    if let Some((row, col)) = marker {
        for d in -6i64..=6 {
            for (x, y) in [(col as i64 + d, row as i64), (col as i64, row as i64 + d)] {
                if (0..w as i64).contains(&x) && (0..h as i64).contains(&y) {
                    img.put_pixel(x as u32, y as u32, Rgb([255, 255, 255]));
                }
            }
        }
    }
    // Small inputs (32x32) are scaled up so the picture is visible.
    let scale = (256 / w.max(h)).max(1);
    let img = if scale > 1 {
        imageops::resize(&img, w * scale, h * scale, imageops::FilterType::Nearest)
    } else {
        img
    };
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .with_context(|| format!("{}: cannot encode PNG", out.display()))?;
    la_core::write_atomically(out, &bytes)?;
    Ok(())
}
