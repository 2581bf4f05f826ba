//! `la-cli train`: build (or resume) a run from flags, a TOML file and presets, and train it.
//!
//! Every option is optional on the command line; the value used is the flag's, else the
//! `--config` file's, else the `--preset`'s, else the default (which trains VGG16 + softmax
//! attention on the embedded digits in a few minutes). The resolved options are written to
//! `<run>/options.json`, which is what `--resume` reads back.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use la_attention::AttentionInit;
use la_data::{AutoAugment, Loader, LoaderConfig, Mix, Pipeline};
use la_train::{OptimizerConfig, RunInfo, Schedule, TrainConfig, Trainer};
use la_vgg::Normalize;

use crate::data_args::{open_data, Data, DataKind};
use crate::device::{parse_device, set_threads};
use crate::model_args::HeadArg;
use crate::precision::apply_precision;
use crate::progress::BarObserver;

mod batch_dump;
mod defaults;
mod options;
mod presets;

use batch_dump::BatchDump;
use defaults::defaults;
pub use defaults::document_defaults;
use options::{merge, write_options, AugmentArg, AutoAugmentArg};
pub use options::{read_options, Options, ScheduleArg};
use presets::preset_options;

/// The seed of `--train-subset`'s draw: fixed, so that runs with different seeds see the same
/// images.
const TRAIN_SUBSET_SEED: u64 = 0;
pub use presets::Preset;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  la-cli train                                   # VGG16 + softmax attention on the built-in digits\n  la-cli train --data fashion-mnist --data-dir /usr/share/datasets/fashion-mnist --epochs 1\n  la-cli train --preset cifar100-article --data-dir data/cifar-100-binary --weights weights/vgg16-softmax-imagenet.safetensors\n  la-cli train --config run.toml --lr 0.01        # flags override the file\n  la-cli train --resume runs/digits-vgg16_bn-softmax-20261125-101500"
)]
pub struct Args {
    #[command(flatten)]
    options: Options,
    /// A TOML file of the same options (kebab-case keys, e.g. `batch-size = 128`).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Continue the run in this directory (or from one of its checkpoint-EPOCH.safetensors)
    /// with its saved options. Only --epochs (to train
    /// longer; a cosine schedule is then stretched over the new length), --max-steps,
    /// --device and --threads may be given with it.
    #[arg(long, conflicts_with_all = ["config", "preset"])]
    resume: Option<PathBuf>,
}

/// The value of an option that [`defaults`] always sets.
fn need<T: Clone>(value: &Option<T>) -> T {
    value
        .clone()
        .expect("the defaults layer sets every option read without a fallback")
}

/// Options with every default filled in (`o`), and those given by the user, a file or a
/// preset (`given`), which decide what a weights file's architecture may be overridden by.
struct Resolved {
    given: Options,
    o: Options,
}

