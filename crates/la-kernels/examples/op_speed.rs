//! Times this crate's CPU ops against the Candle compositions they replace, at the shapes of
//! VGG16's attention: `cargo run --release -p la-kernels --example op_speed`.
//! Best of 10 runs each, in ms, on whatever threads rayon has.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use la_kernels::bias::add_bias;
use la_kernels::linear::token_context;

fn best_ms(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    // The output projection's bias on block 1's tokens at 32x32, batch 64: forward + backward.
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, 1024, 64), &dev)?)?;
    let b = Var::from_tensor(&Tensor::zeros(64, DType::F32, &dev)?)?;
    let probe = Tensor::randn(0f32, 1.0, (64, 1024, 64), &dev)?;
    let step = |y: Tensor| -> Result<()> { (y * &probe)?.sum_all()?.backward().map(drop) };
    // The probe product and its backward are common to both; timed alone and subtracted.
    let common = best_ms(|| step(x.as_tensor().clone()))?;
    let candle = best_ms(|| step(x.as_tensor().broadcast_add(b.as_tensor())?))? - common;
    let ours = best_ms(|| step(add_bias(x.as_tensor(), b.as_tensor(), 2)?))? - common;
    println!(
        "bias add [64, 1024, 64], forward + backward: broadcast_add {candle:.1} ms, add_bias {ours:.1} ms"
    );
    // phi(K) x^T at block 1 of 224x224 (d = 8, c = 64, n = 50,176) and block 4 (64, 512, 784).
    for (d, c, n) in [(8, 64, 50_176), (64, 512, 784)] {
        let k = Tensor::randn(0f32, 1.0, (1, d, n), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (1, c, n), &dev)?;
        let candle = best_ms(|| k.matmul(&x.t()?).map(drop))?;
        let ours = best_ms(|| token_context(&k, &x).map(drop))?;
        println!("phi(K) x^T, d {d}, c {c}, n {n}: Candle matmul {candle:.2} ms, token_context {ours:.2} ms");
    }
    Ok(())
}
