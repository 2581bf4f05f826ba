//! Run directories and checkpoints.
//!
//! `checkpoint.safetensors` holds everything needed to resume (model tensors under `model.`,
//! optimiser buffers under `optim.`, and the train state, configs and class names in the
//! metadata) in one file, so it is replaced atomically as a whole. `last.safetensors` and
//! `best.safetensors` are plain model files (la-vgg's format) for `eval` and `predict`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use la_vgg::{ModelMetadata, Normalize, VggConfig};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::record::EpochRecord;
use crate::{Error, Result};

pub const CHECKPOINT: &str = "checkpoint.safetensors";
pub const LAST: &str = "last.safetensors";
pub const BEST: &str = "best.safetensors";
/// The best epoch's moving average of the weights, when the run keeps one.
pub const EMA_BEST: &str = "ema-best.safetensors";

/// Progress of a run, saved with every checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Completed epochs.
    pub epoch: usize,
    /// Completed optimiser steps.
    pub step: usize,
    pub best_top1: Option<f64>,
    pub best_epoch: Option<usize>,
    pub history: Vec<EpochRecord>,
    /// Where a run stopped in the middle of an epoch (`None` at an epoch's end).
    #[serde(default)]
    pub epoch_progress: Option<EpochProgress>,
    /// The moving average's best validation top-1, and its epoch.
    #[serde(default)]
    pub best_ema_top1: Option<f64>,
    #[serde(default)]
    pub best_ema_epoch: Option<usize>,
    /// Names loaded from pretrained weights when the run started (their learning-rate scale
    /// differs), kept so a resumed run has the same parameter groups.
    #[serde(default)]
    pub pretrained: Vec<String>,
}

/// How far into an epoch a run got, and its figures so far, so that a run resumed there
/// reports the epoch as an uninterrupted one would.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochProgress {
    /// Batches of the epoch done.
    pub batches: usize,
    pub sums: RunningSums,
    pub seconds: f64,
}

/// The training figures of an epoch so far: summed loss, correct predictions, images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningSums {
    pub loss: f64,
    pub correct: usize,
    pub seen: usize,
}

impl RunningSums {
    pub fn add(&mut self, mean_loss: f64, correct: usize, images: usize) {
        self.loss += mean_loss * images as f64;
        self.correct += correct;
        self.seen += images;
    }

    pub fn mean_loss(&self) -> f64 {
        self.loss / self.seen.max(1) as f64
    }

    pub fn top1(&self) -> f64 {
        self.correct as f64 / self.seen.max(1) as f64
    }
}

/// What a run needs besides the tensors: the model, how inputs look, and the class names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub model: VggConfig,
    pub train: TrainConfig,
    pub normalization: Normalize,
    pub input_size: usize,
    pub classes: Vec<String>,
}

/// Everything read back from `checkpoint.safetensors`.
pub struct Checkpoint {
    pub info: RunInfo,
    pub state: TrainState,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub optimizer_steps: u64,
    /// The weights' moving average (empty when the run keeps none).
    pub ema: HashMap<String, Tensor>,
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Checkpoint(e.to_string()))
}

/// The description of the model files (`last`, `best`) of a run.
pub fn model_metadata(info: &RunInfo, state: &TrainState) -> ModelMetadata {
    ModelMetadata {
        normalization: Some(info.normalization),
        classes: Some(info.classes.clone()),
        input_size: Some(info.input_size),
        source: Some("la-train".into()),
        epoch: Some(state.epoch),
        ..ModelMetadata::new(info.model.clone())
    }
}

