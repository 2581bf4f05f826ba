//! `la-cli bench`: training-step or inference images/s of a model on random data, with a
//! per-block breakdown of the forward pass and, on the CPU, the GFLOP/s achieved against the
//! machine's peak. The last line printed is `images/s: X`, like the PyTorch reference
//! scripts, so the two can be compared in one run.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, ModuleT, Tensor};

use crate::device::{parse_device, set_threads};
use crate::model_args::ModelArgs;
use crate::precision::{apply_precision, PrecisionArg};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Forward + backward + SGD step (momentum 0.9), cross-entropy loss.
    Train,
    /// Forward only, evaluation mode.
    Infer,
}

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  la-cli bench --mode train --attention softmax --head cifar --classes 100 --size 32 --batch 64\n  la-cli bench --mode infer --attention none --size 224 --batch 1"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum, default_value = "train")]
    mode: Mode,
    #[arg(long, default_value_t = 32)]
    size: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Timed steps (after the warm-up).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Products of the convs and matmuls: auto (tf32 on a CUDA GPU, f32 elsewhere), f32
    /// (fp32), tf32 (CUDA) or bf16 operands with f32 sums (CPU with AVX512_BF16).
    #[arg(long, value_enum, default_value = "auto")]
    precision: PrecisionArg,
    /// Skip the per-block breakdown.
    #[arg(long)]
    no_breakdown: bool,
}

fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

fn sync(t: &Tensor) -> Result<()> {
    // Reading one value waits for the device to finish.
    t.flatten_all()?
        .narrow(0, 0, 1)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    set_threads(args.threads)?;
    let device = parse_device(&args.device)?;
    let precision = apply_precision(args.precision, &device)?;
    if args.batch == 0 || args.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    let config = args.model.config(args.size)?;
    let min = 1usize << config.blocks.len();
    if args.size < min {
        bail!(
            "--size {} is too small for {} pools (at least {min})",
            args.size,
            config.blocks.len()
        );
    }
    let (trainable_model, varmap) =
        la_vgg::trainable(config.clone(), Default::default(), 0, DType::F32, &device)?;
    // Inference runs on plain tensors, as `la-cli predict` (weights from a file) does and
    // as the PyTorch reference runs under `torch.inference_mode()`: with trainable variables
    // every op would also record the graph for a backward pass.
    let model = match args.mode {
        Mode::Train => trainable_model,
        Mode::Infer => {
            let tensors = varmap
                .data()
                .lock()
                .map_err(|_| anyhow::anyhow!("weights lock poisoned"))?
                .iter()
                .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
                .collect();
            let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &device);
            la_vgg::Vgg::new(config.clone(), vb)?
        }
    };
    let params = la_train::optim::param_groups(&varmap, &la_train::optim::GroupRules::default());
    let mut optimizer = la_train::Optimizer::new(
        la_train::OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        },
        params,
    );
    let x = Tensor::randn(0f32, 1.0, (args.batch, 3, args.size, args.size), &device)?;
    let labels: Vec<u32> = (0..args.batch)
        .map(|i| ((i * 7919) % config.num_classes) as u32)
        .collect();
    // On the device once, as the data loader uploads a batch's labels with its images.
    let labels = Tensor::from_vec(labels, args.batch, &device)?;
    // The phases of a step are timed by waiting for the device after each; on a GPU that wait
    // is a stall the step itself does not have, so there only the whole step is timed.
    let timed_phases = device.is_cpu();
    let summary = la_vgg::summary::summarize(&config, args.size);
    println!(
        "model={} attention={} head={} params={} size={} batch={} classes={} mode={:?} threads={} device={} precision={}",
        config.arch_name(),
        config.attention_config().map_or("none".into(), |a| a.kind.to_string()),
        config.head.name(),
        la_vgg::summary::thousands(summary.params),
        args.size,
        args.batch,
        config.num_classes,
        args.mode,
        rayon::current_num_threads(),
        crate::device::describe(&device),
        precision,
    );

    // One step; in training mode, the seconds of its forward, backward and optimiser phases.
    let mut step = || -> Result<Option<[f64; 3]>> {
        match args.mode {
            Mode::Train => {
                let start = Instant::now();
                let logits = model.forward_t(&x, true)?;
                if timed_phases {
                    sync(&logits)?;
                }
                let forward = start.elapsed().as_secs_f64();
                let loss = la_kernels::loss::cross_entropy_labels(&logits, &labels, 0.0)?;
                let grads = loss.backward()?;
                let backward = start.elapsed().as_secs_f64() - forward;
                optimizer.step(&grads, 0.01)?;
                sync(&loss)?;
                let update = start.elapsed().as_secs_f64() - forward - backward;
                Ok(timed_phases.then_some([forward, backward, update]))
            }
            Mode::Infer => sync(&model.forward_t(&x, false)?).map(|_| None),
        }
    };
    let phases = |p: Option<[f64; 3]>| match p {
        Some([f, b, u]) => format!(" (forward {f:.3}, loss + backward {b:.3}, SGD {u:.3})"),
        None => String::new(),
    };
    for i in 0..args.warmup {
        let t = Instant::now();
        let p = step()?;
        println!(
            "warmup {i}: {:.3} s{}",
            t.elapsed().as_secs_f64(),
            phases(p)
        );
    }
    let mut times = Vec::with_capacity(args.steps);
    for i in 0..args.steps {
        let t = Instant::now();
        let p = step()?;
        times.push(t.elapsed().as_secs_f64());
        println!("step {i}: {:.3} s{}", times[i], phases(p));
    }
    if !args.no_breakdown {
        breakdown(&model, &x)?;
    }
    let total: f64 = times.iter().sum();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "mean {:.3} s/step, median {:.3} s/step, min {:.3} s/step",
        total / times.len() as f64,
        sorted[sorted.len() / 2],
        sorted[0]
    );
    if let Some(gib) = peak_rss_gib() {
        println!("peak RSS: {gib:.2} GiB");
    }
    if let Some(bytes) = la_kernels::device_memory::peak(&device)? {
        println!(
            "peak GPU memory: {:.2} GiB (tensors and workspaces, as torch.cuda.max_memory_allocated)",
            bytes as f64 / (1u64 << 30) as f64
        );
    }
    let images_per_second = args.batch as f64 * times.len() as f64 / total;
    let gflops = step_flops_per_image(summary.macs, args.mode) * images_per_second / 1e9;
    let peak = if device.is_cpu() {
        crate::cpu_peak::CpuPeak::of_this_machine(rayon::current_num_threads())
    } else {
        None
    };
    match peak {
        Some(peak) => println!(
            "GFLOP/s: {gflops:.1} ({:.0} % of the CPU's peak {}; direct-convolution FLOPs, \
             which Winograd's savings can take past 100 %)",
            100.0 * gflops / peak.gflops(),
            peak.describe()
        ),
        None => println!("GFLOP/s: {gflops:.1} (direct-convolution FLOPs)"),
    }
    println!("images/s: {images_per_second:.2}");
    Ok(())
}

