//! Per-sample transforms on `u8` HWC RGB images, each drawing its random choices from
//! the generator it is handed (see [`crate::rng`]). The final normalisation is
//! [`Image::to_chw`].
//!
//! The geometry follows torchvision so that recipes carry over: RandomResizedCrop's
//! scale/ratio sampling with 10 attempts and a centre fallback, RandomCrop's zero
//! padding, ColorJitter's random order of its four adjustments.

use std::fmt;

use image::imageops::FilterType;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::rng::SampleRng;
use crate::{Error, Image, Result};

/// One per-sample augmentation step.
///
/// Implementations must take all randomness from `rng`: the loader seeds it from
/// (seed, epoch, sample index), which is what makes batches reproducible.
pub trait Transform: Send + Sync + fmt::Debug {
    fn apply(&self, image: Image, rng: &mut SampleRng) -> Result<Image>;
}

fn transform_error(what: &str, reason: impl Into<String>) -> Error {
    Error::Config(format!("{what}: {}", reason.into()))
}

fn check_image(what: &str, image: &Image) -> Result<()> {
    if image.height == 0 || image.width == 0 || !image.is_consistent() {
        return Err(transform_error(
            what,
            format!(
                "cannot transform a {}x{} image of {} bytes",
                image.height,
                image.width,
                image.data.len()
            ),
        ));
    }
    Ok(())
}

/// Resizes with a triangle (bilinear) filter, which the `image` crate widens when
/// shrinking, as PIL and torchvision's `antialias=True` do.
pub fn resize_bilinear(image: Image, height: usize, width: usize) -> Result<Image> {
    if (image.height, image.width) == (height, width) {
        return Ok(image);
    }
    check_image("resize", &image)?;
    if height == 0 || width == 0 || height > u32::MAX as usize || width > u32::MAX as usize {
        return Err(transform_error(
            "resize",
            format!("target size {height}x{width} is not usable"),
        ));
    }
    let (h, w) = (image.height, image.width);
    let buf = image::RgbImage::from_raw(w as u32, h as u32, image.data)
        .ok_or_else(|| transform_error("resize", "image buffer too small"))?;
    let out = image::imageops::resize(&buf, width as u32, height as u32, FilterType::Triangle);
    Ok(Image {
        data: out.into_raw(),
        height,
        width,
    })
}

/// The `height` x `width` window whose top-left corner is at (`top`, `left`) in image
/// coordinates, which may lie outside the image: uncovered pixels are zero (the zero
/// padding of torchvision's RandomCrop, without building the padded image).
///
/// An image whose buffer disagrees with its dimensions gives an all-zero window.
pub fn crop_or_pad(image: &Image, top: isize, left: isize, height: usize, width: usize) -> Image {
    let mut out = Image::zeros(height, width);
    if !image.is_consistent() {
        return out;
    }
    let (h, w) = (image.height as isize, image.width as isize);
    let x0 = left.max(0);
    let x1 = (left + width as isize).min(w);
    if x1 <= x0 {
        return out;
    }
    let run = (x1 - x0) as usize * 3;
    let dst_x = (x0 - left) as usize * 3;
    for y in 0..height {
        let sy = top + y as isize;
        if sy < 0 || sy >= h {
            continue;
        }
        let src = (sy as usize * image.width + x0 as usize) * 3;
        let dst = y * width * 3 + dst_x;
        out.data[dst..dst + run].copy_from_slice(&image.data[src..src + run]);
    }
    out
}