impl Resolved {
    fn new(mut layered: Options) -> Result<Self> {
        // The older spelling of --attention-init: `true` is identity, `false` kaiming.
        if let Some(zero) = layered.zero_init_attention.take() {
            let old = if zero {
                AttentionInit::Identity
            } else {
                AttentionInit::Kaiming
            };
            match layered.attention_init {
                Some(new) if new != old => bail!(
                    "--attention-init {new} and --zero-init-attention {zero} disagree: give one"
                ),
                _ => layered.attention_init = Some(old),
            }
        }
        let fallback = defaults(&layered);
        Ok(Self {
            o: merge(layered.clone(), fallback),
            given: layered,
        })
    }
    fn data(&self) -> DataKind {
        need(&self.o.data)
    }
    fn seed(&self) -> u64 {
        need(&self.o.seed)
    }
    fn batch_size(&self) -> usize {
        need(&self.o.batch_size)
    }
    fn optimizer(&self) -> OptimizerConfig {
        match (
            need(&self.o.optimizer).default_config(),
            self.o.weight_decay,
        ) {
            (OptimizerConfig::Sgd { .. }, wd) => OptimizerConfig::Sgd {
                momentum: need(&self.o.momentum),
                nesterov: need(&self.o.nesterov),
                weight_decay: need(&wd),
            },
            (
                OptimizerConfig::AdamW {
                    beta1, beta2, eps, ..
                },
                wd,
            ) => OptimizerConfig::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay: need(&wd),
            },
        }
    }
    fn schedule(&self) -> Schedule {
        let gamma = need(&self.o.gamma);
        match need(&self.o.schedule) {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Step => Schedule::Step {
                step_epochs: need(&self.o.step_epochs),
                gamma,
            },
            ScheduleArg::Multistep => Schedule::MultiStep {
                milestones: need(&self.o.milestones),
                gamma,
            },
            ScheduleArg::Cosine => Schedule::Cosine {
                min_lr: Schedule::DEFAULT_MIN_LR,
            },
        }
    }
    fn train_config(&self) -> Result<TrainConfig> {
        let config = TrainConfig {
            epochs: need(&self.o.epochs),
            lr: need(&self.o.lr),
            optimizer: self.optimizer(),
            schedule: self.schedule(),
            warmup_epochs: need(&self.o.warmup_epochs),
            label_smoothing: need(&self.o.label_smoothing),
            grad_clip: self.o.grad_clip,
            grad_accum_steps: need(&self.o.grad_accum_steps),
            pretrained_lr_scale: need(&self.o.pretrained_lr_scale),
            layer_decay: self.o.layer_decay,
            freeze_backbone: need(&self.o.freeze_backbone),
            recovery_interval: self.o.recovery_interval,
            checkpoint_hist: self.o.checkpoint_hist,
            max_steps: self.o.max_steps,
            early_stop: self
                .o
                .early_stop_patience
                .map(|patience| la_train::EarlyStop {
                    metric: need(&self.o.early_stop_metric).metric(),
                    patience,
                }),
            ema: need(&self.o.model_ema).then(|| la_train::EmaConfig {
                decay: need(&self.o.model_ema_decay),
                warmup: need(&self.o.model_ema_warmup),
            }),
            tensorboard: need(&self.o.tensorboard),
            no_decay_bias_norm: TrainConfig::default().no_decay_bias_norm,
            sync_bn: need(&self.o.sync_bn),
            seed: self.seed(),
        };
        if config.epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        if config.grad_accum_steps == 0 {
            bail!("--grad-accum-steps must be at least 1");
        }
        Ok(config)
    }
    /// The automatic augmentation policy the flags ask for, checked.
    fn auto_augment(&self) -> Result<Option<AutoAugment>> {
        if self.o.auto_augment.is_some() && need(&self.o.augment) == AugmentArg::None {
            bail!("--auto-augment runs after the standard crops and flips; it cannot go with --augment none");
        }
        Ok(match self.o.auto_augment {
            None => None,
            Some(AutoAugmentArg::TrivialAugment) => Some(AutoAugment::trivial_augment_wide()),
            Some(AutoAugmentArg::RandAugment) => Some(
                AutoAugment::rand_augment(need(&self.o.ra_num_ops), need(&self.o.ra_magnitude))
                    .context("--ra-magnitude")?,
            ),
        })
    }
    /// The per-sample training transforms: the data set's standard ones or none, then the
    /// automatic augmentation policy, if any.
    fn train_pipeline(
        &self,
        size: usize,
        norm: Normalize,
        policy: Option<AutoAugment>,
    ) -> Pipeline {
        let pipeline = match need(&self.o.augment) {
            AugmentArg::Standard => self.data().train_pipeline(size, norm),
            AugmentArg::None => Pipeline::eval(size, norm),
        };
        match policy {
            Some(policy) => pipeline.then(policy),
            None => pipeline,
        }
    }
    fn mix(&self) -> Option<Mix> {
        match (self.o.mixup, self.o.cutmix) {
            (None, None) => None,
            (Some(alpha), None) => Some(Mix::MixUp { alpha }),
            (None, Some(alpha)) => Some(Mix::CutMix { alpha }),
            (Some(mixup_alpha), Some(cutmix_alpha)) => Some(Mix::Either {
                mixup_alpha,
                cutmix_alpha,
                prob_cutmix: need(&self.o.mixup_switch_prob) as f32,
            }),
        }
    }
    fn run_name(&self) -> String {
        self.o.name.clone().unwrap_or_else(|| {
            let bn = if need(&self.o.bn) { "_bn" } else { "" };
            format!(
                "{}-vgg{}{bn}-{}-{}",
                self.data().name(),
                need(&self.o.arch).depth(),
                need(&self.o.attention).kind().map_or("none", |k| k.name()),
                crate::timestamp()
            )
        })
    }
}

