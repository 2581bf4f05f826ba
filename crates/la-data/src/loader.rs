//! The batch loader: a producer thread builds batches in order, each one decoded and
//! augmented in parallel on a rayon pool, and hands them over through a bounded queue.
//!
//! Every random choice is keyed by (seed, epoch, sample index) or (seed, epoch, batch
//! index) rather than drawn from a shared generator, so the batches are the same
//! whatever the number of threads. A loader of one rank of a data-parallel run
//! ([`Loader::with_shard`]) yields its slice of each of those batches, so N ranks together
//! see exactly the batches one process sees.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::rng::{sample_rng, stream, Purpose};
use crate::transforms::{ColorJitter, HorizontalFlip, RandomCrop};
use crate::{AutoAugment, Dataset, Error, Normalize, Pipeline, Result, VecDataset};

/// Training targets of a batch.
#[derive(Clone, Debug)]
pub enum Targets {
    /// Class indices, `u32` `[b]`.
    Labels(Tensor),
    /// Class probabilities from MixUp/CutMix, `f32` `[b, num_classes]`, rows summing to 1.
    Soft(Tensor),
}

/// One batch, on the loader's device.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `f32` `[b, 3, h, w]`, normalised.
    pub images: Tensor,
    pub targets: Targets,
    /// Hard labels; with soft targets, the label with the larger weight.
    pub labels: Vec<usize>,
    /// Samples in the whole batch this one is a shard of (all ranks together); in one
    /// process, `labels.len()`.
    pub global_size: usize,
}

/// One rank's part of every batch in a data-parallel run: rank `index` of `count` takes
/// the samples `[len index / count, len (index + 1) / count)` of each batch of `len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole batch: one process.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// This shard's range of a batch of `len` samples (as even as can be; empty when
    /// `len` is smaller than the rank count and this rank is left over).
    pub fn range(&self, len: usize) -> std::ops::Range<usize> {
        len * self.index / self.count..len * (self.index + 1) / self.count
    }
}

/// How the loader batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Reshuffle every epoch from (seed, epoch); otherwise data set order.
    pub shuffle: bool,
    /// Leave out the last, smaller batch.
    pub drop_last: bool,
    pub seed: u64,
    /// Worker threads; 0 = one per core.
    pub threads: usize,
    /// Batches built ahead of the consumer.
    pub prefetch: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 128,
            shuffle: true,
            drop_last: false,
            seed: 0,
            threads: 0,
            prefetch: 2,
        }
    }
}

/// Shuffled, augmented, batched epochs of a data set.
pub struct Loader {
    shared: Arc<Shared>,
    pool: Arc<rayon::ThreadPool>,
}

/// What the producer thread needs, shared with the loader.
struct Shared {
    dataset: Arc<dyn Dataset>,
    pipeline: Pipeline,
    config: LoaderConfig,
    device: Device,
    shard: Shard,
}

