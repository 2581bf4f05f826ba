//! PyTorch state dicts -> the project's names (the way back is [`crate::export`]).
//!
//! Three layouts are read, the architecture inferred from names and shapes:
//! - torchvision: `features.{i}` (conv, [BatchNorm,] ReLU, ..., MaxPool) and `classifier.{0,3,6}`;
//! - timm: the same `features.{i}`, `pre_logits.fc1` as a [hidden, c, 7, 7] conv,
//!   `pre_logits.fc2` as [hidden, hidden, 1, 1], `head.fc`;
//! - the article's: torchvision's Sequential with an attention module (`linear_query`,
//!   `linear_key`, `linear_value`, `out_proj`) before each max-pool, shifting the indices.
//!
//! As timm keeps its pretrained-weight filters beside its models, the conversion lives here.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor};
use la_attention::{AttentionConfig, AttentionKind};

use crate::config::{AttentionSites, HeadConfig, VggConfig};
use crate::export::ARTICLE_PROJECTIONS;
use crate::{Error, Result};

/// Which PyTorch layout a state dict was in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceLayout {
    Torchvision,
    Timm,
    /// The article's Sequential, attention modules inside `features`.
    Article,
}

impl SourceLayout {
    pub fn name(self) -> &'static str {
        match self {
            SourceLayout::Torchvision => "torchvision",
            SourceLayout::Timm => "timm",
            SourceLayout::Article => "article",
        }
    }
}

/// A converted state dict: the inferred config and the tensors under the project's names.
#[derive(Debug)]
pub struct Imported {
    pub layout: SourceLayout,
    pub config: VggConfig,
    pub tensors: HashMap<String, Tensor>,
}

fn bad(tensor: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Import {
        tensor: tensor.into(),
        reason: reason.into(),
    }
}

/// A tensor as f32 (f16, bf16 and f64 are converted), rejected when its dtype is not a float
/// or it holds NaN or infinite values.
pub(crate) fn float32(name: &str, t: Tensor) -> Result<Tensor> {
    let t = match t.dtype() {
        DType::F32 => t,
        DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
        other => {
            return Err(bad(
                name,
                format!("has dtype {other:?}, expected a float type"),
            ))
        }
    };
    let finite = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|x| x.is_finite());
    if !finite {
        return Err(bad(name, "contains NaN or infinite values"));
    }
    Ok(t)
}

/// Guesses the layout from the names present.
pub fn detect_layout(tensors: &HashMap<String, Tensor>) -> Result<SourceLayout> {
    let has = |prefix: &str| tensors.keys().any(|k| k.starts_with(prefix));
    let article_attention = tensors
        .keys()
        .any(|k| k.starts_with("features.") && k.contains(".linear_query."));
    if has("pre_logits.fc1.") {
        Ok(SourceLayout::Timm)
    } else if article_attention {
        Ok(SourceLayout::Article)
    } else if has("features.") && has("classifier.") {
        Ok(SourceLayout::Torchvision)
    } else {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let first = names
            .first()
            .map_or("(no tensors)".to_string(), |s| s.to_string());
        Err(bad(
            first,
            "fits no known layout: expected torchvision (`features.N`, `classifier.N`), timm \
             (`pre_logits.fc1`, `head.fc`) or the article's (`features.N.linear_query`)",
        ))
    }
}

/// Converts a PyTorch VGG state dict in any of the three layouts. Floats become f32;
/// non-finite values, unknown or missing tensors and shapes that do not chain are errors
/// naming the tensor.
pub fn import_state_dict(tensors: HashMap<String, Tensor>) -> Result<Imported> {
    let layout = detect_layout(&tensors)?;
    let mut pending: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in tensors {
        if name.ends_with("num_batches_tracked") {
            continue; // a BatchNorm counter, not a weight
        }
        let t = float32(&name, t)?;
        pending.insert(name, t);
    }
    let mut out = HashMap::new();
    let (blocks, batch_norm, attention, c_last) = import_features(&mut pending, &mut out)?;
    let (head, num_classes) = import_head(layout, &mut pending, &mut out, c_last)?;
    if let Some((name, t)) = pending.iter().next() {
        return Err(bad(
            name.clone(),
            format!(
                "{:?}: not part of a VGG in the {} layout",
                t.dims(),
                layout.name()
            ),
        ));
    }
    let attention = attention.map(|config| AttentionSites {
        config,
        blocks: attention_sites(&out, blocks.len()),
        input_size: None,
    });
    let config = VggConfig {
        blocks,
        batch_norm,
        attention,
        head,
        num_classes,
        in_channels: 3,
    };
    config.validate()?;
    Ok(Imported {
        layout,
        config,
        tensors: out,
    })
}

