//! The [`Dataset`] trait, subsets and deterministic splits.

use std::sync::Arc;

use rand::seq::SliceRandom;

use crate::rng::{stream, Purpose};
use crate::{Error, Image, Result, Sample};

/// Which half of a data set that ships a train and a test part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

/// An indexable, thread-safe collection of labelled images.
///
/// `get` may do real work (decoding a JPEG): the loader calls it from worker threads.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn get(&self, index: usize) -> Result<Sample>;
    /// Class names; a label is an index into this slice.
    fn classes(&self) -> &[String];
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The label of one sample. Readers override it so that histograms and splits do
    /// not decode every image.
    fn label(&self, index: usize) -> Result<usize> {
        Ok(self.get(index)?.label)
    }
    /// `(height, width)` when every image has that size, `None` when sizes vary or are
    /// unknown without decoding.
    fn image_size(&self) -> Option<(usize, usize)> {
        None
    }
}

pub(crate) fn check_index(index: usize, len: usize) -> Result<()> {
    if index < len {
        Ok(())
    } else {
        Err(Error::Index { index, len })
    }
}

/// A view of some samples of another data set, in the order of `indices`.
#[derive(Clone)]
pub struct Subset {
    dataset: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    /// Fails when an index is outside `dataset`.
    pub fn new(dataset: Arc<dyn Dataset>, indices: Vec<usize>) -> Result<Self> {
        let len = dataset.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
            return Err(Error::Index { index: bad, len });
        }
        Ok(Subset { dataset, indices })
    }

    /// Indices into the parent data set.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    pub fn parent(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    fn parent_index(&self, index: usize) -> Result<usize> {
        check_index(index, self.indices.len())?;
        Ok(self.indices[index])
    }
}

impl std::fmt::Debug for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subset")
            .field("len", &self.indices.len())
            .field("parent_len", &self.dataset.len())
            .finish()
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        self.dataset.get(self.parent_index(index)?)
    }
    fn classes(&self) -> &[String] {
        self.dataset.classes()
    }
    fn label(&self, index: usize) -> Result<usize> {
        self.dataset.label(self.parent_index(index)?)
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        self.dataset.image_size()
    }
}

/// A deterministic random split: the first subset holds `round(fraction * len)` samples
/// (`fraction` clamped to [0, 1]), the second the rest; both keep the parent's order.
///
/// The same `(len, fraction, seed)` always gives the same split, so a validation set
/// carved from a training folder stays the same across runs.
pub fn split(dataset: Arc<dyn Dataset>, fraction: f64, seed: u64) -> (Subset, Subset) {
    let len = dataset.len();
    let fraction = if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    };
    let first = ((len as f64) * fraction).round() as usize;
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut stream(seed, 0, len as u64, Purpose::Split));
    let mut a = order[..first].to_vec();
    let mut b = order[first..].to_vec();
    // Sorted so that a reader with locality (one class folder after another) keeps it.
    a.sort_unstable();
    b.sort_unstable();
    (
        Subset {
            dataset: dataset.clone(),
            indices: a,
        },
        Subset {
            dataset,
            indices: b,
        },
    )
}

/// A data set held in memory: synthetic data, tests, or anything already decoded.
#[derive(Clone, Debug)]
pub struct VecDataset {
    samples: Vec<Sample>,
    classes: Vec<String>,
}

impl VecDataset {
    /// Fails when a label is not below `classes.len()` or an image buffer has the wrong length.
    pub fn new(samples: Vec<Sample>, classes: Vec<String>) -> Result<Self> {
        for (index, s) in samples.iter().enumerate() {
            if s.label >= classes.len() {
                return Err(Error::Sample {
                    index,
                    reason: format!(
                        "label {} is not below the class count {}",
                        s.label,
                        classes.len()
                    ),
                });
            }
            if !s.image.is_consistent() {
                return Err(Error::Sample {
                    index,
                    reason: format!(
                        "{} bytes for a {}x{} RGB image",
                        s.image.data.len(),
                        s.image.height,
                        s.image.width
                    ),
                });
            }
        }
        Ok(VecDataset { samples, classes })
    }

    /// `count` images of `height` x `width` with uniform random pixels and labels spread
    /// over `classes` classes, from `seed`: the benchmark's and the tests' input.
    pub fn synthetic(count: usize, height: usize, width: usize, classes: usize, seed: u64) -> Self {
        use rand::RngCore;
        let classes = classes.max(1);
        let samples = (0..count)
            .map(|i| {
                let mut data = vec![0u8; height * width * 3];
                stream(seed, 0, i as u64, Purpose::Synthetic).fill_bytes(&mut data);
                Sample {
                    image: Image {
                        data,
                        height,
                        width,
                    },
                    label: i % classes,
                }
            })
            .collect();
        VecDataset {
            samples,
            classes: (0..classes).map(|c| c.to_string()).collect(),
        }
    }
}

impl Dataset for VecDataset {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        check_index(index, self.samples.len())?;
        Ok(self.samples[index].clone())
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn label(&self, index: usize) -> Result<usize> {
        check_index(index, self.samples.len())?;
        Ok(self.samples[index].label)
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        let first = self.samples.first()?;
        let size = (first.image.height, first.image.width);
        self.samples
            .iter()
            .all(|s| (s.image.height, s.image.width) == size)
            .then_some(size)
    }
}
