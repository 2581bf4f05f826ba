//! The image operations of torchvision's automatic augmentation policies
//! (TrivialAugmentWide, RandAugment), with the arithmetic of torchvision's functions on
//! `uint8` tensors: float32 intermediates, truncation back to `u8`, nearest-neighbour
//! sampling on the affine grid `F.affine`/`F.rotate` build, black fill.
//!
//! Written by hand because neither Candle nor the `image` crate has these operations with
//! torchvision's definitions, and a recipe only carries over when the images do.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Image, Result};

/// One operation of the policies' list, in torchvision's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AugmentOp {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
}

impl AugmentOp {
    pub const ALL: [AugmentOp; 14] = [
        AugmentOp::Identity,
        AugmentOp::ShearX,
        AugmentOp::ShearY,
        AugmentOp::TranslateX,
        AugmentOp::TranslateY,
        AugmentOp::Rotate,
        AugmentOp::Brightness,
        AugmentOp::Color,
        AugmentOp::Contrast,
        AugmentOp::Sharpness,
        AugmentOp::Posterize,
        AugmentOp::Solarize,
        AugmentOp::AutoContrast,
        AugmentOp::Equalize,
    ];

    /// torchvision's name of the operation.
    pub fn name(self) -> &'static str {
        match self {
            AugmentOp::Identity => "Identity",
            AugmentOp::ShearX => "ShearX",
            AugmentOp::ShearY => "ShearY",
            AugmentOp::TranslateX => "TranslateX",
            AugmentOp::TranslateY => "TranslateY",
            AugmentOp::Rotate => "Rotate",
            AugmentOp::Brightness => "Brightness",
            AugmentOp::Color => "Color",
            AugmentOp::Contrast => "Contrast",
            AugmentOp::Sharpness => "Sharpness",
            AugmentOp::Posterize => "Posterize",
            AugmentOp::Solarize => "Solarize",
            AugmentOp::AutoContrast => "AutoContrast",
            AugmentOp::Equalize => "Equalize",
        }
    }

    /// Applies the operation at `magnitude`, as torchvision's `_apply_op`: shears take the
    /// shear factor, translations pixels (truncated to whole pixels), rotation degrees
    /// counter-clockwise, the four enhancements `1 + magnitude` as their factor, posterize
    /// its bit count and solarize its threshold.
    pub fn apply(self, image: Image, magnitude: f32) -> Result<Image> {
        if image.height == 0 || image.width == 0 || !image.is_consistent() {
            return Err(Error::Config(format!(
                "{}: cannot transform a {}x{} image of {} bytes",
                self.name(),
                image.height,
                image.width,
                image.data.len()
            )));
        }
        let factor = 1.0 + magnitude as f64;
        Ok(match self {
            AugmentOp::Identity => image,
            AugmentOp::ShearX => affine(&image, InverseAffine::shear_x(magnitude, &image)),
            AugmentOp::ShearY => affine(&image, InverseAffine::shear_y(magnitude, &image)),
            AugmentOp::TranslateX => {
                affine(&image, InverseAffine::translate(magnitude.trunc(), 0.0))
            }
            AugmentOp::TranslateY => {
                affine(&image, InverseAffine::translate(0.0, magnitude.trunc()))
            }
            AugmentOp::Rotate => affine(&image, InverseAffine::rotate(magnitude)),
            AugmentOp::Brightness => blend_constant(image, 0.0, factor),
            AugmentOp::Color => {
                let gray = grayscale(&image);
                blend(image, &gray, factor)
            }
            AugmentOp::Contrast => {
                let gray = grayscale(&image);
                let mean = gray.iter().map(|&v| v as f64).sum::<f64>() / gray.len() as f64;
                blend_constant(image, mean as f32, factor)
            }
            AugmentOp::Sharpness => sharpness(image, factor),
            AugmentOp::Posterize => posterize(image, magnitude as i64),
            AugmentOp::Solarize => solarize(image, magnitude),
            AugmentOp::AutoContrast => autocontrast(image),
            AugmentOp::Equalize => equalize(image),
        })
    }
}

impl fmt::Display for AugmentOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AugmentOp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        AugmentOp::ALL
            .into_iter()
            .find(|op| op.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::Config(format!("unknown augmentation operation `{s}`")))
    }
}

/// torchvision's `_blend` on `u8`: `ratio * a + (1 - ratio) * b` in float32, clamped to
/// [0, 255] and truncated.
fn mix(a: f32, b: f32, ratio: f64) -> u8 {
    let (r, q) = (ratio as f32, (1.0 - ratio) as f32);
    (r * a + q * b).clamp(0.0, 255.0) as u8
}

fn blend_constant(mut image: Image, other: f32, ratio: f64) -> Image {
    image
        .data
        .iter_mut()
        .for_each(|v| *v = mix(*v as f32, other, ratio));
    image
}

/// Blends with a one-channel image, which every colour channel meets.
fn blend(mut image: Image, gray: &[u8], ratio: f64) -> Image {
    for (p, &g) in image.data.chunks_exact_mut(3).zip(gray) {
        p.iter_mut()
            .for_each(|v| *v = mix(*v as f32, g as f32, ratio));
    }
    image
}

/// torchvision's `rgb_to_grayscale` on `u8`: ITU-R 601-2 luma, truncated.
fn grayscale(image: &Image) -> Vec<u8> {
    image
        .data
        .chunks_exact(3)
        .map(|p| (0.2989f32 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) as u8)
        .collect()
}

