//! One module per subcommand.

pub mod attention_map;
pub mod bench;
pub mod data;
pub mod eval;
pub mod export;
pub mod gradcam;
pub mod predict;
pub mod selftest;
pub mod study;
pub mod summary;
pub mod train;
