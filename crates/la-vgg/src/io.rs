//! Weights files: safetensors with the model's [`ModelMetadata`] (config, normalisation,
//! classes, ...), so that loading needs no architecture flags. Files in a PyTorch layout
//! (no `config` entry) are converted on load by [`crate::import`].

use std::collections::HashMap;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};

use crate::metadata::ModelMetadata;
use crate::{Error, Result};

/// A model's weights under the project's names, with what is needed to use them.
#[derive(Debug)]
pub struct WeightsFile {
    pub metadata: ModelMetadata,
    pub tensors: HashMap<String, Tensor>,
}

impl WeightsFile {
    pub fn config(&self) -> &crate::VggConfig {
        &self.metadata.config
    }
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
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
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| file_error(path, not_safetensors(&bytes, e)))?;
    let map = safetensors::SafeTensors::read_metadata(&bytes)
        .map(|(_, m)| m.metadata().clone().unwrap_or_default())
        .unwrap_or_default();
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = view
            .load(device)
            .map_err(|e| file_error(path, format!("tensor {name}: {e}")))?;
        tensors.insert(name, t);
    }
    let in_file = |e: Error| Error::InFile {
        path: path.to_path_buf(),
        source: Box::new(e),
    };
    let metadata_error = |source| Error::Metadata {
        path: path.to_path_buf(),
        source,
    };
    let config = ModelMetadata::config_in(&map).map_err(metadata_error)?;
    let (config, tensors) = match config {
        Some(config) => {
            let tensors = to_f32(tensors).map_err(in_file)?;
            config.check_tensors(&tensors).map_err(in_file)?;
            (config, tensors)
        }
        None => {
            let imported = crate::import::import_state_dict(tensors).map_err(in_file)?;
            (imported.config, imported.tensors)
        }
    };
    let metadata = ModelMetadata::from_map(map, config).map_err(metadata_error)?;
    Ok(WeightsFile { metadata, tensors })
}

fn to_f32(tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    tensors
        .into_iter()
        .map(|(name, t)| Ok((name.clone(), crate::import::float32(&name, t)?)))
        .collect()
}

/// Writes `tensors` with their `metadata` to `path` atomically: a temporary file beside it,
/// flushed to disk, then renamed over it, so an existing file is never left half-written.
pub fn save_weights(
    path: &Path,
    metadata: &ModelMetadata,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    metadata.config.check_tensors(tensors)?;
    save_tensors(path, tensors, Some(metadata.to_map()))
}

/// Writes any named tensors as f32 safetensors (a PyTorch state dict, a batch dump),
/// atomically as [`save_weights`], names sorted.
pub fn save_tensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut named: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = match t.dtype() {
            DType::F32 | DType::I64 | DType::U32 | DType::U8 => t.clone(),
            _ => t.to_dtype(DType::F32)?,
        };
        named.push((name, t.to_device(&Device::Cpu)?.contiguous()?));
    }
    named.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = safetensors::serialize(named.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| file_error(path, format!("cannot serialise: {e}")))?;
    la_core::write_atomically(path, &bytes)?;
    Ok(())
}
