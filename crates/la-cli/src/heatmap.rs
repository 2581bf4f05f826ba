//! Pictures of what a model looks at: heat maps drawn over the original image at its own
//! resolution, panels side by side under a heading, and a colour bar. Pixels are composed
//! here; plotters draws the text with the font compiled into la-train; PNG is written
//! atomically.

use std::path::Path;

use anyhow::{anyhow, Result};
use image::{imageops, ImageBuffer, Luma, RgbImage};
use la_data::Image;
use plotters::prelude::*;

/// The part of the original image the model saw (its centre crop), in original pixels.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub top: f64,
    pub left: f64,
    pub height: f64,
    pub width: f64,
}

/// One picture of the image: the image alone (`map: None`) or a heat map over it.
pub struct Panel {
    pub title: String,
    /// A second line under the title (a score, the map's size).
    pub note: Option<String>,
    /// [h][w] values in [0, 1] over the region, upsampled smoothly to it.
    pub map: Option<Vec<Vec<f32>>>,
    /// A cross at (row, col), as fractions of the region.
    pub marker: Option<(f64, f64)>,
}

pub struct Picture<'a> {
    pub original: &'a Image,
    pub region: Region,
    pub heading: String,
    pub panels: Vec<Panel>,
    pub columns: usize,
    /// Weight of the heat map in the blend.
    pub alpha: f32,
}

/// Images smaller than this on their longer side are enlarged (nearest neighbour, whole
/// multiples) so that a 28x28 picture stays visible beside its title.
const MIN_DISPLAY: usize = 256;
const MARGIN: u32 = 12;
const HEADING: u32 = 34;
const TITLE: u32 = 44;
const BAR: u32 = 72;

/// A blue-cyan-yellow-red colour for t in [0, 1] (the "jet" map of OpenCV and matplotlib).
fn jet(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let channel = |offset: f32| ((1.5 - (4.0 * t - offset).abs()).clamp(0.0, 1.0) * 255.0) as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// The original enlarged for display, and the display scale.
fn displayed(original: &Image) -> (RgbImage, usize) {
    let (w, h) = (original.width as u32, original.height as u32);
    let scale = MIN_DISPLAY
        .div_ceil(original.width.max(original.height))
        .max(1);
    let img = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb(original.pixel(y as usize, x as usize))
    });
    if scale == 1 {
        return (img, 1);
    }
    let s = scale as u32;
    (
        imageops::resize(&img, w * s, h * s, imageops::FilterType::Nearest),
        scale,
    )
}

/// `map` resized bilinearly to width x height.
fn smooth(map: &[Vec<f32>], width: u32, height: u32) -> ImageBuffer<Luma<u16>, Vec<u16>> {
    let (mh, mw) = (map.len() as u32, map.first().map_or(0, Vec::len) as u32);
    let grey: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_fn(mw, mh, |x, y| {
        Luma([(map[y as usize][x as usize].clamp(0.0, 1.0) * 65535.0).round() as u16])
    });
    imageops::resize(&grey, width, height, imageops::FilterType::Triangle)
}

