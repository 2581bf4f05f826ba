//! The one walk over a config's layers. The model, the weight checks, the summary, the
//! import/export and the bench all read [`VggConfig::layers`] instead of re-deriving names,
//! widths and shapes from the config.

use std::collections::HashMap;

use candle_core::Tensor;
use la_attention::AttentionConfig;

use crate::config::VggConfig;
use crate::{Error, Result};

/// What a layer is, with the sizes that fix its parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerKind {
    /// 3x3 convolution with bias, padding 1; followed by ReLU (after the BatchNorm if any).
    Conv { inputs: usize, outputs: usize },
    /// BatchNorm of the conv before it (eps 1e-5, as torchvision).
    BatchNorm { channels: usize },
    /// A spatial attention module, residual included.
    Attention {
        channels: usize,
        config: AttentionConfig,
    },
    /// The 2x2 max-pool that ends every block.
    MaxPool,
    /// The head's adaptive average pool to `side` x `side`, then the flatten.
    AvgPool { side: usize },
    /// Linear; `hidden` ones are followed by ReLU and dropout, the last one gives the logits.
    Linear {
        inputs: usize,
        outputs: usize,
        hidden: bool,
    },
}

/// One layer: its variable path (`blocks.1.convs.0`, `head.fc1`, ...), the block it belongs to
/// (`None` in the head) and its kind.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSpec {
    pub name: String,
    pub block: Option<usize>,
    pub kind: LayerKind,
}

