//! The options of `la-cli train`: one struct that flags, the TOML file, presets and the
//! defaults table all fill, the checks of its numbers, its layering, and `options.json`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use la_attention::AttentionInit;
use la_train::OptimizerConfig;
use serde::{Deserialize, Serialize};

use crate::data_args::DataKind;
use crate::model_args::{Arch, AttentionArg, HeadArg};
use crate::precision::PrecisionArg;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerArg {
    Sgd,
    Adamw,
}

impl OptimizerArg {
    /// The optimiser with la-train's defaults.
    pub fn default_config(self) -> OptimizerConfig {
        match self {
            OptimizerArg::Sgd => OptimizerConfig::sgd(),
            OptimizerArg::Adamw => OptimizerConfig::adamw(),
        }
    }
}

/// The per-sample training augmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AugmentArg {
    /// The data set's crops and flips: padded RandomCrop + flip for CIFAR and
    /// Fashion-MNIST (no flip for digits), RandomResizedCrop + flip for image folders.
    Standard,
    /// None: images are only resized to --size and normalised, as for validation.
    None,
}

/// torchvision's automatic augmentation policies, run after the crops and flips.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoAugmentArg {
    /// TrivialAugmentWide: one operation at a random magnitude per image.
    #[value(alias = "ta-wide")]
    TrivialAugment,
    /// RandAugment: --ra-num-ops operations at magnitude --ra-magnitude.
    #[value(alias = "ra")]
    RandAugment,
}

/// The validation figure `--early-stop-patience` watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopMetricArg {
    ValTop1,
    ValLoss,
}

