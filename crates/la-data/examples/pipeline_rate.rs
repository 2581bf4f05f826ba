//! Prints the CIFAR training pipeline's throughput (images/s) on synthetic 32x32 images:
//! `cargo run --release -p la-data --example pipeline_rate [images] [batch]`.

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let images = args.next().and_then(Result::ok).unwrap_or(20_000);
    let batch = args.next().and_then(Result::ok).unwrap_or(128);
    for threads in [1, 2, 0] {
        let rate = la_data::bench_pipeline(images, batch, threads);
        let label = if threads == 0 {
            "all cores".to_string()
        } else {
            format!("{threads} thread(s)")
        };
        println!("{label:>12}: {rate:>10.0} images/s ({images} images, batch {batch})");
    }
}