impl Loader {
    /// Fails on a zero batch size, a bad normalisation or mix, or a thread pool that
    /// cannot be started.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        pipeline: Pipeline,
        config: LoaderConfig,
        device: Device,
    ) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::Config("batch_size must be at least 1".into()));
        }
        pipeline.validate()?;
        if pipeline.mix().is_some() && dataset.classes().is_empty() {
            return Err(Error::Config(
                "MixUp/CutMix need the data set's class count, and it has no classes".into(),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .thread_name(|i| format!("la-data-{i}"))
            .build()
            .map_err(|e| Error::Config(format!("cannot start the loader's threads: {e}")))?;
        Ok(Loader {
            shared: Arc::new(Shared {
                dataset,
                pipeline,
                config,
                device,
                shard: Shard::WHOLE,
            }),
            pool: Arc::new(pool),
        })
    }

    /// This loader as rank `shard.index` of `shard.count`: the same batches (count, order,
    /// augmentation), each cut to this rank's slice. Fails on a rank outside the count, or
    /// on a batch size smaller than the rank count (a rank would get no sample).
    pub fn with_shard(self, shard: Shard) -> Result<Self> {
        if shard.count == 0 || shard.index >= shard.count {
            return Err(Error::Config(format!(
                "rank {} of {} does not exist",
                shard.index, shard.count
            )));
        }
        if self.shared.config.batch_size < shard.count {
            return Err(Error::Config(format!(
                "batch size {} is smaller than the {} ranks it is shared among; each rank needs a sample",
                self.shared.config.batch_size, shard.count
            )));
        }
        let shared = Shared {
            dataset: Arc::clone(&self.shared.dataset),
            pipeline: self.shared.pipeline.clone(),
            config: self.shared.config.clone(),
            device: self.shared.device.clone(),
            shard,
        };
        Ok(Loader {
            shared: Arc::new(shared),
            pool: self.pool,
        })
    }

    /// Which part of each batch this loader yields.
    pub fn shard(&self) -> Shard {
        self.shared.shard
    }

    /// Batches per epoch.
    pub fn len(&self) -> usize {
        let n = self.shared.dataset.len();
        let b = self.shared.config.batch_size;
        if self.shared.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples per epoch (after `drop_last`).
    pub fn samples_per_epoch(&self) -> usize {
        let n = self.shared.dataset.len();
        if self.shared.config.drop_last {
            n - n % self.shared.config.batch_size
        } else {
            n
        }
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.shared.dataset
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.shared.pipeline
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.shared.config
    }

    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// The threads decoding and augmenting.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The data set indices of an epoch, in the order they are batched.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        self.shared.order(epoch)
    }

    /// Builds one batch on the calling thread's side (using the pool), without the
    /// prefetch queue.
    pub fn batch(&self, epoch: usize, batch: usize) -> Result<Batch> {
        if batch >= self.len() {
            return Err(Error::Config(format!(
                "batch {batch} does not exist, an epoch has {}",
                self.len()
            )));
        }
        let order = self.order(epoch);
        self.pool
            .install(|| self.shared.build(epoch, batch, &order))
    }

    /// The batches of `epoch`, built ahead on a background thread.
    ///
    /// Dropping the iterator early stops the producer and waits for it; a panic in a
    /// data set or transform comes out as an `Err` item, not as a panic here.
    pub fn epoch(&self, epoch: usize) -> EpochIter<'_> {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on: the same batches as the tail of
    /// [`Loader::epoch`], for a run resumed in the middle of an epoch.
    pub fn epoch_from(&self, epoch: usize, first: usize) -> EpochIter<'_> {
        let total = self.len();
        let first = first.min(total);
        let (tx, rx) = sync_channel(self.shared.config.prefetch);
        let stop = Arc::new(AtomicBool::new(false));
        let shared = self.shared.clone();
        let pool = self.pool.clone();
        let stop_flag = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("la-data-loader".into())
            .spawn(move || {
                let order = shared.order(epoch);
                for b in first..total {
                    if stop_flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let batch = pool.install(|| shared.build(epoch, b, &order));
                    if tx.send(batch).is_err() {
                        break;
                    }
                }
            });
        let (handle, failed) = match spawned {
            Ok(h) => (Some(h), None),
            Err(e) => (
                None,
                Some(Error::Worker(format!(
                    "cannot start the loader thread: {e}"
                ))),
            ),
        };
        EpochIter {
            rx: Some(rx),
            stop,
            handle,
            pending_error: failed,
            received: first,
            total,
            _loader: PhantomData,
        }
    }
}

impl Shared {
    fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            order.shuffle(&mut stream(
                self.config.seed,
                epoch as u64,
                0,
                Purpose::Shuffle,
            ));
        }
        order
    }

    fn build(&self, epoch: usize, b: usize, order: &[usize]) -> Result<Batch> {
        let bs = self.config.batch_size;
        let whole = &order[b * bs..((b + 1) * bs).min(order.len())];
        let indices = &whole[self.shard.range(whole.len())];
        let num_classes = self.dataset.classes().len();
        let seed = self.config.seed;
        let processed: Vec<Result<Processed>> = indices
            .par_iter()
            .map(|&index| {
                let sample = self.dataset.get(index)?;
                if sample.label >= num_classes {
                    return Err(Error::Sample {
                        index,
                        reason: format!(
                            "label {} is not below the class count {num_classes}",
                            sample.label
                        ),
                    });
                }
                let mut rng = sample_rng(seed, epoch, index);
                let (chw, h, w) =
                    self.pipeline
                        .process(sample.image, &mut rng)
                        .map_err(|e| match e {
                            Error::Config(reason) => Error::Sample { index, reason },
                            other => other,
                        })?;
                Ok((chw, h, w, sample.label))
            })
            .collect();

        let n = indices.len();
        let mut data = Vec::new();
        let mut labels = Vec::with_capacity(n);
        let mut size = None;
        for (r, &index) in processed.into_iter().zip(indices) {
            let (chw, h, w, label) = r?;
            match size {
                None => {
                    size = Some((h, w));
                    data.reserve(n * chw.len());
                }
                Some(s) if s != (h, w) => {
                    return Err(Error::Sample {
                        index,
                        reason: format!(
                            "image is {h}x{w} after the transforms but the batch's first is {}x{}; \
                             add a Resize or crop to the pipeline",
                            s.0, s.1
                        ),
                    })
                }
                Some(_) => {}
            }
            data.extend_from_slice(&chw);
            labels.push(label);
        }
        let (h, w) = size.unwrap_or((0, 0));

        let (targets, labels) = match self.pipeline.mix_at(epoch) {
            Some(mix) => {
                let mut rng = stream(seed, epoch as u64, b as u64, Purpose::Mix);
                let out = mix.apply(&mut data, (3, h, w), &labels, num_classes, &mut rng)?;
                let soft = Tensor::from_vec(out.soft, (n, num_classes), &Device::Cpu)?
                    .to_device(&self.device)?;
                (Targets::Soft(soft), out.dominant)
            }
            None => {
                let l: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
                let t = Tensor::from_vec(l, n, &Device::Cpu)?.to_device(&self.device)?;
                (Targets::Labels(t), labels)
            }
        };
        let images = Tensor::from_vec(data, (n, 3, h, w), &Device::Cpu)?.to_device(&self.device)?;
        Ok(Batch {
            images,
            targets,
            labels,
            global_size: whole.len(),
        })
    }
}

