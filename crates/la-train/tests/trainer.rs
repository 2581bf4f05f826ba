//! The training loop on a tiny model: an interrupted and resumed run ends with the same
//! weights as an uninterrupted one; divergence stops with the step and parameter named and
//! the last good checkpoint intact; the run directory holds what it should.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use la_attention::{AttentionConfig, AttentionKind};
use la_data::{Dataset, Loader, LoaderConfig, Mix, Normalize, Pipeline, VecDataset};
use la_train::{
    Control, EpochRecord, Observer, OptimizerConfig, RunInfo, Schedule, Silent, TrainConfig,
    Trainer,
};
use la_vgg::{HeadConfig, VggConfig};

fn tiny_model() -> VggConfig {
    VggConfig {
        blocks: vec![vec![4], vec![8], vec![8]],
        batch_norm: true,
        attention: Some(la_vgg::AttentionSites {
            config: AttentionConfig::new(AttentionKind::Softmax),
            blocks: vec![0, 1, 2],
            input_size: None,
        }),
        head: HeadConfig {
            pool: 1,
            hidden: vec![8],
            dropout: 0.3,
        },
        num_classes: 3,
        in_channels: 3,
    }
}

fn info(epochs: usize, lr: f64) -> RunInfo {
    RunInfo {
        model: tiny_model(),
        train: TrainConfig {
            epochs,
            lr,
            optimizer: OptimizerConfig::Sgd {
                momentum: 0.9,
                nesterov: true,
                weight_decay: 5e-4,
            },
            schedule: Schedule::Cosine { min_lr: 0.0 },
            warmup_epochs: 0.5,
            label_smoothing: 0.1,
            grad_clip: Some(5.0),
            seed: 3,
            ..TrainConfig::default()
        },
        normalization: Normalize::IMAGENET,
        input_size: 16,
        classes: vec!["a".into(), "b".into(), "c".into()],
    }
}

fn loaders(threads: usize) -> (Loader, Loader) {
    let data: Arc<dyn Dataset> = Arc::new(VecDataset::synthetic(48, 16, 16, 3, 1));
    let config = |shuffle| LoaderConfig {
        batch_size: 8,
        shuffle,
        drop_last: true,
        seed: 5,
        threads,
        prefetch: 2,
    };
    let norm = Normalize::IMAGENET;
    let train = Pipeline::train_preset(la_data::Preset::Cifar10, 16)
        .with_normalize(norm)
        .with_mix(Some(Mix::MixUp { alpha: 0.4 }));
    (
        Loader::new(data.clone(), train, config(true), Device::Cpu).unwrap(),
        Loader::new(data, Pipeline::eval(16, norm), config(false), Device::Cpu).unwrap(),
    )
}

/// Stops after a given number of epochs, as an interrupted run would.
struct StopAfter(usize);
impl Observer for StopAfter {
    fn epoch_end(&mut self, r: &EpochRecord) -> Control {
        if r.epoch >= self.0 {
            Control::Stop
        } else {
            Control::Continue
        }
    }
}

/// A new run of `info` in a temporary directory, trained to its end (or to `observer`'s stop).
fn trained(
    label: &str,
    info: RunInfo,
    observer: &mut dyn Observer,
) -> (la_testing::TempDir, std::path::PathBuf, Trainer) {
    let (train, val) = loaders(2);
    let tmp = la_testing::tempdir(label);
    let dir = tmp.path().join("run");
    let mut t = Trainer::new(&dir, info, HashMap::new(), &Device::Cpu).unwrap();
    t.fit(&train, Some(&val), observer).unwrap();
    (tmp, dir, t)
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    la_vgg::load_weights(&dir.join("last.safetensors"), &Device::Cpu)
        .unwrap()
        .tensors
}