fn attention_sites(out: &HashMap<String, Tensor>, blocks: usize) -> Vec<usize> {
    (0..blocks)
        .filter(|i| out.contains_key(&format!("blocks.{i}.attention.query.weight")))
        .collect()
}

fn take(pending: &mut BTreeMap<String, Tensor>, name: &str, why: &str) -> Result<Tensor> {
    pending
        .remove(name)
        .ok_or_else(|| bad(name, format!("missing ({why})")))
}

fn expect_dims(name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() == want {
        Ok(())
    } else {
        Err(bad(
            name,
            format!("has shape {:?}, expected {want:?}", t.dims()),
        ))
    }
}

/// What sits at one index of the `features` Sequential, judged by its tensors.
enum Slot {
    Conv,
    BatchNorm,
    Attention,
    /// No tensors: a ReLU or a MaxPool.
    Empty,
}

fn slot(pending: &BTreeMap<String, Tensor>, idx: usize) -> Slot {
    let has = |leaf: &str| pending.contains_key(&format!("features.{idx}.{leaf}"));
    if has("running_mean") {
        Slot::BatchNorm
    } else if has("linear_query.weight") {
        Slot::Attention
    } else if has("weight") {
        Slot::Conv
    } else {
        Slot::Empty
    }
}

type Features = (Vec<Vec<usize>>, bool, Option<AttentionConfig>, usize);

