//! Our tensors -> PyTorch state dicts that `load_state_dict` takes as they are: the
//! article's Sequential (with its attention modules), torchvision's `vgg{11,13,16,19}[_bn]`
//! and timm's. The ONNX graph is `la_vgg::onnx`'s.

use std::collections::HashMap;
use std::fmt;

use candle_core::Tensor;
use la_attention::AttentionKind;

use crate::config::{standard_blocks, HeadConfig, VggConfig};
use crate::layers::LayerKind;
use crate::{Error, Result};

/// A PyTorch layout to export to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// The article's Sequential: torchvision's with an attention module before each pool
    /// that has one (`bench/reference/seed_model.py`, `mode="intended"`).
    Article,
    /// `torchvision.models.vgg16_bn()` and its siblings.
    Torchvision,
    /// `timm.create_model("vgg16_bn")` and its siblings.
    Timm,
}

impl Layout {
    pub const ALL: [Layout; 3] = [Layout::Article, Layout::Torchvision, Layout::Timm];

    pub fn name(self) -> &'static str {
        match self {
            Layout::Article => "article",
            Layout::Torchvision => "torchvision",
            Layout::Timm => "timm",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn missing(name: &str) -> Error {
    Error::Import {
        tensor: name.to_string(),
        reason: "missing from the model being exported".into(),
    }
}

/// The model's tensors in `layout`'s names and shapes; an error saying why when the layout
/// cannot hold the model.
pub fn state_dict(
    layout: Layout,
    config: &VggConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    match layout {
        Layout::Article => article_layout(config, tensors),
        Layout::Torchvision => {
            torchvision_builder(layout, config)?;
            article_layout(config, tensors)
        }
        Layout::Timm => {
            torchvision_builder(layout, config)?;
            let mut out = article_layout(config, tensors)?;
            let hidden = config.head.hidden[0];
            let c_last = config
                .blocks
                .last()
                .and_then(|b| b.last())
                .copied()
                .unwrap_or(0);
            let p = config.head.pool;
            // timm's ConvMlp: the first two Linears as a 7x7 and a 1x1 convolution.
            for (from, to, shape) in [
                ("classifier.0", "pre_logits.fc1", vec![hidden, c_last, p, p]),
                ("classifier.3", "pre_logits.fc2", vec![hidden, hidden, 1, 1]),
                ("classifier.6", "head.fc", vec![config.num_classes, hidden]),
            ] {
                let w = out
                    .remove(&format!("{from}.weight"))
                    .ok_or_else(|| missing(from))?;
                let b = out
                    .remove(&format!("{from}.bias"))
                    .ok_or_else(|| missing(from))?;
                out.insert(format!("{to}.weight"), w.reshape(shape)?);
                out.insert(format!("{to}.bias"), b);
            }
            Ok(out)
        }
    }
}

/// The torchvision (or timm) builder whose model has exactly `config`'s tensors, e.g.
/// `vgg16_bn`; an error naming what differs when there is none.
pub fn torchvision_builder(layout: Layout, config: &VggConfig) -> Result<String> {
    let refuse = |why: String| {
        Err(Error::Config(format!(
            "{layout} cannot hold this {}: {why}; the article layout can (`--format article`)",
            config.arch_name()
        )))
    };
    if let Some(a) = config.attention_config() {
        return refuse(format!(
            "{layout} has no attention module (the model has {} attention)",
            a.kind
        ));
    }
    let depth = config.blocks.iter().map(Vec::len).sum::<usize>() + 3;
    if standard_blocks(depth).ok().as_ref() != Some(&config.blocks) || config.in_channels != 3 {
        return refuse(format!(
            "its widths {:?} are not VGG's standard ones (a --width other than 1?)",
            config.blocks
        ));
    }
    let imagenet = HeadConfig::imagenet();
    if config.head.pool != imagenet.pool || config.head.hidden != imagenet.hidden {
        return refuse(format!(
            "its head (pool {}, hidden {:?}) is not the ImageNet head (pool 7, hidden [4096, 4096]) {layout} builds",
            config.head.pool, config.head.hidden
        ));
    }
    let bn = if config.batch_norm { "_bn" } else { "" };
    Ok(format!("vgg{depth}{bn}"))
}

/// The article's names of our attention projections.
pub(crate) const ARTICLE_PROJECTIONS: [(&str, &str); 4] = [
    ("linear_query", "query"),
    ("linear_key", "key"),
    ("linear_value", "value"),
    ("out_proj", "out"),
];

/// Our tensors -> the article's Sequential layout (torchvision's when there is no attention),
/// loadable by `shared/reference/seed_model.py` (`VGG(cfg, ..., mode="intended")`) or
/// torchvision. Only the `softmax` kind exists in the article's PyTorch code.
pub fn article_layout(
    config: &VggConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    if let Some(a) = config.attention_config() {
        if a.kind != AttentionKind::Softmax {
            return Err(Error::Config(format!(
                "the article's PyTorch module computes softmax attention; a model with {} attention cannot be exported to its layout",
                a.kind
            )));
        }
    }
    let mut out = HashMap::new();
    // Index in `features`, and whether the ReLU of the last conv is still to be counted.
    let (mut idx, mut relu_pending, mut linear) = (0, false, 0);
    for layer in config.layers() {
        let target = match layer.kind {
            LayerKind::Conv { .. } | LayerKind::Attention { .. } | LayerKind::MaxPool => {
                idx += usize::from(std::mem::take(&mut relu_pending));
                relu_pending = matches!(layer.kind, LayerKind::Conv { .. });
                idx += 1;
                format!("features.{}", idx - 1)
            }
            LayerKind::BatchNorm { .. } => {
                idx += 1;
                format!("features.{}", idx - 1)
            }
            // torchvision's classifier: Linear, ReLU, Dropout per hidden layer.
            LayerKind::Linear { .. } => {
                linear += 1;
                format!("classifier.{}", 3 * (linear - 1))
            }
            LayerKind::AvgPool { .. } => continue,
        };
        for (leaf, _) in layer.tensors() {
            let ours = format!("{}.{leaf}", layer.name);
            let t = tensors.get(&ours).cloned().ok_or_else(|| missing(&ours))?;
            let leaf = ARTICLE_PROJECTIONS
                .iter()
                .find_map(|(article, ours)| {
                    leaf.strip_prefix(ours)
                        .filter(|rest| rest.starts_with('.'))
                        .map(|rest| format!("{article}{rest}"))
                })
                .unwrap_or(leaf);
            out.insert(format!("{target}.{leaf}"), t);
        }
    }
    Ok(out)
}
