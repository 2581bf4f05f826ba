//! Developer tasks of the workspace, run as `cargo xtask <task>` (an alias in
//! `.cargo/config.toml`), in the manner of rust-analyzer's xtask: a small `main` that parses
//! the command line and one module per task.
//!
//! - [`hub`]: downloads from the Hugging Face Hub (or a mirror) into the standard cache,
//!   configured from the environment as the Python client is (`HF_HOME`, `HF_ENDPOINT`,
//!   `HF_TOKEN`, ...).
//! - [`convert`]: a PyTorch VGG state dict (torchvision, timm or the article's layout) -> a
//!   weights file of ours, ready to train from (attention modules, a new head, ...).
//!
//! The product never depends on this crate: the conversion itself lives in `la_vgg::import`.

pub mod convert;
pub mod hub;

use std::path::PathBuf;

/// The workspace root (the directory above this crate), for default output paths.
pub fn project_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The timm repository holding torchvision's ImageNet weights for VGG-`depth` (`_bn` with
/// BatchNorm), e.g. `timm/vgg16.tv_in1k`.
pub fn timm_repo(depth: usize, batch_norm: bool) -> String {
    let bn = if batch_norm { "_bn" } else { "" };
    format!("timm/vgg{depth}{bn}.tv_in1k")
}
