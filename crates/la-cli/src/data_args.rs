//! `--data` and `--data-dir`: opening the data sets the subcommands train and evaluate on.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use la_data::{Dataset, Normalize, Pipeline, Preset, Split};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataKind {
    /// UCI optical digits, 1,797 8x8 images, compiled into the program.
    Digits,
    Cifar10,
    Cifar100,
    FashionMnist,
    /// root/<class>/<image> folders.
    Imagefolder,
}

impl DataKind {
    pub fn name(self) -> &'static str {
        match self {
            DataKind::Digits => "digits",
            DataKind::Cifar10 => "cifar10",
            DataKind::Cifar100 => "cifar100",
            DataKind::FashionMnist => "fashion-mnist",
            DataKind::Imagefolder => "imagefolder",
        }
    }

    fn preset(self) -> Preset {
        match self {
            DataKind::Digits => Preset::Digits,
            DataKind::Cifar10 => Preset::Cifar10,
            DataKind::Cifar100 => Preset::Cifar100,
            DataKind::FashionMnist => Preset::FashionMnist,
            DataKind::Imagefolder => Preset::ImageNet,
        }
    }

    /// The statistics a model trained from scratch on this data normalises with.
    pub fn normalization(self) -> Normalize {
        self.preset().normalization()
    }

    /// The data set's standard augmentation at `size`, normalised with `norm`.
    pub fn train_pipeline(self, size: usize, norm: Normalize) -> Pipeline {
        Pipeline::train_preset(self.preset(), size).with_normalize(norm)
    }
}

/// A training and a validation set with the same classes.
pub struct Data {
    pub train: Arc<dyn Dataset>,
    pub val: Arc<dyn Dataset>,
}

pub fn need_dir(kind: DataKind, dir: Option<&Path>) -> Result<&Path> {
    let hint = match kind {
        DataKind::Cifar10 | DataKind::Cifar100 => {
            "the extracted folder or the .tar.gz; `la-cli data fetch` downloads it"
        }
        DataKind::FashionMnist => {
            "e.g. /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)"
        }
        _ => "root/<class>/<image> folders",
    };
    let dir = dir.with_context(|| format!("--data {} needs --data-dir ({hint})", kind.name()))?;
    if !dir.exists() {
        bail!(
            "{}: no such file or directory (--data-dir for {}: {hint})",
            dir.display(),
            kind.name()
        );
    }
    Ok(dir)
}

/// Opens `kind` for training: its official test split for validation where it has one, else
/// `val_dir`, else a seeded split holding out `val_fraction`.
pub fn open_data(
    kind: DataKind,
    dir: Option<&Path>,
    val_dir: Option<&Path>,
    val_fraction: f64,
    seed: u64,
    skip_bad: bool,
) -> Result<Data> {
    if !(0.0..1.0).contains(&val_fraction) || val_fraction == 0.0 {
        bail!("--val-fraction {val_fraction} must be between 0 and 1");
    }
    let held_out = |all: Arc<dyn Dataset>| -> Data {
        let (train, val) = la_data::split(all, 1.0 - val_fraction, seed);
        Data {
            train: Arc::new(train),
            val: Arc::new(val),
        }
    };
    Ok(match kind {
        DataKind::Digits => held_out(Arc::new(la_data::digits()?)),
        DataKind::Cifar10 | DataKind::Cifar100 => {
            let dir = need_dir(kind, dir)?;
            let which = if kind == DataKind::Cifar10 {
                la_data::CifarKind::Cifar10
            } else {
                la_data::CifarKind::Cifar100Fine
            };
            Data {
                train: Arc::new(la_data::cifar(dir, which, Split::Train)?),
                val: Arc::new(la_data::cifar(dir, which, Split::Test)?),
            }
        }
        DataKind::FashionMnist => {
            let dir = need_dir(kind, dir)?;
            Data {
                train: Arc::new(la_data::fashion_mnist(dir, Split::Train)?),
                val: Arc::new(la_data::fashion_mnist(dir, Split::Test)?),
            }
        }
        DataKind::Imagefolder => {
            let dir = need_dir(kind, dir)?;
            let folder_options = la_data::ImageFolderOptions {
                skip_bad,
                ..Default::default()
            };
            let train = la_data::image_folder(dir, folder_options.clone())?;
            if !train.skipped().is_empty() {
                eprintln!(
                    "note: skipped {} undecodable images in {}",
                    train.skipped().len(),
                    dir.display()
                );
            }
            match val_dir {
                Some(v) => {
                    // The validation root takes the training root's labels, so a class folder
                    // missing there does not shift the others.
                    let options = la_data::ImageFolderOptions {
                        classes: Some(train.classes().to_vec()),
                        ..folder_options
                    };
                    let val = la_data::image_folder(v, options)?;
                    Data {
                        train: Arc::new(train),
                        val: Arc::new(val),
                    }
                }
                None => held_out(Arc::new(train)),
            }
        }
    })
}