/// One panel's pixels: the block's map resized bilinearly straight to the region of the
/// displayed image (the scores use the map at the model's input size; both are smooth
/// upsamplings of the same map) and blended over the region, the rest of the image dimmed
/// (the model never saw it), and the marker.
fn panel_pixels(
    base: &RgbImage,
    region: Region,
    scale: usize,
    panel: &Panel,
    alpha: f32,
) -> RgbImage {
    let mut img = base.clone();
    let Some(map) = &panel.map else { return img };
    let s = scale as f64;
    let (x0, y0) = (
        (region.left * s).round() as u32,
        (region.top * s).round() as u32,
    );
    let rw = ((region.width * s).round() as u32)
        .min(img.width() - x0)
        .max(1);
    let rh = ((region.height * s).round() as u32)
        .min(img.height() - y0)
        .max(1);
    let heat = smooth(map, rw, rh);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let inside = (x0..x0 + rw).contains(&x) && (y0..y0 + rh).contains(&y);
        if inside {
            let colour = jet(heat.get_pixel(x - x0, y - y0)[0] as f32 / 65535.0);
            for (c, h) in px.0.iter_mut().zip(colour) {
                *c = ((1.0 - alpha) * *c as f32 + alpha * h as f32).round() as u8;
            }
        } else {
            px.0.iter_mut().for_each(|c| *c /= 2);
        }
    }
    if let Some((row, col)) = panel.marker {
        let (cy, cx) = (
            (y0 as f64 + row * rh as f64) as i64,
            (x0 as f64 + col * rw as f64) as i64,
        );
        let arm = (rw.min(rh) as i64 / 20).max(4);
        for d in -arm..=arm {
            for (x, y) in [(cx + d, cy), (cx, cy + d)] {
                if (0..img.width() as i64).contains(&x) && (0..img.height() as i64).contains(&y) {
                    img.put_pixel(x as u32, y as u32, image::Rgb([255, 255, 255]));
                }
            }
        }
    }
    img
}

/// Draws the picture and writes it to `out` as PNG.
pub fn draw(picture: &Picture, out: &Path) -> Result<()> {
    la_train::plot::register_font();
    let (base, scale) = displayed(picture.original);
    let (pw, ph) = (base.width(), base.height());
    let columns = picture.columns.clamp(1, picture.panels.len().max(1)) as u32;
    let rows = (picture.panels.len() as u32).div_ceil(columns);
    let width = MARGIN + columns * (pw + MARGIN) + BAR;
    let height = HEADING + rows * (TITLE + ph + MARGIN);
    let mut buffer = vec![255u8; (width * height * 3) as usize];
    let origin = |i: usize| {
        let (r, c) = (i as u32 / columns, i as u32 % columns);
        (
            MARGIN + c * (pw + MARGIN),
            HEADING + r * (TITLE + ph + MARGIN) + TITLE,
        )
    };
    let mut put = |x: u32, y: u32, rgb: [u8; 3]| {
        let o = ((y * width + x) * 3) as usize;
        buffer[o..o + 3].copy_from_slice(&rgb);
    };
    for (i, panel) in picture.panels.iter().enumerate() {
        let img = panel_pixels(&base, picture.region, scale, panel, picture.alpha);
        let (ox, oy) = origin(i);
        for (x, y, px) in img.enumerate_pixels() {
            put(ox + x, oy + y, px.0);
        }
    }
    // The colour bar: 1 at the top, 0 at the bottom, beside the first row.
    let (bar_x, bar_top) = (width - BAR + 8, HEADING + TITLE);
    for y in 0..ph {
        let colour = jet(1.0 - y as f32 / (ph - 1).max(1) as f32);
        for x in bar_x..bar_x + 16 {
            put(x, bar_top + y, colour);
        }
    }
    let fail = |e: &dyn std::fmt::Display| anyhow!("{}: cannot draw: {e}", out.display());
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        let text = |s: &str, x: u32, y: u32, size: u32| {
            root.draw(&Text::new(
                s.to_string(),
                (x as i32, y as i32),
                ("sans-serif", size).into_font(),
            ))
            .map_err(|e| fail(&e))
        };
        text(&picture.heading, MARGIN, 8, 18)?;
        for (i, panel) in picture.panels.iter().enumerate() {
            let (ox, oy) = origin(i);
            text(&panel.title, ox, oy - TITLE + 4, 16)?;
            if let Some(note) = &panel.note {
                text(note, ox, oy - TITLE + 24, 13)?;
            }
        }
        text("1", bar_x + 20, bar_top, 13)?;
        text("0", bar_x + 20, bar_top + ph - 14, 13)?;
        root.present().map_err(|e| fail(&e))?;
    }
    la_train::plot::save_png(out, buffer, width, height)?;
    Ok(())
}
