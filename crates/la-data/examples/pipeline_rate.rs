//! Prints the training pipelines' throughput (images/s) on synthetic 32x32 images:
//! RandomCrop + flip + ColorJitter, and RandomCrop + flip + TrivialAugmentWide.
//! `cargo run --release -p la-data --example pipeline_rate [images] [batch]`.

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let images = args.next().and_then(Result::ok).unwrap_or(20_000);
    let batch = args.next().and_then(Result::ok).unwrap_or(128);
    let pipelines = [
        ("crop + flip + ColorJitter", la_data::bench_cifar_pipeline()),
        (
            "crop + flip + TrivialAugmentWide",
            la_data::bench_trivial_augment_pipeline(),
        ),
    ];
    for (name, pipeline) in &pipelines {
        for threads in [1, 2, 0] {
            let rate = la_data::bench_pipeline(pipeline, images, batch, threads);
            let label = if threads == 0 {
                "all cores".to_string()
            } else {
                format!("{threads} thread(s)")
            };
            println!("{name}, {label:>12}: {rate:>10.0} images/s ({images} images, batch {batch})");
        }
    }
}
