//! `cargo xtask <task>`: developer tasks of the workspace (see `xtask/README.md`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use xtask::convert::{self, ModelOptions};
use xtask::hub::{self, HubConfig, HubFile};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks: pretrained VGG weights",
    after_help = "Examples:\n  cargo xtask fetch-weights                      # weights/vgg16-softmax-imagenet.safetensors\n  cargo xtask fetch-weights --arch vgg11 --bn --attention none\n  cargo xtask convert --from model.safetensors --out weights/vgg16-cifar.safetensors --head cifar --classes 10"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Download torchvision's ImageNet VGG weights (timm/vggNN[_bn].tv_in1k on the Hugging
    /// Face Hub, honouring HF_HOME, HF_ENDPOINT, HF_TOKEN) and convert them for training.
    FetchWeights(FetchArgs),
    /// Convert a local safetensors file (torchvision, timm or the article's layout) for training.
    Convert(ConvertArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Arch {
    Vgg11,
    Vgg13,
    Vgg16,
    Vgg19,
}

impl Arch {
    fn depth(self) -> usize {
        match self {
            Arch::Vgg11 => 11,
            Arch::Vgg13 => 13,
            Arch::Vgg16 => 16,
            Arch::Vgg19 => 19,
        }
    }
}

#[derive(clap::Args)]
struct FetchArgs {
    /// Which VGG.
    #[arg(long, value_enum, default_value_t = Arch::Vgg16)]
    arch: Arch,
    /// The BatchNorm variant (vggNN_bn).
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    bn: bool,
    /// Another repository with a timm-layout model.safetensors [default: timm/<arch>[_bn].tv_in1k].
    #[arg(long, value_name = "ORG/NAME")]
    repo: Option<String>,
    /// Branch, tag or commit of the repository.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Never draw a progress bar (there is none anyway when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    model: ModelOptions,
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// A safetensors state dict in the torchvision, timm or article layout (or a file of ours).
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    #[command(flatten)]
    model: ModelOptions,
}

const FILENAME: &str = "model.safetensors";

fn fetch_weights(args: FetchArgs) -> Result<()> {
    let expected_arch = format!(
        "vgg{}{}",
        args.arch.depth(),
        if args.bn { "_bn" } else { "" }
    );
    let repo = args
        .repo
        .clone()
        .unwrap_or_else(|| xtask::timm_repo(args.arch.depth(), args.bn));
    let hub_config = HubConfig::from_env()?;
    let file = HubFile::new(&repo, &args.revision, FILENAME);
    let fetched = hub::fetch(&hub_config, &file, !args.no_progress)?;
    let source = convert::read_source(&fetched.path)?;
    if args.repo.is_none() && source.config.arch_name() != expected_arch {
        bail!(
            "{repo} holds a {}, not the {expected_arch} asked for",
            source.config.arch_name()
        );
    }
    if source.sha256 != fetched.sha256 {
        bail!(
            "{} changed while it was read (sha256 {} then {})",
            fetched.path.display(),
            fetched.sha256,
            source.sha256
        );
    }
    let info = serde_json::json!({
        "repo": repo,
        "revision": args.revision,
        "commit": fetched.commit,
        "file": FILENAME,
        "layout": source.layout,
    });
    convert::convert_and_write(source, info, &args.model)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::FetchWeights(args) => fetch_weights(args),
        Task::Convert(args) => convert::convert_file(&args.from, &args.model).map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
