//! `la-cli attention-map`: how much one position of the image takes from every other, for
//! each attention module of a model, in one grid over the original image.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::gradcam::{block_index, rows, ModelAndImage};
use crate::heatmap::{draw, Panel, Picture};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  la-cli attention-map --weights runs/x/best.safetensors --image shirt.png
  la-cli attention-map --weights runs/x/best.safetensors --image shirt.png --block 2 --query 10,20")]
pub struct AttentionMapArgs {
    #[command(flatten)]
    input: ModelAndImage,
    /// Block (1-based) to draw [default: every block with an attention module, in one grid].
    #[arg(long)]
    block: Option<usize>,
    /// The query position as ROW,COL in the model's input pixels [default: the centre].
    #[arg(long, value_delimiter = ',')]
    query: Option<Vec<usize>>,
    #[arg(long, default_value = "attention.png")]
    out: PathBuf,
    #[arg(long, default_value_t = 0.6)]
    alpha: f32,
}

pub fn run_attention_map(args: AttentionMapArgs) -> Result<()> {
    let loaded = args.input.load()?;
    let vgg = &loaded.model.model;
    let blocks: Vec<usize> = match args.block {
        Some(b) => vec![block_index(Some(b), vgg.config().blocks.len())?],
        None => (0..vgg.config().blocks.len())
            .filter(|&b| vgg.attention(b).is_some())
            .collect(),
    };
    if blocks.is_empty() {
        bail!("{} has no attention modules", args.input.weights.display());
    }
    let size = loaded.model.input_size;
    let (row, col) = match args.query.as_deref() {
        Some([r, c]) if *r < size && *c < size => (*r, *c),
        Some(q) => bail!("--query {q:?}: expected ROW,COL inside the {size}x{size} input"),
        None => (size / 2, size / 2),
    };
    let taps = vgg.forward_intermediates(&loaded.input, &blocks, false)?;
    let mut panels = Vec::new();
    for (&block, tap) in blocks.iter().zip(&taps.blocks) {
        let Some(module) = vgg.attention(block) else {
            bail!("block {} has no attention module", block + 1);
        };
        let (_, _, h, w) = tap.attention_input.dims4()?;
        let index = (row * h / size) * w + col * w / size;
        let weights = module
            .attention_row(&tap.attention_input, index)?
            .reshape((h, w))?;
        let scalar = |t: candle_core::Tensor| -> Result<f64> {
            Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
        };
        let max = scalar(weights.max_all()?)?;
        // Linformer's weights (taken back through F) may be negative: scale by the largest
        // magnitude, so the picture shows where the position takes most from.
        let largest = scalar(weights.abs()?.max_all()?)?;
        let map = (weights / largest.max(f64::MIN_POSITIVE))?;
        println!(
            "block {}: {} attention ({h}x{w} map), query at pixel ({row}, {col}) = token {index}: max weight {max:.4}",
            block + 1,
            module.kind(),
        );
        panels.push(Panel {
            title: format!("block {} ({h}x{w})", block + 1),
            note: Some(format!("{} attention, max weight {max:.3}", module.kind())),
            map: Some(rows(&map)?),
            marker: Some((
                (row as f64 + 0.5) / size as f64,
                (col as f64 + 0.5) / size as f64,
            )),
        });
    }
    let picture = Picture {
        original: &loaded.original,
        region: loaded.region,
        heading: format!(
            "{}: attention of the position ({row}, {col}) of the {size}x{size} input",
            args.input.file_name()
        ),
        columns: panels.len().min(3),
        panels,
        alpha: args.alpha,
    };
    draw(&picture, &args.out)?;
    println!("picture: {}", args.out.display());
    Ok(())
}
