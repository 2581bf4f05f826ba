use std::time::Instant;
fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (m, n, k, threads) = (a[0], a[1], a[2], a[3]);
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let av = vec![1.0f32; m * k];
    let bv = vec![1.0f32; k * n];
    let mut d = vec![0.0f32; m * n];
    for (name, a_rm, b_rm, d_rm) in [
        ("a rm, b rm, d rm", true, true, true),
        ("a rm, b cm, d rm", true, false, true),
        ("a cm, b rm, d rm", false, true, true),
        ("a cm, b cm, d rm", false, false, true),
    ] {
        let (a_rs, a_cs) = if a_rm { (k, 1) } else { (1, m) };
        let (b_rs, b_cs) = if b_rm { (n, 1) } else { (1, k) };
        let (d_rs, d_cs) = if d_rm { (n, 1) } else { (1, m) };
        let mut best = f64::INFINITY;
        for _ in 0..6 {
            let t = Instant::now();
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    d.as_mut_ptr(),
                    d_cs as isize,
                    d_rs as isize,
                    true,
                    av.as_ptr(),
                    a_cs as isize,
                    a_rs as isize,
                    bv.as_ptr(),
                    b_cs as isize,
                    b_rs as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "m{m} n{n} k{k} t{threads} {name}: {best:.2} ms, {:.0} GFLOP/s",
            2.0 * (m * n * k) as f64 / best / 1e6
        );
    }
}