impl LayerSpec {
    /// Each tensor of the layer: (leaf name, shape), as `VarBuilder` paths below `name`.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        match &self.kind {
            LayerKind::Conv { inputs, outputs } => vec![
                ("weight".into(), vec![*outputs, *inputs, 3, 3]),
                ("bias".into(), vec![*outputs]),
            ],
            LayerKind::BatchNorm { channels } => ["weight", "bias", "running_mean", "running_var"]
                .into_iter()
                .map(|leaf| (leaf.to_string(), vec![*channels]))
                .collect(),
            LayerKind::Attention { channels, config } => config.tensors(*channels),
            LayerKind::Linear {
                inputs, outputs, ..
            } => vec![
                ("weight".into(), vec![*outputs, *inputs]),
                ("bias".into(), vec![*outputs]),
            ],
            LayerKind::MaxPool | LayerKind::AvgPool { .. } => Vec::new(),
        }
    }

    /// Trainable parameters (BatchNorm's running statistics are buffers, not parameters).
    pub fn params(&self) -> u64 {
        self.tensors()
            .iter()
            .filter(|(leaf, _)| !leaf.starts_with("running_"))
            .map(|(_, shape)| shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// The output shape for an input of `shape` ([c, h, w] for maps, [features] after the
    /// flatten).
    pub fn output_shape(&self, shape: &[usize]) -> Vec<usize> {
        match (&self.kind, shape) {
            (LayerKind::Conv { outputs, .. }, [_, h, w]) => vec![*outputs, *h, *w],
            (LayerKind::MaxPool, [c, h, w]) => vec![*c, h / 2, w / 2],
            (LayerKind::AvgPool { side }, [c, ..]) => vec![c * side * side],
            (LayerKind::Linear { outputs, .. }, _) => vec![*outputs],
            _ => shape.to_vec(),
        }
    }

    /// Multiply-accumulates for an input of `shape`: convs, Linear layers and the attention's
    /// projections and token mixing; not ReLU, BatchNorm or pooling.
    pub fn macs(&self, shape: &[usize]) -> u64 {
        match (&self.kind, shape) {
            (LayerKind::Conv { inputs, outputs }, [_, h, w]) => {
                (h * w * outputs * inputs * 9) as u64
            }
            (LayerKind::Attention { channels, config }, [_, h, w]) => {
                la_attention::macs(config, h * w, *channels)
            }
            (
                LayerKind::Linear {
                    inputs, outputs, ..
                },
                _,
            ) => (inputs * outputs) as u64,
            _ => 0,
        }
    }

    /// The part of [`LayerSpec::macs`] that grows as the square of the tokens.
    pub fn quadratic_macs(&self, shape: &[usize]) -> u64 {
        match (&self.kind, shape) {
            (LayerKind::Attention { channels, config }, [_, h, w]) => {
                la_attention::quadratic_macs(config, h * w, *channels)
            }
            _ => 0,
        }
    }
}

impl VggConfig {
    /// Every layer in forward order: per block its convs (each with its BatchNorm), its
    /// attention module, its pool; then the head's pool, hidden Linears and logits.
    pub fn layers(&self) -> Vec<LayerSpec> {
        let mut layers = Vec::new();
        let mut channels = self.in_channels;
        for (i, widths) in self.blocks.iter().enumerate() {
            let mut push = |name: String, kind| {
                layers.push(LayerSpec {
                    name: format!("blocks.{i}.{name}"),
                    block: Some(i),
                    kind,
                })
            };
            for (j, &width) in widths.iter().enumerate() {
                push(
                    format!("convs.{j}"),
                    LayerKind::Conv {
                        inputs: channels,
                        outputs: width,
                    },
                );
                if self.batch_norm {
                    push(
                        format!("norms.{j}"),
                        LayerKind::BatchNorm { channels: width },
                    );
                }
                channels = width;
            }
            if let Some(config) = self.attention_at(i) {
                push(
                    "attention".into(),
                    LayerKind::Attention { channels, config },
                );
            }
            push("pool".into(), LayerKind::MaxPool);
        }
        let mut head = |name: &str, kind| {
            layers.push(LayerSpec {
                name: format!("head.{name}"),
                block: None,
                kind,
            })
        };
        let side = self.head.pool;
        head("pool", LayerKind::AvgPool { side });
        let mut features = channels * side * side;
        for (k, &width) in self.head.hidden.iter().enumerate() {
            head(
                &format!("fc{}", k + 1),
                LayerKind::Linear {
                    inputs: features,
                    outputs: width,
                    hidden: true,
                },
            );
            features = width;
        }
        head(
            "logits",
            LayerKind::Linear {
                inputs: features,
                outputs: self.num_classes,
                hidden: false,
            },
        );
        layers
    }

    /// The name and shape of every tensor of the model, in forward order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.layers()
            .iter()
            .flat_map(|layer| {
                layer
                    .tensors()
                    .into_iter()
                    .map(|(leaf, shape)| (format!("{}.{leaf}", layer.name), shape))
            })
            .collect()
    }
}

impl VggConfig {
    /// Checks that `tensors` are exactly the model's: every name present with its shape, and
    /// no other.
    pub fn check_tensors(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.check_tensors_subset(tensors)?;
        match self
            .tensor_shapes()
            .into_iter()
            .find(|(name, _)| !tensors.contains_key(name))
        {
            Some((name, _)) => Err(Error::Import {
                tensor: name,
                reason: format!("missing (a {} needs it)", self.arch_name()),
            }),
            None => Ok(()),
        }
    }

    /// Checks that every tensor of `tensors` belongs to the model with the right shape; missing
    /// ones are allowed (they are initialised fresh: new attention modules, a new last layer).
    pub fn check_tensors_subset(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let expected: HashMap<String, Vec<usize>> = self.tensor_shapes().into_iter().collect();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in names {
            let reason = match expected.get(name) {
                None => format!("is not part of a {} with this config", self.arch_name()),
                Some(shape) if tensors[name].dims() != shape.as_slice() => format!(
                    "has shape {:?}, the model needs {shape:?}",
                    tensors[name].dims()
                ),
                Some(_) => continue,
            };
            return Err(Error::Import {
                tensor: name.clone(),
                reason,
            });
        }
        Ok(())
    }
}
