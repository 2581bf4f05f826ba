//! Weights files: safetensors with the model config (and input normalisation, source) in
//! the metadata, so that loading needs no architecture flags. Files in a PyTorch layout
//! (no `config` entry) are converted on load by [`crate::import`].

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::VggConfig;
use crate::{Error, Result};

/// Per-channel input normalisation the weights were trained with: (x / 255 - mean) / std.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    /// torchvision's ImageNet statistics, which the pretrained VGG weights expect.
    pub const IMAGENET: Normalization = Normalization {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
}

/// A model's weights under the project's names, with what is needed to use them.
#[derive(Debug)]
pub struct WeightsFile {
    pub config: VggConfig,
    pub tensors: HashMap<String, Tensor>,
    /// `None` when the file does not say (a PyTorch state dict).
    pub normalization: Option<Normalization>,
    /// Every metadata entry of the file (including `config`).
    pub metadata: HashMap<String, String>,
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The name and shape of every tensor a model of `config` has, in name order.
pub fn expected_shapes(config: &VggConfig) -> BTreeMap<String, Vec<usize>> {
    let mut shapes = BTreeMap::new();
    let mut channels = config.in_channels;
    for (i, widths) in config.blocks.iter().enumerate() {
        for (j, &width) in widths.iter().enumerate() {
            shapes.insert(
                format!("blocks.{i}.convs.{j}.weight"),
                vec![width, channels, 3, 3],
            );
            shapes.insert(format!("blocks.{i}.convs.{j}.bias"), vec![width]);
            if config.batch_norm {
                for leaf in ["weight", "bias", "running_mean", "running_var"] {
                    shapes.insert(format!("blocks.{i}.norms.{j}.{leaf}"), vec![width]);
                }
            }
            channels = width;
        }
        if let (Some(a), true) = (&config.attention, config.has_attention(i)) {
            let d = a.key_channels(channels);
            for (name, rows) in [
                ("query", d),
                ("key", d),
                ("value", channels),
                ("out", channels),
            ] {
                shapes.insert(
                    format!("blocks.{i}.attention.{name}.weight"),
                    vec![rows, channels],
                );
                shapes.insert(format!("blocks.{i}.attention.{name}.bias"), vec![rows]);
            }
        }
    }
    let mut features = channels * config.head.pool * config.head.pool;
    for (k, &width) in config.head.hidden.iter().enumerate() {
        shapes.insert(format!("head.fc{}.weight", k + 1), vec![width, features]);
        shapes.insert(format!("head.fc{}.bias", k + 1), vec![width]);
        features = width;
    }
    shapes.insert(
        "head.logits.weight".into(),
        vec![config.num_classes, features],
    );
    shapes.insert("head.logits.bias".into(), vec![config.num_classes]);
    shapes
}

/// Checks that `tensors` are exactly the model's: every name present with its shape, and
/// no other.
pub fn check_tensors(config: &VggConfig, tensors: &HashMap<String, Tensor>) -> Result<()> {
    check_tensors_subset(config, tensors)?;
    match expected_shapes(config)
        .into_keys()
        .find(|name| !tensors.contains_key(name))
    {
        Some(name) => Err(Error::Import {
            tensor: name,
            reason: format!("missing (a {} needs it)", config.arch_name()),
        }),
        None => Ok(()),
    }
}

/// Checks that every tensor of `tensors` belongs to the model with the right shape; missing
/// ones are allowed (they are initialised fresh: new attention modules, a new last layer).
pub fn check_tensors_subset(config: &VggConfig, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let expected = expected_shapes(config);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        match expected.get(name) {
            None => {
                return Err(Error::Import {
                    tensor: name.clone(),
                    reason: format!("is not part of a {} with this config", config.arch_name()),
                })
            }
            Some(shape) if tensors[name].dims() != shape.as_slice() => {
                return Err(Error::Import {
                    tensor: name.clone(),
                    reason: format!(
                        "has shape {:?}, the model needs {shape:?}",
                        tensors[name].dims()
                    ),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Why `bytes` are not a safetensors file, with what to do when we know it: a PyTorch
/// pickle (`torch.save`'s zip archive, or a bare pickle) is named as such, since it is the
/// file users most often give by mistake.
pub fn not_safetensors(bytes: &[u8], error: impl std::fmt::Display) -> String {
    let zip = bytes.starts_with(b"PK\x03\x04");
    let pickle = bytes.first() == Some(&0x80) && bytes.get(1).is_some_and(|p| (2..=5).contains(p));
    if zip || pickle {
        "a PyTorch pickle (.pth/.pt from torch.save), not a safetensors file: la never \
         unpickles (loading a pickle can run code); convert it where PyTorch is installed, \
         e.g. `python -c \"import torch, safetensors.torch as st; \
         st.save_file(torch.load('model.pth', weights_only=True), 'model.safetensors')\"`, \
         and give the .safetensors file"
            .to_string()
    } else {
        format!("not a valid safetensors file ({error})")
    }
}

/// Reads a weights file: ours (config in the metadata) or a PyTorch state dict in the
/// torchvision, timm or article layout. Errors name the file and what is wrong with it.
pub fn load_weights(path: &Path, device: &Device) -> Result<WeightsFile> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| file_error(path, not_safetensors(&bytes, e)))?;
    let metadata = safetensors::SafeTensors::read_metadata(&bytes)
        .map(|(_, m)| m.metadata().clone().unwrap_or_default())
        .unwrap_or_default();
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = view
            .load(device)
            .map_err(|e| file_error(path, format!("tensor {name}: {e}")))?;
        tensors.insert(name, t);
    }
    let in_file = |e: Error| match e {
        Error::File { .. } => e,
        other => file_error(path, other),
    };
    let (config, tensors) = match metadata.get("config") {
        Some(json) => {
            let config: VggConfig = serde_json::from_str(json).map_err(|e| {
                file_error(
                    path,
                    format!("metadata `config` is not a model config: {e}"),
                )
            })?;
            config.validate().map_err(in_file)?;
            let tensors = to_f32(tensors).map_err(in_file)?;
            check_tensors(&config, &tensors).map_err(in_file)?;
            (config, tensors)
        }
        None => {
            let imported = crate::import::import_state_dict(tensors).map_err(in_file)?;
            (imported.config, imported.tensors)
        }
    };
    let normalization = match metadata.get("normalization") {
        Some(json) => Some(serde_json::from_str(json).map_err(|e| {
            file_error(path, format!("metadata `normalization` is malformed: {e}"))
        })?),
        None => None,
    };
    Ok(WeightsFile {
        config,
        tensors,
        normalization,
        metadata,
    })
}

fn to_f32(tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    tensors
        .into_iter()
        .map(|(name, t)| Ok((name.clone(), crate::import::float32(&name, t)?)))
        .collect()
}

/// Writes `tensors` with `config` (and `normalization`, and any `extra` metadata) to `path`
/// atomically: a temporary file beside it, flushed to disk, then renamed over it, so an
/// existing file is never left half-written.
pub fn save_weights(
    path: &Path,
    config: &VggConfig,
    tensors: &HashMap<String, Tensor>,
    normalization: Option<Normalization>,
    extra: &HashMap<String, String>,
) -> Result<()> {
    check_tensors(config, tensors)?;
    let mut metadata = extra.clone();
    metadata.insert(
        "config".into(),
        serde_json::to_string(config).map_err(|e| Error::Config(e.to_string()))?,
    );
    if let Some(n) = normalization {
        metadata.insert(
            "normalization".into(),
            serde_json::to_string(&n).map_err(|e| Error::Config(e.to_string()))?,
        );
    }
    let mut named: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        named.push((
            name,
            t.to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .contiguous()?,
        ));
    }
    named.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = safetensors::serialize(named.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| file_error(path, format!("cannot serialise: {e}")))?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| file_error(path, "is not a file path"))?
        .to_string_lossy();
    // Unique per process and call, so two writers of one path never share a temporary file.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{n}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        #[cfg(unix)]
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        file_error(path, format!("cannot write: {e}"))
    })
}
