//! What a run records of each epoch: the rows of metrics.csv, the points of the curves and
//! the history a checkpoint keeps.

use serde::{Deserialize, Serialize};

/// One epoch's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub val_loss: Option<f64>,
    pub val_top1: Option<f64>,
    pub val_top5: Option<f64>,
    /// The weights' moving average on the validation set, when the run keeps one.
    #[serde(default)]
    pub ema_val_loss: Option<f64>,
    #[serde(default)]
    pub ema_val_top1: Option<f64>,
    pub seconds: f64,
    pub images_per_s: f64,
}
