//! VGG16 training-step and inference throughput on burn's CPU backends (ndarray, Flex).
//!
//! Options and output mirror bench/reference/bench_train.py and bench_infer.py, so the
//! same parsers read them; the last line is "images/s: <float>" (timed steps only).

use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Int, Tensor};
use clap::{Parser, ValueEnum};

/// burn exports no version constant; keep in step with the pin in Cargo.toml.
const BURN_VERSION: &str = "0.22.1";

/// A max-pool in the feature config (torchvision's "M").
const M: usize = 0;
/// torchvision's VGG16 ("D") feature config.
const VGG16_CFG: [usize; 18] = [
    64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M,
];

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Train,
    Infer,
}

/// burn's CPU backends: ndarray (deprecated in 0.22) and Flex, its pure-Rust successor.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    Ndarray,
    Flex,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Head {
    /// Global average pool + Linear(512, classes); the reference scripts call it "compact".
    #[value(alias = "compact")]
    Cifar,
    /// 7x7 adaptive average pool + 25088-4096-4096-classes with ReLU and Dropout(0.5).
    Imagenet,
}

/// Only plain VGG16: accepted so command lines written for the reference scripts still parse.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Model {
    Vgg16,
}

#[derive(Parser, Debug)]
#[command(about = "VGG16 train/inference images/s with burn's ndarray CPU backend")]
struct Args {
    #[arg(long, value_enum, default_value_t = Mode::Train)]
    mode: Mode,
    #[arg(long, value_enum, default_value_t = Model::Vgg16)]
    model: Model,
    #[arg(long, value_enum, default_value_t = Backend::Ndarray)]
    backend: Backend,
    #[arg(long, value_enum, default_value_t = Head::Imagenet)]
    head: Head,
    #[arg(long, default_value_t = 32)]
    size: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, visible_alias = "num-classes", default_value_t = 100)]
    classes: usize,
    /// Sets rayon's global pool and matrixmultiply's own pool (which caps itself at 4).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    /// 0 matches the reference (SGD, momentum 0.9, no weight decay).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
}

#[derive(Module, Debug)]
struct Vgg16 {
    features: Vec<Conv2d>,
    pool: MaxPool2d,
    avgpool: AdaptiveAvgPool2d,
    /// One layer for the cifar head, three for the imagenet head.
    classifier: Vec<Linear>,
    dropout: Dropout,
}

impl Vgg16 {
    fn new(head: Head, classes: usize, device: &Device) -> Self {
        let mut features = Vec::new();
        let mut c_in = 3;
        for &c in VGG16_CFG.iter().filter(|&&c| c != M) {
            let conv = Conv2dConfig::new([c_in, c], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device);
            features.push(conv);
            c_in = c;
        }
        let (pooled, widths) = match head {
            Head::Cifar => ([1, 1], vec![512, classes]),
            Head::Imagenet => ([7, 7], vec![512 * 7 * 7, 4096, 4096, classes]),
        };
        let classifier = widths
            .windows(2)
            .map(|w| LinearConfig::new(w[0], w[1]).init(device))
            .collect();
        Self {
            features,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            avgpool: AdaptiveAvgPool2dConfig::new(pooled).init(),
            classifier,
            dropout: DropoutConfig::new(0.5).init(),
        }
    }

    /// Dropout is a no-op on a device without autodiff, i.e. in infer mode.
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let mut convs = self.features.iter();
        let mut x = x;
        for &c in VGG16_CFG.iter() {
            x = match c {
                M => self.pool.forward(x),
                _ => relu(convs.next().expect("one conv per channel entry").forward(x)),
            };
        }
        let mut x: Tensor<2> = self.avgpool.forward(x).flatten(1, 3);
        let last = self.classifier.len() - 1;
        for (i, fc) in self.classifier.iter().enumerate() {
            x = fc.forward(x);
            if i < last {
                x = self.dropout.forward(relu(x));
            }
        }
        x
    }
}

/// burn initialises parameters lazily on first use; reading each one here keeps that
/// cost out of the first measured step even with --warmup 0.
struct Materialize;

impl ModuleVisitor for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}