/// The run directory of a `--resume` argument: the directory itself, or the one holding a
/// kept `checkpoint-EPOCH.safetensors`.
fn run_dir_of(resume: &std::path::Path) -> &std::path::Path {
    match resume.parent() {
        Some(dir) if resume.is_file() => dir,
        _ => resume,
    }
}

pub fn run(args: Args) -> Result<()> {
    let collective = crate::ranks::join()?;
    let result = run_on(args, &collective);
    if let Err(e) = &result {
        crate::ranks::end_on_error(&*collective, e);
    }
    result
}

/// `la-cli train` as one of the ranks of `collective` (rank 0 of 1 without a launcher).
fn run_on(args: Args, collective: &Arc<dyn la_train::Collective>) -> Result<()> {
    let leader = collective.rank() == 0;
    let ranks = collective.size();
    let (options, resume) = match &args.resume {
        Some(dir) => {
            // Anything but a longer run or other machine settings would change the run.
            let given = serde_json::to_value(&args.options)?;
            if let Some((flag, _)) = given.as_object().into_iter().flatten().find(|(k, v)| {
                !v.is_null() && !matches!(k.as_str(), "epochs" | "max-steps" | "device" | "threads")
            }) {
                bail!("--{flag} cannot change a run being resumed: only --epochs, --max-steps, --device and --threads may be given with --resume");
            }
            let saved = read_options(run_dir_of(dir))?;
            // Only a longer run and the machine-related settings may change on resume.
            let mut o = saved;
            if let Some(e) = args.options.epochs {
                o.epochs = Some(e);
            }
            if let Some(m) = args.options.max_steps {
                o.max_steps = Some(m);
            }
            o.device = args.options.device.clone().or(o.device);
            o.threads = args.options.threads.or(o.threads);
            // A dump belongs to the command that wrote it: a resumed run must not replace it.
            o.dump_batches = None;
            (o, Some(dir.clone()))
        }
        None => {
            let file = match &args.config {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("{}: cannot read", path.display()))?;
                    let file = toml::from_str::<Options>(&text)
                        .with_context(|| format!("{}: not a valid options file", path.display()))?;
                    file.check_numbers(&format!(" (in {})", path.display()))?;
                    file
                }
                None => Options::default(),
            };
            args.options.check_numbers("")?;
            let preset = args.preset.map(preset_options).unwrap_or_default();
            (merge(merge(args.options.clone(), file), preset), None)
        }
    };
    let r = Resolved::new(options)?;
    set_threads(r.o.threads)?;
    let device = parse_device(&crate::ranks::rank_device(&need(&r.o.device), ranks))?;
    apply_precision(need(&r.o.precision), &device)?;
    let collective = &crate::ranks::on_device(Arc::clone(collective), &device)?;

    // Data first: a missing data set fails before anything is written.
    let size = need(&r.o.size);
    if size < 32 {
        bail!("--size {size}: VGG's five 2x2 pools need inputs of at least 32x32");
    }
    let data = open_data(
        r.data(),
        r.o.data_dir.as_deref(),
        r.o.val_dir.as_deref(),
        need(&r.o.val_fraction),
        r.seed(),
        need(&r.o.skip_bad),
    )?;
    let data = match r.o.train_subset {
        Some(n) if n > data.train.len() => bail!(
            "--train-subset {n}: the training set has only {} images",
            data.train.len()
        ),
        Some(n) => Data {
            train: Arc::new(
                la_data::split(
                    data.train.clone(),
                    n as f64 / data.train.len() as f64,
                    TRAIN_SUBSET_SEED,
                )
                .0,
            ),
            val: data.val,
        },
        None => data,
    };
    let classes = data.train.classes().to_vec();
    let threads = r.o.threads.unwrap_or(0);
    let loader_config = |shuffle: bool, drop_last: bool| LoaderConfig {
        batch_size: r.batch_size(),
        shuffle,
        drop_last,
        seed: r.seed(),
        threads,
        prefetch: 4,
    };
    if r.batch_size() == 0 {
        bail!("--batch-size must be at least 1");
    }
    // Checked before the run directory is written.
    if data.train.len() < r.batch_size() {
        bail!(
            "the training split has {} images, fewer than one batch of --batch-size {}",
            data.train.len(),
            r.batch_size()
        );
    }
    if data.val.is_empty() {
        bail!("the validation split is empty (raise --val-fraction, or give --val-dir)");
    }
    let policy = r.auto_augment()?;
    if ranks > 1 && r.o.dump_batches.is_some() {
        bail!("--dump-batches writes the batches of one process; run it without mpirun");
    }
    if r.batch_size() < ranks {
        bail!(
            "--batch-size {} is the batch of all {ranks} ranks together: it needs at least one image per rank",
            r.batch_size()
        );
    }

    let mut trainer = match &resume {
        Some(dir) => {
            let mut t = Trainer::resume_on(dir, &device, Arc::clone(collective))?;
            t.info.train.epochs = need(&r.o.epochs);
            // A run stopped by --max-steps goes on when resumed with a larger one.
            t.info.train.max_steps = r.o.max_steps;
            if leader {
                // The options file is what the next --resume reads: keep it current.
                write_options(run_dir_of(dir), &r.o)?;
                eprintln!(
                    "resuming {} after epoch {} (step {})",
                    dir.display(),
                    t.state.epoch,
                    t.state.step
                );
            }
            t
        }
        None => {
            let (model_config, initial, normalization) = model_and_weights(&r, classes.len())?;
            let info = RunInfo {
                model: model_config,
                train: r.train_config()?,
                normalization,
                input_size: size,
                classes: classes.clone(),
            };
            // Every rank names the run as rank 0 does (the name holds the time).
            let mut name = r.run_name().into_bytes();
            collective.broadcast_bytes(&mut name, 0)?;
            let run_dir = need(&r.o.runs_dir).join(String::from_utf8_lossy(&name).as_ref());
            let t = Trainer::new_on(&run_dir, info, initial, &device, Arc::clone(collective))?;
            if leader {
                write_options(&run_dir, &r.o)?;
            }
            t
        }
    };
    let shard = la_data::Shard {
        index: collective.rank(),
        count: ranks,
    };
    let norm = trainer.info.normalization;
    let reprob = need(&r.o.reprob);
    let erasing = (reprob > 0.0).then(|| la_data::RandomErasing::new(reprob));
    let train_pipeline = r
        .train_pipeline(size, norm, policy)
        .with_random_erasing(erasing)
        .with_mix(r.mix())
        .with_mix_off_epoch(r.o.mixup_off_epoch);
    let train_loader = Loader::new(
        Arc::clone(&data.train),
        train_pipeline,
        loader_config(need(&r.o.shuffle), true),
        device.clone(),
    )?
    .with_shard(shard)?;
    let val_loader = Loader::new(
        Arc::clone(&data.val),
        Pipeline::eval(size, norm),
        loader_config(false, false),
        device.clone(),
    )?
    .with_shard(shard)?;
    let summary = la_vgg::summary::summarize(trainer.config(), size);
    if leader {
        eprintln!(
        "{} with {} attention: {} parameters, {:.3} GMAC per {size}x{size} image; {} training / {} validation images, {} classes, on {}",
        trainer.config().arch_name(),
        trainer.config().attention_config().map_or("no".to_string(), |a| a.kind.to_string()),
        la_vgg::summary::thousands(summary.params),
        summary.macs as f64 / 1e9,
        data.train.len(),
        data.val.len(),
        classes.len(),
        crate::device::describe(&device),
    );
        if ranks > 1 {
            eprintln!(
                "data-parallel over {} ranks ({}): each trains on {} of every batch of {}{}",
                ranks,
                collective.transport(),
                if r.batch_size() % ranks == 0 {
                    format!("{}", r.batch_size() / ranks)
                } else {
                    format!("about {}", r.batch_size() / ranks)
                },
                r.batch_size(),
                if need(&r.o.sync_bn) {
                    ", BatchNorm synchronised"
                } else {
                    ""
                }
            );
        }
        eprintln!("run directory: {}", trainer.run_dir().display());
    }
    let mut observer = BarObserver::new().quiet(!leader).stop_on_ctrl_c();
    let training = std::time::Instant::now();
    match &r.o.dump_batches {
        Some(path) => {
            let mut dump = BatchDump::new(&mut observer, path);
            trainer.fit(&train_loader, Some(&val_loader), &mut dump)?;
            let batches = dump.finish()?;
            eprintln!("{batches} training batches written to {}", path.display());
        }
        None => trainer.fit(&train_loader, Some(&val_loader), &mut observer)?,
    }
    // The other ranks stopped with rank 0, which reports.
    if !leader {
        return Ok(());
    }
    if observer.was_interrupted() {
        return Err(crate::ranks::Interrupted(format!(
            "interrupted after step {}; continue with `la-cli train --resume {}`",
            trainer.state.step,
            trainer.run_dir().display()
        ))
        .into());
    }
    if ranks > 1 {
        let total = training.elapsed().as_secs_f64();
        eprintln!(
            "gradient all-reduce on rank 0: {:.1} s of {total:.1} s ({:.1} %, waiting for the other ranks included)",
            trainer.reduce_seconds(),
            100.0 * trainer.reduce_seconds() / total.max(1e-9)
        );
    }
    let Some(best_epoch) = trainer.state.best_epoch else {
        println!(
            "done: {} steps, no epoch finished; the checkpoint is {}",
            trainer.state.step,
            trainer
                .run_dir()
                .join(la_train::checkpoint::CHECKPOINT)
                .display()
        );
        return Ok(());
    };
    let best = trainer.state.best_top1.unwrap_or(0.0);
    println!(
        "done: {} epochs, best validation top-1 {:.2} % (epoch {}); run directory {}",
        trainer.state.epoch,
        best * 100.0,
        best_epoch,
        trainer.run_dir().display()
    );
    println!(
        "  best weights: {}",
        trainer.run_dir().join(la_train::checkpoint::BEST).display()
    );
    if let (Some(top1), Some(epoch)) = (trainer.state.best_ema_top1, trainer.state.best_ema_epoch) {
        println!(
            "  best weights' average: {} (validation top-1 {:.2} %, epoch {epoch})",
            trainer
                .run_dir()
                .join(la_train::checkpoint::EMA_BEST)
                .display(),
            top1 * 100.0
        );
    }
    Ok(())
}

