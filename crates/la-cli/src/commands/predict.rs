//! `la-cli predict`: the top classes of image files.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{ModuleT, D};

use crate::device::parse_device;
use crate::model_file::load_model;
use crate::precision::{apply_precision, PrecisionArg};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  la-cli predict --weights runs/x/best.safetensors --image shirt.png\n  la-cli predict --weights weights/vgg16-none-imagenet.safetensors --image a.jpg --image b.jpg --top-k 3 --json"
)]
pub struct Args {
    /// The model (architecture, classes and normalisation come from the file).
    #[arg(long)]
    weights: PathBuf,
    /// Image files (png, jpeg, bmp, webp), any size.
    #[arg(long = "image", required = true)]
    images: Vec<PathBuf>,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    top_k: u64,
    /// Print JSON: one object per image with its file, the top classes (index, name,
    /// probability) and every logit.
    #[arg(long)]
    json: bool,
    /// Input size override [default: the file's, else 224].
    #[arg(long)]
    size: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Products of the convs and matmuls: auto (tf32 on a CUDA GPU, f32 elsewhere), f32,
    /// tf32 (CUDA) or bf16 (a CPU with AVX512_BF16).
    #[arg(long, value_enum, default_value = "auto")]
    precision: PrecisionArg,
}

pub fn run(args: Args) -> Result<()> {
    let device = parse_device(&args.device)?;
    apply_precision(args.precision, &device)?;
    let loaded = load_model(&args.weights, args.size, &device)?;
    let mut results = Vec::new();
    for path in &args.images {
        let (x, _, _) = loaded.prepare(path)?;
        let logits = loaded.model.forward_t(&x, false)?;
        let raw: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let probs: Vec<f32> = candle_nn::ops::softmax(&logits, D::Minus1)?
            .squeeze(0)?
            .to_vec1()?;
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let top: Vec<serde_json::Value> = order
            .iter()
            .take(args.top_k as usize)
            .map(|&i| serde_json::json!({"class": i, "name": loaded.classes[i], "probability": probs[i]}))
            .collect();
        if !args.json {
            println!("{}:", path.display());
            for t in &top {
                println!(
                    "  {:>6.2} %  {} ({})",
                    t["probability"].as_f64().unwrap_or(0.0) * 100.0,
                    t["name"].as_str().unwrap_or(""),
                    t["class"]
                );
            }
        }
        results.push(
            serde_json::json!({"file": path.display().to_string(), "top": top, "logits": raw}),
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}
