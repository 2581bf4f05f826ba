//! How to train: the options a run is started with, their defaults, and the schedule they
//! give.

use serde::{Deserialize, Serialize};

use crate::ema::EmaConfig;
use crate::optim::OptimizerConfig;
use crate::record::EpochRecord;
use crate::schedule::{LrSchedule, Schedule};

/// How to train; saved in every checkpoint so a run resumes with the same settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub lr: f64,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    pub warmup_epochs: f64,
    pub label_smoothing: f64,
    /// Clip the global gradient norm to this value.
    pub grad_clip: Option<f64>,
    /// Micro-batches whose gradients are summed (each loss divided by their count) before
    /// one optimiser step: K batches of B train as one batch of K B.
    pub grad_accum_steps: usize,
    /// Learning-rate multiplier of the layers loaded from pretrained weights.
    pub pretrained_lr_scale: f64,
    /// Layer-wise decay of the pretrained layers' rate (timm's `--layer-decay`), on top of
    /// `pretrained_lr_scale`: see [`crate::optim::layer_decay_scales`].
    pub layer_decay: Option<f64>,
    pub freeze_backbone: bool,
    /// Write a resumable checkpoint every this many optimiser steps within an epoch too.
    pub recovery_interval: Option<usize>,
    /// Keep the checkpoints of this many best epochs as `checkpoint-{epoch}.safetensors`.
    pub checkpoint_hist: Option<usize>,
    /// Stop when the validation metric has not improved for this many epochs.
    pub early_stop: Option<EarlyStop>,
    /// Stop after this many optimiser steps (Lightning's `max_steps`), with a resumable
    /// checkpoint; the schedule still spans `epochs`.
    pub max_steps: Option<usize>,
    /// Write TensorBoard event files into the run directory.
    pub tensorboard: bool,
    /// Keep (and evaluate, and save) an exponential moving average of the weights.
    pub ema: Option<EmaConfig>,
    /// No weight decay on biases and BatchNorm parameters.
    pub no_decay_bias_norm: bool,
    /// In data-parallel training, BatchNorm's batch statistics over every rank's shard
    /// together (PyTorch's `SyncBatchNorm`) instead of each rank's own.
    pub sync_bn: bool,
    pub seed: u64,
}

/// The defaults of every training option, in one place: the default run's (a few minutes
/// of SGD on the embedded digits). `la-cli train` layers flags, a TOML file and presets
/// over them.
impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 6,
            lr: 0.05,
            optimizer: OptimizerConfig::sgd(),
            schedule: Schedule::Cosine {
                min_lr: Schedule::DEFAULT_MIN_LR,
            },
            warmup_epochs: 0.0,
            label_smoothing: 0.0,
            grad_clip: None,
            grad_accum_steps: 1,
            pretrained_lr_scale: 1.0,
            layer_decay: None,
            freeze_backbone: false,
            recovery_interval: None,
            checkpoint_hist: None,
            early_stop: None,
            max_steps: None,
            ema: None,
            tensorboard: false,
            no_decay_bias_norm: true,
            sync_bn: false,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// The learning-rate multiplier of pretrained layers when fine-tuning, unless set.
    pub const FINE_TUNE_LR_SCALE: f64 = 0.1;

    pub(crate) fn lr_schedule(&self) -> LrSchedule {
        LrSchedule {
            base_lr: self.lr,
            schedule: self.schedule.clone(),
            warmup_epochs: self.warmup_epochs,
            epochs: self.epochs,
        }
    }
}

/// The validation figure early stopping watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopMetric {
    /// Validation top-1, higher is better.
    ValTop1,
    /// Validation loss, lower is better.
    ValLoss,
}

impl StopMetric {
    pub fn name(self) -> &'static str {
        match self {
            StopMetric::ValTop1 => "validation top-1",
            StopMetric::ValLoss => "validation loss",
        }
    }
}

/// Early stopping: after `patience` epochs without a better `metric` than the best so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStop {
    pub metric: StopMetric,
    pub patience: usize,
}

impl EarlyStop {
    /// Whether a run with this `history` should stop: its last `patience` epochs did not
    /// improve on the best before them. Derived from the history alone, so a resumed run
    /// decides as an uninterrupted one.
    pub fn should_stop(&self, history: &[EpochRecord]) -> bool {
        let value = |r: &EpochRecord| match self.metric {
            StopMetric::ValTop1 => r.val_top1,
            StopMetric::ValLoss => r.val_loss.map(|l| -l),
        };
        let mut best: Option<(usize, f64)> = None;
        for (i, v) in history
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((i, value(r)?)))
        {
            if best.is_none_or(|(_, b)| v > b) {
                best = Some((i, v));
            }
        }
        match best {
            Some((i, _)) => history.len() - 1 - i >= self.patience,
            None => false,
        }
    }
}