/// The attention flags applied to `config`: `--attention-blocks` (1-based), the input size
/// (Linformer's modules are built for it) and, for fresh Performer modules, random features
/// drawn from the run's seed, so that seeds differ in their features as in their weights.
fn attention_options(
    config: la_vgg::VggConfig,
    r: &Resolved,
    fresh_modules: bool,
) -> Result<la_vgg::VggConfig> {
    let size = need(&r.o.size);
    if let Some(built) = config.attention.as_ref().and_then(|a| a.input_size) {
        if !fresh_modules && built != size {
            bail!("the weights' linformer modules are built for {built}x{built} inputs; --size {size} cannot use them (give --size {built}, or --attention to start new modules)");
        }
    }
    let mut config = config.with_input_size(size);
    if let (true, Some(sites)) = (fresh_modules, config.attention.as_mut()) {
        if sites.config.kind == la_attention::AttentionKind::Performer {
            sites.config.feature_seed = r.seed();
        }
    }
    let Some(blocks) = &r.o.attention_blocks else {
        return Ok(config);
    };
    if config.attention.is_none() {
        bail!("--attention-blocks: the model has no attention modules to place");
    }
    if blocks.contains(&0) {
        bail!("--attention-blocks counts blocks from 1");
    }
    let zero_based: Vec<usize> = blocks.iter().map(|b| b - 1).collect();
    config
        .with_attention_blocks(&zero_based)
        .context("--attention-blocks")
}

