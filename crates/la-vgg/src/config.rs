//! The configuration table: which convs, which attention, which head.
//!
//! As torchvision's `cfgs`, a table of widths per depth drives the layers; unlike it, the
//! widths are stored per block so that any width (the golden files' widths / 8, a `--width`
//! multiplier) round-trips through a file's metadata.

use la_attention::AttentionConfig;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// VGG's conv widths per block for depths 11, 13, 16 and 19 (Simonyan & Zisserman, table 1).
pub fn standard_blocks(depth: usize) -> Result<Vec<Vec<usize>>> {
    let convs_per_block: [usize; 5] = match depth {
        11 => [1, 1, 2, 2, 2],
        13 => [2, 2, 2, 2, 2],
        16 => [2, 2, 3, 3, 3],
        19 => [2, 2, 4, 4, 4],
        _ => {
            return Err(Error::Config(format!(
                "no VGG of depth {depth} (11, 13, 16 or 19)"
            )))
        }
    };
    Ok(convs_per_block
        .iter()
        .zip([64, 128, 256, 512, 512])
        .map(|(&n, width)| vec![width; n])
        .collect())
}

/// The classifier after the conv stack: average-pool the last map to `pool` x `pool`, flatten,
/// `hidden` Linear + ReLU + Dropout layers, then a Linear to the classes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// Side of the adaptive average pool: 7 for torchvision's ImageNet head, 1 for global pooling.
    pub pool: usize,
    pub hidden: Vec<usize>,
    pub dropout: f32,
}

impl HeadConfig {
    /// torchvision's and the article's head: 7x7 pool, 25088-4096-4096-classes, dropout 0.5.
    pub fn imagenet() -> Self {
        Self {
            pool: 7,
            hidden: vec![4096, 4096],
            dropout: 0.5,
        }
    }

    /// The usual CIFAR head: global average pool, an optional hidden layer, Linear to classes.
    pub fn cifar(hidden: Option<usize>) -> Self {
        Self {
            pool: 1,
            hidden: hidden.into_iter().collect(),
            dropout: if hidden.is_some() { 0.5 } else { 0.0 },
        }
    }

    /// A name for the head's shape: `imagenet`, `cifar`, or `pool{p}-{hidden...}`.
    pub fn name(&self) -> String {
        match (self.pool, self.hidden.as_slice()) {
            (7, [4096, 4096]) => "imagenet".into(),
            (1, [] | [_]) => "cifar".into(),
            (p, h) => {
                let h: Vec<String> = h.iter().map(|x| x.to_string()).collect();
                format!("pool{p}-{}", h.join("-"))
            }
        }
    }
}

/// Attention modules: which module, and the blocks (0-based, ascending, distinct) that get
/// one after their last conv + ReLU, before the pool (the article puts one in each of five).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionSites {
    pub config: AttentionConfig,
    pub blocks: Vec<usize>,
    /// The input side the modules are built for: needed by the kinds defined for one map
    /// size (Linformer), whose module at block b sees a map of side `input_size >> b`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_size: Option<usize>,
}

/// A whole model. Serialised as JSON into the metadata of every weights file the project
/// writes, so that loading a file needs no architecture flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "stored::StoredConfig")]
pub struct VggConfig {
    /// Output channels of each 3x3 conv, per block; every block ends with a 2x2 max-pool.
    pub blocks: Vec<Vec<usize>>,
    #[serde(default)]
    pub batch_norm: bool,
    /// `None`: no attention anywhere.
    #[serde(default)]
    pub attention: Option<AttentionSites>,
    pub head: HeadConfig,
    pub num_classes: usize,
    #[serde(default = "three")]
    pub in_channels: usize,
}

/// The config as files store it. Files written before attention sites were one field hold
/// `attention` (the module) and `attention_blocks` side by side; both forms read.
mod stored {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(super) enum StoredAttention {
        Sites(AttentionSites),
        Module(AttentionConfig),
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct StoredConfig {
        blocks: Vec<Vec<usize>>,
        #[serde(default)]
        batch_norm: bool,
        #[serde(default)]
        attention: Option<StoredAttention>,
        #[serde(default)]
        attention_blocks: Option<Vec<usize>>,
        head: HeadConfig,
        num_classes: usize,
        #[serde(default = "three")]
        in_channels: usize,
    }

    impl TryFrom<StoredConfig> for VggConfig {
        type Error = String;

        fn try_from(s: StoredConfig) -> std::result::Result<Self, String> {
            let attention = match (s.attention, s.attention_blocks) {
                (Some(StoredAttention::Sites(sites)), None) => Some(sites),
                (Some(StoredAttention::Module(config)), blocks) => {
                    let mut blocks = blocks.unwrap_or_default();
                    blocks.sort_unstable();
                    blocks.dedup();
                    Some(AttentionSites {
                        config,
                        blocks,
                        input_size: None,
                    })
                }
                (None, None) => None,
                (None, Some(b)) if b.is_empty() => None,
                (None, Some(_)) => return Err("`attention_blocks` without `attention`".into()),
                (Some(StoredAttention::Sites(_)), Some(_)) => {
                    return Err("`attention_blocks` beside attention sites".into())
                }
            };
            Ok(VggConfig {
                blocks: s.blocks,
                batch_norm: s.batch_norm,
                attention: attention.filter(|a| !a.blocks.is_empty()),
                head: s.head,
                num_classes: s.num_classes,
                in_channels: s.in_channels,
            })
        }
    }
}

fn three() -> usize {
    3
}

impl VggConfig {
    /// VGG-`depth` as torchvision builds it: ImageNet head, no BatchNorm, no attention.
    pub fn vgg(depth: usize, num_classes: usize) -> Result<Self> {
        Ok(Self {
            blocks: standard_blocks(depth)?,
            batch_norm: false,
            attention: None,
            head: HeadConfig::imagenet(),
            num_classes,
            in_channels: 3,
        })
    }

