//! Spatial attention for CNN feature maps.
//!
//! [`SpatialAttention`] maps a [b, c, h, w] feature map to one of the same shape: each of the
//! N = h*w positions is a token, projected to queries and keys (c/r channels) and values (c),
//! mixed by one of the [`AttentionKind`]s, projected back by `out` and added to the input.
//! `softmax` is the article's module with its intended meaning, exact but computed in
//! O(N) memory; `linear`, `efficient` and `relu-linear` are O(N) in time as well.
//! The ops themselves (fused CPU kernels and their device-generic forms) are in `la-kernels`;
//! this crate holds the modules, their configuration and their cost.
//!
//! - [`kind`]: the kinds and their names; [`config`]: a module's configuration and cost;
//! - [`module`]: [`SpatialAttention`], the module itself;
//! - [`performer`], [`linformer`]: the two kinds with parameters of their own (random
//!   features; token projections).

pub mod config;
pub mod kind;
pub mod linformer;
pub mod module;
pub mod performer;

pub use config::{
    macs, quadratic_macs, AttentionConfig, AttentionInit, DEFAULT_PROJECTED_TOKENS,
    DEFAULT_RANDOM_FEATURES, DEFAULT_REDUCTION,
};
pub use kind::AttentionKind;
pub use module::SpatialAttention;

/// Errors from building an attention module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("attention over {channels} channels with reduction {reduction}: {reason}")]
    InvalidConfig {
        channels: usize,
        reduction: usize,
        reason: &'static str,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
