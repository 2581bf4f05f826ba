//! `la-cli gradcam` and `la-cli attention-map`: pictures of what the model looks at.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::device::parse_device;
use crate::heatmap::overlay;
use crate::model_file::{load_model, LoadedModel};
use candle_core::Tensor;

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  la-cli gradcam --weights runs/x/best.safetensors --image shirt.png --out cam.png"
)]
pub struct GradcamArgs {
    #[command(flatten)]
    input: ModelAndImage,
    /// Block (1-based) whose output is explained [default: the last].
    #[arg(long)]
    block: Option<usize>,
    /// Class index to explain [default: the predicted class].
    #[arg(long)]
    class: Option<usize>,
    #[arg(long, default_value = "gradcam.png")]
    out: PathBuf,
    /// Weight of the heat map in the blend.
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
}

/// The model and the image both pictures start from.
#[derive(clap::Args)]
struct ModelAndImage {
    #[arg(long)]
    weights: PathBuf,
    #[arg(long)]
    image: PathBuf,
    /// Input side [default: the weights file's, else 224].
    #[arg(long)]
    size: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl ModelAndImage {
    fn load(&self) -> Result<(LoadedModel, Tensor, la_data::Image)> {
        let device = parse_device(&self.device)?;
        let loaded = load_model(&self.weights, self.size, &device)?;
        let (x, picture) = loaded.prepare(&self.image)?;
        Ok((loaded, x, picture))
    }
}

fn block_index(block: Option<usize>, blocks: usize) -> Result<usize> {
    match block {
        None => Ok(blocks - 1),
        Some(b) if (1..=blocks).contains(&b) => Ok(b - 1),
        Some(b) => bail!("--block {b}: the model has blocks 1 to {blocks}"),
    }
}

fn rows(t: &candle_core::Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_vec2()?)
}

pub fn run_gradcam(args: GradcamArgs) -> Result<()> {
    let (loaded, x, picture) = args.input.load()?;
    let block = block_index(args.block, loaded.model.config().blocks.len())?;
    let cam = loaded.model.grad_cam(&x, block, args.class)?;
    overlay(&picture, &rows(&cam.map)?, args.alpha, None, &args.out)?;
    let probs: Vec<f32> = candle_nn::ops::softmax(&cam.logits, 1)?
        .squeeze(0)?
        .to_vec1()?;
    println!(
        "Grad-CAM of class {} ({}, p = {:.3}) on block {} ({}x{} map): {}",
        cam.class,
        loaded.classes[cam.class],
        probs[cam.class],
        block + 1,
        cam.map.dim(0)?,
        cam.map.dim(1)?,
        args.out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  la-cli attention-map --weights runs/x/best.safetensors --image shirt.png --block 1 --query 16,16"
)]
pub struct AttentionMapArgs {
    #[command(flatten)]
    input: ModelAndImage,
    /// Block (1-based) whose softmax attention is drawn [default: the first with attention].
    #[arg(long)]
    block: Option<usize>,
    /// The query position as ROW,COL in input pixels [default: the centre].
    #[arg(long, value_delimiter = ',')]
    query: Option<Vec<usize>>,
    #[arg(long, default_value = "attention.png")]
    out: PathBuf,
    #[arg(long, default_value_t = 0.6)]
    alpha: f32,
}

pub fn run_attention_map(args: AttentionMapArgs) -> Result<()> {
    let (loaded, x, picture) = args.input.load()?;
    let config = loaded.model.config();
    let block = match args.block {
        Some(b) => block_index(Some(b), config.blocks.len())?,
        None => match &config.attention {
            Some(sites) => sites.blocks[0],
            None => bail!("{} has no attention modules", args.input.weights.display()),
        },
    };
    let Some(module) = loaded.model.attention(block) else {
        bail!("block {} has no attention module", block + 1);
    };
    let taps = loaded.model.forward_intermediates(&x, &[block], false)?;
    let input = &taps.blocks[0].attention_input;
    let (_, _, h, w) = input.dims4()?;
    let size = loaded.input_size;
    let (row, col) = match args.query.as_deref() {
        Some([r, c]) if *r < size && *c < size => (*r, *c),
        Some(q) => bail!("--query {q:?} is outside the {size}x{size} input"),
        None => (size / 2, size / 2),
    };
    let index = (row * h / size) * w + col * w / size;
    let weights = module.attention_row(input, index)?.reshape((h, w))?;
    let max = weights.max_all()?.to_scalar::<f32>()?;
    let map = (weights / max.max(f32::MIN_POSITIVE) as f64)?;
    overlay(
        &picture,
        &rows(&map)?,
        args.alpha,
        Some((row, col)),
        &args.out,
    )?;
    println!(
        "{} attention of block {} ({}x{} map), query at pixel ({row}, {col}) = token {index}: max weight {max:.4}: {}",
        module.kind(),
        block + 1,
        h,
        w,
        args.out.display()
    );
    Ok(())
}
