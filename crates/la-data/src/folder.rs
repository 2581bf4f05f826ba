//! ImageFolder trees: `root/<class>/<image>.{jpg,jpeg,png,bmp,webp}`, classes in sorted
//! order. The structure is checked at open; images are decoded in [`Dataset::get`] so
//! that the loader's workers decode in parallel.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use crate::dataset::{check_index, split, Dataset, Subset};
use crate::{Error, Image, Result, Sample};

/// File extensions read (case-insensitive); other files are ignored.
pub const EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "bmp", "webp"];

/// How to open an ImageFolder.
#[derive(Clone, Debug, Default)]
pub struct ImageFolderOptions {
    /// Decode every image at open (in parallel) and leave out the ones that fail,
    /// listing them in [`ImageFolderDataset::skipped`]. Without it an undecodable image
    /// is an error from `get` that names the file.
    pub skip_bad: bool,
    /// The class list to label with instead of the sorted folder names: give a
    /// validation root the training root's classes so that labels agree even if a class
    /// is missing there. Every folder must then be one of these.
    pub classes: Option<Vec<String>>,
}

/// An ImageFolder: image paths and labels, decoded on demand.
#[derive(Clone, Debug)]
pub struct ImageFolderDataset {
    root: PathBuf,
    files: Vec<PathBuf>,
    labels: Vec<usize>,
    classes: Vec<String>,
    skipped: Vec<(PathBuf, String)>,
}

impl ImageFolderDataset {
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image file of a sample.
    pub fn path(&self, index: usize) -> Option<&Path> {
        self.files.get(index).map(PathBuf::as_path)
    }

    /// Files left out by `skip_bad`, with the decoder's reason.
    pub fn skipped(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }
}

/// Decodes one image file to RGB (grey, palette, 16-bit and alpha are converted).
pub fn decode_image(path: &Path) -> Result<Image> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        // The content decides the format: a PNG saved as .jpg still reads.
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let rgb = reader
        .decode()
        .map_err(|source| Error::Decode {
            path: path.to_path_buf(),
            source,
        })?
        .into_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::format(path, "image has zero width or height"));
    }
    Ok(Image {
        data: rgb.into_raw(),
        height: h as usize,
        width: w as usize,
    })
}

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

/// Image files under `dir`, nested folders included (as torchvision walks them), sorted.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for p in sorted_entries(dir)? {
        if is_hidden(&p) {
            continue;
        }
        if p.is_dir() {
            collect_images(&p, out)?;
        } else if has_image_extension(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Opens `root/<class>/<image>` and checks its structure: at least one class folder,
/// and at least one image file in each.
pub fn image_folder(root: &Path, options: ImageFolderOptions) -> Result<ImageFolderDataset> {
    let meta = fs::metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::format(
            root,
            "not a folder (expected root/<class>/<image>)",
        ));
    }
    let class_dirs: Vec<PathBuf> = sorted_entries(root)?
        .into_iter()
        .filter(|p| p.is_dir() && !is_hidden(p))
        .collect();
    if class_dirs.is_empty() {
        return Err(Error::format(
            root,
            "no class folders (expected root/<class>/<image>)",
        ));
    }
    let folder_names: Vec<String> = class_dirs
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let classes = options
        .classes
        .clone()
        .unwrap_or_else(|| folder_names.clone());

    let mut files = Vec::new();
    let mut labels = Vec::new();
    for (dir, name) in class_dirs.iter().zip(&folder_names) {
        let label = classes.iter().position(|c| c == name).ok_or_else(|| {
            Error::format(
                dir,
                format!(
                    "class folder `{name}` is not one of the {} given classes",
                    classes.len()
                ),
            )
        })?;
        let mut found = Vec::new();
        collect_images(dir, &mut found)?;
        if found.is_empty() {
            return Err(Error::format(
                dir,
                format!("empty class folder: no .{} files", EXTENSIONS.join("/.")),
            ));
        }
        labels.extend(std::iter::repeat_n(label, found.len()));
        files.extend(found);
    }

    let mut skipped = Vec::new();
    if options.skip_bad {
        let verdicts: Vec<Option<String>> = files
            .par_iter()
            .map(|p| decode_image(p).err().map(|e| e.to_string()))
            .collect();
        let mut keep_files = Vec::with_capacity(files.len());
        let mut keep_labels = Vec::with_capacity(files.len());
        for ((p, l), bad) in files.into_iter().zip(labels).zip(verdicts) {
            match bad {
                Some(reason) => skipped.push((p, reason)),
                None => {
                    keep_files.push(p);
                    keep_labels.push(l);
                }
            }
        }
        for (dir, name) in class_dirs.iter().zip(&folder_names) {
            let label = classes.iter().position(|c| c == name);
            if !keep_labels.iter().any(|&l| Some(l) == label) {
                return Err(Error::format(
                    dir,
                    "every image in this class folder is undecodable",
                ));
            }
        }
        files = keep_files;
        labels = keep_labels;
    }

    Ok(ImageFolderDataset {
        root: root.to_path_buf(),
        files,
        labels,
        classes,
        skipped,
    })
}

/// One ImageFolder root split into (train, validation) with `val_fraction` of the
/// images in validation, the same split for the same seed.
pub fn image_folder_split(
    root: &Path,
    options: ImageFolderOptions,
    val_fraction: f64,
    seed: u64,
) -> Result<(Subset, Subset)> {
    let ds: Arc<dyn Dataset> = Arc::new(image_folder(root, options)?);
    let (val, train) = split(ds, val_fraction, seed);
    Ok((train, val))
}

impl Dataset for ImageFolderDataset {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        check_index(index, self.files.len())?;
        Ok(Sample {
            image: decode_image(&self.files[index])?,
            label: self.labels[index],
        })
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn label(&self, index: usize) -> Result<usize> {
        check_index(index, self.files.len())?;
        Ok(self.labels[index])
    }
}
