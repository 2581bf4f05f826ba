//! Metrics files of a run: `metrics.jsonl` (one JSON object per step and per epoch, appended)
//! and `epochs.csv` (rewritten from the history after every epoch).

use std::io::Write;
use std::path::Path;

use crate::record::EpochRecord;
use crate::{Error, Result};

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::File {
        path: path.to_path_buf(),
        what: "cannot write",
        source,
    }
}

/// Appends one JSON line to `dir/metrics.jsonl`.
pub fn append_jsonl(dir: &Path, value: &serde_json::Value) -> Result<()> {
    let path = dir.join("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| io_error(&path, e))?;
    writeln!(f, "{value}").map_err(|e| io_error(&path, e))
}

/// Rewrites `dir/epochs.csv` from the per-epoch history.
pub fn write_csv(dir: &Path, history: &[EpochRecord]) -> Result<()> {
    let mut text = String::from(
        "epoch,lr,train_loss,train_top1,val_loss,val_top1,val_top5,ema_val_loss,ema_val_top1,seconds,images_per_s\n",
    );
    let opt = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.6}"));
    for r in history {
        text.push_str(&format!(
            "{},{:.6e},{:.6},{:.6},{},{},{},{},{},{:.2},{:.1}\n",
            r.epoch,
            r.lr,
            r.train_loss,
            r.train_top1,
            opt(r.val_loss),
            opt(r.val_top1),
            opt(r.val_top5),
            opt(r.ema_val_loss),
            opt(r.ema_val_top1),
            r.seconds,
            r.images_per_s
        ));
    }
    la_core::write_atomically(&dir.join("epochs.csv"), text.as_bytes())?;
    Ok(())
}
