//! The vocabulary every crate of the workspace shares, so that none has to import it from a
//! sibling: la-vgg and la-data sit side by side, and both need these.
//!
//! - [`normalize`]: the per-channel input normalisation that weights files record and
//!   pipelines apply.
//! - [`rng`]: the seeded ChaCha generators behind initialisation, dropout and data.
//! - [`fs`]: writing a file atomically (a temporary file beside it, then a rename).

pub mod fs;
pub mod normalize;
pub mod rng;

pub use fs::{write_atomically, AtomicFile};
pub use normalize::Normalize;
