//! MNIST-style IDX files (raw or gzip): `0x00000803` image files (n x h x w unsigned
//! bytes) and `0x00000801` label files (n unsigned bytes), dimensions big-endian `u32`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dataset::Split;
use crate::in_memory::{InMemory, Planes};
use crate::{Error, Result};

/// Where the Debian package `dataset-fashion-mnist` installs the files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST's classes, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Decompressed IDX files above this are refused: the real ones are ~50 MB, and a
/// corrupt length must not make us allocate without bound.
const MAX_DECOMPRESSED: u64 = 1 << 32;

/// Grey images of one size with their labels, held in memory; the info is the image file.
pub type IdxDataset = InMemory<PathBuf>;

/// Decoded IDX image file: count, height, width, then the pixels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
}

/// The bytes of a file, gunzipped when they start with the gzip magic.
pub fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_maybe_gzip(bytes, path)
}

/// `bytes` gunzipped when they start with the gzip magic, else as they are; `name` is
/// only used in error messages.
pub fn decode_maybe_gzip(bytes: Vec<u8>, name: &Path) -> Result<Vec<u8>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes.as_slice())
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut out)
        .map_err(Error::unreadable(name, "bad gzip data"))?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        return Err(Error::format(
            name,
            format!("decompresses to more than {MAX_DECOMPRESSED} bytes"),
        ));
    }
    Ok(out)
}

