//! One module per subcommand.

pub mod eval;
pub mod gradcam;
pub mod predict;
pub mod summary;
pub mod train;
