//! Seeding. Every random number of a run comes from a ChaCha stream keyed by the run's seed
//! and what the numbers are for, never from a shared or thread-local generator, so a result
//! does not depend on thread timing or the number of threads.
//!
//! ChaCha by name rather than `rand`'s `StdRng`, whose algorithm `rand` may change between
//! versions and with it every initialisation and augmentation. Data streams use 8 rounds
//! (one is drawn per sample and per epoch, so they are many and short); parameter and dropout
//! streams use 12, the generator `StdRng` was when the published runs were made, so their
//! numbers stay as they were.

use rand::SeedableRng;
pub use rand_chacha::{ChaCha12Rng, ChaCha8Rng};

/// What a data stream is used for; part of the key so that the shuffle, a sample's
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

/// The data generator for one (seed, epoch, index, purpose).
pub fn stream(seed: u64, epoch: u64, index: u64, purpose: Purpose) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..].copy_from_slice(&(purpose as u64).to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// The generator of one named model quantity (a variable's initial values, a dropout
/// layer's masks): keyed by `seed` and the FNV-1a hash of `label`.
pub fn labelled(seed: u64, label: &str) -> ChaCha12Rng {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in label.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    ChaCha12Rng::seed_from_u64(seed ^ h)
}