/// Blends with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (rounded),
/// whose border pixels are the image's own.
fn sharpness(image: Image, ratio: f64) -> Image {
    let (h, w) = (image.height, image.width);
    if h <= 2 || w <= 2 {
        return image;
    }
    let mut smooth = image.data.clone();
    let weight = |dy: usize, dx: usize| if dy == 1 && dx == 1 { 5.0 } else { 1.0 } / 13.0f32;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for c in 0..3 {
                let mut sum = 0f32;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let v = image.data[((y + dy - 1) * w + x + dx - 1) * 3 + c];
                        sum += v as f32 * weight(dy, dx);
                    }
                }
                smooth[(y * w + x) * 3 + c] = sum.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    let mut out = image;
    for (v, &s) in out.data.iter_mut().zip(&smooth) {
        *v = mix(*v as f32, s as f32, ratio);
    }
    out
}

fn posterize(mut image: Image, bits: i64) -> Image {
    let bits = bits.clamp(0, 8) as u32;
    let mask = (0xffu32 << (8 - bits)) as u8;
    image.data.iter_mut().for_each(|v| *v &= mask);
    image
}

fn solarize(mut image: Image, threshold: f32) -> Image {
    image.data.iter_mut().for_each(|v| {
        if *v as f32 >= threshold {
            *v = 255 - *v;
        }
    });
    image
}

/// Stretches each channel to [0, 255]; a constant channel is left as it is.
fn autocontrast(mut image: Image) -> Image {
    for c in 0..3 {
        let channel = || image.data.iter().skip(c).step_by(3);
        let lo = *channel().min().unwrap_or(&0) as f32;
        let hi = *channel().max().unwrap_or(&0) as f32;
        let scale = 255.0 / (hi - lo);
        let (lo, scale) = if scale.is_finite() {
            (lo, scale)
        } else {
            (0.0, 1.0)
        };
        for v in image.data.iter_mut().skip(c).step_by(3) {
            *v = ((*v as f32 - lo) * scale).clamp(0.0, 255.0) as u8;
        }
    }
    image
}

/// Histogram equalisation per channel, PIL's `ImageOps.equalize` as torchvision writes it.
fn equalize(mut image: Image) -> Image {
    for c in 0..3 {
        let mut hist = [0u64; 256];
        image
            .data
            .iter()
            .skip(c)
            .step_by(3)
            .for_each(|&v| hist[v as usize] += 1);
        let nonzero: Vec<u64> = hist.iter().copied().filter(|&n| n != 0).collect();
        let step = nonzero[..nonzero.len().saturating_sub(1)]
            .iter()
            .sum::<u64>()
            / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut cumulative = 0u64;
        for (value, &n) in hist.iter().enumerate() {
            // The table is shifted by one: value v maps from the count below it.
            lut[value] = ((cumulative + step / 2) / step).min(255) as u8;
            cumulative += n;
        }
        for v in image.data.iter_mut().skip(c).step_by(3) {
            *v = lut[*v as usize];
        }
    }
    image
}

/// The output-to-input map `F.affine` hands to its grid: for an output pixel at (x, y)
/// relative to the image centre, the input point (m0 x + m1 y + m2, m3 x + m4 y + m5).
struct InverseAffine([f32; 6]);

impl InverseAffine {
    /// `F.affine(shear=[degrees(atan(m)), 0], center=[0, 0])`: x' = x + m (y + h/2).
    fn shear_x(m: f32, image: &Image) -> Self {
        InverseAffine([
            1.0,
            m,
            (m as f64 * image.height as f64 * 0.5) as f32,
            0.0,
            1.0,
            0.0,
        ])
    }

    /// `F.affine(shear=[0, degrees(atan(m))], center=[0, 0])`: y' = y + m (x + w/2).
    fn shear_y(m: f32, image: &Image) -> Self {
        InverseAffine([
            1.0,
            0.0,
            0.0,
            m,
            1.0,
            (m as f64 * image.width as f64 * 0.5) as f32,
        ])
    }

    fn translate(dx: f32, dy: f32) -> Self {
        InverseAffine([1.0, 0.0, -dx, 0.0, 1.0, -dy])
    }

    /// `F.rotate(angle)`: counter-clockwise about the centre.
    fn rotate(degrees: f32) -> Self {
        let (sin, cos) = (degrees as f64).to_radians().sin_cos();
        let (sin, cos) = (sin as f32, cos as f32);
        InverseAffine([cos, -sin, 0.0, sin, cos, 0.0])
    }
}

/// Resamples through `map` as torchvision does for tensors: the grid of
/// `_gen_affine_grid` in normalised coordinates, then `grid_sample(mode="nearest",
/// padding_mode="zeros", align_corners=False)`, all in float32 so that ties round alike.
fn affine(image: &Image, map: InverseAffine) -> Image {
    let (h, w) = (image.height, image.width);
    let (half_w, half_h) = (0.5 * w as f32, 0.5 * h as f32);
    let m = map.0;
    let row_x = [m[0] / half_w, m[1] / half_w, m[2] / half_w];
    let row_y = [m[3] / half_h, m[4] / half_h, m[5] / half_h];
    let mut out = Image::zeros(h, w);
    for i in 0..h {
        let y = -half_h + 0.5 + i as f32;
        for j in 0..w {
            let x = -half_w + 0.5 + j as f32;
            let gx = x * row_x[0] + y * row_x[1] + row_x[2];
            let gy = x * row_y[0] + y * row_y[1] + row_y[2];
            let ix = (((gx + 1.0) * w as f32 - 1.0) / 2.0).round_ties_even();
            let iy = (((gy + 1.0) * h as f32 - 1.0) / 2.0).round_ties_even();
            if ix >= 0.0 && iy >= 0.0 && (ix as usize) < w && (iy as usize) < h {
                let src = (iy as usize * w + ix as usize) * 3;
                let dst = (i * w + j) * 3;
                out.data[dst..dst + 3].copy_from_slice(&image.data[src..src + 3]);
            }
        }
    }
    out
}
