//! The in-memory image and sample types shared by readers, transforms and the loader.

use crate::Normalize;

/// An RGB image, `u8`, rows of pixels of 3 interleaved channels (HWC).
///
/// Always 3 channels: grey sources are replicated so that every network sees the same
/// input layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub data: Vec<u8>,
    pub height: usize,
    pub width: usize,
}

/// One image and its class index (an index into [`crate::Dataset::classes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub image: Image,
    pub label: usize,
}

impl Image {
    /// An image from HWC RGB bytes; `None` when the length is not `height * width * 3`.
    pub fn new(data: Vec<u8>, height: usize, width: usize) -> Option<Self> {
        (height.checked_mul(width)?.checked_mul(3)? == data.len()).then_some(Image {
            data,
            height,
            width,
        })
    }

    /// A black image.
    pub fn zeros(height: usize, width: usize) -> Self {
        Image {
            data: vec![0; height * width * 3],
            height,
            width,
        }
    }

    /// An RGB image from one grey plane, each value copied to the three channels.
    pub fn from_gray(gray: &[u8], height: usize, width: usize) -> Option<Self> {
        if height.checked_mul(width)? != gray.len() {
            return None;
        }
        let data = gray.iter().flat_map(|&v| [v, v, v]).collect();
        Some(Image {
            data,
            height,
            width,
        })
    }

    /// An HWC image from planar CHW RGB bytes (the CIFAR record layout).
    pub fn from_chw(chw: &[u8], height: usize, width: usize) -> Option<Self> {
        let plane = height.checked_mul(width)?;
        if plane.checked_mul(3)? != chw.len() {
            return None;
        }
        let (r, rest) = chw.split_at(plane);
        let (g, b) = rest.split_at(plane);
        let mut data = Vec::with_capacity(plane * 3);
        for i in 0..plane {
            data.extend_from_slice(&[r[i], g[i], b[i]]);
        }
        Some(Image {
            data,
            height,
            width,
        })
    }

    /// `true` when the buffer length agrees with the dimensions.
    pub fn is_consistent(&self) -> bool {
        self.height
            .checked_mul(self.width)
            .and_then(|p| p.checked_mul(3))
            == Some(self.data.len())
    }

    /// The pixel at row `y`, column `x`.
    pub fn pixel(&self, y: usize, x: usize) -> [u8; 3] {
        let o = (y * self.width + x) * 3;
        [self.data[o], self.data[o + 1], self.data[o + 2]]
    }
}

impl Image {
    /// Appends the image to `out` as CHW `f32`, normalised by `normalize` (the last
    /// per-sample step).
    pub fn extend_chw(&self, normalize: &Normalize, out: &mut Vec<f32>) {
        let t = normalize.byte_table();
        let plane = self.height * self.width;
        let start = out.len();
        out.resize(start + 3 * plane, 0.0);
        let dst = &mut out[start..];
        // `take` keeps a buffer longer than its dimensions from writing past the planes.
        for (i, p) in self.data.chunks_exact(3).take(plane).enumerate() {
            dst[i] = t[0][p[0] as usize];
            dst[plane + i] = t[1][p[1] as usize];
            dst[2 * plane + i] = t[2][p[2] as usize];
        }
    }

    /// The image as CHW `f32`, normalised by `normalize`.
    pub fn to_chw(&self, normalize: &Normalize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.data.len());
        self.extend_chw(normalize, &mut out);
        out
    }
}
