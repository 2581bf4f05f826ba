//! `la-cli summary`: the layer table of a model given by flags or by a weights file.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;

use crate::model_args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Summarise the model stored in this weights file (its config; flags are ignored).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Input image side in pixels.
    #[arg(long, default_value_t = 224)]
    size: usize,
}

pub fn run(args: Args) -> Result<()> {
    let config = match &args.weights {
        Some(path) => la_vgg::load_weights(path, &Device::Cpu)?.metadata.config,
        None => args.model.config(args.size)?,
    };
    let min = 1usize << config.blocks.len();
    if args.size < min {
        anyhow::bail!(
            "--size {} is too small: {} max-pools need at least {min} pixels",
            args.size,
            config.blocks.len()
        );
    }
    let attention = config
        .attention_config()
        .map_or("no".to_string(), |a| a.kind.to_string());
    println!(
        "{} with {attention} attention, {} head, {} classes, {}x{} input",
        config.arch_name(),
        config.head.name(),
        config.num_classes,
        args.size,
        args.size
    );
    println!("{}", la_vgg::summary::summarize(&config, args.size));
    Ok(())
}