#[test]
fn a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one() {
    let (train, val) = loaders(2);
    let (_straight_tmp, straight, t) = trained("train-straight", info(3, 0.05), &mut Silent);
    assert_eq!(t.state.epoch, 3);

    let interrupted_tmp = la_testing::tempdir("train-interrupted");
    let interrupted = interrupted_tmp.path().join("run");
    let mut t = Trainer::new(&interrupted, info(3, 0.05), HashMap::new(), &Device::Cpu).unwrap();
    t.fit(&train, Some(&val), &mut StopAfter(1)).unwrap();
    assert_eq!(t.state.epoch, 1);
    drop(t);
    // Resume in a new process-like state, with loaders using another thread count.
    let (train1, val1) = loaders(1);
    let mut t = Trainer::resume(&interrupted, &Device::Cpu).unwrap();
    assert_eq!((t.state.epoch, t.state.step), (1, 6));
    t.fit(&train1, Some(&val1), &mut Silent).unwrap();
    assert_eq!(t.state.epoch, 3);

    let (a, b) = (weights(&straight), weights(&interrupted));
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        let diff = la_testing::max_abs_diff(ta, &b[name]);
        assert_eq!(diff, 0.0, "{name} differs after resume");
    }
    // Training moved the weights (the comparison above is not between two untouched models).
    let fresh = la_vgg::trainable(
        tiny_model(),
        HashMap::new(),
        3,
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .1;
    let w0 = fresh.data().lock().unwrap()["blocks.0.convs.0.weight"]
        .as_tensor()
        .clone();
    let moved = la_testing::abs_sum(&(w0 - &a["blocks.0.convs.0.weight"]).unwrap());
    assert!(moved > 1e-3);

    for file in [
        "checkpoint.safetensors",
        "last.safetensors",
        "best.safetensors",
        "metrics.jsonl",
        "epochs.csv",
        "curves.png",
    ] {
        assert!(straight.join(file).exists(), "{file} missing");
    }
    let csv = std::fs::read_to_string(straight.join("epochs.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    let png = std::fs::read(straight.join("curves.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // A second run in the same directory is refused rather than overwriting it.
    let err = Trainer::new(&straight, info(3, 0.05), HashMap::new(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already holds a run"), "{err}");
    let _ = std::fs::remove_dir_all(&straight);
    let _ = std::fs::remove_dir_all(&interrupted);
}

#[test]
fn divergence_names_the_step_and_keeps_the_last_good_checkpoint() {
    let (train, val) = loaders(2);
    let dir_tmp = la_testing::tempdir("train-diverge");
    let dir = dir_tmp.path().join("run");
    let mut t = Trainer::new(&dir, info(2, 0.05), HashMap::new(), &Device::Cpu).unwrap();
    t.fit(&train, Some(&val), &mut StopAfter(1)).unwrap();
    let good = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    drop(t);
    // Resume with an absurd learning rate: the weights blow up within a few steps.
    let mut t = Trainer::resume(&dir, &Device::Cpu).unwrap();
    t.info.train.lr = 1e30;
    t.info.train.grad_clip = None;
    let err = t
        .fit(&train, Some(&val), &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("training diverged at step"), "{err}");
    assert!(err.contains("NaN or infinite"), "{err}");
    assert!(
        err.contains("parameter ") || err.contains("gradient of") || err.contains("loss"),
        "{err}"
    );
    assert!(err.contains("checkpoint.safetensors"), "{err}");
    assert_eq!(
        std::fs::read(dir.join("checkpoint.safetensors")).unwrap(),
        good,
        "the good checkpoint was overwritten"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unwritable_run_directories_fail_before_training() {
    let err = Trainer::new(
        Path::new("/proc/la-train-cannot-write-here"),
        info(1, 0.05),
        HashMap::new(),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("/proc/la-train-cannot-write-here"), "{err}");
    assert!(
        err.contains("cannot create") || err.contains("not writable"),
        "{err}"
    );
}

#[test]
fn a_corrupt_checkpoint_is_named_on_resume() {
    let dir_tmp = la_testing::tempdir("train-corrupt");
    let dir = dir_tmp.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("checkpoint.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
    )
    .unwrap();
    let err = Trainer::resume(&dir, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("checkpoint.safetensors") && err.contains("not a valid checkpoint"),
        "{err}"
    );
    let err = Trainer::resume(&dir.join("missing"), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is this a run directory"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// K micro-batches of B with accumulated gradients train as one batch of K B: without
/// BatchNorm (whose statistics are per batch) and dropout, the weights agree.
#[test]
fn gradient_accumulation_equals_a_larger_batch() {
    let mut model = tiny_model();
    model.batch_norm = false;
    model.head.dropout = 0.0;
    let data: Arc<dyn Dataset> = Arc::new(VecDataset::synthetic(48, 16, 16, 3, 1));
    let run = |batch_size: usize, accum: usize| {
        let loader = Loader::new(
            data.clone(),
            Pipeline::eval(16, Normalize::IMAGENET),
            LoaderConfig {
                batch_size,
                shuffle: true,
                drop_last: true,
                seed: 5,
                threads: 2,
                prefetch: 2,
            },
            Device::Cpu,
        )
        .unwrap();
        let mut info = info(2, 0.05);
        info.model = model.clone();
        info.train.grad_accum_steps = accum;
        let tmp = la_testing::tempdir("train-accum");
        let dir = tmp.path().join("run");
        let mut t = Trainer::new(&dir, info, HashMap::new(), &Device::Cpu).unwrap();
        t.fit(&loader, None, &mut Silent).unwrap();
        (t.state.step, weights(&dir))
    };
    let (steps_one, one) = run(8, 1);
    let (steps_accum, accumulated) = run(4, 2);
    assert_eq!((steps_one, steps_accum), (12, 12), "optimiser steps");
    for (name, t) in &one {
        let diff = la_testing::max_abs_diff(t, &accumulated[name]);
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    // A third of a group at the end of each epoch (48 / 5 = 9 batches, groups of 4):
    // the short group still steps.
    let (steps, _) = run(5, 4);
    assert_eq!(steps, 2 * 3);
}

/// A run whose validation top-1 stops improving ends after `patience` more epochs, and
/// stays ended when resumed.
#[test]
fn early_stopping_ends_a_run_that_stopped_improving() {
    let (train, val) = loaders(2);
    let tmp = la_testing::tempdir("train-early-stop");
    let dir = tmp.path().join("run");
    // A zero learning rate and no BatchNorm statistics to update: the first epoch's figures
    // are never beaten.
    let mut info = info(10, 0.0);
    info.model.batch_norm = false;
    info.train.early_stop = Some(la_train::EarlyStop {
        metric: la_train::StopMetric::ValTop1,
        patience: 2,
    });
    let mut t = Trainer::new(&dir, info, HashMap::new(), &Device::Cpu).unwrap();
    t.fit(&train, Some(&val), &mut Silent).unwrap();
    assert_eq!(t.state.epoch, 3);
    drop(t);
    let mut t = Trainer::resume(&dir, &Device::Cpu).unwrap();
    t.fit(&train, Some(&val), &mut Silent).unwrap();
    assert_eq!(t.state.epoch, 3, "a resumed run stays stopped");
    // The rule itself: val-loss improving at the last epoch does not stop.
    let record = |loss: f64| EpochRecord {
        epoch: 1,
        lr: 0.0,
        train_loss: 0.0,
        train_top1: 0.0,
        val_loss: Some(loss),
        val_top1: Some(0.5),
        val_top5: None,
        ema_val_loss: None,
        ema_val_top1: None,
        seconds: 0.0,
        images_per_s: 0.0,
    };
    let rule = la_train::EarlyStop {
        metric: la_train::StopMetric::ValLoss,
        patience: 2,
    };
    assert!(!rule.should_stop(&[record(1.0), record(1.1), record(0.9)]));
    assert!(rule.should_stop(&[record(1.0), record(1.1), record(1.2)]));
}

/// With an EMA the run evaluates and saves the average, and an interrupted and resumed run
/// ends with the same average as an uninterrupted one.
#[test]
fn the_weights_average_is_evaluated_saved_and_resumed_exactly() {
    let with_ema = || {
        let mut i = info(3, 0.05);
        i.train.ema = Some(la_train::EmaConfig {
            decay: 0.9,
            warmup: true,
        });
        i
    };
    let (train, val) = loaders(2);
    let (_straight_tmp, straight, t) = trained("ema-straight", with_ema(), &mut Silent);
    assert!(t.state.history.iter().all(|r| r.ema_val_top1.is_some()));
    assert!(straight.join("ema-best.safetensors").exists());

    let interrupted_tmp = la_testing::tempdir("ema-interrupted");
    let interrupted = interrupted_tmp.path().join("run");
    let mut t = Trainer::new(&interrupted, with_ema(), HashMap::new(), &Device::Cpu).unwrap();
    t.fit(&train, Some(&val), &mut StopAfter(1)).unwrap();
    drop(t);
    let mut t = Trainer::resume(&interrupted, &Device::Cpu).unwrap();
    t.fit(&train, Some(&val), &mut Silent).unwrap();

    let ema = |dir: &Path| {
        la_train::checkpoint::load_checkpoint(dir, &Device::Cpu)
            .unwrap()
            .ema
    };
    let (a, b) = (ema(&straight), ema(&interrupted));
    assert!(!a.is_empty());
    for (name, ta) in &a {
        assert_eq!(la_testing::max_abs_diff(ta, &b[name]), 0.0, "{name}");
    }
    // The average differs from the last weights (it is not a copy).
    let last = weights(&straight);
    let moved: f64 = a
        .iter()
        .map(|(n, t)| la_testing::max_abs_diff(t, &last[n]))
        .fold(0.0, f64::max);
    assert!(moved > 1e-4, "{moved}");
}

/// Stops at an optimiser step, as Ctrl-C does.
struct StopAtStep(usize);
impl Observer for StopAtStep {
    fn step(&mut self, s: &la_train::StepInfo) -> Control {
        if s.step >= self.0 {
            Control::Stop
        } else {
            Control::Continue
        }
    }
}

/// A run stopped in the middle of an epoch (Ctrl-C) resumes there and ends with the
/// weights and the epoch figures of an uninterrupted run; recovery checkpoints within
/// epochs and the kept best epochs' checkpoints resume too.
#[test]
fn runs_resume_mid_epoch_and_from_kept_checkpoints() {
    let (train, val) = loaders(2);
    let (_straight_tmp, straight, t) = trained("mid-straight", info(2, 0.05), &mut Silent);
    let straight_history = t.state.history.clone();

    let stopped_tmp = la_testing::tempdir("mid-stopped");
    let stopped = stopped_tmp.path().join("run");
    let mut with_hist = info(2, 0.05);
    with_hist.train.recovery_interval = Some(2);
    with_hist.train.checkpoint_hist = Some(1);
    let mut t = Trainer::new(&stopped, with_hist, HashMap::new(), &Device::Cpu).unwrap();
    // 6 steps an epoch: stop at step 9, in the middle of epoch 2.
    t.fit(&train, Some(&val), &mut StopAtStep(9)).unwrap();
    assert_eq!((t.state.epoch, t.state.step), (1, 9));
    drop(t);
    let mut t = Trainer::resume(&stopped, &Device::Cpu).unwrap();
    assert_eq!(
        (t.state.epoch, t.state.step),
        (1, 9),
        "resumes at the step it stopped"
    );
    t.fit(&train, Some(&val), &mut Silent).unwrap();
    assert_eq!(t.state.epoch, 2);
    let (a, b) = (weights(&straight), weights(&stopped));
    for (name, ta) in &a {
        assert_eq!(la_testing::max_abs_diff(ta, &b[name]), 0.0, "{name}");
    }
    for (x, y) in straight_history.iter().zip(&t.state.history) {
        assert_eq!(
            (x.train_loss, x.train_top1, x.val_top1),
            (y.train_loss, y.train_top1, y.val_top1)
        );
    }
    // One epoch checkpoint is kept, the best one; it resumes that epoch's state.
    let kept: Vec<String> = std::fs::read_dir(&stopped)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    let best = t.state.best_epoch.unwrap();
    assert_eq!(kept, [format!("checkpoint-{best}.safetensors")]);
    let t = Trainer::resume(
        &la_train::checkpoint::epoch_checkpoint(&stopped, best),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!((t.state.epoch, t.state.step), (best, 6 * best));
}

/// TensorBoard events: every step's loss and rate and every epoch's figures, read back
/// with their checksums checked.
#[test]
fn tensorboard_events_hold_the_runs_figures() {
    let mut i = info(2, 0.05);
    i.train.tensorboard = true;
    let (_tmp, dir, t) = trained("tensorboard", i, &mut Silent);
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("tfevents"))
        .expect("an event file");
    let scalars = la_train::tensorboard::read_scalars(&file).unwrap();
    let tagged = |tag: &str| -> Vec<(u64, f32)> {
        scalars
            .iter()
            .filter(|(t, _, _)| t == tag)
            .map(|(_, s, v)| (*s, *v))
            .collect()
    };
    assert_eq!(tagged("train/loss").len(), t.state.step);
    let val: Vec<(u64, f32)> = t
        .state
        .history
        .iter()
        .map(|r| ((6 * r.epoch) as u64, r.val_top1.unwrap() as f32))
        .collect();
    assert_eq!(tagged("epoch/val_top1"), val);
    // A flipped byte is caught by the checksums.
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 6;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    assert!(la_train::tensorboard::read_scalars(&file).is_err());
}
