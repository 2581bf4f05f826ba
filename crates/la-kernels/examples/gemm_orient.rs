//! gemm's speed for one product shape in each operand orientation (row- or column-major
//! lhs and rhs, row-major destination), best of 6 runs: the measurements behind the
//! orientation choices in `src/conv.rs` and `src/conv/*.rs`.
//!
//! `cargo run --release -p la-kernels --example gemm_orient -- M N K [THREADS]`, e.g.
//! `-- 576 64 1024 1` (block 1's weight gradient per tile) or `-- 64 2048 2048 2`.

use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("M N K [THREADS] as integers"))
        .collect();
    let [m, n, k] = match args[..] {
        [m, n, k, ..] => [m, n, k],
        _ => panic!("usage: gemm_orient M N K [THREADS]"),
    };
    let threads = args.get(3).copied().unwrap_or(1);
    let par = match threads {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    let lhs = vec![1.0f32; m * k];
    let rhs = vec![1.0f32; k * n];
    let mut dst = vec![0.0f32; m * n];
    for (lhs_row_major, rhs_row_major) in
        [(true, true), (true, false), (false, true), (false, false)]
    {
        // (row stride, column stride) of each operand.
        let (l_rs, l_cs) = if lhs_row_major { (k, 1) } else { (1, m) };
        let (r_rs, r_cs) = if rhs_row_major { (n, 1) } else { (1, k) };
        let mut best = f64::INFINITY;
        for _ in 0..6 {
            let start = Instant::now();
            // SAFETY: lhs is m x k, rhs k x n and dst m x n under the strides above (each
            // element inside its Vec); dst aliases neither operand.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    lhs.as_ptr(),
                    l_cs as isize,
                    l_rs as isize,
                    rhs.as_ptr(),
                    r_cs as isize,
                    r_rs as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
            best = best.min(start.elapsed().as_secs_f64() * 1e3);
        }
        let name = |row_major| {
            if row_major {
                "row-major"
            } else {
                "column-major"
            }
        };
        println!(
            "{m} x {n} x {k}, {threads} thread(s), lhs {}, rhs {}: {best:.2} ms, {:.0} GFLOP/s",
            name(lhs_row_major),
            name(rhs_row_major),
            2.0 * (m * n * k) as f64 / best / 1e6
        );
    }
}
