//! The fused tiled softmax attention against the plain Candle composition of the same
//! function: values and gradients, at sizes that are not multiples of the tiles.

use candle_core::{DType, Device, Tensor, Var};
use la_kernels::softmax_attention::{softmax_attention, softmax_attention_reference};
use la_testing::max_abs_diff;

fn check(b: usize, n: usize, d: usize, c: usize, dtype: DType, tol: f64) {
    let dev = Device::Cpu;
    let mk = |shape: (usize, usize, usize), scale: f64| {
        Var::from_tensor(
            &(Tensor::randn(0f64, 1.0, shape, &dev).unwrap() * scale)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    };
    // Large queries make the softmax peaked, which stresses the running-max rescaling.
    let (q, k, v) = (mk((b, n, d), 3.0), mk((b, n, d), 1.0), mk((b, n, c), 1.0));
    let probe = Tensor::randn(0f64, 1.0, (b, n, c), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let scale = (d as f64).powf(-0.5);

    let fused = softmax_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
    let plain =
        softmax_attention_reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
    let diff = max_abs_diff(&fused, &plain);
    assert!(
        diff < tol,
        "n={n} d={d} c={c} {dtype:?}: outputs differ by {diff}"
    );

    let g_fused = (fused * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_plain = (plain * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        let a = g_fused.get(var.as_tensor()).expect("fused gradient");
        let b = g_plain.get(var.as_tensor()).expect("plain gradient");
        let diff = max_abs_diff(a, b);
        assert!(
            diff < tol * 10.0,
            "n={n} d={d} c={c} {dtype:?}: d{name} differs by {diff}"
        );
    }
}

#[test]
fn fused_op_matches_plain_candle_in_f64() {
    // Batches of 2 and 3 take the one-pass backward (an image per task) on 2 or more
    // threads; a single image is split between threads by the two-pass backward.
    for (n, d, c) in [(1, 1, 3), (7, 2, 5), (200, 4, 16), (333, 8, 24)] {
        check(2, n, d, c, DType::F64, 1e-10);
        check(1, n, d, c, DType::F64, 1e-10);
    }
}

#[test]
fn fused_op_matches_plain_candle_in_f32() {
    check(3, 300, 8, 64, DType::F32, 2e-5);
}

#[test]
fn memory_is_linear_in_tokens() {
    // 4096 tokens: the plain version would hold 4096^2 * 4 B = 64 MiB of scores per image;
    // the fused one holds one tile. Here we only check that a long sequence runs and that
    // its rows are convex combinations of the values (softmax weights sum to one).
    let dev = Device::Cpu;
    let (n, d, c) = (4096, 8, 16);
    let q = Tensor::randn(0f32, 1.0, (1, n, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, n, d), &dev).unwrap();
    let v = Tensor::ones((1, n, c), DType::F32, &dev).unwrap();
    let out = softmax_attention(&q, &k, &v, 0.35).unwrap();
    let diff = max_abs_diff(&out, &v);
    assert!(diff < 1e-5, "weights do not sum to one: {diff}");
}

#[test]
fn mismatched_shapes_are_errors() {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 10, 4), DType::F32, &dev).unwrap();
    let k = Tensor::zeros((1, 9, 4), DType::F32, &dev).unwrap();
    let v = Tensor::zeros((1, 10, 8), DType::F32, &dev).unwrap();
    let err = softmax_attention(&q, &k, &v, 0.5).unwrap_err().to_string();
    assert!(err.contains("do not fit"), "{err}");
}