/// FLOPs of one image's step, counted as the direct algorithms do: a multiply-add is 2
/// FLOPs; training adds the input and the weight gradients, each as large as the forward.
fn step_flops_per_image(macs: u64, mode: Mode) -> f64 {
    let passes = match mode {
        Mode::Train => 3.0,
        Mode::Infer => 1.0,
    };
    2.0 * macs as f64 * passes
}

/// Forward time of each block's convs, its attention module and its pool, and of the head,
/// in evaluation mode: the fastest of three passes after the timed steps (a single pass
/// carried first-touch costs, nearly twice the steady time for some parts). The model's own
/// forward pass runs; each layer's output is synchronised and timed as it is reported.
fn breakdown(model: &la_vgg::Vgg, x: &Tensor) -> Result<()> {
    const PASSES: usize = 3;
    let blocks = model.config().blocks.len();
    // Per block: convs, attention, pool; then the head. Fastest over the passes.
    let mut best = vec![[f64::INFINITY; 3]; blocks];
    let mut best_head = f64::INFINITY;
    for _ in 0..PASSES {
        let mut pass = vec![[0.0f64; 3]; blocks];
        let mut head = 0.0;
        let mut last = Instant::now();
        model.forward_observed(x, false, &mut |name, out| {
            sync(out).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let t = last.elapsed().as_secs_f64();
            let parts: Vec<&str> = name.split('.').collect();
            match parts.as_slice() {
                ["blocks", i, part, ..] => {
                    let slot = match *part {
                        "convs" => 0,
                        "attention" => 1,
                        _ => 2,
                    };
                    if let Ok(i) = i.parse::<usize>() {
                        pass[i][slot] += t;
                    }
                }
                _ => head += t,
            }
            last = Instant::now();
            Ok(())
        })?;
        for (b, p) in best.iter_mut().zip(&pass) {
            for (b, p) in b.iter_mut().zip(p) {
                *b = b.min(*p);
            }
        }
        best_head = best_head.min(head);
    }
    println!("forward breakdown (evaluation mode, fastest of {PASSES} passes):");
    let mut total = best_head;
    for (i, [convs, attention, pool]) in best.iter().enumerate() {
        println!(
            "  block {}: convs {:>8.2} ms{}  pool {:>6.2} ms",
            i + 1,
            convs * 1e3,
            if model.attention(i).is_some() {
                format!("  attention {:>8.2} ms", attention * 1e3)
            } else {
                String::new()
            },
            pool * 1e3
        );
        total += convs + attention + pool;
    }
    println!(
        "  head: {:.2} ms; forward total {:.2} ms",
        best_head * 1e3,
        total * 1e3
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_training_step_counts_three_passes_of_two_flops_a_mac() {
        // VGG16 at 224x224: 15.5 GMAC, 31 GFLOP forward, 93 GFLOP a training step.
        assert_eq!(step_flops_per_image(15_500_000_000, Mode::Infer), 31e9);
        assert_eq!(step_flops_per_image(15_500_000_000, Mode::Train), 93e9);
    }
}
