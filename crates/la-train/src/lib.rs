//! Training VGG + attention models: optimisers (SGD with momentum/Nesterov/weight decay,
//! AdamW) with parameter groups, learning-rate schedules, cross-entropy with label smoothing
//! and soft targets, the epoch loop with evaluation, atomic resumable checkpoints, metrics
//! files and training curves.
//!
//! - [`config`]: `TrainConfig`, how to train, and its `Default` (every training default).
//! - [`trainer`]: the loop; [`checkpoint`]: run directories and resumable checkpoints;
//!   [`record`]: each epoch's figures, which [`metrics`] and [`plot`] write.
//! - [`optim`], [`schedule`], [`loss`]: the pieces of a step; [`parity`]: one step in both
//!   kernel forms, for tests and the selftest.
//! - [`ema`]: the weights' moving average; [`tensorboard`]: event files for TensorBoard.
//! - [`study`]: a grid of runs over seeds summarised as mean ± std and paired differences.
//! - [`collective`]: all-reduce, broadcast and abort across the ranks of a data-parallel
//!   run (one process, threads, MPI); [`data_parallel`]: the gradient buckets and the
//!   weight checks that make N ranks train as one process.

pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod data_parallel;
pub mod ema;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod parity;
pub mod plot;
pub mod record;
pub mod schedule;
pub mod study;
pub mod tensorboard;
pub mod trainer;

use std::path::PathBuf;

pub use checkpoint::{RunInfo, TrainState};
pub use collective::{Collective, SingleProcess, ThreadGroup};
pub use config::{EarlyStop, StopMetric, TrainConfig};
pub use ema::EmaConfig;
pub use optim::{Optimizer, OptimizerConfig};
pub use record::EpochRecord;
pub use schedule::{LrSchedule, Schedule};
pub use trainer::{evaluate, Control, EvalReport, Observer, Silent, StepInfo, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Data(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("training diverged at step {step}: {what} is NaN or infinite; the last good checkpoint is {}", checkpoint.display())]
    NonFinite {
        step: usize,
        what: String,
        checkpoint: PathBuf,
    },
    #[error("{}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    #[error("{}: {what}", path.display())]
    File {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint metadata entry that does not parse.
    #[error("{}: metadata `{key}` is malformed", path.display())]
    CheckpointEntry {
        path: PathBuf,
        key: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A checkpoint whose model tensors do not fit its config.
    #[error("{}: the model does not fit its config", path.display())]
    CheckpointModel {
        path: PathBuf,
        #[source]
        source: la_vgg::Error,
    },
    /// Another rank of a data-parallel run failed with this message; this one stops too.
    #[error("rank {rank} failed: {message}")]
    Rank { rank: usize, message: String },
    /// This rank's own error, which every other rank of the run has been told of (they stop
    /// with [`Error::Rank`]).
    #[error(transparent)]
    Reported(Box<Error>),
    /// The ranks of a data-parallel run do not fit together (models, loaders, options).
    #[error("data-parallel training: {0}")]
    Collective(String),
    #[error(transparent)]
    Write(#[from] la_core::fs::WriteError),
    #[error(transparent)]
    Model(#[from] la_vgg::Error),
    #[error(transparent)]
    Dataset(#[from] la_data::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
