//! The training loop: epochs of forward, loss, backward, clipping and the optimiser step,
//! evaluation after each epoch, atomic checkpoints, metrics and curves.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use la_data::{Batch, Loader, Targets};
use la_vgg::{Vgg, VggConfig};
use rand::RngCore;

use crate::checkpoint::{self, EpochProgress, RunInfo, TrainState};
use crate::collective::{agree, any, Collective, ReplicaSum, SingleProcess};
use crate::data_parallel::{broadcast_running_stats, check_same_weights, GradBuckets};
use crate::ema::ModelEma;
use crate::loss::{cross_entropy, cross_entropy_labels, cross_entropy_soft, label_ranks};
use crate::optim::{layer_decay_scales, param_groups, GroupRules, Optimizer};
use crate::record::EpochRecord;
use crate::tensorboard::EventWriter;
use crate::{metrics, plot, Error, Result};

/// What the loop reports after each step.
#[derive(Clone, Debug)]
pub struct StepInfo {
    pub epoch: usize,
    pub batch: usize,
    pub batches: usize,
    pub step: usize,
    pub loss: f64,
    pub running_loss: f64,
    pub running_top1: f64,
    pub lr: f64,
    pub images_per_s: f64,
}

/// Whether to go on after an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// Receives progress (the CLI draws progress bars from it).
pub trait Observer {
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _batches: usize) {}
    /// Each training batch as it is trained on: `batch` is its index in the epoch (0-based,
    /// `epoch` 1-based as in `epoch_start`).
    fn batch(&mut self, _epoch: usize, _batch: usize, _data: &Batch) {}
    /// `Stop` ends the run after the current optimiser step with a resumable checkpoint.
    fn step(&mut self, _info: &StepInfo) -> Control {
        Control::Continue
    }
    fn evaluating(&mut self, _batches: usize) {}
    fn epoch_end(&mut self, _record: &EpochRecord) -> Control {
        Control::Continue
    }
    fn message(&mut self, _text: &str) {}
}

/// An observer that reports nothing.
pub struct Silent;
impl Observer for Silent {}

/// Figures of an evaluation pass.
#[derive(Clone, Debug)]
pub struct EvalReport {
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub count: usize,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
}

impl EvalReport {
    /// Accuracy of each class (None for a class with no examples).
    pub fn per_class(&self) -> Vec<Option<f64>> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let total: u64 = row.iter().sum();
                (total > 0).then(|| row[i] as f64 / total as f64)
            })
            .collect()
    }
}

/// Runs `model` in evaluation mode over `loader`: loss, top-1, top-5 and the confusion matrix.
pub fn evaluate(
    model: &Vgg,
    loader: &Loader,
    classes: usize,
    on_batch: impl FnMut(usize),
) -> Result<EvalReport> {
    evaluate_on(&SingleProcess, model, loader, classes, on_batch)
}

