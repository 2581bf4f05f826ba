//! Data for training VGG-with-attention networks: readers for CIFAR-10/100 (binary
//! folders or the official `.tar.gz`), MNIST-style IDX files (Fashion-MNIST as the
//! Debian package ships it), ImageFolder trees and the embedded UCI digits; seeded
//! augmentation (crops, flips, colour jitter, TrivialAugment/RandAugment, random
//! erasing, MixUp/CutMix); and a loader that decodes
//! and augments on worker threads and yields candle tensors, identical for a given
//! seed whatever the number of threads.
//!
//! - [`Dataset`]: the trait every reader implements; [`Subset`] and [`split`] carve them;
//!   [`InMemory`]: the images of one size that the CIFAR, IDX and digits readers hold.
//! - [`transforms`]: per-sample augmentation on `u8` HWC images; [`Normalize`] (la-core's)
//!   is applied by [`Image::to_chw`]; [`AutoAugment`]: torchvision's TrivialAugmentWide
//!   and RandAugment over the operations of [`augment_ops`].
//! - [`Pipeline`]: transforms, then normalisation, then an optional batch-level [`Mix`].
//! - [`Loader`]: shuffled, prefetched, parallel batches of `[b, 3, h, w]` `f32` tensors;
//!   [`Shard`]: one rank's slice of each of them in data-parallel training.
//! - [`fetch`]: downloads the CIFAR archives with an MD5 check and a safe extraction.
//! - [`info()`]: counts, classes, sizes and a label histogram of any data set.

pub mod augment_ops;
pub mod auto_augment;
pub mod cifar;
pub mod dataset;
pub mod digits;
pub mod erasing;
pub mod fetch;
pub mod folder;
pub mod idx;
pub mod in_memory;
pub mod info;
pub mod loader;
pub mod pipeline;
pub mod rng;
pub mod sample;
pub mod transforms;

use std::path::PathBuf;

pub use augment_ops::AugmentOp;
pub use auto_augment::{AutoAugment, Policy};
pub use cifar::{cifar, CifarDataset, CifarInfo, CifarKind};
pub use dataset::{split, Dataset, Split, Subset, VecDataset};
pub use digits::{digits, DigitsDataset};
pub use erasing::RandomErasing;
pub use folder::{image_folder, ImageFolderDataset, ImageFolderOptions};
pub use idx::{fashion_mnist, idx, mnist, IdxDataset};
pub use in_memory::{InMemory, Planes};
pub use info::{info, DataInfo, ImageSizes};
pub use la_core::Normalize;
pub use loader::{
    bench_cifar_pipeline, bench_pipeline, bench_trivial_augment_pipeline, Batch, Loader,
    LoaderConfig, Shard, Targets,
};
pub use pipeline::{Mix, Pipeline, Preset};
pub use sample::{Image, Sample};
pub use transforms::Transform;

/// Errors of this crate; each names the file (or sample, or URL) at fault and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file whose content is not what its format requires.
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    /// A file or folder that could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose bytes could not be read as its format requires (a gzip or tar stream
    /// that breaks off or is corrupt).
    #[error("{}: {what}", path.display())]
    Unreadable {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// An image file that the `image` crate cannot decode.
    #[error("{}: cannot decode image", path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    /// A sample index past the end of a data set.
    #[error("sample index {index} is out of range for a data set of {len} samples")]
    Index { index: usize, len: usize },
    /// A transform or batch assembly that cannot handle a sample.
    #[error("sample {index}: {reason}")]
    Sample { index: usize, reason: String },
    /// A configuration value that cannot work (batch size 0, Beta alpha <= 0, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A download that failed (network, HTTP status).
    #[error("download of {url} failed: {reason}")]
    Download { url: String, reason: String },
    /// A downloaded file whose MD5 differs from the published one.
    #[error("{}: MD5 is {actual}, expected {expected}", path.display())]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// A loader worker thread that panicked (a bug in a dataset or transform).
    #[error("loader worker failed: {0}")]
    Worker(String),
    /// A file that could not be written (the old one, if any, is intact).
    #[error(transparent)]
    Write(#[from] la_core::fs::WriteError),
    #[error("invalid configuration: {0}")]
    Normalize(#[from] la_core::normalize::InvalidNormalize),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unreadable(
        path: impl Into<PathBuf>,
        what: &'static str,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Unreadable { path, what, source }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
