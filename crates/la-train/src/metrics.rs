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

/// Reads `dir/epochs.csv` back: the history [`write_csv`] wrote.
pub fn read_csv(dir: &Path) -> Result<Vec<EpochRecord>> {
    let path = dir.join("epochs.csv");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::File {
        path: path.clone(),
        what: "cannot read",
        source,
    })?;
    let bad = |line: usize, reason: String| Error::Io {
        path: path.clone(),
        reason: format!("line {line}: {reason}"),
    };
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = match lines.next() {
        Some((_, h)) => h.split(',').collect(),
        None => return Err(bad(1, "empty file".into())),
    };
    let mut history = Vec::new();
    for (i, line) in lines {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != header.len() {
            return Err(bad(
                i + 1,
                format!("{} fields, the header has {}", fields.len(), header.len()),
            ));
        }
        let value = |name: &str| -> Result<Option<f64>> {
            let Some(k) = header.iter().position(|h| *h == name) else {
                return Err(bad(1, format!("no column `{name}`")));
            };
            match fields[k] {
                "" => Ok(None),
                v => v
                    .parse::<f64>()
                    .map(Some)
                    .map_err(|_| bad(i + 1, format!("`{name}` is `{v}`, not a number"))),
            }
        };
        let need = |name: &str| -> Result<f64> {
            value(name)?.ok_or_else(|| bad(i + 1, format!("`{name}` is empty")))
        };
        history.push(EpochRecord {
            epoch: need("epoch")? as usize,
            lr: need("lr")?,
            train_loss: need("train_loss")?,
            train_top1: need("train_top1")?,
            val_loss: value("val_loss")?,
            val_top1: value("val_top1")?,
            val_top5: value("val_top5")?,
            ema_val_loss: value("ema_val_loss")?,
            ema_val_top1: value("ema_val_top1")?,
            seconds: need("seconds")?,
            images_per_s: need("images_per_s")?,
        });
    }
    Ok(history)
}
