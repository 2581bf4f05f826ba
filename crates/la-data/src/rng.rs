//! Seeding. Every random choice in the crate draws from a ChaCha8 stream keyed by
//! (seed, epoch, index, purpose) rather than from a shared generator, so a result never
//! depends on which thread ran first or how many threads there were.
//!
//! ChaCha8 rather than `StdRng`: `rand` documents that `StdRng`'s algorithm may change
//! between versions, which would silently change every augmentation.

use rand::SeedableRng;
pub use rand_chacha::ChaCha8Rng as SampleRng;

/// What a stream is used for; part of the key so that the shuffle, a sample's
/// augmentation and a batch's mix never share random numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    Shuffle = 1,
    Sample = 2,
    Mix = 3,
    Split = 4,
    Synthetic = 5,
}

/// The generator for one (seed, epoch, index, purpose).
pub fn stream(seed: u64, epoch: u64, index: u64, purpose: Purpose) -> SampleRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..].copy_from_slice(&(purpose as u64).to_le_bytes());
    SampleRng::from_seed(key)
}

/// The generator that augments sample `index` (a data set index) in `epoch`.
pub fn sample_rng(seed: u64, epoch: usize, index: usize) -> SampleRng {
    stream(seed, epoch as u64, index as u64, Purpose::Sample)
}
