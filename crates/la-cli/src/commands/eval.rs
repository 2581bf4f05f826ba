//! `la-cli eval`: top-1/top-5, per-class accuracy and the confusion matrix (CSV and PNG).

use std::path::PathBuf;

use anyhow::{Context, Result};
use la_data::{Loader, LoaderConfig};

use crate::data_args::{open_data, DataKind};
use crate::device::{parse_device, set_threads};
use crate::model_file::load_model;
use crate::precision::{apply_precision, PrecisionArg};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  la-cli eval --run runs/fashion-mnist-vgg16_bn-softmax-20261125-101500\n  la-cli eval --weights best.safetensors --data cifar10 --data-dir data/cifar-10-batches-bin"
)]
pub struct Args {
    /// A run directory: evaluates its best.safetensors on its validation data.
    #[arg(long, required_unless_present = "weights")]
    run: Option<PathBuf>,
    /// A weights file (with --data and --data-dir).
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, value_enum)]
    data: Option<DataKind>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Where confusion.csv and confusion.png go [default: the run directory, or beside the weights].
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Products of the convs and matmuls: auto (tf32 on a CUDA GPU, f32 elsewhere), f32,
    /// tf32 (CUDA) or bf16 (a CPU with AVX512_BF16).
    #[arg(long, value_enum, default_value = "auto")]
    precision: PrecisionArg,
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    set_threads(args.threads)?;
    let device = parse_device(&args.device)?;
    apply_precision(args.precision, &device)?;
    let (weights, data, data_dir, val_dir, val_fraction, seed, skip_bad) = match &args.run {
        Some(run) => {
            let o = crate::commands::train::read_options(run)?;
            let weights = args
                .weights
                .clone()
                .unwrap_or_else(|| run.join(la_train::checkpoint::BEST));
            (
                weights,
                args.data.or(o.data).unwrap_or(DataKind::Digits),
                args.data_dir.clone().or(o.data_dir),
                o.val_dir,
                o.val_fraction.unwrap_or(0.2),
                o.seed.unwrap_or(0),
                o.skip_bad.unwrap_or(false),
            )
        }
        None => {
            let weights = args
                .weights
                .clone()
                .expect("clap requires --weights without --run");
            let data = args
                .data
                .context("--weights needs --data (and --data-dir)")?;
            (weights, data, args.data_dir.clone(), None, 0.2, 0, false)
        }
    };
    let loaded = load_model(&weights, None, &device)?;
    // The same split as training: the run's validation folder, or its seeded held-out part.
    let dataset = open_data(
        data,
        data_dir.as_deref(),
        val_dir.as_deref(),
        val_fraction,
        seed,
        skip_bad,
    )?
    .val;
    if dataset.classes().len() == loaded.classes.len()
        && dataset.classes() != loaded.classes.as_slice()
    {
        anyhow::bail!(
            "{} was trained on classes {:?}, the {} data has {:?}: outputs would be matched to the wrong names",
            weights.display(),
            loaded.classes,
            data.name(),
            dataset.classes()
        );
    }
    if dataset.classes().len() != loaded.classes.len() {
        anyhow::bail!(
            "{} has {} classes, the {} data {}",
            weights.display(),
            loaded.classes.len(),
            data.name(),
            dataset.classes().len()
        );
    }
    let norm = loaded.normalization;
    let config = LoaderConfig {
        batch_size: args.batch_size as usize,
        shuffle: false,
        drop_last: false,
        seed: 0,
        threads: args.threads.unwrap_or(0),
        prefetch: 4,
    };
    let loader = Loader::new(
        dataset.clone(),
        la_data::Pipeline::eval(loaded.input_size, norm),
        config,
        device.clone(),
    )?;
    let report = la_train::evaluate(&loaded.model, &loader, loaded.classes.len(), |_| {})?;
    println!(
        "{}: {} images of {} ({})",
        weights.display(),
        report.count,
        data.name(),
        if args.run.is_some() {
            "the run's validation data: the test split, or the held-out part"
        } else {
            "the test split, or the held-out part"
        }
    );
    println!(
        "top-1 {:.2} %  top-5 {:.2} %  loss {:.4}",
        report.top1 * 100.0,
        report.top5 * 100.0,
        report.loss
    );
    println!("per-class accuracy:");
    for (name, acc) in loaded.classes.iter().zip(report.per_class()) {
        println!(
            "  {name:<24} {}",
            acc.map_or("no examples".to_string(), |a| format!("{:.2} %", a * 100.0))
        );
    }
    let out = args
        .out
        .clone()
        .or_else(|| args.run.clone())
        .unwrap_or_else(|| weights.parent().map(PathBuf::from).unwrap_or_default());
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut csv = String::from("true\\predicted");
    // Class names come from folder names: quote them so commas cannot shift the columns.
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    for name in &loaded.classes {
        csv.push(',');
        csv.push_str(&quote(name));
    }
    csv.push('\n');
    for (name, row) in loaded.classes.iter().zip(&report.confusion) {
        csv.push_str(&quote(name));
        for v in row {
            csv.push_str(&format!(",{v}"));
        }
        csv.push('\n');
    }
    la_core::write_atomically(&out.join("confusion.csv"), csv.as_bytes())?;
    la_train::plot::confusion_matrix(
        &out.join("confusion.png"),
        &report.confusion,
        &loaded.classes,
    )?;
    println!(
        "confusion matrix: {} and {}",
        out.join("confusion.csv").display(),
        out.join("confusion.png").display()
    );
    Ok(())
}
