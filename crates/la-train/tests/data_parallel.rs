//! Data-parallel training with the ranks as threads ([`ThreadGroup`]), against one process
//! on the same global batches, as PyTorch's own DDP test does: the same loss at every step
//! and the same final weights, with synchronised BatchNorm and without BatchNorm; per-rank
//! BatchNorm as one process fed each rank's shard; and a failing rank stops every rank.
//! (tests/distributed.rs runs the same over MPI with `mpirun` and the real binary.)

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, ModuleT, Tensor};
use la_data::{Dataset, Loader, LoaderConfig, Normalize, Pipeline, Sample, Shard, VecDataset};
use la_train::{
    Collective, Control, Observer, OptimizerConfig, RunInfo, Schedule, StepInfo, ThreadGroup,
    TrainConfig, Trainer,
};
use la_vgg::{HeadConfig, VggConfig};

const STEPS: usize = 20;
const BATCH: usize = 8;

fn model(batch_norm: bool) -> VggConfig {
    VggConfig {
        blocks: vec![vec![4], vec![8], vec![8]],
        batch_norm,
        attention: Some(la_vgg::AttentionSites {
            config: la_attention::AttentionConfig::new(la_attention::AttentionKind::Softmax),
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

fn info(batch_norm: bool, sync_bn: bool) -> RunInfo {
    RunInfo {
        model: model(batch_norm),
        train: TrainConfig {
            epochs: 4,
            lr: 0.02,
            optimizer: OptimizerConfig::Sgd {
                momentum: 0.9,
                nesterov: true,
                weight_decay: 5e-4,
            },
            schedule: Schedule::Cosine { min_lr: 0.0 },
            warmup_epochs: 0.5,
            label_smoothing: 0.1,
            grad_clip: Some(5.0),
            max_steps: Some(STEPS),
            sync_bn,
            seed: 3,
            ..TrainConfig::default()
        },
        normalization: Normalize::IMAGENET,
        input_size: 16,
        classes: vec!["a".into(), "b".into(), "c".into()],
    }
}

fn loaders(data: Arc<dyn Dataset>, shard: Shard) -> (Loader, Loader) {
    let config = |shuffle, drop_last| LoaderConfig {
        batch_size: BATCH,
        shuffle,
        drop_last,
        seed: 5,
        threads: 1,
        prefetch: 2,
    };
    let norm = Normalize::IMAGENET;
    let train = Pipeline::train_preset(la_data::Preset::Cifar10, 16).with_normalize(norm);
    (
        Loader::new(data.clone(), train, config(true, true), Device::Cpu)
            .unwrap()
            .with_shard(shard)
            .unwrap(),
        Loader::new(
            data,
            Pipeline::eval(16, norm),
            config(false, false),
            Device::Cpu,
        )
        .unwrap()
        .with_shard(shard)
        .unwrap(),
    )
}

fn data() -> Arc<dyn Dataset> {
    // 45 images: 5 full batches of 8 an epoch, and a validation pass ending in a batch of 5.
    Arc::new(VecDataset::synthetic(45, 16, 16, 3, 1))
}

/// The loss of every step, and each training batch's shard as trained on.
#[derive(Default)]
struct Record {
    losses: Vec<f64>,
    batches: Vec<Tensor>,
    labels: Vec<Vec<usize>>,
}

impl Observer for Record {
    fn batch(&mut self, _: usize, _: usize, data: &la_data::Batch) {
        self.batches.push(data.images.clone());
        self.labels.push(data.labels.clone());
    }
    fn step(&mut self, info: &StepInfo) -> Control {
        self.losses.push(info.loss);
        Control::Continue
    }
}

struct Outcome {
    record: Record,
    weights: HashMap<String, Tensor>,
    top1: Option<f64>,
    ema_top1: Option<f64>,
}

/// Trains `info` for [`STEPS`] steps as every rank of `group`, each rank on its own thread
/// with its own shard of `data`; the outcome of each rank, rank 0 first.
fn train_as(
    group: Vec<ThreadGroup>,
    info: RunInfo,
    data: Arc<dyn Dataset>,
) -> Vec<Result<Outcome, String>> {
    let tmp = la_testing::tempdir("data-parallel");
    let dir = tmp.path().join("run");
    let ranks = group.len();
    let handles: Vec<_> = group
        .into_iter()
        .map(|member| {
            let (info, data, dir) = (info.clone(), data.clone(), dir.clone());
            std::thread::spawn(move || -> Result<Outcome, String> {
                let failed = |e: la_train::Error| la_testing::error_chain(&e);
                let shard = Shard {
                    index: member.rank(),
                    count: ranks,
                };
                let (train, val) = loaders(data, shard);
                let mut t =
                    Trainer::new_on(&dir, info, HashMap::new(), &Device::Cpu, Arc::new(member))
                        .map_err(failed)?;
                let mut record = Record::default();
                t.fit(&train, Some(&val), &mut record).map_err(failed)?;
                Ok(Outcome {
                    record,
                    weights: t.tensors().map_err(failed)?,
                    top1: t.state.history.last().and_then(|r| r.val_top1),
                    ema_top1: t.state.history.last().and_then(|r| r.ema_val_top1),
                })
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn one_process(info: RunInfo) -> Outcome {
    train_as(ThreadGroup::new(1), info, data())
        .pop()
        .unwrap()
        .unwrap()
}

fn two_ranks(info: RunInfo) -> Vec<Outcome> {
    train_as(ThreadGroup::new(2), info, data())
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Largest difference between two sets of tensors, relative to each tensor's largest value
/// (at least 1).
fn weights_gap(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, t)| {
            let scale = la_testing::values(t)
                .iter()
                .fold(1.0f64, |m, v| m.max(v.abs()));
            la_testing::max_abs_diff(t, &b[name]) / scale
        })
        .fold(0.0, f64::max)
}

fn assert_trains_as_one_process(batch_norm: bool, sync_bn: bool) {
    let one = one_process(info(batch_norm, sync_bn));
    let ranks = two_ranks(info(batch_norm, sync_bn));
    assert_eq!(one.record.losses.len(), STEPS);
    for rank in &ranks {
        assert_eq!(rank.record.losses.len(), STEPS);
        for (step, (a, b)) in one
            .record
            .losses
            .iter()
            .zip(&rank.record.losses)
            .enumerate()
        {
            assert!(
                (a - b).abs() < 1e-5,
                "step {step}: loss {a} in one process, {b} over two ranks"
            );
        }
        let gap = weights_gap(&one.weights, &rank.weights);
        assert!(gap < 1e-5, "final weights {gap:e} apart");
        assert_eq!(rank.top1, one.top1, "validation top-1");
    }
    // Both ranks hold the same model, bit for bit.
    for (name, t) in &ranks[0].weights {
        assert_eq!(
            la_testing::max_abs_diff(t, &ranks[1].weights[name]),
            0.0,
            "{name}"
        );
    }
    // The run really moved: a test of nothing would pass too.
    let first = one.record.losses[0];
    assert!(one.record.losses.iter().any(|l| (l - first).abs() > 1e-3));
}

#[test]
fn two_ranks_without_batch_norm_train_as_one_process() {
    assert_trains_as_one_process(false, false);
}

#[test]
fn two_ranks_with_synchronised_batch_norm_train_as_one_process() {
    assert_trains_as_one_process(true, true);
}

#[test]
fn accumulated_gradients_and_the_weights_average_work_on_two_ranks() {
    let mut info = info(false, false);
    info.train.grad_accum_steps = 2;
    info.train.ema = Some(la_train::EmaConfig {
        decay: 0.9,
        warmup: true,
    });
    info.train.max_steps = None;
    info.train.epochs = 2;
    let one = one_process(info.clone());
    let ranks = two_ranks(info);
    assert!(one.ema_top1.is_some());
    for rank in &ranks {
        let gap = weights_gap(&one.weights, &rank.weights);
        assert!(gap < 1e-5, "final weights {gap:e} apart");
        for (a, b) in one.record.losses.iter().zip(&rank.record.losses) {
            assert!(
                (a - b).abs() < 1e-5,
                "loss {a} in one process, {b} over two ranks"
            );
        }
        assert_eq!(
            rank.ema_top1, one.ema_top1,
            "the average's validation top-1"
        );
    }
}

#[test]
fn per_rank_batch_norm_is_one_process_fed_each_shard() {
    let mut info = info(true, false);
    info.train.max_steps = Some(1);
    info.model.head.dropout = 0.0;
    let one = one_process(info.clone());
    let ranks = two_ranks(info.clone());
    // The shards, put together, are the one-process batch.
    let whole = &one.record.batches[0];
    let shards: Vec<&Tensor> = ranks.iter().map(|r| &r.record.batches[0]).collect();
    assert_eq!(
        la_testing::max_abs_diff(whole, &Tensor::cat(&shards, 0).unwrap()),
        0.0
    );
    let labels: Vec<usize> = ranks
        .iter()
        .flat_map(|r| r.record.labels[0].clone())
        .collect();
    assert_eq!(labels, one.record.labels[0]);
    // The first step's loss is the mean of each shard's loss under the shard's own batch
    // statistics, as one process fed that shard computes it, and not the whole batch's.
    let (fresh, _) = la_vgg::trainable(
        info.model.clone(),
        HashMap::new(),
        info.train.seed,
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let smoothing = info.train.label_smoothing;
    let loss = |images: &Tensor, labels: &[usize]| -> f64 {
        let logits = fresh.forward_t(images, true).unwrap();
        let l = la_train::loss::cross_entropy(&logits, labels, smoothing).unwrap();
        l.to_scalar::<f32>().unwrap() as f64
    };
    let expected: f64 = ranks
        .iter()
        .map(|r| loss(&r.record.batches[0], &r.record.labels[0]) * r.record.labels[0].len() as f64)
        .sum::<f64>()
        / BATCH as f64;
    let whole_batch = loss(whole, &labels);
    for rank in &ranks {
        let got = rank.record.losses[0];
        assert!(
            (got - expected).abs() < 1e-7,
            "loss {got}, shards under their own statistics {expected}"
        );
    }
    // At initialisation the logits are small, so the losses differ little; the shards' loss
    // is matched to the last bit of f32 (1e-7), 60 times closer than the whole batch's.
    assert!(
        (whole_batch - expected).abs() > 3e-6,
        "the check needs shards whose statistics differ from the batch's"
    );
    assert!((one.record.losses[0] - whole_batch).abs() < 1e-6);
}

/// A data set whose sample `bad` cannot be read.
struct Broken {
    inner: VecDataset,
    bad: usize,
}

impl Dataset for Broken {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get(&self, index: usize) -> la_data::Result<Sample> {
        if index == self.bad {
            return Err(la_data::Error::Sample {
                index,
                reason: "unreadable on purpose".into(),
            });
        }
        self.inner.get(index)
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
}

#[test]
fn a_rank_that_fails_stops_every_rank_with_its_error() {
    // Sample 7 falls in some step's shard of one rank; that rank fails, the other learns why.
    let data: Arc<dyn Dataset> = Arc::new(Broken {
        inner: VecDataset::synthetic(45, 16, 16, 3, 1),
        bad: 7,
    });
    let outcomes = train_as(ThreadGroup::new(2), info(true, false), data);
    let errors: Vec<String> = outcomes
        .into_iter()
        .map(|o| match o {
            Ok(_) => panic!("a rank finished although sample 7 is unreadable"),
            Err(e) => e,
        })
        .collect();
    let own = errors
        .iter()
        .filter(|e| e.contains("unreadable on purpose") && !e.contains("failed:"))
        .count();
    let told = errors
        .iter()
        .filter(|e| e.contains("failed: ") && e.contains("unreadable on purpose"))
        .count();
    assert_eq!((own, told), (1, 1), "{errors:?}");
}

#[test]
fn ranks_that_build_different_models_are_stopped_at_the_start() {
    let group = ThreadGroup::new(2);
    let handles: Vec<_> = group
        .into_iter()
        .map(|member| {
            std::thread::spawn(move || {
                let mut info = info(false, false);
                info.train.seed += member.rank() as u64; // a mistake: each rank its own seed
                let tmp = la_testing::tempdir("data-parallel-seeds");
                Trainer::new_on(
                    &tmp.path().join("run"),
                    info,
                    HashMap::new(),
                    &Device::Cpu,
                    Arc::new(member),
                )
                .map(|_| ())
                .map_err(|e| la_testing::error_chain(&e))
            })
        })
        .collect();
    for h in handles {
        let e = h.join().unwrap().unwrap_err();
        assert!(e.contains("differs from rank 0's"), "{e}");
    }
}

#[test]
fn a_sum_over_one_rank_changes_no_step() {
    // The bucket-tensor path (the one NCCL takes on a GPU) and the host-staging path (MPI's).
    let threads = ThreadGroup::new(1).pop().unwrap();
    let tensors =
        la_train::data_parallel::one_rank_step_difference(&threads, &Device::Cpu).unwrap();
    assert_eq!(tensors, 0.0);
    let host =
        la_train::data_parallel::one_rank_step_difference(&la_train::SingleProcess, &Device::Cpu)
            .unwrap();
    assert_eq!(host, 0.0);
}
