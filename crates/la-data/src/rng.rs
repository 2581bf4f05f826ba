//! Seeding: every random choice in the crate draws from a ChaCha8 stream of
//! [`la_core::rng`] keyed by (seed, epoch, index, purpose) rather than from a shared
//! generator, so a result never depends on which thread ran first or how many threads there
//! were.

pub use la_core::rng::{stream, ChaCha8Rng as SampleRng, Purpose};

/// The generator that augments sample `index` (a data set index) in `epoch`.
pub fn sample_rng(seed: u64, epoch: usize, index: usize) -> SampleRng {
    stream(seed, epoch as u64, index as u64, Purpose::Sample)
}
