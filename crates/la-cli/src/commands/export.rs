//! `la-cli export`: a weights file of ours as a PyTorch state dict (safetensors) in the
//! article's, torchvision's or timm's layout, or as an ONNX graph.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::ValueEnum;
use la_vgg::export::Layout;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The article's Sequential with its attention modules (softmax attention or none).
    Article,
    /// torchvision's vgg11..vgg19[_bn] (plain models with the ImageNet head, width 1).
    Torchvision,
    /// timm's vgg11..vgg19[_bn] (the same models).
    Timm,
    /// An ONNX graph (opset 17) of any model, every attention kind included, for inputs of
    /// --size pixels.
    Onnx,
}

impl Format {
    fn layout(self) -> Option<Layout> {
        match self {
            Format::Article => Some(Layout::Article),
            Format::Torchvision => Some(Layout::Torchvision),
            Format::Timm => Some(Layout::Timm),
            Format::Onnx => None,
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// A weights file of ours (best.safetensors, last.safetensors, an imported file).
    #[arg(long)]
    weights: PathBuf,
    #[arg(long, value_enum)]
    format: Format,
    /// Where to write the export (safetensors or .onnx; written atomically).
    #[arg(long)]
    out: PathBuf,
    /// ONNX: the input side in pixels [default: the file's input size, else 224].
    #[arg(long)]
    size: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    let weights = la_vgg::load_weights(&args.weights, &Device::Cpu)?;
    let config = &weights.metadata.config;
    let Some(layout) = args.format.layout() else {
        let size = args.size.or(weights.metadata.input_size).unwrap_or(224);
        let bytes = la_vgg::onnx::export(config, &weights.tensors, size)
            .with_context(|| format!("{}: cannot export", args.weights.display()))?;
        la_core::write_atomically(&args.out, &bytes)?;
        println!(
            "{} as ONNX (opset {}, input [batch, 3, {size}, {size}], output logits) written to {}",
            config.arch_name(),
            la_vgg::onnx::OPSET,
            args.out.display()
        );
        return Ok(());
    };
    let tensors = la_vgg::export::state_dict(layout, config, &weights.tensors)
        .with_context(|| format!("{}: cannot export", args.weights.display()))?;
    // What a reader needs to build the PyTorch model; load_state_dict ignores it.
    let builder = la_vgg::export::torchvision_builder(Layout::Torchvision, config).ok();
    let mut metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("layout".to_string(), layout.name().to_string()),
        ("num_classes".to_string(), config.num_classes.to_string()),
        ("config".to_string(), serde_json::to_string(config)?),
    ]);
    if let Some(builder) = &builder {
        metadata.insert("builder".into(), builder.clone());
    }
    la_vgg::save_tensors(&args.out, &tensors, Some(metadata))?;
    let how = match (args.format, &builder) {
        (Format::Torchvision, Some(b)) => {
            format!(
                "torchvision.models.{b}(num_classes={}).load_state_dict(...)",
                config.num_classes
            )
        }
        (Format::Timm, Some(b)) => format!(
            "timm.create_model(\"{b}\", num_classes={}).load_state_dict(...)",
            config.num_classes
        ),
        _ => {
            "bench/reference/seed_model.py VGG(..., mode=\"intended\").load_state_dict(...)".into()
        }
    };
    println!(
        "{} tensors in the {} layout written to {} (load with {how})",
        tensors.len(),
        layout,
        args.out.display()
    );
    Ok(())
}