    pub fn with_batch_norm(mut self, on: bool) -> Self {
        self.batch_norm = on;
        self
    }

    /// Attention after every block (`Some`), or none.
    pub fn with_attention(mut self, attention: Option<AttentionConfig>) -> Self {
        self.attention = attention.map(|config| AttentionSites {
            config,
            blocks: (0..self.blocks.len()).collect(),
            input_size: None,
        });
        self
    }

    /// Records the input side in the attention sites when their kind is defined for one map
    /// size (Linformer); other kinds run at any size and are left as they are.
    pub fn with_input_size(mut self, size: usize) -> Self {
        if let Some(a) = &mut self.attention {
            if a.config.kind == la_attention::AttentionKind::Linformer {
                a.input_size = Some(size);
            }
        }
        self
    }

    /// Keeps attention only in `blocks` (0-based); no blocks means no attention.
    pub fn with_attention_blocks(mut self, blocks: &[usize]) -> Result<Self> {
        if let Some(&b) = blocks.iter().find(|&&b| b >= self.blocks.len()) {
            return Err(Error::Config(format!(
                "attention block {} does not exist (the model has blocks 1 to {})",
                b + 1,
                self.blocks.len()
            )));
        }
        let mut blocks = blocks.to_vec();
        blocks.sort_unstable();
        blocks.dedup();
        if blocks.is_empty() {
            self.attention = None;
        } else if let Some(a) = &mut self.attention {
            a.blocks = blocks;
        }
        Ok(self)
    }

    /// The attention module of every site, if the model has any.
    pub fn attention_config(&self) -> Option<AttentionConfig> {
        self.attention.as_ref().map(|a| a.config)
    }

    pub fn with_head(mut self, head: HeadConfig) -> Self {
        self.head = head;
        self
    }

    /// Multiplies every conv width (and the hidden widths of the head) by `factor`, rounding
    /// and keeping at least one channel: `0.25` makes a quarter-width VGG for quick runs.
    pub fn with_width(mut self, factor: f64) -> Result<Self> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(Error::Config(format!(
                "width multiplier {factor} must be positive"
            )));
        }
        let scale = |w: usize| ((w as f64 * factor).round() as usize).max(1);
        for block in &mut self.blocks {
            block.iter_mut().for_each(|w| *w = scale(*w));
        }
        self.head.hidden.iter_mut().for_each(|w| *w = scale(*w));
        Ok(self)
    }

    /// Channels leaving the conv stack.
    pub fn out_channels(&self) -> usize {
        self.blocks
            .iter()
            .rev()
            .find_map(|b| b.last().copied())
            .unwrap_or(self.in_channels)
    }

    /// The module after block `block`'s convs, if it has one: the sites' config with the
    /// block's own random-feature seed and, given an input size, its map's positions.
    pub fn attention_at(&self, block: usize) -> Option<AttentionConfig> {
        self.attention
            .as_ref()
            .filter(|a| a.blocks.contains(&block))
            .map(|a| {
                let tokens = a.input_size.map(|s| (s >> block).pow(2));
                a.config.for_module(block, tokens)
            })
    }

    /// `vgg16`, `vgg11_bn`, ... when the convs per block are a standard depth's; else `vgg`.
    pub fn arch_name(&self) -> String {
        let counts: Vec<usize> = self.blocks.iter().map(Vec::len).collect();
        let depth = [11, 13, 16, 19].into_iter().find(|&d| {
            standard_blocks(d)
                .map(|b| b.iter().map(Vec::len).collect::<Vec<_>>() == counts)
                .unwrap_or(false)
        });
        let base = depth.map_or("vgg".to_string(), |d| format!("vgg{d}"));
        if self.batch_norm {
            format!("{base}_bn")
        } else {
            base
        }
    }

    /// Rejects configurations that cannot build a model, naming the field.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::Config(m));
        if self.blocks.is_empty() || self.blocks.iter().any(Vec::is_empty) {
            return fail("every block needs at least one conv".into());
        }
        if self.blocks.iter().flatten().any(|&w| w == 0) {
            return fail("a conv width is zero".into());
        }
        if self.num_classes == 0 {
            return fail("num_classes must be at least 1".into());
        }
        if self.head.pool == 0 || self.head.hidden.contains(&0) {
            return fail("the head's pool size and hidden widths must be positive".into());
        }
        if !(0.0..1.0).contains(&self.head.dropout) {
            return fail(format!("dropout {} is not in [0, 1)", self.head.dropout));
        }
        if let Some(a) = &self.attention {
            if let Some(&b) = a.blocks.iter().find(|&&b| b >= self.blocks.len()) {
                return fail(format!(
                    "attention block {b} does not exist (the model has {} blocks)",
                    self.blocks.len()
                ));
            }
            if a.blocks.windows(2).any(|w| w[0] >= w[1]) {
                return fail(format!(
                    "attention blocks {:?} must be distinct and ascending",
                    a.blocks
                ));
            }
            if a.blocks.is_empty() {
                return fail("attention sites with no blocks: give `attention: null`".into());
            }
            if a.config.reduction == 0 {
                return fail("attention reduction must be at least 1".into());
            }
            if a.config.kind == la_attention::AttentionKind::Linformer {
                match a.input_size {
                    None => {
                        return fail(
                            "linformer attention is defined for one map size: give the attention sites an `input_size`".into(),
                        )
                    }
                    Some(s) if a.blocks.iter().any(|&b| s >> b == 0) => {
                        return fail(format!("input size {s} leaves an attention block an empty map"))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }
}
