//! VGG 11/13/16/19 (optionally with BatchNorm) with spatial attention modules from
//! `la-attention` after the last conv of chosen blocks, as the article does.
//!
//! - [`config`]: the serde config table (depth, widths, attention sites, head).
//! - [`layers`]: the one walk over a config's layers (names, shapes, costs) that the model,
//!   the weight checks, the summary, import/export and the bench all read.
//! - [`conv`]: the 3x3 convolution layer (its kernels are in `la-kernels`).
//! - [`model`]: the network, in candle-nn's style (`Module`/`ModuleT`, `VarBuilder` paths),
//!   with timm's `forward_features` / `forward_head` / `forward_intermediates`.
//! - [`import`]: torchvision / timm / article state dicts -> ours; [`export`]: the way back.
//! - [`onnx`]: the model as an ONNX graph.
//! - [`metadata`]: what a weights file says besides its tensors (config, normalisation, classes, ...).
//! - [`io`]: weights files, written atomically.
//! - [`params`]: trainable variables with seeded initialisation (Candle's CPU RNG has no seed).
//! - [`summary`]: per-layer shapes, parameters and multiply-accumulates.
//! - [`explain`]: the CAM family (Grad-CAM and six more) on any block's output, and how
//!   faithful a map is (confidence change, ROAD).

pub mod config;
pub mod conv;
pub mod explain;
pub mod export;
pub mod import;
pub mod io;
pub mod layers;
pub mod metadata;
pub mod model;
pub mod onnx;
pub mod params;
pub mod summary;

use std::path::PathBuf;

pub use config::{AttentionSites, HeadConfig, VggConfig};
pub use io::{load_weights, save_tensors, save_weights, WeightsFile};
pub use la_core::Normalize;
pub use layers::{LayerKind, LayerSpec};
pub use metadata::ModelMetadata;
pub use model::{BlockTaps, ConvBnRelu, Intermediates, Vgg};
pub use params::trainable;

/// Errors of this crate; each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("tensor `{tensor}` {reason}")]
    Import { tensor: String, reason: String },
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// What is wrong inside a file: its metadata, a tensor, the layout.
    #[error("{}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },
    #[error("{}", path.display())]
    Metadata {
        path: PathBuf,
        #[source]
        source: metadata::MetadataError,
    },
    #[error("bad input: {0}")]
    Input(String),
    #[error(transparent)]
    Write(#[from] la_core::fs::WriteError),
    #[error(transparent)]
    Attention(#[from] la_attention::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Vgg {
    /// A model from a loaded weights file, on `device` in `dtype`.
    pub fn from_weights(
        weights: &WeightsFile,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let config = weights.config();
        config.check_tensors(&weights.tensors)?;
        let vb = candle_nn::VarBuilder::from_tensors(weights.tensors.clone(), dtype, device);
        Vgg::new(config.clone(), vb)
    }
}