fn main() {
    let args = Args::parse();
    if [args.steps, args.batch, args.classes, args.threads].contains(&0) {
        eprintln!("--steps, --batch, --classes and --threads must be at least 1");
        std::process::exit(2);
    }
    configure_threads(args.threads);

    let train = matches!(args.mode, Mode::Train);
    let device = if train {
        cpu_device(args.backend).autodiff()
    } else {
        cpu_device(args.backend)
    };
    device.seed(args.seed);
    let model = Vgg16::new(args.head, args.classes, &device);
    model.visit(&mut Materialize);
    let x = Tensor::<4>::random(
        [args.batch, 3, args.size, args.size],
        Distribution::Normal(0.0, 1.0),
        &device,
    );

    println!(
        "model={} head={} mode={} params={} size={} batch={} classes={} threads={} \
         (rayon {}, matrixmultiply {}) burn {BURN_VERSION} {}",
        value_name(args.model),
        value_name(args.head),
        value_name(args.mode),
        model.num_params(),
        args.size,
        args.batch,
        args.classes,
        args.threads,
        rayon::current_num_threads(),
        args.threads.min(4),
        value_name(args.backend),
    );

    let times = match args.mode {
        Mode::Train => train_steps(model, x, &args, &device),
        Mode::Infer => infer_steps(model, x, &args),
    };

    let total: f64 = times.iter().sum();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let unit = if train { "s/step" } else { "s/batch" };
    println!(
        "mean {:.3} {unit}, median {:.3} {unit}, min {:.3} {unit}",
        total / times.len() as f64,
        sorted[sorted.len() / 2],
        sorted[0],
    );
    println!("peak RSS: {:.2} GiB", peak_rss_gib());
    println!("images/s: {:.2}", (args.batch * times.len()) as f64 / total);
}

/// Must run before any burn call: rayon's global pool can be set only once, before first
/// use, and matrixmultiply reads MATMUL_NUM_THREADS once, at its first sgemm.
fn configure_threads(threads: usize) {
    // burn-ndarray's default "multi-threads" feature turns on matrixmultiply's "threading",
    // a thread pool of its own that would otherwise size itself to the physical cores.
    std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("rayon's global pool was already initialised");
}

/// burn 0.22 deprecates ndarray in favour of Flex; both are measured, as users have both.
#[allow(deprecated)]
fn cpu_device(backend: Backend) -> Device {
    match backend {
        Backend::Ndarray => Device::ndarray(),
        Backend::Flex => Device::flex(),
    }
}

fn train_steps(mut model: Vgg16, x: Tensor<4>, args: &Args, device: &Device) -> Vec<f64> {
    let labels = random_labels(args.batch, args.classes, args.seed);
    let y = Tensor::<1, Int>::from_ints(labels.as_slice(), device);
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    // dampening 0 (burn defaults to 0.1) so the update is torch.optim.SGD's.
    let momentum = MomentumConfig::new().with_momentum(0.9).with_dampening(0.0);
    let weight_decay =
        (args.weight_decay > 0.0).then_some(WeightDecayConfig::new(args.weight_decay));
    let mut optim = SgdConfig::new()
        .with_momentum(Some(momentum))
        .with_weight_decay(weight_decay)
        .init();

    let mut times = Vec::with_capacity(args.steps);
    for i in 0..args.warmup + args.steps {
        let t = Instant::now();
        let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(args.lr, model, grads);
        // Reading the loss back waits for the step, as loss.item() does in the reference.
        let loss: f32 = loss.into_scalar();
        let secs = t.elapsed().as_secs_f64();
        let extra = format!("  loss {loss:.4}");
        report(i, args.warmup, secs, &extra, &mut times);
    }
    times
}

fn infer_steps(model: Vgg16, x: Tensor<4>, args: &Args) -> Vec<f64> {
    let mut times = Vec::with_capacity(args.steps);
    for i in 0..args.warmup + args.steps {
        let t = Instant::now();
        let out = model.forward(x.clone());
        // Reading the logits back makes sure the forward has finished on any backend.
        let _logits = out.into_data();
        let secs = t.elapsed().as_secs_f64();
        report(i, args.warmup, secs, "", &mut times);
    }
    times
}

/// Prints "warmup i: ..." or "step i: ..." like the reference scripts; keeps timed steps.
fn report(i: usize, warmup: usize, secs: f64, extra: &str, times: &mut Vec<f64>) {
    if i < warmup {
        println!("warmup {i}: {secs:.3} s{extra}");
    } else {
        println!("step {}: {secs:.3} s{extra}", i - warmup);
        times.push(secs);
    }
}

/// Fixed labels in 0..classes (splitmix64): they only need to be reproducible.
fn random_labels(n: usize, classes: usize, seed: u64) -> Vec<i32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % classes as u64) as i32
        })
        .collect()
}

fn value_name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_owned())
}

/// VmHWM (peak resident set) from /proc/self/status, in GiB; NaN where unavailable.
fn peak_rss_gib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib / (1024.0 * 1024.0))
}
