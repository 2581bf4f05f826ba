//! `la-cli data fetch` and `la-cli data info`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use la_data::fetch::CifarArchive;
use la_data::Split;

use crate::data_args::DataKind;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Archive {
    Cifar10,
    Cifar100,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Download a data set's official archive (with a progress bar), check its MD5 and extract it.
    #[command(
        after_help = "Example:\n  la-cli data fetch cifar10 --dir data/\n  la-cli train --data cifar10 --data-dir data/cifar-10-batches-bin"
    )]
    Fetch {
        #[arg(value_enum)]
        which: Archive,
        #[arg(long, default_value = "data")]
        dir: PathBuf,
        /// Another server holding the same archive names (a mirror).
        #[arg(long)]
        base_url: Option<String>,
    },
    /// Count, classes, image size and label histogram of a data set.
    #[command(
        after_help = "Examples:\n  la-cli data info --data digits\n  la-cli data info --data fashion-mnist --data-dir /usr/share/datasets/fashion-mnist --split test"
    )]
    Info {
        #[arg(long, value_enum, default_value = "digits")]
        data: DataKind,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Which split, for data sets that have one.
        #[arg(long, value_enum, default_value = "train")]
        split: SplitArg,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SplitArg {
    Train,
    Test,
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Fetch {
            which,
            dir,
            base_url,
        } => {
            let which = match which {
                Archive::Cifar10 => CifarArchive::Cifar10,
                Archive::Cifar100 => CifarArchive::Cifar100,
            };
            let show = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let folder = la_data::fetch::fetch_cifar(which, &dir, base_url.as_deref(), show)?;
            println!("extracted to {}", folder.display());
        }
        DataCommand::Info {
            data,
            data_dir,
            split,
        } => {
            let split = match split {
                SplitArg::Train => Split::Train,
                SplitArg::Test => Split::Test,
            };
            let dataset: Box<dyn la_data::Dataset> = match data {
                DataKind::Digits => Box::new(la_data::digits()?),
                DataKind::Cifar10 | DataKind::Cifar100 => {
                    let dir = crate::data_args::need_dir(data, data_dir.as_deref())?;
                    let kind = if data == DataKind::Cifar10 {
                        la_data::CifarKind::Cifar10
                    } else {
                        la_data::CifarKind::Cifar100Fine
                    };
                    Box::new(la_data::cifar(dir, kind, split)?)
                }
                DataKind::FashionMnist => Box::new(la_data::fashion_mnist(
                    crate::data_args::need_dir(data, data_dir.as_deref())?,
                    split,
                )?),
                DataKind::Imagefolder => Box::new(la_data::image_folder(
                    crate::data_args::need_dir(data, data_dir.as_deref())?,
                    Default::default(),
                )?),
            };
            println!(
                "{} ({})",
                data.name(),
                data_dir.map_or("built in".to_string(), |d| d.display().to_string())
            );
            print!("{}", la_data::info(dataset.as_ref()));
        }
    }
    Ok(())
}
