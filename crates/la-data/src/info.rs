//! A summary of a data set: count, classes, image sizes and the label histogram.

use std::fmt;

use crate::Dataset;

/// How many images are decoded to estimate sizes when they are not known up front
/// (ImageFolder): enough to see the spread without reading a whole ImageNet.
const SIZE_SAMPLES: usize = 64;

/// What is known of the image sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSizes {
    /// No image could be looked at.
    Unknown,
    /// Every image is `height` x `width`.
    Fixed { height: usize, width: usize },
    /// Sizes vary; smallest and largest (by area) among `sampled` decoded images.
    Varying {
        min: (usize, usize),
        max: (usize, usize),
        sampled: usize,
    },
}

/// The report [`info()`] returns; `Display` prints it for a person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataInfo {
    pub count: usize,
    pub classes: Vec<String>,
    pub sizes: ImageSizes,
    /// Samples per label, indexed like `classes`.
    pub histogram: Vec<usize>,
    /// Samples whose label could not be read, or whose label is past the class list.
    pub errors: usize,
}

/// Counts, classes, image sizes and the label histogram of `dataset`.
///
/// Errors from single samples are counted in [`DataInfo::errors`] instead of failing,
/// so that the report can still show the rest.
pub fn info(dataset: &dyn Dataset) -> DataInfo {
    let count = dataset.len();
    let classes = dataset.classes().to_vec();
    let mut histogram = vec![0usize; classes.len()];
    let mut errors = 0;
    for i in 0..count {
        match dataset.label(i) {
            Ok(l) if l < histogram.len() => histogram[l] += 1,
            _ => errors += 1,
        }
    }
    let sizes = match dataset.image_size() {
        Some((height, width)) => ImageSizes::Fixed { height, width },
        None => sampled_sizes(dataset, &mut errors),
    };
    DataInfo {
        count,
        classes,
        sizes,
        histogram,
        errors,
    }
}

fn sampled_sizes(dataset: &dyn Dataset, errors: &mut usize) -> ImageSizes {
    let n = dataset.len();
    let take = n.min(SIZE_SAMPLES);
    let mut sizes = Vec::with_capacity(take);
    for k in 0..take {
        // Evenly spaced, so that every class of a class-sorted folder is looked at.
        match dataset.get(k * n / take) {
            Ok(s) => sizes.push((s.image.height, s.image.width)),
            Err(_) => *errors += 1,
        }
    }
    let Some(&first) = sizes.first() else {
        return ImageSizes::Unknown;
    };
    if sizes.iter().all(|&s| s == first) && take == n {
        return ImageSizes::Fixed {
            height: first.0,
            width: first.1,
        };
    }
    let area = |s: &&(usize, usize)| s.0 * s.1;
    ImageSizes::Varying {
        min: *sizes.iter().min_by_key(area).unwrap_or(&first),
        max: *sizes.iter().max_by_key(area).unwrap_or(&first),
        sampled: sizes.len(),
    }
}

impl fmt::Display for ImageSizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSizes::Unknown => write!(f, "unknown"),
            ImageSizes::Fixed { height, width } => write!(f, "{height} x {width} (h x w)"),
            ImageSizes::Varying { min, max, sampled } => write!(
                f,
                "from {} x {} to {} x {} (h x w, {sampled} images sampled)",
                min.0, min.1, max.0, max.1
            ),
        }
    }
}

impl fmt::Display for DataInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "samples:     {}", self.count)?;
        writeln!(f, "classes:     {}", self.classes.len())?;
        writeln!(f, "image size:  {}", self.sizes)?;
        if self.errors > 0 {
            writeln!(f, "unreadable:  {} samples", self.errors)?;
        }
        writeln!(f, "label histogram:")?;
        let name_w = self
            .classes
            .iter()
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        let count_w = self
            .histogram
            .iter()
            .max()
            .map_or(1, |m| m.to_string().len());
        let peak = self.histogram.iter().copied().max().unwrap_or(0).max(1);
        for (i, (name, &n)) in self.classes.iter().zip(&self.histogram).enumerate() {
            let pct = if self.count > 0 {
                100.0 * n as f64 / self.count as f64
            } else {
                0.0
            };
            let bar = "#".repeat((30 * n).div_ceil(peak));
            writeln!(
                f,
                "  {i:>3} {name:<name_w$} {n:>count_w$} {pct:>5.1}% {bar}"
            )?;
        }
        Ok(())
    }
}
