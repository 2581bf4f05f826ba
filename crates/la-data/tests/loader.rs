//! Loader: determinism across thread counts, shuffling, drop_last, errors, early drop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use la_data::{
    Batch, Dataset, Error, Image, Loader, LoaderConfig, Mix, Pipeline, Preset, Result, Sample,
    Targets, VecDataset,
};

fn config(threads: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size: 16,
        shuffle: true,
        drop_last: false,
        seed: 42,
        threads,
        prefetch: 2,
    }
}

fn synthetic(n: usize) -> Arc<dyn Dataset> {
    Arc::new(VecDataset::synthetic(n, 32, 32, 10, 3))
}

fn collect(loader: &Loader, epoch: usize) -> Vec<Batch> {
    loader.epoch(epoch).map(|b| b.unwrap()).collect()
}

fn values(b: &Batch) -> Vec<f32> {
    b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn targets(b: &Batch) -> Vec<f32> {
    match &b.targets {
        Targets::Labels(t) => t.to_dtype(DType::F32).unwrap().to_vec1().unwrap(),
        Targets::Soft(t) => t.flatten_all().unwrap().to_vec1().unwrap(),
    }
}

#[test]
fn same_batches_whatever_the_thread_count() {
    let ds = synthetic(70);
    let pipeline = Pipeline::train_preset(Preset::ArticleRecipe, 24).with_mix(Some(Mix::Either {
        mixup_alpha: 0.2,
        cutmix_alpha: 1.0,
        prob_cutmix: 0.5,
    }));
    let one = Loader::new(ds.clone(), pipeline.clone(), config(1), Device::Cpu).unwrap();
    let two = Loader::new(ds, pipeline, config(2), Device::Cpu).unwrap();
    assert_eq!((one.threads(), two.threads()), (1, 2));
    let (a, b) = (collect(&one, 3), collect(&two, 3));
    assert_eq!(a.len(), 5);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.images.dims(), y.images.dims());
        assert_eq!(values(x), values(y));
        assert_eq!(x.labels, y.labels);
        assert_eq!(targets(x), targets(y));
    }
    // Shapes and soft targets.
    assert_eq!(a[0].images.dims(), &[16, 3, 24, 24]);
    assert_eq!(a[4].images.dims(), &[6, 3, 24, 24]);
    let Targets::Soft(soft) = &a[0].targets else {
        panic!("mix gives soft targets")
    };
    assert_eq!(soft.dims(), &[16, 10]);
    for row in soft.to_vec2::<f32>().unwrap() {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    // The same epoch again is the same; another epoch is not.
    let again = collect(&one, 3);
    assert_eq!(values(&again[1]), values(&a[1]));
    let other = collect(&one, 4);
    assert_ne!(values(&other[1]), values(&a[1]));
}

