//! The CIFAR training pipelines (RandomCrop + flip + ColorJitter or TrivialAugmentWide +
//! normalise + batching into a Tensor) on synthetic 32x32 images; criterion reports
//! images/s.

use std::sync::Arc;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use la_data::{bench_cifar_pipeline, bench_trivial_augment_pipeline};
use la_data::{Dataset, Loader, LoaderConfig, VecDataset};

const IMAGES: usize = 4096;
const BATCH: usize = 128;

fn pipeline(c: &mut Criterion) {
    let ds: Arc<dyn Dataset> = Arc::new(VecDataset::synthetic(IMAGES, 32, 32, 10, 0));
    for (group_name, pipeline) in [
        ("cifar_pipeline", bench_cifar_pipeline()),
        ("trivial_augment_pipeline", bench_trivial_augment_pipeline()),
    ] {
        bench_group(c, &ds, group_name, pipeline);
    }
}

fn bench_group(c: &mut Criterion, ds: &Arc<dyn Dataset>, name: &str, pipeline: la_data::Pipeline) {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(IMAGES as u64));
    group.sample_size(10);
    for threads in [1usize, 0] {
        let config = LoaderConfig {
            batch_size: BATCH,
            shuffle: true,
            drop_last: false,
            seed: 0,
            threads,
            prefetch: 4,
        };
        let loader =
            Loader::new(ds.clone(), pipeline.clone(), config, Device::Cpu).expect("loader");
        let name = if threads == 0 {
            "all_cores".to_string()
        } else {
            format!("{threads}_thread")
        };
        let mut epoch = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                epoch += 1;
                let mut n = 0;
                for batch in loader.epoch(epoch) {
                    n += batch.expect("batch").labels.len();
                }
                assert_eq!(n, IMAGES);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