/// Crops a random region of random area and aspect ratio and resizes it to `size`
/// (torchvision's RandomResizedCrop: scale (0.08, 1), ratio (3/4, 4/3) by default).
#[derive(Clone, Debug, PartialEq)]
pub struct RandomResizedCrop {
    /// Output (height, width).
    pub size: (usize, usize),
    /// Range of the crop's area as a fraction of the image's.
    pub scale: (f64, f64),
    /// Range of the crop's width / height.
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    pub fn new(size: usize) -> Self {
        RandomResizedCrop {
            size: (size, size),
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    pub fn with_scale(mut self, lo: f64, hi: f64) -> Self {
        self.scale = (lo, hi);
        self
    }

    pub fn with_ratio(mut self, lo: f64, hi: f64) -> Self {
        self.ratio = (lo, hi);
        self
    }

    /// The crop (top, left, height, width) for an image of `height` x `width`.
    pub fn params(
        &self,
        height: usize,
        width: usize,
        rng: &mut SampleRng,
    ) -> Result<(usize, usize, usize, usize)> {
        let (s0, s1) = self.scale;
        let (r0, r1) = self.ratio;
        let ok = |a: f64, b: f64| a.is_finite() && b.is_finite() && a > 0.0 && a <= b;
        if !ok(s0, s1) || !ok(r0, r1) {
            return Err(transform_error(
                "RandomResizedCrop",
                format!(
                    "scale {:?} and ratio {:?} must be positive, finite, (low, high)",
                    self.scale, self.ratio
                ),
            ));
        }
        let area = (height * width) as f64;
        let (log_r0, log_r1) = (r0.ln(), r1.ln());
        for _ in 0..10 {
            let target = area * uniform(rng, s0, s1);
            let aspect = uniform(rng, log_r0, log_r1).exp();
            let w = (target * aspect).sqrt().round() as usize;
            let h = (target / aspect).sqrt().round() as usize;
            if 0 < w && w <= width && 0 < h && h <= height {
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                return Ok((top, left, h, w));
            }
        }
        // Centre crop at the nearest allowed aspect ratio, as torchvision falls back.
        let in_ratio = width as f64 / height as f64;
        let (h, w) = if in_ratio < r0 {
            (
                ((width as f64 / r0).round() as usize).clamp(1, height),
                width,
            )
        } else if in_ratio > r1 {
            (
                height,
                ((height as f64 * r1).round() as usize).clamp(1, width),
            )
        } else {
            (height, width)
        };
        Ok(((height - h) / 2, (width - w) / 2, h, w))
    }
}

fn uniform(rng: &mut SampleRng, lo: f64, hi: f64) -> f64 {
    if lo < hi {
        rng.random_range(lo..hi)
    } else {
        lo
    }
}

impl Transform for RandomResizedCrop {
    fn apply(&self, image: Image, rng: &mut SampleRng) -> Result<Image> {
        check_image("RandomResizedCrop", &image)?;
        let (top, left, h, w) = self.params(image.height, image.width, rng)?;
        let crop = crop_or_pad(&image, top as isize, left as isize, h, w);
        resize_bilinear(crop, self.size.0, self.size.1)
    }
}

/// A random `size` window of the image zero-padded by `padding` on every side
/// (torchvision's `RandomCrop(32, padding=4)`); an image smaller than the window is
/// padded further, centred, rather than refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RandomCrop {
    pub size: (usize, usize),
    pub padding: usize,
}

impl RandomCrop {
    pub fn new(size: usize, padding: usize) -> Self {
        RandomCrop {
            size: (size, size),
            padding,
        }
    }
}

impl Transform for RandomCrop {
    fn apply(&self, image: Image, rng: &mut SampleRng) -> Result<Image> {
        check_image("RandomCrop", &image)?;
        let (th, tw) = self.size;
        if th == 0 || tw == 0 {
            return Err(transform_error("RandomCrop", "crop size is zero"));
        }
        let p = self.padding;
        let (ph, pw) = (image.height + 2 * p, image.width + 2 * p);
        // Extra centring when the padded image is still smaller than the window.
        let (ey, ex) = (th.saturating_sub(ph) / 2, tw.saturating_sub(pw) / 2);
        let top = rng.random_range(0..=ph.max(th) - th);
        let left = rng.random_range(0..=pw.max(tw) - tw);
        Ok(crop_or_pad(
            &image,
            top as isize - p as isize - ey as isize,
            left as isize - p as isize - ex as isize,
            th,
            tw,
        ))
    }
}

/// Mirrors left-right with probability `p`.
#[derive(Clone, Debug, PartialEq)]
pub struct HorizontalFlip {
    pub p: f64,
}

impl HorizontalFlip {
    pub fn new(p: f64) -> Self {
        HorizontalFlip { p }
    }
}

impl Default for HorizontalFlip {
    fn default() -> Self {
        HorizontalFlip { p: 0.5 }
    }
}

/// Mirrors an image left-right.
pub fn hflip(mut image: Image) -> Image {
    let row = image.width * 3;
    for r in image.data.chunks_exact_mut(row.max(1)) {
        let (mut i, mut j) = (0, image.width);
        while i + 1 < j {
            j -= 1;
            for c in 0..3 {
                r.swap(i * 3 + c, j * 3 + c);
            }
            i += 1;
        }
    }
    image
}

impl Transform for HorizontalFlip {
    fn apply(&self, image: Image, rng: &mut SampleRng) -> Result<Image> {
        // Drawn even when p is 0 or 1, so that the stream a later transform sees does
        // not depend on p.
        let u: f64 = rng.random();
        Ok(if u < self.p { hflip(image) } else { image })
    }
}

/// Random brightness, contrast, saturation and hue, applied in a random order
/// (torchvision's ColorJitter). Each factor is drawn from `[max(0, 1 - x), 1 + x]`, the
/// hue shift from `[-hue, hue]` with `hue` at most 0.5; 0 disables an adjustment.
#[derive(Clone, Debug, PartialEq)]
pub struct ColorJitter {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

impl ColorJitter {
    pub fn new(brightness: f32, contrast: f32, saturation: f32, hue: f32) -> Self {
        ColorJitter {
            brightness,
            contrast,
            saturation,
            hue,
        }
    }
}

fn sane(x: f32) -> f32 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

fn factor(rng: &mut SampleRng, x: f32) -> Option<f32> {
    let x = sane(x);
    (x > 0.0).then(|| rng.random_range((1.0 - x).max(0.0)..=1.0 + x))
}

/// ITU-R 601-2 luma, the weights torchvision's `rgb_to_grayscale` uses.
fn luma(p: &[f32]) -> f32 {
    0.2989 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

fn shift_hue(p: &mut [f32], shift: f32) {
    let (r, g, b) = (p[0], p[1], p[2]);
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let chroma = maxc - minc;
    if chroma <= 0.0 {
        // Grey has no hue to rotate.
        return;
    }
    let v = maxc;
    let s = chroma / maxc;
    let h = if maxc == r {
        (g - b) / chroma
    } else if maxc == g {
        2.0 + (b - r) / chroma
    } else {
        4.0 + (r - g) / chroma
    };
    let h = (h / 6.0 + shift).rem_euclid(1.0);
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let pp = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    let (r, g, b) = match (i as i32).rem_euclid(6) {
        0 => (v, t, pp),
        1 => (q, v, pp),
        2 => (pp, v, t),
        3 => (pp, q, v),
        4 => (t, pp, v),
        _ => (v, pp, q),
    };
    p[0] = r;
    p[1] = g;
    p[2] = b;
}

impl Transform for ColorJitter {
    fn apply(&self, image: Image, rng: &mut SampleRng) -> Result<Image> {
        let mut order = [0usize, 1, 2, 3];
        order.shuffle(rng);
        let b = factor(rng, self.brightness);
        let c = factor(rng, self.contrast);
        let s = factor(rng, self.saturation);
        let hue = sane(self.hue).min(0.5);
        let h = (hue > 0.0).then(|| rng.random_range(-hue..=hue));
        if b.is_none() && c.is_none() && s.is_none() && h.is_none() {
            return Ok(image);
        }
        // Float in between so that the four steps do not each round to u8.
        let mut px: Vec<f32> = image.data.iter().map(|&v| v as f32 / 255.0).collect();
        for step in order {
            match (step, b, c, s, h) {
                (0, Some(f), ..) => px.iter_mut().for_each(|v| *v = (*v * f).clamp(0.0, 1.0)),
                (1, _, Some(f), ..) => {
                    let n = (px.len() / 3).max(1) as f32;
                    let mean = px.chunks_exact(3).map(luma).sum::<f32>() / n;
                    px.iter_mut()
                        .for_each(|v| *v = (f * *v + (1.0 - f) * mean).clamp(0.0, 1.0));
                }
                (2, _, _, Some(f), _) => {
                    for p in px.chunks_exact_mut(3) {
                        let g = luma(p);
                        for v in p.iter_mut() {
                            *v = (f * *v + (1.0 - f) * g).clamp(0.0, 1.0);
                        }
                    }
                }
                (3, .., Some(shift)) => px.chunks_exact_mut(3).for_each(|p| shift_hue(p, shift)),
                _ => {}
            }
        }
        let data = px
            .iter()
            .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        Ok(Image { data, ..image })
    }
}

/// How [`Resize`] chooses the output size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeMode {
    /// The shorter side becomes `size`, the aspect ratio is kept (torchvision `Resize(int)`).
    ShorterSide(usize),
    /// Exactly `height` x `width`.
    Exact(usize, usize),
}

/// Bilinear resize; a no-op on an image that already has the target size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resize {
    pub mode: ResizeMode,
}

impl Resize {
    pub fn shorter_side(size: usize) -> Self {
        Resize {
            mode: ResizeMode::ShorterSide(size),
        }
    }

