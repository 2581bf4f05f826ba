//! CIFAR-10 and CIFAR-100 in their official binary form.
//!
//! CIFAR-10 records are 1 label byte + 3072 bytes of 32x32 RGB, planar (CHW), in
//! `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`. CIFAR-100 records are
//! a coarse byte, a fine byte, then the same 3072 bytes, in `train.bin` and `test.bin`.
//! Either the extracted folder, its parent, or the `.tar.gz` itself is accepted; the
//! archive is read in memory and nothing is written to disk.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dataset::Split;
use crate::in_memory::{InMemory, Planes};
use crate::{Error, Result};

pub const SIDE: usize = 32;
const PIXELS: usize = SIDE * SIDE * 3;

/// Which labels to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CifarKind {
    Cifar10,
    /// CIFAR-100 with its 100 fine classes.
    Cifar100Fine,
    /// CIFAR-100 with its 20 superclasses.
    Cifar100Coarse,
}

impl CifarKind {
    pub fn num_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100Fine => 100,
            CifarKind::Cifar100Coarse => 20,
        }
    }

    /// Bytes per record, label bytes included.
    pub fn record_len(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1 + PIXELS,
            _ => 2 + PIXELS,
        }
    }

    /// The folder name inside the official archive.
    pub fn folder(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar-10-batches-bin",
            _ => "cifar-100-binary",
        }
    }

    /// The official archive's file name.
    pub fn archive(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar-10-binary.tar.gz",
            _ => "cifar-100-binary.tar.gz",
        }
    }

    /// The batch files of a split, in the order their records are concatenated.
    pub fn files(self, split: Split) -> &'static [&'static str] {
        match (self, split) {
            (CifarKind::Cifar10, Split::Train) => &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            (CifarKind::Cifar10, Split::Test) => &["test_batch.bin"],
            (_, Split::Train) => &["train.bin"],
            (_, Split::Test) => &["test.bin"],
        }
    }

    /// The class-name file shipped in the archive.
    pub fn meta_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "batches.meta.txt",
            CifarKind::Cifar100Fine => "fine_label_names.txt",
            CifarKind::Cifar100Coarse => "coarse_label_names.txt",
        }
    }

    /// The official class names, used when the meta file is absent.
    pub fn default_classes(self) -> Vec<String> {
        let names: &[&str] = match self {
            CifarKind::Cifar10 => &CIFAR10_CLASSES,
            CifarKind::Cifar100Fine => &CIFAR100_FINE,
            CifarKind::Cifar100Coarse => &CIFAR100_COARSE,
        };
        names.iter().map(|s| s.to_string()).collect()
    }
}

const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

const CIFAR100_COARSE: [&str; 20] = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
];

const CIFAR100_FINE: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

/// What a CIFAR data set is: its variant and where it came from.
#[derive(Clone, Debug)]
pub struct CifarInfo {
    pub kind: CifarKind,
    pub source: PathBuf,
}

/// CIFAR images (32x32) and labels, held in memory in the file's planar layout.
pub type CifarDataset = InMemory<CifarInfo>;

impl CifarDataset {
    /// Parses the records of one batch file (`name` is only used in error messages);
    /// classes are the official names.
    pub fn parse(bytes: &[u8], kind: CifarKind, name: &Path) -> Result<Self> {
        let info = CifarInfo {
            kind,
            source: name.to_path_buf(),
        };
        let mut ds = InMemory::new((SIDE, SIDE), Planes::Rgb, kind.default_classes(), info);
        ds.append(bytes, name)?;
        Ok(ds)
    }

    fn append(&mut self, bytes: &[u8], name: &Path) -> Result<()> {
        let kind = self.info.kind;
        let rec = kind.record_len();
        if bytes.is_empty() {
            return Err(Error::format(name, "empty file, no CIFAR records"));
        }
        if !bytes.len().is_multiple_of(rec) {
            return Err(Error::format(
                name,
                format!(
                    "{} bytes is not a whole number of {rec}-byte {:?} records \
                     (truncated, or the wrong CIFAR variant)",
                    bytes.len(),
                    kind
                ),
            ));
        }
        let n = bytes.len() / rec;
        self.reserve(n);
        for (i, r) in bytes.chunks_exact(rec).enumerate() {
            let label = match kind {
                CifarKind::Cifar10 => check_label(r[0], 10, "label", name, i)?,
                CifarKind::Cifar100Fine | CifarKind::Cifar100Coarse => {
                    // Both bytes are checked whichever is used: one bad byte means a bad file.
                    let coarse = check_label(r[0], 20, "coarse label", name, i)?;
                    let fine = check_label(r[1], 100, "fine label", name, i)?;
                    if kind == CifarKind::Cifar100Fine {
                        fine
                    } else {
                        coarse
                    }
                }
            };
            self.extend(&r[rec - PIXELS..], &[label]);
        }
        Ok(())
    }

    pub fn kind(&self) -> CifarKind {
        self.info.kind
    }

