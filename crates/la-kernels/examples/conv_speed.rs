//! Times the GEMM 3x3 conv against Candle's conv2d, forward and forward + backward, at
//! VGG16-on-CIFAR shapes with batch 64:
//! `cargo run --release -p la-kernels --example conv_speed [batch] [repeats]`.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use la_kernels::conv::conv3x3;

/// Best wall time of `f` in milliseconds, after one warm-up run: the least disturbed by
/// whatever else the machine runs.
fn time(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times.into_iter().fold(f64::INFINITY, f64::min))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().map_or(64, |a| a.parse().expect("batch"));
    let repeats: usize = args.next().map_or(5, |a| a.parse().expect("repeats"));
    let dev = Device::Cpu;
    println!(
        "batch {batch}, {} threads, best of {repeats} (ms); GFLOP/s of ours in brackets",
        rayon::current_num_threads()
    );
    println!(
        "{:<16} {:>9} {:>9} {:>7} {:>12} {:>12} {:>7}",
        "c_in->c_out hxw", "fwd ours", "candle", "ratio", "fwd+bwd ours", "candle", "ratio"
    );
    let shapes = [
        (3, 64, 32),
        (64, 64, 32),
        (128, 128, 16),
        (256, 256, 8),
        (512, 512, 4),
        (512, 512, 2),
    ];
    let (mut fwd_total, mut both_total) = ([0f64; 2], [0f64; 2]);
    for (c_in, c_out, hw) in shapes {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, c_in, hw, hw), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (c_out, c_in, 3, 3), &dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros(c_out, DType::F32, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (batch, c_out, hw, hw), &dev)?;
        let ours = |x: &Tensor| conv3x3(x, w.as_tensor(), Some(b.as_tensor()), false);
        let candle = |x: &Tensor| {
            x.conv2d(w.as_tensor(), 1, 1, 1, 1)?
                .broadcast_add(&b.as_tensor().reshape((1, c_out, 1, 1))?)
        };
        let step = |out: Tensor| -> Result<()> {
            (out * &probe)?.sum_all()?.backward()?;
            Ok(())
        };
        let fwd = [
            time(repeats, || ours(x.as_tensor()).map(drop))?,
            time(repeats, || candle(x.as_tensor()).map(drop))?,
        ];
        let both = [
            time(repeats, || step(ours(x.as_tensor())?))?,
            time(repeats, || step(candle(x.as_tensor())?))?,
        ];
        let flops = 2.0 * (batch * hw * hw * c_out * 9 * c_in) as f64;
        let gflops = |ms: f64, products: f64| products * flops / ms / 1e6;
        println!(
            "{:<16} {:>9} {:>9.1} {:>6.2}x {:>12} {:>12.1} {:>6.2}x",
            format!("{c_in}->{c_out} {hw}x{hw}"),
            format!("{:.1} [{:.0}]", fwd[0], gflops(fwd[0], 1.0)),
            fwd[1],
            fwd[1] / fwd[0],
            format!("{:.1} [{:.0}]", both[0], gflops(both[0], 3.0)),
            both[1],
            both[1] / both[0],
        );
        for k in 0..2 {
            fwd_total[k] += fwd[k];
            both_total[k] += both[k];
        }
    }
    println!(
        "{:<16} {:>9.1} {:>9.1} {:>6.2}x {:>12.1} {:>12.1} {:>6.2}x",
        "total",
        fwd_total[0],
        fwd_total[1],
        fwd_total[1] / fwd_total[0],
        both_total[0],
        both_total[1],
        both_total[1] / both_total[0],
    );
    Ok(())
}