    pub fn exact(height: usize, width: usize) -> Self {
        Resize {
            mode: ResizeMode::Exact(height, width),
        }
    }

    /// Output size for an input of `height` x `width`.
    pub fn target(&self, height: usize, width: usize) -> (usize, usize) {
        match self.mode {
            ResizeMode::Exact(h, w) => (h, w),
            ResizeMode::ShorterSide(s) => {
                // Long side truncated, as torchvision computes it.
                if height <= width {
                    (s, (s * width / height.max(1)).max(1))
                } else {
                    ((s * height / width.max(1)).max(1), s)
                }
            }
        }
    }
}

impl Transform for Resize {
    fn apply(&self, image: Image, _rng: &mut SampleRng) -> Result<Image> {
        check_image("Resize", &image)?;
        let (h, w) = self.target(image.height, image.width);
        resize_bilinear(image, h, w)
    }
}

/// The central `size` window; zero-padded where the image is smaller (as torchvision).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CenterCrop {
    pub size: (usize, usize),
}

impl CenterCrop {
    pub fn new(size: usize) -> Self {
        CenterCrop { size: (size, size) }
    }
}

impl Transform for CenterCrop {
    fn apply(&self, image: Image, _rng: &mut SampleRng) -> Result<Image> {
        check_image("CenterCrop", &image)?;
        let (th, tw) = self.size;
        if (image.height, image.width) == (th, tw) {
            return Ok(image);
        }
        let top = ((image.height as f64 - th as f64) / 2.0).round() as isize;
        let left = ((image.width as f64 - tw as f64) / 2.0).round() as isize;
        Ok(crop_or_pad(&image, top, left, th, tw))
    }
}
