//! Images of one size held in memory with their labels: what the CIFAR, IDX and digits
//! readers each produce, with a reader-specific description `M` beside them.

use crate::dataset::check_index;
use crate::{Dataset, Image, Result, Sample};

/// How one image's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planes {
    /// One grey plane (replicated to RGB when read).
    Gray,
    /// Three planes, R then G then B (CIFAR's records).
    Rgb,
}

/// `len` images of `height` x `width` in `planes`, one label each.
#[derive(Clone, Debug)]
pub struct InMemory<M> {
    pixels: Vec<u8>,
    labels: Vec<u8>,
    classes: Vec<String>,
    height: usize,
    width: usize,
    planes: Planes,
    /// What the reader knows of the data (its source file, its variant).
    pub info: M,
}

impl<M> InMemory<M> {
    /// An empty set of `height` x `width` images.
    pub(crate) fn new(
        (height, width): (usize, usize),
        planes: Planes,
        classes: Vec<String>,
        info: M,
    ) -> Self {
        Self {
            pixels: Vec::new(),
            labels: Vec::new(),
            classes,
            height,
            width,
            planes,
            info,
        }
    }

    /// Bytes of one image.
    pub(crate) fn image_bytes(&self) -> usize {
        let planes = match self.planes {
            Planes::Gray => 1,
            Planes::Rgb => 3,
        };
        planes * self.height * self.width
    }

    /// Room for `more` images.
    pub(crate) fn reserve(&mut self, more: usize) {
        self.pixels.reserve(more * self.image_bytes());
        self.labels.reserve(more);
    }

    /// Appends images (their bytes, [`InMemory::image_bytes`] each) and their labels; the
    /// readers have checked both.
    pub(crate) fn extend(&mut self, pixels: &[u8], labels: &[u8]) {
        debug_assert_eq!(pixels.len(), labels.len() * self.image_bytes());
        self.pixels.extend_from_slice(pixels);
        self.labels.extend_from_slice(labels);
    }
}

impl<M: Send + Sync> Dataset for InMemory<M> {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn get(&self, index: usize) -> Result<Sample> {
        let label = self.label(index)?;
        let size = self.image_bytes();
        let bytes = &self.pixels[index * size..(index + 1) * size];
        let (h, w) = (self.height, self.width);
        let image = match self.planes {
            Planes::Gray => Image::from_gray(bytes, h, w),
            Planes::Rgb => Image::from_chw(bytes, h, w),
        };
        Ok(Sample {
            image: image.expect("the image size is fixed"),
            label,
        })
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn label(&self, index: usize) -> Result<usize> {
        check_index(index, self.labels.len())?;
        Ok(self.labels[index] as usize)
    }

    fn image_size(&self) -> Option<(usize, usize)> {
        Some((self.height, self.width))
    }
}
