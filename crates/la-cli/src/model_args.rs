//! The flags that describe a model, shared by the subcommands that build one.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use la_attention::{AttentionConfig, AttentionInit, AttentionKind};
use la_vgg::{HeadConfig, VggConfig};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    Vgg11,
    Vgg13,
    Vgg16,
    Vgg19,
}

impl Arch {
    pub fn depth(self) -> usize {
        match self {
            Arch::Vgg11 => 11,
            Arch::Vgg13 => 13,
            Arch::Vgg16 => 16,
            Arch::Vgg19 => 19,
        }
    }
}

/// `none` or one of la-attention's kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionArg {
    None,
    Softmax,
    Linear,
    Efficient,
    ReluLinear,
    Performer,
    Linformer,
}

impl AttentionArg {
    pub fn kind(self) -> Option<AttentionKind> {
        match self {
            AttentionArg::None => None,
            AttentionArg::Softmax => Some(AttentionKind::Softmax),
            AttentionArg::Linear => Some(AttentionKind::Linear),
            AttentionArg::Efficient => Some(AttentionKind::Efficient),
            AttentionArg::ReluLinear => Some(AttentionKind::ReluLinear),
            AttentionArg::Performer => Some(AttentionKind::Performer),
            AttentionArg::Linformer => Some(AttentionKind::Linformer),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadArg {
    /// 7x7 average pool, 25088-4096-4096-classes (torchvision, the article).
    Imagenet,
    /// Global average pool, optional hidden layer (--hidden), Linear to classes.
    Cifar,
}

/// The model defaults every command shares (`train`'s own are in its defaults table, which
/// starts from these).
pub const DEFAULT_ARCH: Arch = Arch::Vgg16;
pub const DEFAULT_ATTENTION: AttentionArg = AttentionArg::Softmax;

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// VGG depth.
    #[arg(long, value_enum, default_value_t = DEFAULT_ARCH)]
    pub arch: Arch,
    /// BatchNorm after every conv.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub bn: bool,
    /// Attention module after the last conv of every block.
    #[arg(long, value_enum, default_value_t = DEFAULT_ATTENTION)]
    pub attention: AttentionArg,
    /// Query/key channels are channels / reduction.
    #[arg(long, default_value_t = la_attention::DEFAULT_REDUCTION)]
    pub reduction: usize,
    /// How attention modules start: `identity` (output projection at zero) or `kaiming`
    /// (the article's advice).
    #[arg(long, default_value_t = AttentionInit::default(), value_name = "INIT")]
    pub attention_init: AttentionInit,
    #[arg(long, value_enum, default_value = "imagenet")]
    pub head: HeadArg,
    /// Hidden width of the cifar head (none by default).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Number of classes.
    #[arg(long, default_value_t = 1000)]
    pub classes: usize,
    /// Multiplies every conv width (0.25 = a quarter-width VGG).
    #[arg(long, default_value_t = 1.0)]
    pub width: f64,
}

impl ModelArgs {
    /// The model for inputs of `size` x `size` (which Linformer's modules are built for).
    pub fn config(&self, size: usize) -> Result<VggConfig> {
        let head = match self.head {
            HeadArg::Imagenet => HeadConfig::imagenet(),
            HeadArg::Cifar => HeadConfig::cifar(self.hidden),
        };
        let attention = self.attention.kind().map(|kind| AttentionConfig {
            reduction: self.reduction,
            zero_init_out: self.attention_init.zero_init_out(),
            ..AttentionConfig::new(kind)
        });
        let config = VggConfig::vgg(self.arch.depth(), self.classes)?
            .with_batch_norm(self.bn)
            .with_attention(attention)
            .with_head(head)
            .with_width(self.width)?
            .with_input_size(size);
        config
            .validate()
            .context("the model flags do not make a valid model")?;
        Ok(config)
    }
}
