//! `--dump-batches FILE`: every training batch as the trainer saw it, for checks against
//! another framework (scripts/check-pytorch-training.sh feeds them to PyTorch).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;
use la_data::{Batch, Targets};
use la_train::{Control, EpochRecord, Observer, StepInfo};

/// Passes everything on to `inner` and keeps each batch: `images.N` (`[b, 3, h, w]` f32),
/// `labels.N` (i64) and, under MixUp/CutMix, `targets.N` (`[b, classes]`), N counting the
/// batches of the run from 0.
pub struct BatchDump<'a> {
    inner: &'a mut dyn Observer,
    path: PathBuf,
    batches_per_epoch: usize,
    tensors: HashMap<String, Tensor>,
    failure: Option<anyhow::Error>,
}

impl<'a> BatchDump<'a> {
    pub fn new(inner: &'a mut dyn Observer, path: &Path) -> Self {
        BatchDump {
            inner,
            path: path.to_path_buf(),
            batches_per_epoch: 0,
            tensors: HashMap::new(),
            failure: None,
        }
    }

    fn keep(&mut self, n: usize, data: &Batch) -> Result<()> {
        let labels: Vec<i64> = data.labels.iter().map(|&l| l as i64).collect();
        let count = labels.len();
        self.tensors
            .insert(format!("images.{n}"), data.images.clone());
        self.tensors.insert(
            format!("labels.{n}"),
            Tensor::from_vec(labels, count, &candle_core::Device::Cpu)?,
        );
        if let Targets::Soft(t) = &data.targets {
            self.tensors.insert(format!("targets.{n}"), t.clone());
        }
        Ok(())
    }

    /// Writes the file (atomically); the first error met while keeping batches, if any.
    pub fn finish(self) -> Result<usize> {
        if let Some(e) = self.failure {
            return Err(e);
        }
        let batches = self
            .tensors
            .keys()
            .filter(|k| k.starts_with("labels."))
            .count();
        la_vgg::save_tensors(&self.path, &self.tensors, None)
            .with_context(|| format!("--dump-batches {}", self.path.display()))?;
        Ok(batches)
    }
}

impl Observer for BatchDump<'_> {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize) {
        self.batches_per_epoch = batches;
        self.inner.epoch_start(epoch, epochs, batches);
    }
    fn batch(&mut self, epoch: usize, batch: usize, data: &Batch) {
        let n = (epoch - 1) * self.batches_per_epoch + batch;
        if self.failure.is_none() {
            self.failure = self.keep(n, data).err();
        }
        self.inner.batch(epoch, batch, data);
    }
    fn step(&mut self, info: &StepInfo) -> Control {
        self.inner.step(info)
    }
    fn evaluating(&mut self, batches: usize) {
        self.inner.evaluating(batches);
    }
    fn epoch_end(&mut self, record: &EpochRecord) -> Control {
        self.inner.epoch_end(record)
    }
    fn message(&mut self, text: &str) {
        self.inner.message(text);
    }
}