/// The model config and its starting tensors: from `--weights` (with the head replaced when
/// the class count differs) or fresh.
fn model_and_weights(
    r: &Resolved,
    classes: usize,
) -> Result<(
    la_vgg::VggConfig,
    std::collections::HashMap<String, candle_core::Tensor>,
    Normalize,
)> {
    let Some(path) = &r.o.weights else {
        let args = crate::model_args::ModelArgs {
            arch: need(&r.o.arch),
            bn: need(&r.o.bn),
            attention: need(&r.o.attention),
            reduction: la_attention::DEFAULT_REDUCTION,
            attention_init: need(&r.o.attention_init),
            head: need(&r.o.head),
            hidden: r.o.hidden,
            classes,
            width: need(&r.o.width),
        };
        let normalization = r.data().normalization();
        let config = attention_options(args.config(need(&r.o.size))?, r, true)?;
        return Ok((config, Default::default(), normalization));
    };
    let weights = la_vgg::load_weights(path, &candle_core::Device::Cpu)?;
    let config = weights.config().clone();
    // The file decides the architecture; a flag that says otherwise is a mistake to report.
    let file_arch = config.arch_name();
    let conflicts = [
        r.given
            .arch
            .map(|a| format!("vgg{}", a.depth()))
            .filter(|a| !file_arch.starts_with(&format!("{a}_")) && file_arch != *a)
            .map(|a| format!("--arch {a}")),
        r.given
            .bn
            .filter(|&bn| bn != config.batch_norm)
            .map(|bn| format!("--bn {bn}")),
        r.given
            .width
            .filter(|&w| ((64.0 * w).round() as usize).max(1) != config.blocks[0][0])
            .map(|w| format!("--width {w}")),
        r.given
            .head
            .filter(|h| (*h == HeadArg::Imagenet) != (config.head.pool == 7))
            .map(|h| {
                format!(
                    "--head {}",
                    if h == HeadArg::Imagenet {
                        "imagenet"
                    } else {
                        "cifar"
                    }
                )
            }),
    ];
    if let Some(flag) = conflicts.into_iter().flatten().next() {
        bail!(
            "{} holds a {file_arch} (widths {:?}); {flag} asks for another architecture. Drop the flag: the weights file decides the architecture",
            path.display(),
            config.blocks.iter().map(|b| b[0]).collect::<Vec<_>>()
        );
    }
    // The attention flag may swap the file's modules for fresh ones; without it they stay.
    let zero_init_out = need(&r.o.attention_init).zero_init_out();
    let wanted = match r.given.attention {
        Some(arg) => arg.kind().map(|kind| la_attention::AttentionConfig {
            zero_init_out,
            ..la_attention::AttentionConfig::new(kind)
        }),
        None => config.attention_config(),
    };
    let new_classes = (config.num_classes != classes).then_some(classes);
    if new_classes.is_some() {
        eprintln!(
            "note: {} has {} classes, the data {classes}: the last layer is replaced (fresh, seeded)",
            path.display(),
            config.num_classes
        );
    }
    let (config, tensors, _) = la_vgg::import::adapt(config, weights.tensors, wanted, new_classes)
        .with_context(|| format!("{} does not fit the model", path.display()))?;
    let config = attention_options(config, r, r.given.attention.is_some())?;
    // The modules of the blocks --attention-blocks leaves out go with them.
    let mut tensors = tensors;
    tensors.retain(|name, _| {
        match name
            .strip_prefix("blocks.")
            .and_then(|n| n.split_once(".attention."))
        {
            Some((block, _)) => block
                .parse::<usize>()
                .is_ok_and(|b| config.attention_at(b).is_some()),
            None => true,
        }
    });
    let normalization = weights
        .metadata
        .normalization
        .unwrap_or(Normalize::IMAGENET);
    Ok((config, tensors, normalization))
}