/// Writes the resumable checkpoint atomically.
pub fn save_checkpoint(
    dir: &Path,
    info: &RunInfo,
    state: &TrainState,
    model: &HashMap<String, Tensor>,
    optimizer: (&HashMap<String, Tensor>, u64),
    ema: Option<&HashMap<String, Tensor>>,
    copies: &[PathBuf],
) -> Result<()> {
    let path = dir.join(CHECKPOINT);
    let mut named: Vec<(String, Tensor)> = Vec::with_capacity(model.len() + optimizer.0.len());
    for (k, t) in model {
        named.push((
            format!("model.{k}"),
            t.to_device(&Device::Cpu)?.contiguous()?,
        ));
    }
    for (k, t) in ema.into_iter().flatten() {
        named.push((format!("ema.{k}"), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    for (k, t) in optimizer.0 {
        named.push((
            format!("optim.{k}"),
            t.to_device(&Device::Cpu)?.contiguous()?,
        ));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = HashMap::new();
    meta.insert("run".to_string(), json(info)?);
    meta.insert("state".to_string(), json(state)?);
    meta.insert("optimizer_steps".to_string(), optimizer.1.to_string());
    let bytes = safetensors::serialize(named.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| Error::Checkpoint(format!("{}: cannot serialise: {e}", path.display())))?;
    for copy in copies {
        la_core::write_atomically(copy, &bytes)?;
    }
    la_core::write_atomically(&path, &bytes)?;
    Ok(())
}

/// Reads `checkpoint.safetensors` of a run directory.
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<Checkpoint> {
    load_checkpoint_file(&dir.join(CHECKPOINT), device)
}

/// `checkpoint-{epoch}.safetensors`: a kept copy of the checkpoint of an epoch's end.
pub fn epoch_checkpoint(dir: &Path, epoch: usize) -> PathBuf {
    dir.join(format!("checkpoint-{epoch}.safetensors"))
}

/// Keeps the `keep` best of the epochs' checkpoint copies (by validation top-1, else the
/// most recent), removing the others.
pub fn keep_best(dir: &Path, history: &[EpochRecord], keep: usize) -> Result<()> {
    let mut ranked: Vec<&EpochRecord> = history.iter().collect();
    // Best validation top-1 first, the earlier epoch first on a tie (as best.safetensors);
    // without validation figures, the most recent first.
    ranked.sort_by(|a, b| match (a.val_top1, b.val_top1) {
        (Some(x), Some(y)) => y.total_cmp(&x).then(a.epoch.cmp(&b.epoch)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => b.epoch.cmp(&a.epoch),
    });
    for r in ranked.iter().skip(keep) {
        let path = epoch_checkpoint(dir, r.epoch);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::File {
                    path,
                    what: "cannot remove an old checkpoint",
                    source: e,
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Reads a checkpoint file (`checkpoint.safetensors`, or a kept `checkpoint-{epoch}` copy).
pub fn load_checkpoint_file(path: &Path, device: &Device) -> Result<Checkpoint> {
    let path = path.to_path_buf();
    let bad = |why: String| Error::Checkpoint(format!("{}: {why}", path.display()));
    let bytes = std::fs::read(&path).map_err(|source| Error::File {
        path: path.clone(),
        what: "cannot read the checkpoint; is this a run directory?",
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a valid checkpoint ({e})")))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |key: &str| {
        meta.get(key)
            .ok_or_else(|| bad(format!("metadata `{key}` is missing")))
    };
    let entry = |key: &'static str| {
        let path = path.clone();
        move |source| Error::CheckpointEntry { path, key, source }
    };
    let info: RunInfo = serde_json::from_str(field("run")?).map_err(entry("run"))?;
    let state: TrainState = serde_json::from_str(field("state")?).map_err(entry("state"))?;
    let optimizer_steps: u64 = field("optimizer_steps")?
        .parse()
        .map_err(|e| bad(format!("metadata `optimizer_steps`: {e}")))?;
    let mut model = HashMap::new();
    let mut optimizer = HashMap::new();
    let mut ema = HashMap::new();
    for (name, view) in st.tensors() {
        let t = view
            .load(device)
            .map_err(|e| bad(format!("tensor {name}: {e}")))?;
        if t.dtype() != DType::F32 {
            return Err(bad(format!(
                "tensor {name} has dtype {:?}, expected F32",
                t.dtype()
            )));
        }
        if let Some(k) = name.strip_prefix("model.") {
            model.insert(k.to_string(), t);
        } else if let Some(k) = name.strip_prefix("optim.") {
            optimizer.insert(k.to_string(), t);
        } else if let Some(k) = name.strip_prefix("ema.") {
            ema.insert(k.to_string(), t);
        } else {
            return Err(bad(format!("unexpected tensor {name}")));
        }
    }
    for tensors in [&model, &ema].into_iter().filter(|t| !t.is_empty()) {
        info.model
            .check_tensors(tensors)
            .map_err(|source| Error::CheckpointModel {
                path: path.clone(),
                source,
            })?;
    }
    Ok(Checkpoint {
        info,
        state,
        model,
        optimizer,
        optimizer_steps,
        ema,
    })
}

/// Creates `dir` (and parents) and checks that it can be written, before any work is done.
pub fn prepare_run_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|source| Error::File {
        path: dir.to_path_buf(),
        what: "cannot create the run directory",
        source,
    })?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok").map_err(|source| Error::File {
        path: dir.to_path_buf(),
        what: "the run directory is not writable",
        source,
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(dir.to_path_buf())
}