#[test]
fn shuffle_changes_order_between_epochs_and_covers_everything() {
    let ds = synthetic(50);
    let loader = Loader::new(
        ds.clone(),
        Pipeline::eval(32, la_data::Normalize::UNIT),
        config(2),
        Device::Cpu,
    )
    .unwrap();
    let (o0, o1) = (loader.order(0), loader.order(1));
    assert_ne!(o0, o1);
    assert_eq!(o0, loader.order(0));
    let mut sorted = o0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    // The batches follow that order.
    let labels: Vec<usize> = collect(&loader, 1)
        .iter()
        .flat_map(|b| b.labels.clone())
        .collect();
    let expect: Vec<usize> = o1.iter().map(|&i| ds.label(i).unwrap()).collect();
    assert_eq!(labels, expect);
    // Pixels survive unshuffled, un-augmented: batch 0 image 0 is sample 0 in [0, 1].
    let plain = Loader::new(
        ds.clone(),
        Pipeline::eval(32, la_data::Normalize::UNIT),
        LoaderConfig {
            shuffle: false,
            ..config(1)
        },
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(plain.order(5), (0..50).collect::<Vec<_>>());
    let b0 = plain.batch(0, 0).unwrap();
    let px = b0
        .images
        .get(0)
        .unwrap()
        .get(1)
        .unwrap()
        .get(2)
        .unwrap()
        .get(3)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let s0 = ds.get(0).unwrap();
    assert!((px - s0.image.pixel(2, 3)[1] as f32 / 255.0).abs() < 1e-6);
    let Targets::Labels(l) = &b0.targets else {
        panic!("hard labels")
    };
    assert_eq!(l.dtype(), DType::U32);
    assert_eq!(l.to_vec1::<u32>().unwrap()[..3], [0, 1, 2]);
}

#[test]
fn drop_last_and_lengths() {
    let ds = synthetic(50);
    let p = Pipeline::train_preset(Preset::Cifar10, 32);
    let keep = Loader::new(ds.clone(), p.clone(), config(1), Device::Cpu).unwrap();
    let drop = Loader::new(
        ds.clone(),
        p.clone(),
        LoaderConfig {
            drop_last: true,
            ..config(1)
        },
        Device::Cpu,
    )
    .unwrap();
    assert_eq!((keep.len(), drop.len()), (4, 3));
    assert_eq!(drop.samples_per_epoch(), 48);
    let sizes: Vec<usize> = collect(&keep, 0).iter().map(|b| b.labels.len()).collect();
    assert_eq!(sizes, [16, 16, 16, 2]);
    let sizes: Vec<usize> = collect(&drop, 0).iter().map(|b| b.labels.len()).collect();
    assert_eq!(sizes, [16, 16, 16]);
    assert!(Loader::new(
        ds,
        p,
        LoaderConfig {
            batch_size: 0,
            ..config(1)
        },
        Device::Cpu
    )
    .is_err());
}

/// Fails on one index, panics on another, counts calls.
struct Faulty {
    inner: VecDataset,
    fail: usize,
    panic: Option<usize>,
    calls: Arc<AtomicUsize>,
    delay: Duration,
}

impl Dataset for Faulty {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        if index == self.fail {
            return Err(Error::Sample {
                index,
                reason: "synthetic failure".into(),
            });
        }
        if Some(index) == self.panic {
            panic!("synthetic panic at {index}");
        }
        self.inner.get(index)
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
}

fn faulty(
    n: usize,
    fail: usize,
    panic: Option<usize>,
    delay: Duration,
) -> (Arc<dyn Dataset>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let ds = Faulty {
        inner: VecDataset::synthetic(n, 8, 8, 4, 0),
        fail,
        panic,
        calls: calls.clone(),
        delay,
    };
    (Arc::new(ds), calls)
}

#[test]
fn sample_errors_and_panics_come_out_as_err_items() {
    let unshuffled = LoaderConfig {
        shuffle: false,
        batch_size: 4,
        ..config(2)
    };
    let (ds, _) = faulty(12, 5, None, Duration::ZERO);
    let loader = Loader::new(
        ds,
        Pipeline::new(la_data::Normalize::UNIT),
        unshuffled.clone(),
        Device::Cpu,
    )
    .unwrap();
    let items: Vec<_> = loader.epoch(0).collect();
    assert_eq!(items.len(), 3);
    assert!(items[0].is_ok() && items[2].is_ok());
    let msg = items[1].as_ref().unwrap_err().to_string();
    assert!(
        msg.contains("sample 5") && msg.contains("synthetic failure"),
        "{msg}"
    );

    let (ds, _) = faulty(12, 99, Some(9), Duration::ZERO);
    let loader = Loader::new(
        ds,
        Pipeline::new(la_data::Normalize::UNIT),
        unshuffled,
        Device::Cpu,
    )
    .unwrap();
    let items: Vec<_> = loader.epoch(0).collect();
    assert_eq!(items.len(), 3);
    assert!(items[0].is_ok() && items[1].is_ok());
    let err = items[2].as_ref().unwrap_err();
    assert!(matches!(err, Error::Worker(_)));
    assert!(err.to_string().contains("synthetic panic at 9"), "{err}");

    // Images of different sizes in one batch: an error naming the sample.
    let samples = vec![
        Sample {
            image: Image::zeros(4, 4),
            label: 0,
        },
        Sample {
            image: Image::zeros(5, 4),
            label: 1,
        },
    ];
    let mixed: Arc<dyn Dataset> =
        Arc::new(VecDataset::new(samples, vec!["a".into(), "b".into()]).unwrap());
    let loader = Loader::new(
        mixed,
        Pipeline::new(la_data::Normalize::UNIT),
        LoaderConfig {
            shuffle: false,
            ..config(1)
        },
        Device::Cpu,
    )
    .unwrap();
    let msg = loader.epoch(0).next().unwrap().unwrap_err().to_string();
    assert!(msg.contains("sample 1") && msg.contains("5x4"), "{msg}");
}

#[test]
fn dropping_the_iterator_early_stops_the_workers() {
    let (ds, calls) = faulty(4000, usize::MAX, None, Duration::from_micros(200));
    let cfg = LoaderConfig {
        batch_size: 8,
        prefetch: 2,
        ..config(2)
    };
    let loader = Loader::new(
        ds,
        Pipeline::new(la_data::Normalize::UNIT),
        cfg,
        Device::Cpu,
    )
    .unwrap();
    {
        let mut it = loader.epoch(0);
        it.next().unwrap().unwrap();
    }
    let after_drop = calls.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        after_drop,
        "no work after the drop returned"
    );
    // At most the consumed batch, the queued ones and the one being built.
    assert!(after_drop <= 8 * 5, "{after_drop} samples loaded");
}