impl StopMetricArg {
    pub(super) fn metric(self) -> la_train::StopMetric {
        match self {
            StopMetricArg::ValTop1 => la_train::StopMetric::ValTop1,
            StopMetricArg::ValLoss => la_train::StopMetric::ValLoss,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleArg {
    Constant,
    Step,
    Multistep,
    Cosine,
}

/// Every option of a run. Flags, the TOML file and presets all fill this same struct.
#[derive(clap::Args, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// Data set.
    #[arg(long, value_enum, help_heading = "Data")]
    pub data: Option<DataKind>,
    /// Where the data set lives (CIFAR folders or .tar.gz, Fashion-MNIST IDX files, an image folder).
    #[arg(long, help_heading = "Data")]
    pub data_dir: Option<PathBuf>,
    /// Validation folder for --data imagefolder (else a split of --data-dir).
    #[arg(long, help_heading = "Data")]
    pub val_dir: Option<PathBuf>,
    /// ImageFolder: skip (and count) undecodable images instead of stopping at the first.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", help_heading = "Data")]
    pub skip_bad: Option<bool>,
    /// Fraction held out for validation when the data set has no test split
    #[arg(long, help_heading = "Data")]
    pub val_fraction: Option<f64>,
    /// Input side in pixels
    #[arg(long, help_heading = "Data")]
    pub size: Option<usize>,
    /// Train on a subset of this many training images, drawn with seed 0 from the training
    /// split (the same images for every --seed where the data set has its own test split)
    #[arg(long, value_name = "N", help_heading = "Data")]
    pub train_subset: Option<usize>,
    /// Images per batch.
    #[arg(long, help_heading = "Data")]
    pub batch_size: Option<usize>,
    /// Reshuffle the training set every epoch (false: data set order, for comparisons).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", help_heading = "Data")]
    pub shuffle: Option<bool>,
    /// VGG depth.
    #[arg(long, value_enum, help_heading = "Model")]
    pub arch: Option<Arch>,
    /// BatchNorm after every conv
    #[arg(long, num_args = 0..=1, default_missing_value = "true", help_heading = "Model")]
    pub bn: Option<bool>,
    /// Attention module after the last conv of every block.
    #[arg(long, value_enum, help_heading = "Model")]
    pub attention: Option<AttentionArg>,
    /// Blocks (1-based, comma-separated) that get the attention module [default: every block]
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "BLOCKS",
        help_heading = "Model"
    )]
    pub attention_blocks: Option<Vec<usize>>,
    /// How new attention modules start: `identity` (output projection at zero) or `kaiming`
    /// (the article's advice: every block then adds a large random residual at step 0, and
    /// VGG16 from scratch barely learns)
    #[arg(long, value_name = "INIT", help_heading = "Model")]
    pub attention_init: Option<AttentionInit>,
    /// The older spelling: `true` is `--attention-init identity`, `false` is `kaiming`.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true", help_heading = "Model")]
    pub zero_init_attention: Option<bool>,
    /// The classifier: ImageNet's 7x7 pool and two hidden layers, or a global pool and one Linear.
    #[arg(long, value_enum, help_heading = "Model")]
    pub head: Option<HeadArg>,
    /// Hidden width of the cifar head.
    #[arg(long, help_heading = "Model")]
    pub hidden: Option<usize>,
    /// Conv width multiplier
    #[arg(long, help_heading = "Model")]
    pub width: Option<f64>,
    /// Pretrained weights to start from (any layout la-cli reads).
    #[arg(long, help_heading = "Model")]
    pub weights: Option<PathBuf>,
    /// Epochs to train.
    #[arg(long, help_heading = "Optimizer")]
    pub epochs: Option<usize>,
    /// Base learning rate
    #[arg(long, help_heading = "Optimizer")]
    pub lr: Option<f64>,
    /// The optimiser.
    #[arg(long, value_enum, help_heading = "Optimizer")]
    pub optimizer: Option<OptimizerArg>,
    /// SGD momentum
    #[arg(long, help_heading = "Optimizer")]
    pub momentum: Option<f64>,
    /// Nesterov momentum.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", help_heading = "Optimizer")]
    pub nesterov: Option<bool>,
    /// Weight decay (decoupled for AdamW; none on biases and norms).
    #[arg(long, help_heading = "Optimizer")]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm.
    #[arg(long, help_heading = "Optimizer")]
    pub grad_clip: Option<f64>,
    /// Sum the gradients of this many batches before each optimiser step (an effective
    /// batch of --batch-size x this).
    #[arg(long, help_heading = "Optimizer")]
    pub grad_accum_steps: Option<usize>,
    /// Learning-rate multiplier for the pretrained layers
    #[arg(long, help_heading = "Optimizer")]
    pub pretrained_lr_scale: Option<f64>,
    /// Layer-wise decay of the pretrained layers' rate (timm's): the head's layer keeps it,
    /// each layer before it is multiplied by this once more (no decay when not given).
    #[arg(long, help_heading = "Optimizer")]
    pub layer_decay: Option<f64>,
    /// Train only the attention modules and the head.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", help_heading = "Optimizer")]
    pub freeze_backbone: Option<bool>,
    /// Learning-rate schedule.
    #[arg(long, value_enum, help_heading = "Schedule")]
    pub schedule: Option<ScheduleArg>,
    /// Epochs between decays of the step schedule
    #[arg(long, help_heading = "Schedule")]
    pub step_epochs: Option<usize>,
    /// Milestones of the multistep schedule, e.g. 60,120,160.
    #[arg(long, value_delimiter = ',', help_heading = "Schedule")]
    pub milestones: Option<Vec<usize>>,
    /// Decay factor of step/multistep
    #[arg(long, help_heading = "Schedule")]
    pub gamma: Option<f64>,
    /// Linear warm-up epochs
    #[arg(long, help_heading = "Schedule")]
    pub warmup_epochs: Option<f64>,
    /// MixUp with this Beta alpha.
    #[arg(long, help_heading = "Augmentation and regularisation")]
    pub mixup: Option<f32>,
    /// CutMix with this Beta alpha.
    #[arg(long, help_heading = "Augmentation and regularisation")]
    pub cutmix: Option<f32>,
    /// With both --mixup and --cutmix, the probability that a batch gets CutMix.
    #[arg(long, help_heading = "Augmentation and regularisation")]
    pub mixup_switch_prob: Option<f64>,
    /// No MixUp/CutMix after this many epochs, as timm's (10 mixes epochs 1-10; every epoch
    /// when not given).
    #[arg(long, help_heading = "Augmentation and regularisation")]
    pub mixup_off_epoch: Option<usize>,
    /// Label smoothing of the cross-entropy.
    #[arg(long, help_heading = "Augmentation and regularisation")]
    pub label_smoothing: Option<f64>,
    /// Per-sample augmentation: the data set's standard crops and flips, or none.
    #[arg(long, value_enum, help_heading = "Augmentation and regularisation")]
    pub augment: Option<AugmentArg>,
    /// An automatic augmentation policy after the crops and flips (torchvision's).
    #[arg(long, value_enum, help_heading = "Augmentation and regularisation")]
    pub auto_augment: Option<AutoAugmentArg>,
    /// RandAugment's number of operations per image.
    #[arg(long, help_heading = "Augmentation and regularisation")]
    pub ra_num_ops: Option<usize>,
    /// RandAugment's magnitude, a bin of 0-30.
    #[arg(long, help_heading = "Augmentation and regularisation")]
    pub ra_magnitude: Option<usize>,
    /// Random erasing probability (timm's --reprob, per-pixel noise).
    #[arg(long, help_heading = "Augmentation and regularisation")]
    pub reprob: Option<f64>,
    /// Keep an exponential moving average of the weights (timm's ModelEmaV3), evaluate it
    /// each epoch beside the model and save its best epoch as ema-best.safetensors.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", help_heading = "Weights average")]
    pub model_ema: Option<bool>,
    /// The average's decay per optimiser step.
    #[arg(long, help_heading = "Weights average")]
    pub model_ema_decay: Option<f64>,
    /// Start the average's decay small and let it grow (1 - (1 + step)^(-2/3), capped at
    /// --model-ema-decay).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", help_heading = "Weights average")]
    pub model_ema_warmup: Option<bool>,
    /// Also write a resumable checkpoint every this many optimiser steps within an epoch
    /// (only at epoch ends when not given).
    #[arg(long, help_heading = "Checkpoints and stopping")]
    pub recovery_interval: Option<usize>,
    /// Keep the checkpoints of this many best epochs as checkpoint-EPOCH.safetensors, each
    /// resumable with --resume FILE (none kept when not given).
    #[arg(long, help_heading = "Checkpoints and stopping")]
    pub checkpoint_hist: Option<usize>,
    /// Stop when the --early-stop-metric has not improved for this many epochs (no early
    /// stopping when not given).
    #[arg(long, help_heading = "Checkpoints and stopping")]
    pub early_stop_patience: Option<usize>,
    /// What early stopping watches.
    #[arg(long, value_enum, help_heading = "Checkpoints and stopping")]
    pub early_stop_metric: Option<StopMetricArg>,
    /// cpu, cuda, cuda:N or auto
    #[arg(long, help_heading = "Run")]
    pub device: Option<String>,
    /// Precision of the convs' and matmuls' products: auto (tf32 on a CUDA GPU, PyTorch's
    /// default for convs; f32 elsewhere), f32 (fp32), tf32 (a CUDA GPU's tensor cores), or
    /// bf16 operands with f32 sums (weights, gradients, BatchNorm statistics and the
    /// optimiser state stay f32, as under PyTorch's bf16 autocast; a CPU with AVX512_BF16).
    #[arg(long, value_enum, help_heading = "Run")]
    pub precision: Option<PrecisionArg>,
    /// Seed of the initialisation, the data order and augmentation, and dropout.
    #[arg(long, help_heading = "Run")]
    pub seed: Option<u64>,
    /// Worker threads for compute and data loading (all cores when not given)
    #[arg(long, help_heading = "Run")]
    pub threads: Option<usize>,
    /// Run name; the run directory is <runs-dir>/<name> (data-arch-attention-time when not given)
    #[arg(long, help_heading = "Run")]
    pub name: Option<String>,
    /// Where run directories are made.
    #[arg(long, help_heading = "Run")]
    pub runs_dir: Option<PathBuf>,
    /// Stop after this many optimiser steps, with a resumable checkpoint (the schedule
    /// still spans --epochs).
    #[arg(long, help_heading = "Run")]
    pub max_steps: Option<usize>,
    /// Write every training batch (the preprocessed images and the labels, as trained on)
    /// to this safetensors file at the end: `images.N`, `labels.N`. They are kept in memory
    /// until then, so this is for short checks (with --max-steps).
    #[arg(long, value_name = "FILE", help_heading = "Run")]
    pub dump_batches: Option<PathBuf>,
    /// Write TensorBoard event files into the run directory (`tensorboard --logdir runs`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", help_heading = "Run")]
    pub tensorboard: Option<bool>,
    /// Under `mpirun`: BatchNorm's batch statistics over every rank's shard together
    /// (PyTorch's SyncBatchNorm), so N ranks train as one process; otherwise each rank's own
    /// (as PyTorch DDP). See docs/distributed.md.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", help_heading = "Run")]
    pub sync_bn: Option<bool>,
}