/// Checks the magic and sizes, and returns the dimensions and the data bytes.
fn parse_header<'a>(bytes: &'a [u8], ndim: u8, name: &Path) -> Result<(Vec<usize>, &'a [u8])> {
    let kind = if ndim == 3 { "image" } else { "label" };
    if bytes.len() < 4 {
        return Err(Error::format(
            name,
            format!("{} bytes, too short for an IDX header", bytes.len()),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(Error::format(
            name,
            format!(
                "not an IDX file: magic {:02x}{:02x}{:02x}{:02x}",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(Error::format(
            name,
            format!(
                "IDX element type 0x{:02x} is not supported (only 0x08, unsigned bytes)",
                bytes[2]
            ),
        ));
    }
    if bytes[3] != ndim {
        return Err(Error::format(
            name,
            format!(
                "IDX magic 0x0000080{} has {} dimensions, an {kind} file (0x0000080{ndim}) has {ndim}",
                bytes[3], bytes[3]
            ),
        ));
    }
    let header = 4 + 4 * ndim as usize;
    if bytes.len() < header {
        return Err(Error::format(
            name,
            format!("truncated IDX header ({} bytes)", bytes.len()),
        ));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::format(name, format!("dimensions {dims:?} overflow")))?;
    let data = &bytes[header..];
    if data.len() < expected {
        return Err(Error::format(
            name,
            format!(
                "truncated: dimensions {dims:?} need {expected} data bytes, the file has {}",
                data.len()
            ),
        ));
    }
    if data.len() > expected {
        return Err(Error::format(
            name,
            format!(
                "{} bytes after the {expected} that dimensions {dims:?} describe",
                data.len() - expected
            ),
        ));
    }
    Ok((dims, data))
}

/// Parses an IDX image file (already gunzipped).
pub fn parse_images(bytes: &[u8], name: &Path) -> Result<IdxImages> {
    let (dims, data) = parse_header(bytes, 3, name)?;
    if dims[1] == 0 || dims[2] == 0 {
        return Err(Error::format(
            name,
            format!("zero-sized images ({} x {})", dims[1], dims[2]),
        ));
    }
    Ok(IdxImages {
        count: dims[0],
        height: dims[1],
        width: dims[2],
        pixels: data.to_vec(),
    })
}

/// Parses an IDX label file (already gunzipped).
pub fn parse_labels(bytes: &[u8], name: &Path) -> Result<Vec<u8>> {
    let (_, data) = parse_header(bytes, 1, name)?;
    Ok(data.to_vec())
}

impl IdxDataset {
    /// A data set from parsed parts; `labels_name` names the label file in errors. Empty
    /// `class_names` means "0", "1", ... up to the largest label.
    pub fn from_parts(
        images: IdxImages,
        labels: Vec<u8>,
        class_names: Vec<String>,
        images_name: &Path,
        labels_name: &Path,
    ) -> Result<Self> {
        let expected = images
            .count
            .checked_mul(images.height)
            .and_then(|n| n.checked_mul(images.width));
        if expected != Some(images.pixels.len()) || images.height == 0 || images.width == 0 {
            return Err(Error::format(
                images_name,
                format!(
                    "{} pixel bytes for {} images of {}x{}",
                    images.pixels.len(),
                    images.count,
                    images.height,
                    images.width
                ),
            ));
        }
        if images.count != labels.len() {
            return Err(Error::format(
                labels_name,
                format!(
                    "{} labels for the {} images of {}",
                    labels.len(),
                    images.count,
                    images_name.display()
                ),
            ));
        }
        let classes = if class_names.is_empty() {
            let n = labels.iter().max().map_or(0, |&m| m as usize + 1);
            (0..n).map(|c| c.to_string()).collect()
        } else {
            class_names
        };
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= classes.len())
        {
            return Err(Error::format(
                labels_name,
                format!(
                    "label {l} of item {i} is out of range ({} classes)",
                    classes.len()
                ),
            ));
        }
        let size = (images.height, images.width);
        let mut ds = InMemory::new(size, Planes::Gray, classes, images_name.to_path_buf());
        ds.extend(&images.pixels, &labels);
        Ok(ds)
    }

    /// The image file the data came from.
    pub fn source(&self) -> &Path {
        &self.info
    }
}

/// An IDX image file and its label file, each raw or gzip. Empty `class_names` means
/// "0", "1", ... up to the largest label; otherwise every label must be below its length.
pub fn idx(images: &Path, labels: &Path, class_names: Vec<String>) -> Result<IdxDataset> {
    let img = parse_images(&read_maybe_gzip(images)?, images)?;
    let lab = parse_labels(&read_maybe_gzip(labels)?, labels)?;
    IdxDataset::from_parts(img, lab, class_names, images, labels)
}

/// The first existing of the names MNIST-style sets are distributed under
/// (`train-images-idx3-ubyte.gz` as Debian ships them, the same without `.gz`, and
/// the `train-images.idx3-ubyte` spelling).
fn find_idx_file(dir: &Path, prefix: &str, what: &str, ndim: u8) -> Result<PathBuf> {
    let candidates = [
        format!("{prefix}-{what}-idx{ndim}-ubyte.gz"),
        format!("{prefix}-{what}-idx{ndim}-ubyte"),
        format!("{prefix}-{what}.idx{ndim}-ubyte"),
        format!("{prefix}-{what}.idx{ndim}-ubyte.gz"),
    ];
    candidates
        .iter()
        .map(|c| dir.join(c))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::format(
                dir,
                format!(
                    "no {prefix} {what} file: expected `{}` (or without `.gz`)",
                    candidates[0]
                ),
            )
        })
}

fn mnist_style(dir: &Path, split: Split, classes: Vec<String>) -> Result<IdxDataset> {
    fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images = find_idx_file(dir, prefix, "images", 3)?;
    let labels = find_idx_file(dir, prefix, "labels", 1)?;
    idx(&images, &labels, classes)
}

/// Fashion-MNIST from a folder with the four files as the Debian package
/// `dataset-fashion-mnist` ships them ([`FASHION_MNIST_DIR`]).
pub fn fashion_mnist(dir: &Path, split: Split) -> Result<IdxDataset> {
    let classes = FASHION_MNIST_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    mnist_style(dir, split, classes)
}

/// MNIST from a folder with the four files under their usual names; classes "0".."9".
pub fn mnist(dir: &Path, split: Split) -> Result<IdxDataset> {
    mnist_style(dir, split, (0..10).map(|c| c.to_string()).collect())
}