    /// The folder or archive the data came from.
    pub fn source(&self) -> &Path {
        &self.info.source
    }
}

fn check_label(v: u8, n: usize, what: &str, name: &Path, record: usize) -> Result<u8> {
    if (v as usize) < n {
        Ok(v)
    } else {
        Err(Error::format(
            name,
            format!("record {record}: {what} {v} is out of range (must be below {n})"),
        ))
    }
}

/// A file's display path and bytes.
type Member = (PathBuf, Vec<u8>);

/// Where the files are.
enum Source {
    Folder(PathBuf),
    Archive(PathBuf),
}

fn is_archive_name(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

fn locate(path: &Path, kind: CifarKind, split: Split) -> Result<Source> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return if is_archive_name(path) {
            Ok(Source::Archive(path.to_path_buf()))
        } else {
            Err(Error::format(
                path,
                format!(
                    "expected a folder with the {:?} batch files or the `{}` archive",
                    kind,
                    kind.archive()
                ),
            ))
        };
    }
    let first = kind.files(split)[0];
    if path.join(first).exists() {
        return Ok(Source::Folder(path.to_path_buf()));
    }
    let nested = path.join(kind.folder());
    if nested.join(first).exists() {
        return Ok(Source::Folder(nested));
    }
    let archive = path.join(kind.archive());
    if archive.is_file() {
        return Ok(Source::Archive(archive));
    }
    Err(Error::format(
        path,
        format!(
            "no {:?} data here: expected `{first}`, a `{}/` folder or `{}`",
            kind,
            kind.folder(),
            kind.archive()
        ),
    ))
}

fn parse_classes(text: &str, kind: CifarKind, name: &Path) -> Result<Vec<String>> {
    let classes: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if classes.len() != kind.num_classes() {
        return Err(Error::format(
            name,
            format!(
                "{} class names, {:?} has {}",
                classes.len(),
                kind,
                kind.num_classes()
            ),
        ));
    }
    Ok(classes)
}

/// Reads a CIFAR split from the extracted folder (`cifar-10-batches-bin`,
/// `cifar-100-binary`), the folder that contains it, or the `.tar.gz` archive.
///
/// Class names come from the meta file next to the batches (`batches.meta.txt`,
/// `fine_label_names.txt`, `coarse_label_names.txt`), or the official names when it is
/// absent.
pub fn cifar(path: &Path, which: CifarKind, split: Split) -> Result<CifarDataset> {
    let (files, meta, source): (Vec<Member>, Option<Member>, PathBuf) =
        match locate(path, which, split)? {
            Source::Folder(dir) => {
                let mut files = Vec::new();
                for f in which.files(split) {
                    let p = dir.join(f);
                    let bytes = fs::read(&p).map_err(|e| Error::io(&p, e))?;
                    files.push((p, bytes));
                }
                let mp = dir.join(which.meta_file());
                let meta = match fs::read(&mp) {
                    Ok(b) => Some((mp, b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(Error::io(&mp, e)),
                };
                (files, meta, dir)
            }
            Source::Archive(archive) => {
                let mut wanted: Vec<&str> = which.files(split).to_vec();
                wanted.push(which.meta_file());
                let mut found = read_archive_members(&archive, &wanted)?;
                let mut files = Vec::new();
                for f in which.files(split) {
                    match found.remove(*f) {
                        Some(member) => files.push(member),
                        None => {
                            return Err(Error::format(
                                &archive,
                                format!("the archive has no `{f}` member"),
                            ))
                        }
                    }
                }
                let meta = found.remove(which.meta_file());
                (files, meta, archive)
            }
        };
    let classes = match meta {
        Some((name, bytes)) => parse_classes(&String::from_utf8_lossy(&bytes), which, &name)?,
        None => which.default_classes(),
    };
    let info = CifarInfo {
        kind: which,
        source,
    };
    let mut ds = InMemory::new((SIDE, SIDE), Planes::Rgb, classes, info);
    for (name, bytes) in &files {
        ds.append(bytes, name)?;
    }
    Ok(ds)
}

/// The members of a `.tar.gz` whose file names are in `wanted`, keyed by file name, each
/// with a display path `archive/member`.
fn read_archive_members(archive: &Path, wanted: &[&str]) -> Result<HashMap<String, Member>> {
    let file = fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut found = HashMap::new();
    let bad = |e: std::io::Error| Error::unreadable(archive, "unreadable archive")(e);
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = entry.path().map_err(bad)?.into_owned();
        let Some(name) = member.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if wanted.contains(&name) && !found.contains_key(name) {
            let name = name.to_string();
            let display = archive.join(&member);
            // The header's size is untrusted: cap the reservation, not the read.
            let mut bytes = Vec::with_capacity((entry.size() as usize).min(1 << 28));
            entry
                .read_to_end(&mut bytes)
                .map_err(Error::unreadable(&display, "truncated archive member"))?;
            found.insert(name, (display, bytes));
        }
    }
    Ok(found)
}