#[test]
fn eval_loader_on_real_digits() {
    let ds: Arc<dyn Dataset> = Arc::new(la_data::digits().unwrap());
    let loader = Loader::new(
        ds.clone(),
        Pipeline::eval(32, la_data::Normalize::DIGITS),
        LoaderConfig {
            batch_size: 500,
            shuffle: false,
            ..config(0)
        },
        Device::Cpu,
    )
    .unwrap();
    let batches = collect(&loader, 0);
    assert_eq!(batches.len(), 4);
    assert_eq!(batches[3].images.dims(), &[297, 3, 32, 32]);
    let total: usize = batches.iter().map(|b| b.labels.len()).sum();
    assert_eq!(total, 1797);
    // Normalised with the data's own statistics: mean near 0 (upscaling changes it a bit).
    let mean = batches[0]
        .images
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(mean.abs() < 0.2, "{mean}");
}

#[test]
fn bench_pipeline_reports_a_rate() {
    for pipeline in [
        la_data::bench_cifar_pipeline(),
        la_data::bench_trivial_augment_pipeline(),
    ] {
        let rate = la_data::bench_pipeline(&pipeline, 256, 64, 1);
        assert!(rate.is_finite() && rate > 100.0, "{rate}");
    }
}

#[test]
fn shards_put_together_are_the_whole_batches() {
    // 70 samples in batches of 16: the last batch has 6, split 2 + 2 + 2 over three ranks.
    let ds = synthetic(70);
    let pipeline = Pipeline::train_preset(Preset::ArticleRecipe, 24);
    let whole = Loader::new(ds.clone(), pipeline.clone(), config(2), Device::Cpu).unwrap();
    let ranks: Vec<Loader> = (0..3)
        .map(|index| {
            Loader::new(ds.clone(), pipeline.clone(), config(1), Device::Cpu)
                .unwrap()
                .with_shard(la_data::Shard { index, count: 3 })
                .unwrap()
        })
        .collect();
    let expected = collect(&whole, 2);
    let shards: Vec<Vec<Batch>> = ranks.iter().map(|l| collect(l, 2)).collect();
    for (b, batch) in expected.iter().enumerate() {
        let parts: Vec<&Batch> = shards.iter().map(|s| &s[b]).collect();
        let sizes: Vec<usize> = parts.iter().map(|p| p.labels.len()).collect();
        let n = batch.labels.len();
        assert_eq!(sizes, vec![n / 3, 2 * n / 3 - n / 3, n - 2 * n / 3]);
        assert!(parts.iter().all(|p| p.global_size == n));
        let labels: Vec<usize> = parts.iter().flat_map(|p| p.labels.clone()).collect();
        assert_eq!(labels, batch.labels);
        let values_joined: Vec<f32> = parts.iter().flat_map(|p| values(p)).collect();
        assert_eq!(values_joined, values(batch));
    }
    assert_eq!(expected[0].global_size, 16);
}

#[test]
fn a_shard_needs_a_sample_of_every_batch() {
    let loader = || {
        Loader::new(
            synthetic(8),
            Pipeline::eval(32, la_data::Normalize::UNIT),
            config(1),
            Device::Cpu,
        )
        .unwrap()
    };
    let too_many = loader().with_shard(la_data::Shard {
        index: 0,
        count: 17,
    });
    assert!(matches!(too_many, Err(Error::Config(m)) if m.contains("smaller than the 17 ranks")));
    let no_such_rank = loader().with_shard(la_data::Shard { index: 2, count: 2 });
    assert!(matches!(no_such_rank, Err(Error::Config(m)) if m.contains("rank 2 of 2")));
}