/// Walks `features.{i}`: conv [BN] ReLU ... [attention] MaxPool, block after block.
fn import_features(
    pending: &mut BTreeMap<String, Tensor>,
    out: &mut HashMap<String, Tensor>,
) -> Result<Features> {
    let last_index = pending
        .keys()
        .filter_map(|k| {
            k.strip_prefix("features.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .ok_or_else(|| bad("features.0.weight", "missing (no conv layers at all)"))?;
    let mut blocks: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut batch_norm = None;
    let mut attention_sites: Vec<(usize, usize, usize)> = Vec::new(); // (index, c, d)
    let mut channels = 3usize;
    let mut idx = 0;
    while idx <= last_index {
        let block = blocks.len();
        match slot(pending, idx) {
            Slot::Conv => {
                let wname = format!("features.{idx}.weight");
                let w = take(pending, &wname, "conv weight")?;
                let width = w.dim(0).unwrap_or(0);
                expect_dims(&wname, &w, &[width, channels, 3, 3])?;
                let bname = format!("features.{idx}.bias");
                let b = take(pending, &bname, "conv bias")?;
                expect_dims(&bname, &b, &[width])?;
                let j = current.len();
                out.insert(format!("blocks.{block}.convs.{j}.weight"), w);
                out.insert(format!("blocks.{block}.convs.{j}.bias"), b);
                idx += 1;
                let has_bn = matches!(slot(pending, idx), Slot::BatchNorm);
                if *batch_norm.get_or_insert(has_bn) != has_bn {
                    return Err(bad(
                        format!("features.{idx}"),
                        "BatchNorm after some convs but not others",
                    ));
                }
                if has_bn {
                    for leaf in ["weight", "bias", "running_mean", "running_var"] {
                        let name = format!("features.{idx}.{leaf}");
                        let t = take(pending, &name, "BatchNorm parameter")?;
                        expect_dims(&name, &t, &[width])?;
                        out.insert(format!("blocks.{block}.norms.{j}.{leaf}"), t);
                    }
                    idx += 1;
                }
                if !matches!(slot(pending, idx), Slot::Empty) {
                    return Err(bad(
                        format!("features.{idx}"),
                        "expected a ReLU (no tensors) after a conv",
                    ));
                }
                idx += 1; // the ReLU
                current.push(width);
                channels = width;
            }
            Slot::Attention => {
                if current.is_empty() {
                    return Err(bad(
                        format!("features.{idx}.linear_query.weight"),
                        "attention before any conv of its block",
                    ));
                }
                let d = import_attention(pending, out, idx, block, channels)?;
                attention_sites.push((idx, channels, d));
                idx += 1;
            }
            Slot::Empty => {
                // A MaxPool closes the block.
                if current.is_empty() {
                    // Name the first tensor that the walk cannot place.
                    let stray = pending
                        .keys()
                        .filter(|k| k.starts_with("features."))
                        .min_by_key(|k| k.split('.').nth(1).and_then(|i| i.parse::<usize>().ok()))
                        .cloned()
                        .unwrap_or_else(|| format!("features.{idx}"));
                    return Err(bad(
                        stray,
                        format!("does not fit: a conv was expected at features.{idx}, after a pool (is a conv weight missing?)"),
                    ));
                }
                blocks.push(std::mem::take(&mut current));
                idx += 1;
            }
            Slot::BatchNorm => {
                return Err(bad(
                    format!("features.{idx}.running_mean"),
                    "BatchNorm without a conv before it",
                ));
            }
        }
    }
    if !current.is_empty() {
        blocks.push(current); // its pool has no tensors and may lie past the last index
    }
    let attention = if attention_sites.is_empty() {
        None
    } else {
        Some(AttentionConfig {
            reduction: shared_reduction(&attention_sites)?,
            ..AttentionConfig::new(AttentionKind::Softmax)
        })
    };
    Ok((blocks, batch_norm.unwrap_or(false), attention, channels))
}

/// The reduction r that gives every module its query width d = max(1, c / r) (integer
/// division), preferring the article's 8. Widths alone do not pin r down (64 channels with 8-wide
/// queries allow only 8, a 4-channel block with 1-wide queries allows any r >= 3), so the
/// ranges of all modules are intersected.
fn shared_reduction(sites: &[(usize, usize, usize)]) -> Result<usize> {
    let (mut lo, mut hi) = (1usize, usize::MAX);
    for &(idx, c, d) in sites {
        let (l, h) = if d == 1 {
            (c / 2 + 1, usize::MAX)
        } else {
            (c / (d + 1) + 1, c / d)
        };
        lo = lo.max(l);
        hi = hi.min(h);
        if lo > hi {
            return Err(bad(
                format!("features.{idx}.linear_query.weight"),
                format!("query width {d} for {c} channels fits no channel reduction shared with the other attention modules"),
            ));
        }
    }
    Ok(if (lo..=hi).contains(&8) { 8 } else { lo })
}

fn import_attention(
    pending: &mut BTreeMap<String, Tensor>,
    out: &mut HashMap<String, Tensor>,
    idx: usize,
    block: usize,
    channels: usize,
) -> Result<usize> {
    let q_name = format!("features.{idx}.linear_query.weight");
    let d = pending.get(&q_name).map_or(0, |t| t.dim(0).unwrap_or(0));
    if d == 0 || d > channels {
        return Err(bad(
            q_name,
            format!("query width {d} does not fit {channels} channels"),
        ));
    }
    for ((article, ours), rows) in ARTICLE_PROJECTIONS
        .into_iter()
        .zip([d, d, channels, channels])
    {
        let wname = format!("features.{idx}.{article}.weight");
        let w = take(pending, &wname, "attention projection")?;
        expect_dims(&wname, &w, &[rows, channels])?;
        let bname = format!("features.{idx}.{article}.bias");
        let b = take(pending, &bname, "attention projection bias")?;
        expect_dims(&bname, &b, &[rows])?;
        out.insert(format!("blocks.{block}.attention.{ours}.weight"), w);
        out.insert(format!("blocks.{block}.attention.{ours}.bias"), b);
    }
    Ok(d)
}

/// The classifier: a chain of Linear layers, the first of which sees the c x p x p pooled map.
fn import_head(
    layout: SourceLayout,
    pending: &mut BTreeMap<String, Tensor>,
    out: &mut HashMap<String, Tensor>,
    channels: usize,
) -> Result<(HeadConfig, usize)> {
    // (source name, weight as [out, in])
    let mut layers: Vec<(String, Tensor, Tensor)> = Vec::new();
    match layout {
        SourceLayout::Timm => {
            for name in ["pre_logits.fc1", "pre_logits.fc2", "head.fc"] {
                let w = take(pending, &format!("{name}.weight"), "timm classifier")?;
                let b = take(pending, &format!("{name}.bias"), "timm classifier")?;
                let rows = w.dim(0)?;
                let w = w.reshape((rows, w.elem_count() / rows.max(1)))?;
                layers.push((name.to_string(), w, b));
            }
        }
        SourceLayout::Torchvision | SourceLayout::Article => {
            let mut indices: Vec<usize> = pending
                .keys()
                .filter_map(|k| {
                    k.strip_prefix("classifier.")?
                        .split('.')
                        .next()?
                        .parse()
                        .ok()
                })
                .collect();
            indices.sort_unstable();
            indices.dedup();
            for i in indices {
                let name = format!("classifier.{i}");
                let w = take(pending, &format!("{name}.weight"), "classifier Linear")?;
                let b = take(pending, &format!("{name}.bias"), "classifier Linear")?;
                if w.rank() != 2 {
                    return Err(bad(
                        format!("{name}.weight"),
                        format!("has shape {:?}, expected a Linear [out, in]", w.dims()),
                    ));
                }
                layers.push((name, w, b));
            }
        }
    }
    let Some((first_name, first, _)) = layers.first() else {
        return Err(bad("classifier.0.weight", "missing (no classifier layers)"));
    };
    let inputs = first.dim(1)?;
    let pool =
        (1..=64)
            .find(|p| channels * p * p == inputs)
            .ok_or_else(|| {
                bad(
            format!("{first_name}.weight"),
            format!("takes {inputs} inputs, which is not {channels} channels times a square pool"),
        )
            })?;
    let mut hidden = Vec::new();
    let mut features = inputs;
    let count = layers.len();
    for (k, (name, w, b)) in layers.into_iter().enumerate() {
        let rows = w.dim(0)?;
        expect_dims(&format!("{name}.weight"), &w, &[rows, features])?;
        expect_dims(&format!("{name}.bias"), &b, &[rows])?;
        let ours = if k + 1 == count {
            "head.logits".to_string()
        } else {
            hidden.push(rows);
            format!("head.fc{}", k + 1)
        };
        out.insert(format!("{ours}.weight"), w);
        out.insert(format!("{ours}.bias"), b);
        features = rows;
    }
    let dropout = if hidden.is_empty() { 0.0 } else { 0.5 };
    Ok((
        HeadConfig {
            pool,
            hidden,
            dropout,
        },
        features,
    ))
}

/// Collapses the head's adaptive pool for inputs whose last feature map is 1x1 (32x32 images
/// through five pools): the pool then copies that value to all p x p positions, so the first
/// Linear (`head.fc1`, or `head.logits` without hidden layers) sees each channel p² times and
/// can sum its weights over the positions. The result, with a pool-1 head, gives the same
/// logits on such inputs from a [out, c] weight instead of [out, c·p²]. Errors unless the head
/// pools to p > 1 and the first Linear has its [out, c·p²] shape; other tensors are kept.
pub fn collapse_fc1(
    config: &VggConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<(VggConfig, HashMap<String, Tensor>)> {
    let p = config.head.pool;
    if p < 2 {
        return Err(Error::Config(format!(
            "collapse_fc1 needs a head that pools to p x p with p > 1 (as ImageNet's 7), this one pools to {p} x {p}"
        )));
    }
    let name = if config.head.hidden.is_empty() {
        "head.logits.weight"
    } else {
        "head.fc1.weight"
    };
    let w = tensors
        .get(name)
        .ok_or_else(|| bad(name, "missing (the first Linear of the head, to collapse)"))?;
    let (rows, c) = (w.dim(0).unwrap_or(0), config.out_channels());
    expect_dims(name, w, &[rows, c * p * p])?;
    let mut out = tensors.clone();
    out.insert(name.to_string(), w.reshape((rows, c, p * p))?.sum(2)?);
    let mut config = config.clone();
    config.head.pool = 1;
    Ok((config, out))
}

/// Adapts a loaded model before it is trained or saved again: `attention` is the attention
/// wanted (None: no modules), `classes` asks for a fresh last layer with that many outputs.
/// Modules of the kind already there are kept (with `attention`'s `zero_init_out` recorded);
/// those of another kind are dropped and the removed tensors are left for seeded
/// initialisation. Returns the new config, the tensors kept, and notes for the user.
pub fn adapt(
    mut config: VggConfig,
    mut tensors: HashMap<String, Tensor>,
    attention: Option<AttentionConfig>,
    classes: Option<usize>,
) -> Result<(VggConfig, HashMap<String, Tensor>, Vec<String>)> {
    let mut notes = Vec::new();
    if let Some(n) = classes {
        config.num_classes = n;
        tensors.retain(|name, _| !name.starts_with("head.logits."));
        notes.push(format!("a new last layer with {n} outputs"));
    }
    match (config.attention.as_mut(), attention) {
        (Some(sites), Some(wanted)) if sites.config.kind == wanted.kind => {
            sites.config.zero_init_out = wanted.zero_init_out;
            notes.push(format!(
                "the source's {} attention modules (blocks {:?}) are kept",
                sites.config.kind, sites.blocks
            ));
        }
        (None, None) => {}
        (source, wanted) => {
            if let Some(a) = source.map(|s| s.config) {
                notes.push(format!(
                    "the source's {} attention modules are dropped{}",
                    a.kind,
                    wanted.map_or(String::new(), |w| format!(" for fresh {} ones", w.kind))
                ));
            }
            tensors.retain(|name, _| !name.contains(".attention."));
            config = config.with_attention(wanted);
        }
    }
    config.check_tensors_subset(&tensors)?;
    Ok((config, tensors, notes))
}