/// [`evaluate`] by every rank of `c` together, each over its shard of every batch of
/// `loader` (a loader sharded for this rank): the figures are those of the whole set, on
/// every rank.
pub fn evaluate_on(
    c: &dyn Collective,
    model: &Vgg,
    loader: &Loader,
    classes: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<EvalReport> {
    let mut confusion = vec![vec![0u64; classes]; classes];
    let (mut loss_sum, mut top1, mut top5, mut count) = (0.0, 0usize, 0usize, 0usize);
    let local = (|| -> Result<()> {
        check_shard(c, loader, "validation")?;
        for (i, batch) in loader.epoch(0).enumerate() {
            let batch = batch?;
            let b = batch.labels.len();
            // A batch smaller than the rank count leaves some ranks without a sample.
            if b > 0 {
                let logits = model.forward_t(&batch.images, false)?;
                loss_sum += cross_entropy(&logits, &batch.labels, 0.0)?.to_scalar::<f32>()? as f64
                    * b as f64;
                let ranks = label_ranks(&logits, &batch.labels)?;
                top1 += ranks.iter().filter(|&&r| r == 0).count();
                top5 += ranks.iter().filter(|&&r| r < 5).count();
                let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
                for (&l, &p) in batch.labels.iter().zip(&predicted) {
                    confusion[l][p as usize] += 1;
                }
                count += b;
            }
            on_batch(i + 1);
        }
        Ok(())
    })();
    if c.size() > 1 {
        // Every figure summed over the ranks: the sums, then the confusion matrix.
        let mut figures = vec![loss_sum, top1 as f64, top5 as f64, count as f64];
        figures.extend(confusion.iter().flatten().map(|&v| v as f64));
        let len = figures.len();
        let (_, sums) = agree(c, local.map(|()| ((), figures)), len)?;
        (loss_sum, top1, top5, count) = (
            sums[0],
            sums[1] as usize,
            sums[2] as usize,
            sums[3] as usize,
        );
        for (cell, v) in confusion.iter_mut().flatten().zip(&sums[4..]) {
            *cell = *v as u64;
        }
    } else {
        local?;
    }
    if count == 0 {
        return Err(Error::Data("the evaluation set is empty".into()));
    }
    Ok(EvalReport {
        loss: loss_sum / count as f64,
        top1: top1 as f64 / count as f64,
        top5: top5 as f64 / count as f64,
        count,
        confusion,
    })
}

/// A loader that gives this rank its own shard of every batch: the ranks together must see
/// each batch once.
fn check_shard(c: &dyn Collective, loader: &Loader, what: &str) -> Result<()> {
    let shard = loader.shard();
    if (shard.index, shard.count) != (c.rank(), c.size()) {
        return Err(Error::Collective(format!(
            "the {what} loader gives shard {} of {}, but this is rank {} of {}",
            shard.index,
            shard.count,
            c.rank(),
            c.size()
        )));
    }
    Ok(())
}

/// One micro-batch's outcome on this rank.
struct MicroBatch {
    grads: candle_core::backprop::GradStore,
    /// Mean loss over the samples.
    loss: f64,
    correct: usize,
    samples: usize,
}

/// A model being trained, with its optimiser and run directory.
pub struct Trainer {
    pub info: RunInfo,
    pub state: TrainState,
    pub model: Vgg,
    varmap: VarMap,
    optimizer: Optimizer,
    ema: Option<ModelEma>,
    /// TensorBoard's event file, when the run writes one.
    events: Option<EventWriter>,
    run_dir: PathBuf,
    device: Device,
    /// The ranks training together; [`SingleProcess`] for one.
    collective: Arc<dyn Collective>,
    /// How the gradients travel between ranks (with more than one).
    buckets: Option<GradBuckets>,
    /// Time spent summing gradients over the ranks since this trainer was made.
    reduce_seconds: f64,
}

impl Trainer {
    /// A new run in `run_dir`: tensors of `initial` (pretrained weights) are loaded, every
    /// other variable is initialised from the seed.
    pub fn new(
        run_dir: &Path,
        info: RunInfo,
        initial: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        Self::new_on(run_dir, info, initial, device, Arc::new(SingleProcess))
    }

    /// [`Trainer::new`] as one rank of a data-parallel run: every rank builds the model
    /// (and rank 0's weights are checked on every rank); rank 0 alone writes `run_dir`.
    pub fn new_on(
        run_dir: &Path,
        info: RunInfo,
        initial: HashMap<String, Tensor>,
        device: &Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        let writer = collective.rank() == 0;
        let prepared = if writer {
            checkpoint::prepare_run_dir(run_dir).and_then(|dir| {
                if dir.join(checkpoint::CHECKPOINT).exists() {
                    return Err(Error::Io {
                        path: dir.clone(),
                        reason: "already holds a run; resume it or choose another run name".into(),
                    });
                }
                Ok(dir)
            })
        } else {
            Ok(run_dir.to_path_buf())
        };
        let (run_dir, _) = agree(&*collective, prepared.map(|d| (d, Vec::new())), 0)?;
        let mut names: Vec<String> = initial.keys().cloned().collect();
        names.sort();
        let state = TrainState {
            pretrained: names,
            ..TrainState::default()
        };
        let pretrained: HashSet<String> = initial.keys().cloned().collect();
        let (model, varmap) = la_vgg::trainable(
            info.model.clone(),
            initial,
            info.train.seed,
            DType::F32,
            device,
        )?;
        let optimizer = Self::optimizer(&info, &varmap, pretrained);
        let ema = match info.train.ema {
            Some(config) => Some(ModelEma::new(config, &varmap, HashMap::new())?),
            None => None,
        };
        let info_tensorboard = info.train.tensorboard;
        if writer {
            // A directory without a checkpoint may hold the log of a run that never finished
            // an epoch.
            let _ = std::fs::remove_file(run_dir.join("metrics.jsonl"));
        }
        let events = EventWriter::create_if(info_tensorboard && writer, &run_dir)?;
        Self {
            info,
            state,
            model,
            varmap,
            optimizer,
            ema,
            events,
            run_dir,
            device: device.clone(),
            collective,
            buckets: None,
            reduce_seconds: 0.0,
        }
        .joined()
    }

    /// With more than one rank: the weights checked against rank 0's, the gradient buckets
    /// laid out, and BatchNorm synchronised if the run asks for it.
    fn joined(mut self) -> Result<Self> {
        let c = Arc::clone(&self.collective);
        if c.size() == 1 {
            return Ok(self);
        }
        check_same_weights(&*c, &self.varmap)?;
        self.buckets = Some(GradBuckets::new(
            self.optimizer.params(),
            GradBuckets::DEFAULT_BYTES,
        ));
        if self.info.train.sync_bn {
            self.model
                .set_batch_norm_replicas(Some(Arc::new(ReplicaSum(Arc::clone(&c)))));
        }
        Ok(self)
    }

    /// The ranks this trainer trains with.
    pub fn collective(&self) -> &Arc<dyn Collective> {
        &self.collective
    }

    /// Seconds this rank spent summing gradients over the ranks (waiting for the others
    /// included) since it was made: the communication's share of the run.
    pub fn reduce_seconds(&self) -> f64 {
        self.reduce_seconds
    }

    /// Whether this rank writes the run's files (rank 0).
    fn writes(&self) -> bool {
        self.collective.rank() == 0
    }

    /// Continues the run saved in `run_dir`.
    /// `from` is a run directory (its latest checkpoint, at an epoch's end or mid-epoch) or
    /// one of its kept `checkpoint-{epoch}.safetensors`.
    pub fn resume(from: &Path, device: &Device) -> Result<Self> {
        Self::resume_on(from, device, Arc::new(SingleProcess))
    }

    /// [`Trainer::resume`] as one rank of a data-parallel run: every rank reads the same
    /// checkpoint (checked against rank 0's); rank 0 alone writes.
    pub fn resume_on(
        from: &Path,
        device: &Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        let loaded = if from.is_file() {
            let dir = from.parent().unwrap_or(Path::new("."));
            checkpoint::load_checkpoint_file(from, device).map(|c| (dir, c))
        } else {
            checkpoint::load_checkpoint(from, device).map(|c| (from, c))
        };
        let ((run_dir, ckpt), _) = agree(&*collective, loaded.map(|l| (l, Vec::new())), 0)?;
        let writer = collective.rank() == 0;
        let (model, varmap) = la_vgg::trainable(
            ckpt.info.model.clone(),
            ckpt.model,
            ckpt.info.train.seed,
            DType::F32,
            device,
        )?;
        let pretrained: HashSet<String> = ckpt.state.pretrained.iter().cloned().collect();
        let mut optimizer = Self::optimizer(&ckpt.info, &varmap, pretrained);
        optimizer.load_state(ckpt.optimizer, ckpt.optimizer_steps)?;
        let events = EventWriter::create_if(ckpt.info.train.tensorboard && writer, run_dir)?;
        let ema = match ckpt.info.train.ema {
            Some(config) => Some(ModelEma::new(config, &varmap, ckpt.ema)?),
            None => None,
        };
        if writer {
            // Steps of an epoch cut short are in metrics.jsonl already and will be redone:
            // mark where the log resumes.
            metrics::append_jsonl(
                run_dir,
                &serde_json::json!({"type": "resume", "epoch": ckpt.state.epoch, "step": ckpt.state.step}),
            )?;
        }
        Self {
            info: ckpt.info,
            state: ckpt.state,
            model,
            varmap,
            optimizer,
            ema,
            events,
            run_dir: run_dir.to_path_buf(),
            device: device.clone(),
            collective,
            buckets: None,
            reduce_seconds: 0.0,
        }
        .joined()
    }

    fn optimizer(info: &RunInfo, varmap: &VarMap, pretrained: HashSet<String>) -> Optimizer {
        let rules = GroupRules {
            pretrained,
            pretrained_lr_scale: info.train.pretrained_lr_scale,
            pretrained_layer_scale: info
                .train
                .layer_decay
                .map(|decay| layer_decay_scales(&info.model, decay))
                .unwrap_or_default(),
            freeze_backbone: info.train.freeze_backbone,
            no_decay_bias_norm: info.train.no_decay_bias_norm,
        };
        Optimizer::new(info.train.optimizer, param_groups(varmap, &rules))
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn config(&self) -> &VggConfig {
        &self.info.model
    }

    /// The model's tensors by name (copies, detached from the graph).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect()
    }

    fn step_limit_reached(&self) -> bool {
        self.info
            .train
            .max_steps
            .is_some_and(|max| self.state.step >= max)
    }

    /// Trains until `info.train.epochs` epochs (or `max_steps` steps) are done or the
    /// observer says stop.
    pub fn fit(
        &mut self,
        train: &Loader,
        val: Option<&Loader>,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        let schedule = self.info.train.lr_schedule();
        let batches = train.len();
        if batches == 0 {
            return Err(Error::Data("the training set gives no batch (is it smaller than the batch size with drop_last?)".into()));
        }
        let accum = self.info.train.grad_accum_steps.max(1);
        let steps_per_epoch = batches.div_ceil(accum);
        let classes = self.info.model.num_classes;
        let collective = Arc::clone(&self.collective);
        let c = &*collective;
        let world = c.size();
        check_shard(c, train, "training")?;
        while self.state.epoch < self.info.train.epochs {
            // Checked before each epoch, so a resumed run that had stopped stays stopped.
            if let Some(rule) = self.info.train.early_stop {
                if rule.should_stop(&self.state.history) {
                    observer.message(&format!(
                        "early stop after epoch {}: no better {} in the last {} epochs",
                        self.state.epoch,
                        rule.metric.name(),
                        rule.patience
                    ));
                    break;
                }
            }
            if self.step_limit_reached() {
                break;
            }
            let epoch = self.state.epoch;
            observer.epoch_start(epoch + 1, self.info.train.epochs, batches);
            let started = Instant::now();
            // A run stopped in the middle of this epoch goes on from where it stopped.
            let progress = self.state.epoch_progress.take().unwrap_or_default();
            let first = progress.batches;
            let mut sums = progress.sums;
            let elapsed = || progress.seconds + started.elapsed().as_secs_f64();
            let mut stop = false;
            let mut lr = schedule.lr_at(self.state.step, steps_per_epoch);
            // Gradients of the micro-batches of the current optimiser step.
            let mut accumulated: Option<candle_core::backprop::GradStore> = None;
            for (k, batch) in train.epoch_from(epoch, first).enumerate() {
                let i = first + k;
                let step = self.state.step;
                lr = schedule.lr_at(step, steps_per_epoch);
                // This micro-batch's place in its group; the last group of an epoch may be short.
                let (micro, group) = (i % accum, accum.min(batches - i / accum * accum));
                let local = batch.map_err(Error::from).and_then(|batch| {
                    observer.batch(epoch + 1, i, &batch);
                    self.micro_batch(&batch, train, step, micro, group)
                });
                // Every rank goes on only if every rank could; the figures are the whole
                // batch's.
                let done = if world == 1 {
                    local?
                } else {
                    let figures = |m: &MicroBatch| {
                        let n = m.samples as f64;
                        vec![m.loss * n, m.correct as f64, n]
                    };
                    let (m, sums) = agree(
                        c,
                        local.map(|m| {
                            let f = figures(&m);
                            (m, f)
                        }),
                        3,
                    )?;
                    MicroBatch {
                        loss: sums[0] / sums[2],
                        correct: sums[1] as usize,
                        samples: sums[2] as usize,
                        ..m
                    }
                };
                let loss_value = done.loss;
                let mut grads = match accumulated.take() {
                    Some(mut sum) => {
                        sum.extend(done.grads)?;
                        sum
                    }
                    None => done.grads,
                };
                if micro + 1 == group {
                    if let Some(buckets) = &mut self.buckets {
                        let started = Instant::now();
                        buckets.all_reduce(c, self.optimizer.params(), &mut grads)?;
                        self.reduce_seconds += started.elapsed().as_secs_f64();
                    }
                    self.clip_and_check(&mut grads, step)?;
                    self.optimizer.step(&grads, lr)?;
                    if world > 1 && !self.info.train.sync_bn {
                        broadcast_running_stats(c, &self.varmap)?;
                    }
                    if let Some(ema) = &mut self.ema {
                        ema.update(&self.varmap, step)?;
                    }
                    self.state.step += 1;
                } else {
                    accumulated = Some(grads);
                }

                sums.add(loss_value, done.correct, done.samples);
                let info = StepInfo {
                    epoch: epoch + 1,
                    batch: i + 1,
                    batches,
                    step: self.state.step,
                    loss: loss_value,
                    running_loss: sums.mean_loss(),
                    running_top1: sums.top1(),
                    lr,
                    images_per_s: (sums.seen - progress.sums.seen) as f64
                        / started.elapsed().as_secs_f64().max(1e-9),
                };
                if self.writes() {
                    metrics::append_jsonl(
                        &self.run_dir,
                        &serde_json::json!({"type": "step", "epoch": info.epoch, "step": info.step, "loss": loss_value, "lr": lr}),
                    )?;
                }
                if let Some(events) = &mut self.events {
                    let step = self.state.step as u64;
                    events.scalar("train/loss", loss_value, step)?;
                    events.scalar("train/lr", lr, step)?;
                }
                stop |= observer.step(&info) == Control::Stop;
                // A stop asked for on any rank (Ctrl-C reaches them one by one) stops all.
                stop = any(c, stop)?;
                let limit = micro + 1 == group && self.step_limit_reached();
                let recovery = self.info.train.recovery_interval;
                let due = recovery.is_some_and(|n| self.state.step.is_multiple_of(n));
                // Mid-epoch checkpoints, after an optimiser step (the last one is the epoch's).
                if micro + 1 == group && i + 1 < batches && (stop || due || limit) {
                    self.state.epoch_progress = Some(EpochProgress {
                        batches: i + 1,
                        sums,
                        seconds: elapsed(),
                    });
                    let saved = self.tensors().and_then(|t| self.save_checkpoint(&t, &[]));
                    agree(c, saved.map(|()| ((), Vec::new())), 0)?;
                    self.state.epoch_progress = None;
                    if stop || limit {
                        let why = if stop {
                            "stopped"
                        } else {
                            "reached the step limit"
                        };
                        observer.message(&format!(
                            "{why} after step {} (epoch {}, batch {}): the checkpoint resumes here",
                            self.state.step,
                            epoch + 1,
                            i + 1
                        ));
                        return Ok(());
                    }
                }
            }
            let seconds = elapsed();
            let report = match val {
                Some(loader) => {
                    observer.evaluating(loader.len());
                    Some(evaluate_on(c, &self.model, loader, classes, |_| {})?)
                }
                None => None,
            };
            let ema_report = match (val, &self.ema) {
                (Some(loader), Some(ema)) => {
                    let model = ema.model(&self.info.model, &self.device)?;
                    Some(evaluate_on(c, &model, loader, classes, |_| {})?)
                }
                _ => None,
            };
            let record = EpochRecord {
                epoch: epoch + 1,
                lr,
                train_loss: sums.mean_loss(),
                train_top1: sums.top1(),
                val_loss: report.as_ref().map(|r| r.loss),
                val_top1: report.as_ref().map(|r| r.top1),
                val_top5: report.as_ref().map(|r| r.top5),
                ema_val_loss: ema_report.as_ref().map(|r| r.loss),
                ema_val_top1: ema_report.as_ref().map(|r| r.top1),
                seconds,
                images_per_s: sums.seen as f64 / seconds.max(1e-9),
            };
            self.state.epoch += 1;
            self.state.history.push(record.clone());
            let is_best = improves(record.val_top1, self.state.best_top1);
            if is_best {
                self.state.best_top1 = record.val_top1;
                self.state.best_epoch = Some(record.epoch);
            }
            let is_best_ema = improves(record.ema_val_top1, self.state.best_ema_top1);
            if is_best_ema {
                self.state.best_ema_top1 = record.ema_val_top1;
                self.state.best_ema_epoch = Some(record.epoch);
            }
            let written = (|| -> Result<()> {
                if !self.writes() {
                    return Ok(());
                }
                self.save(is_best, is_best_ema)?;
                if let Some(keep) = self.info.train.checkpoint_hist {
                    checkpoint::keep_best(&self.run_dir, &self.state.history, keep)?;
                }
                metrics::append_jsonl(
                    &self.run_dir,
                    &serde_json::json!({"type": "epoch", "record": record}),
                )
            })();
            agree(c, written.map(|()| ((), Vec::new())), 0)?;
            if let Some(events) = &mut self.events {
                let step = self.state.step as u64;
                let figures = [
                    ("epoch/train_loss", Some(record.train_loss)),
                    ("epoch/train_top1", Some(record.train_top1)),
                    ("epoch/val_loss", record.val_loss),
                    ("epoch/val_top1", record.val_top1),
                    ("epoch/val_top5", record.val_top5),
                    ("epoch/ema_val_top1", record.ema_val_top1),
                    ("epoch/images_per_s", Some(record.images_per_s)),
                ];
                for (tag, value) in figures {
                    if let Some(v) = value {
                        events.scalar(tag, v, step)?;
                    }
                }
            }
            if any(c, observer.epoch_end(&record) == Control::Stop)? || stop {
                break;
            }
        }
        Ok(())
    }

    /// Writes last.safetensors (and best.safetensors), the CSV, the curves and then
    /// checkpoint.safetensors, each atomically. The checkpoint goes last because it is what
    /// commits the epoch: after a crash in between, resuming redoes the epoch and rewrites
    /// the others.
    pub fn save(&self, is_best: bool, is_best_ema: bool) -> Result<()> {
        let tensors = self.tensors()?;
        let metadata = checkpoint::model_metadata(&self.info, &self.state);
        la_vgg::save_weights(&self.run_dir.join(checkpoint::LAST), &metadata, &tensors)?;
        if is_best {
            la_vgg::save_weights(&self.run_dir.join(checkpoint::BEST), &metadata, &tensors)?;
        }
        if let (true, Some(ema)) = (is_best_ema, &self.ema) {
            let path = self.run_dir.join(checkpoint::EMA_BEST);
            la_vgg::save_weights(&path, &metadata, ema.tensors())?;
        }
        metrics::write_csv(&self.run_dir, &self.state.history)?;
        plot::training_curves(&self.run_dir.join("curves.png"), &self.state.history)?;
        // With a checkpoint history, the epoch's checkpoint is also kept under its number.
        let copies: Vec<PathBuf> = self
            .info
            .train
            .checkpoint_hist
            .map(|_| checkpoint::epoch_checkpoint(&self.run_dir, self.state.epoch))
            .into_iter()
            .collect();
        self.save_checkpoint(&tensors, &copies)
    }

    /// Writes checkpoint.safetensors, what `--resume` continues from (and `copies` of it);
    /// on rank 0 only.
    fn save_checkpoint(&self, tensors: &HashMap<String, Tensor>, copies: &[PathBuf]) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        checkpoint::save_checkpoint(
            &self.run_dir,
            &self.info,
            &self.state,
            tensors,
            self.optimizer.state(),
            self.ema.as_ref().map(ModelEma::tensors),
            copies,
        )?;
        Ok(())
    }

    /// Forward and backward of one micro-batch (this rank's shard of it): the gradients of
    /// this rank's share of the step's mean loss.
    fn micro_batch(
        &self,
        batch: &Batch,
        train: &Loader,
        step: usize,
        micro: usize,
        group: usize,
    ) -> Result<MicroBatch> {
        let label = match micro {
            0 => format!("step.{step}"),
            m => format!("step.{step}.{m}"),
        };
        let mut step_rng = la_core::rng::labelled(self.info.train.seed, &label);
        self.model.set_dropout_seed(step_rng.next_u64());
        let samples = batch.labels.len();
        let first_row = train.shard().range(batch.global_size).start;
        self.model.set_dropout_first_row(first_row);
        let logits = self.model.forward_t(&batch.images, true)?;
        let smoothing = self.info.train.label_smoothing;
        let loss = match &batch.targets {
            Targets::Labels(t) => cross_entropy_labels(&logits, t, &batch.labels, smoothing)?,
            Targets::Soft(t) => cross_entropy_soft(&logits, t, smoothing)?,
        };
        // The loss is read after the backward pass is queued, so that a GPU does not wait for
        // the host in between; a non-finite loss still stops the step before the update.
        // The gradients of all ranks are summed: each contributes its share of the whole
        // batch's mean loss (all of it in one process).
        let grads = if samples == batch.global_size {
            if group > 1 {
                (&loss / group as f64)?.backward()?
            } else {
                loss.backward()?
            }
        } else {
            let share = samples as f64 / batch.global_size as f64;
            (&loss * (share / group as f64))?.backward()?
        };
        let loss_value = loss.to_scalar::<f32>()? as f64;
        if !loss_value.is_finite() {
            return Err(self.non_finite(step, "the loss", None));
        }
        let ranks = label_ranks(&logits, &batch.labels)?;
        Ok(MicroBatch {
            grads,
            loss: loss_value,
            correct: ranks.iter().filter(|&&r| r == 0).count(),
            samples,
        })
    }

    /// Clips the global gradient norm (if configured) and stops on a non-finite gradient,
    /// naming the parameter.
    fn clip_and_check(
        &self,
        grads: &mut candle_core::backprop::GradStore,
        step: usize,
    ) -> Result<()> {
        // All the gradients' squares at once: on a GPU two launches and one wait for the
        // host a step, not a few launches and a wait per parameter.
        let (names, gradients): (Vec<&str>, Vec<&Tensor>) = self
            .optimizer
            .params()
            .iter()
            .filter_map(|p| Some((p.name.as_str(), grads.get(p.var.as_tensor())?)))
            .unzip();
        let squares = la_kernels::squares::sums_of_squares(&gradients)?;
        let mut total = 0.0f64;
        for (name, sq) in names.iter().zip(squares) {
            if !sq.is_finite() {
                return Err(self.non_finite(step, "the gradient of", Some(name)));
            }
            total += sq;
        }
        if let Some(max) = self.info.train.grad_clip {
            let norm = total.sqrt();
            if norm > max {
                let scale = max / (norm + 1e-6);
                for p in self.optimizer.params() {
                    let t = p.var.as_tensor();
                    if let Some(g) = grads.get(t) {
                        let scaled = (g * scale)?;
                        grads.insert(t, scaled);
                    }
                }
            }
        }
        Ok(())
    }

    fn non_finite(&self, step: usize, what: &str, param: Option<&str>) -> Error {
        // Name the first parameter that already holds a non-finite value, if any: that is
        // where it went bad; otherwise the quantity that overflowed.
        let bad_param = self.optimizer.params().iter().find(|p| {
            p.var
                .as_tensor()
                .sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_dtype(DType::F64))
                .and_then(|t| t.to_scalar::<f64>())
                .map(|v| !v.is_finite())
                .unwrap_or(false)
        });
        let what = match (param, bad_param) {
            (_, Some(p)) => format!("parameter {}", p.name),
            (Some(name), None) => format!("{what} {name}"),
            (None, None) => what.to_string(),
        };
        Error::NonFinite {
            step: step + 1,
            what,
            checkpoint: self.run_dir.join(checkpoint::CHECKPOINT),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// Whether `new` beats `best` (higher is better; no figure never does).
fn improves(new: Option<f64>, best: Option<f64>) -> bool {
    match (new, best) {
        (Some(v), Some(best)) => v > best,
        (Some(_), None) => true,
        (None, _) => false,
    }
}