/// A sample ready for batching: normalised CHW values, height, width, label.
type Processed = (Vec<f32>, usize, usize, usize);

/// The batches of one epoch, in order (see [`Loader::epoch`]).
pub struct EpochIter<'a> {
    rx: Option<Receiver<Result<Batch>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    pending_error: Option<Error>,
    received: usize,
    total: usize,
    _loader: PhantomData<&'a Loader>,
}

impl EpochIter<'_> {
    /// Waits for the producer; its panic message if it panicked.
    fn join(&mut self) -> Option<String> {
        let handle = self.handle.take()?;
        match handle.join() {
            Ok(()) => None,
            Err(payload) => Some(
                payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into()),
            ),
        }
    }
}

impl Iterator for EpochIter<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending_error.take() {
            self.rx = None;
            return Some(Err(e));
        }
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(item) => {
                self.received += 1;
                Some(item)
            }
            Err(_) => {
                // The producer is gone: finished, or panicked before finishing.
                self.rx = None;
                let panic = self.join();
                match panic {
                    Some(msg) => Some(Err(Error::Worker(format!(
                        "a data set or transform panicked while building batch {} of {}: {msg}",
                        self.received, self.total
                    )))),
                    None if self.received < self.total => Some(Err(Error::Worker(format!(
                        "the producer stopped after {} of {} batches",
                        self.received, self.total
                    )))),
                    None => None,
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.rx.is_none() {
            return (0, Some(usize::from(self.pending_error.is_some())));
        }
        let left = self.total - self.received;
        (left, Some(left + 1))
    }
}

impl Drop for EpochIter<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Closing the queue wakes a producer blocked on a full queue.
        self.rx = None;
        let _ = self.join();
    }
}

/// The CIFAR training pipeline the benchmark measures: RandomCrop(32, 4) +
/// HorizontalFlip + ColorJitter(0.4, 0.4, 0.4, 0.1) + CIFAR-10 normalisation.
pub fn bench_cifar_pipeline() -> Pipeline {
    Pipeline::new(Normalize::CIFAR10)
        .then(RandomCrop::new(32, 4))
        .then(HorizontalFlip::default())
        .then(ColorJitter::new(0.4, 0.4, 0.4, 0.1))
}

/// [`bench_cifar_pipeline`] with torchvision's TrivialAugmentWide after the flip in place
/// of the colour jitter, as torchvision's classification recipes place it.
pub fn bench_trivial_augment_pipeline() -> Pipeline {
    Pipeline::new(Normalize::CIFAR10)
        .then(RandomCrop::new(32, 4))
        .then(HorizontalFlip::default())
        .then(AutoAugment::trivial_augment_wide())
}

/// Images per second through `pipeline` and the loader (batches built into CPU tensors)
/// on `images` synthetic 32x32 images: one untimed warm-up epoch, then one timed epoch.
/// `threads` 0 = all cores. Returns 0 if the loader fails.
pub fn bench_pipeline(pipeline: &Pipeline, images: usize, batch: usize, threads: usize) -> f64 {
    let ds: Arc<dyn Dataset> = Arc::new(VecDataset::synthetic(images.max(1), 32, 32, 10, 0));
    let config = LoaderConfig {
        batch_size: batch.max(1),
        shuffle: true,
        drop_last: false,
        seed: 0,
        threads,
        prefetch: 4,
    };
    let Ok(loader) = Loader::new(ds, pipeline.clone(), config, Device::Cpu) else {
        return 0.0;
    };
    let run = |epoch| -> Option<usize> {
        let mut n = 0;
        for b in loader.epoch(epoch) {
            n += b.ok()?.labels.len();
        }
        Some(n)
    };
    if run(0).is_none() {
        return 0.0;
    }
    let start = Instant::now();
    match run(1) {
        Some(n) => n as f64 / start.elapsed().as_secs_f64().max(1e-9),
        None => 0.0,
    }
}
