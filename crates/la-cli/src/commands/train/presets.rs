//! `la-cli train --preset`: named recipes, as partial options under the flags and the file.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::options::{OptimizerArg, Options, ScheduleArg};
use crate::data_args::DataKind;
use crate::model_args::{Arch, AttentionArg, HeadArg};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The article's recipe: ImageNet head, SGD 0.01 momentum 0.9, StepLR(30, 0.1),
    /// RandomResizedCrop + flip + ColorJitter + CutMix/MixUp, 90 epochs (give --weights).
    #[value(alias = "cifar100-seed")]
    #[serde(alias = "cifar100-seed")]
    Cifar100Article,
    /// A quick CIFAR-100 recipe: BatchNorm, CIFAR head, SGD 0.05 Nesterov, cosine, label
    /// smoothing 0.1, RandomCrop + flip, 30 epochs.
    Cifar100Fast,
}

/// The options a preset sets; the rest stay unset.
pub(super) fn preset_options(preset: Preset) -> Options {
    match preset {
        Preset::Cifar100Article => Options {
            data: Some(DataKind::Cifar100),
            arch: Some(Arch::Vgg16),
            bn: Some(false),
            attention: Some(AttentionArg::Softmax),
            head: Some(HeadArg::Imagenet),
            width: Some(1.0),
            size: Some(32),
            epochs: Some(90),
            batch_size: Some(128),
            lr: Some(0.01),
            optimizer: Some(OptimizerArg::Sgd),
            momentum: Some(0.9),
            weight_decay: Some(5e-4),
            schedule: Some(ScheduleArg::Step),
            step_epochs: Some(30),
            gamma: Some(0.1),
            mixup: Some(0.2),
            cutmix: Some(1.0),
            ..Options::default()
        },
        Preset::Cifar100Fast => Options {
            data: Some(DataKind::Cifar100),
            arch: Some(Arch::Vgg16),
            bn: Some(true),
            attention: Some(AttentionArg::Softmax),
            head: Some(HeadArg::Cifar),
            width: Some(1.0),
            size: Some(32),
            epochs: Some(30),
            batch_size: Some(128),
            lr: Some(0.05),
            optimizer: Some(OptimizerArg::Sgd),
            nesterov: Some(true),
            schedule: Some(ScheduleArg::Cosine),
            warmup_epochs: Some(1.0),
            label_smoothing: Some(0.1),
            ..Options::default()
        },
    }
}