/// Where a numeric option's value must lie.
#[derive(Clone, Copy)]
enum Range {
    Positive,
    NonNegative,
    /// [0, 1)
    Unit,
    /// (0, 1)
    OpenUnit,
    /// [0, 1]
    Probability,
}

impl Range {
    fn contains(self, v: f64) -> bool {
        match self {
            Range::Positive => v > 0.0,
            Range::NonNegative => v >= 0.0,
            Range::Unit => (0.0..1.0).contains(&v),
            Range::OpenUnit => v > 0.0 && v < 1.0,
            Range::Probability => (0.0..=1.0).contains(&v),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Range::Positive => "a positive number",
            Range::NonNegative => "a number >= 0",
            Range::Unit => "in [0, 1)",
            Range::OpenUnit => "in (0, 1)",
            Range::Probability => "in [0, 1]",
        }
    }
}

impl Options {
    /// Refuses a number that cannot be used, naming its option (`where_` says where it was
    /// given). Checked before the layering, whose JSON round trip would turn a NaN into
    /// "unset" and so into the default.
    pub(super) fn check_numbers(&self, where_: &str) -> Result<()> {
        use Range::*;
        let checks = [
            ("lr", self.lr, Positive),
            ("momentum", self.momentum, Unit),
            ("weight-decay", self.weight_decay, NonNegative),
            ("gamma", self.gamma, Positive),
            ("warmup-epochs", self.warmup_epochs, NonNegative),
            ("mixup", self.mixup.map(f64::from), Positive),
            ("cutmix", self.cutmix.map(f64::from), Positive),
            ("label-smoothing", self.label_smoothing, Unit),
            ("reprob", self.reprob, Probability),
            ("mixup-switch-prob", self.mixup_switch_prob, Probability),
            ("model-ema-decay", self.model_ema_decay, OpenUnit),
            ("layer-decay", self.layer_decay, OpenUnit),
            ("grad-clip", self.grad_clip, Positive),
            ("pretrained-lr-scale", self.pretrained_lr_scale, NonNegative),
            ("width", self.width, Positive),
            ("val-fraction", self.val_fraction, OpenUnit),
        ];
        for (name, value, range) in checks {
            let Some(v) = value else { continue };
            if !v.is_finite() {
                bail!("--{name} {v}{where_} must be a finite number");
            }
            if !range.contains(v) {
                bail!("--{name} {v}{where_} must be {}", range.describe());
            }
        }
        // Counts that mean nothing at zero (a zero --threads is refused where it is used).
        let counts = [
            ("epochs", self.epochs),
            ("batch-size", self.batch_size),
            ("step-epochs", self.step_epochs),
            ("hidden", self.hidden),
            ("grad-accum-steps", self.grad_accum_steps),
            ("mixup-off-epoch", self.mixup_off_epoch),
            ("early-stop-patience", self.early_stop_patience),
            ("recovery-interval", self.recovery_interval),
            ("checkpoint-hist", self.checkpoint_hist),
            ("size", self.size),
            ("max-steps", self.max_steps),
            ("ra-num-ops", self.ra_num_ops),
            ("train-subset", self.train_subset),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, v)| *v == Some(0)) {
            bail!("--{name} 0{where_} must be at least 1");
        }
        if self
            .milestones
            .as_ref()
            .is_some_and(|m| m.windows(2).any(|w| w[0] >= w[1]))
        {
            bail!("--milestones{where_} must be increasing epochs");
        }
        Ok(())
    }
}

/// Fills `base`'s unset fields from `fallback`.
pub(super) fn merge(base: Options, fallback: Options) -> Options {
    let a = serde_json::to_value(base).expect("options serialise");
    let b = serde_json::to_value(fallback).expect("options serialise");
    let (serde_json::Value::Object(mut a), serde_json::Value::Object(b)) = (a, b) else {
        unreachable!("options are a struct")
    };
    for (k, v) in b {
        if a.get(&k).is_none_or(|x| x.is_null()) {
            a.insert(k, v);
        }
    }
    serde_json::from_value(serde_json::Value::Object(a)).expect("merged options deserialise")
}

/// The options a run was started (or last resumed) with: `<run>/options.json`.
pub fn read_options(run_dir: &std::path::Path) -> Result<Options> {
    let path = run_dir.join("options.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: cannot read the run's options; is this a run directory?",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: malformed options", path.display()))
}

pub(super) fn write_options(run_dir: &std::path::Path, options: &Options) -> Result<()> {
    let json = serde_json::to_string_pretty(options)?;
    la_core::write_atomically(&run_dir.join("options.json"), json.as_bytes())?;
    Ok(())
}
