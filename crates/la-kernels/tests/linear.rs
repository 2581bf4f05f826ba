//! The fused linear attention op against the plain Candle composition of the same function
//! (`linear_attention_reference`): values and gradients of q, k and v, for both feature maps,
//! with token counts below, at and across the op's 512-token chunks.

use candle_core::{DType, Device, Tensor, Var};
use la_kernels::linear::{
    linear_attention, linear_attention_reference, FeatureMap, ELU_EPS, RELU_EPS,
};

/// Largest difference relative to the reference's largest magnitude (at least 1).
use la_testing::max_rel_diff as rel_diff;

fn check(b: usize, d: usize, c: usize, n: usize, phi: FeatureMap, dtype: DType, tol: f64) {
    let dev = Device::Cpu;
    let mk = |shape: (usize, usize, usize)| {
        Var::from_tensor(
            &Tensor::randn(0f64, 1.0, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    };
    // In f32, queries stay clear of zero. A query whose relu features are all tiny has a
    // tiny denominator: its output is a ratio of tiny numbers, and its gradient is a
    // difference of terms of size 1/denominator. Any two f32 evaluations then differ in
    // proportion, by about 1e-3 here. The f64 runs keep such queries.
    let q = if dtype == DType::F32 {
        let t = mk((b, d, n));
        Var::from_tensor(&(t.as_tensor().abs().unwrap() + 0.1).unwrap()).unwrap()
    } else {
        mk((b, d, n))
    };
    let (k, v) = (mk((b, d, n)), mk((b, c, n)));
    let probe = Tensor::randn(0f64, 1.0, (b, c, n), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let eps = match phi {
        FeatureMap::EluPlusOne => ELU_EPS,
        FeatureMap::Relu => RELU_EPS,
    };
    let args = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    let fused = linear_attention(args.0, args.1, args.2, phi, eps).unwrap();
    let plain = linear_attention_reference(args.0, args.1, args.2, phi, eps).unwrap();
    assert_eq!(fused.dims(), &[b, c, n]);
    let diff = rel_diff(&fused, &plain);
    let case = format!("b={b} d={d} c={c} n={n} {phi:?} {dtype:?}");
    assert!(diff < tol, "{case}: outputs differ by {diff:e}");

    let grads = |out: Tensor| {
        (out * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let (g_fused, g_plain) = (grads(fused), grads(plain));
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        let a = g_fused.get(var.as_tensor()).expect("fused gradient");
        let b = g_plain.get(var.as_tensor()).expect("plain gradient");
        let diff = rel_diff(a, b);
        assert!(diff < tol, "{case}: d{name} differs by {diff:e}");
    }
}

#[test]
fn fused_op_matches_plain_candle() {
    for phi in [FeatureMap::EluPlusOne, FeatureMap::Relu] {
        for (b, d, c, n) in [
            (1, 1, 1, 1),
            (2, 3, 5, 7),
            (3, 8, 16, 512),
            (2, 4, 12, 1100),
        ] {
            check(b, d, c, n, phi, DType::F64, 1e-9);
            check(b, d, c, n, phi, DType::F32, 1e-3);
        }
    }
}

#[test]
fn other_dtypes_fall_back_to_the_reference() {
    let dev = Device::Cpu;
    let t = |shape: (usize, usize, usize)| {
        Tensor::randn(0f32, 1.0, shape, &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    };
    let (q, k, v) = (t((1, 2, 9)), t((1, 2, 9)), t((1, 3, 9)));
    let out = linear_attention(&q, &k, &v, FeatureMap::EluPlusOne, ELU_EPS).unwrap();
    let reference =
        linear_attention_reference(&q, &k, &v, FeatureMap::EluPlusOne, ELU_EPS).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    assert_eq!(rel_diff(&out, &reference), 0.0);
}

#[test]
fn mismatched_shapes_are_errors() {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 2, 9), DType::F32, &dev).unwrap();
    let v = Tensor::zeros((1, 3, 8), DType::F32, &dev).unwrap();
    let err = linear_attention(&q, &q, &v, FeatureMap::Relu, RELU_EPS).unwrap_err();
    assert!(err.to_string().contains("linear attention"), "{err}");
}

/// `folded_output` against the same function from Candle ops, across several chunks.
#[test]
fn folded_output_matches_plain_candle() {
    let dev = Device::Cpu;
    // d = 4 takes the axpy path, d = 20 the GEMM path.
    for (phi, (b, d, c, n)) in [
        (FeatureMap::EluPlusOne, (2, 4, 6, 1100)),
        (FeatureMap::Relu, (2, 4, 6, 1100)),
        (FeatureMap::EluPlusOne, (2, 20, 24, 300)),
        (FeatureMap::Relu, (1, 20, 24, 300)),
    ] {
        let var = |shape: &[usize], shift: f64| {
            Var::from_tensor(&(Tensor::randn(0f64, 1.0, shape, &dev).unwrap() + shift).unwrap())
                .unwrap()
        };
        // A positive key sum, as phi(K) 1 always is.
        let (q, m, s) = (
            var(&[b, d, n], 0.0),
            var(&[b, c, d], 0.0),
            var(&[b, d], 3.0),
        );
        let s_pos = s.as_tensor().abs().unwrap();
        let probe = Tensor::randn(0f64, 1.0, (b, c, n), &dev).unwrap();
        let eps = 1e-6;
        let ours =
            la_kernels::linear::folded_output(q.as_tensor(), m.as_tensor(), &s_pos, phi, eps)
                .unwrap();
        let phi_q = match phi {
            FeatureMap::Relu => q.as_tensor().relu().unwrap(),
            FeatureMap::EluPlusOne => la_kernels::activation::elu_plus_one(q.as_tensor()).unwrap(),
        };
        let den = (s_pos.unsqueeze(1).unwrap().matmul(&phi_q).unwrap() + eps).unwrap(); // [b, 1, n]
        let reference = m
            .as_tensor()
            .matmul(&phi_q)
            .unwrap()
            .broadcast_div(&den)
            .unwrap();
        assert!(
            rel_diff(&ours, &reference) < 1e-10,
            "{phi:?}: outputs differ"
        );
        let grads = |out: Tensor| {
            (out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g1, g2) = (grads(ours), grads(reference));
        for (name, v) in [("q", &q), ("M", &m), ("s", &s)] {
            let diff = rel_diff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(diff < 1e-9, "{phi:?}: d{name} differs by {diff:e}");
        }
    }
}

#[test]
fn token_context_matches_candle_matmul() {
    let dev = Device::Cpu;
    // d = 3 takes the dot-product path, d = 17 the GEMM path.
    for (b, d, c, n) in [(2, 3, 5, 1100), (2, 17, 40, 300)] {
        let k = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, d, n), &dev).unwrap()).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, c, n), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f64, 1.0, (b, d, c), &dev).unwrap();
        let ours = la_kernels::linear::token_context(k.as_tensor(), x.as_tensor()).unwrap();
        let reference = k.as_tensor().matmul(&x.as_tensor().t().unwrap()).unwrap();
        assert!(rel_diff(&ours, &reference) < 1e-10);
        let grads = |out: Tensor| {
            (out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g1, g2) = (grads(ours), grads(reference));
        for v in [&k, &x] {
            assert!(
                rel_diff(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap()
                ) < 1e-10
            );
        }
    }
}

/// `folded_output_residual` against `x + folded_output + bias` from Candle ops.
#[test]
fn folded_output_residual_matches_plain_candle() {
    let dev = Device::Cpu;
    for (phi, (b, d, c, n)) in [
        (FeatureMap::EluPlusOne, (2, 4, 6, 1100)),
        (FeatureMap::Relu, (2, 20, 24, 300)),
    ] {
        let var = |shape: &[usize], shift: f64| {
            Var::from_tensor(&(Tensor::randn(0f64, 1.0, shape, &dev).unwrap() + shift).unwrap())
                .unwrap()
        };
        let (q, m, s) = (
            var(&[b, d, n], 0.0),
            var(&[b, c, d], 0.0),
            var(&[b, d], 3.0),
        );
        let (bias, x) = (var(&[c], 0.0), var(&[b, c, n], 0.0));
        let s_pos = s.as_tensor().abs().unwrap();
        let probe = Tensor::randn(0f64, 1.0, (b, c, n), &dev).unwrap();
        let ours = la_kernels::linear::folded_output_residual(
            q.as_tensor(),
            m.as_tensor(),
            &s_pos,
            bias.as_tensor(),
            x.as_tensor(),
            phi,
            1e-6,
        )
        .unwrap();
        let plain =
            la_kernels::linear::folded_output(q.as_tensor(), m.as_tensor(), &s_pos, phi, 1e-6)
                .unwrap();
        let reference = (x.as_tensor()
            + plain
                .broadcast_add(&bias.as_tensor().reshape((1, c, 1)).unwrap())
                .unwrap())
        .unwrap();
        assert!(
            rel_diff(&ours, &reference) < 1e-10,
            "{phi:?} d={d}: outputs differ"
        );
        let grads = |out: Tensor| {
            (out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g1, g2) = (grads(ours), grads(reference));
        for (name, v) in [("q", &q), ("M", &m), ("s", &s), ("bias", &bias), ("x", &x)] {
            let diff = rel_diff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(diff < 1e-9, "{phi:?} d={d}: d{name} differs by {diff:e}");
        }
    }
}

/// `project_context` (inference's single pass) against the same three results from Candle
/// ops: the stacked projection, phi of its key half, phi(K) x^T and the sum over tokens.
#[test]
fn project_context_matches_candle_ops() {
    let dev = Device::Cpu;
    // One chunk per thread or several (c = 128: 1024-token chunks), a single token.
    for (phi, (b, d, c, n)) in [
        (FeatureMap::EluPlusOne, (2, 4, 6, 1100)),
        (FeatureMap::Relu, (1, 8, 128, 2600)),
        (FeatureMap::EluPlusOne, (3, 16, 24, 1)),
    ] {
        for dtype in [DType::F64, DType::F32] {
            let randn = |shape: &[usize]| {
                Tensor::randn(0f64, 1.0, shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (x, w, bias) = (randn(&[b, c, n]), randn(&[2 * d, c]), randn(&[2 * d]));
            let (q, a, s) = la_kernels::linear::project_context(&x, &w, &bias, phi).unwrap();
            let qk = w
                .broadcast_left(b)
                .unwrap()
                .matmul(&x)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 2 * d, 1)).unwrap())
                .unwrap();
            let phi_k = match phi {
                FeatureMap::Relu => qk.narrow(1, d, d).unwrap().relu().unwrap(),
                FeatureMap::EluPlusOne => {
                    (qk.narrow(1, d, d).unwrap().elu(1.0).unwrap() + 1.0).unwrap()
                }
            };
            let want_a = phi_k.matmul(&x.t().unwrap()).unwrap();
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
            for (name, ours, want) in [
                ("q", &q, &qk.narrow(1, 0, d).unwrap()),
                ("A", &a, &want_a),
                ("s", &s, &phi_k.sum(2).unwrap()),
            ] {
                let diff = rel_diff(ours, want);
                assert!(
                    diff < tol,
                    "{phi:?} {dtype:?} {:?}: {name} differs by {diff:e}",
                    (b, d, c, n)
                );
            }
        }
    }
}

/// An empty map (no tokens) gives zero sums rather than a panic.
#[test]
fn project_context_of_an_empty_map_is_zero() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 6, 0), DType::F32, &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (8, 6), &dev).unwrap();
    let bias = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
    let (q, a, s) =
        la_kernels::linear::project_context(&x, &w, &bias, FeatureMap::EluPlusOne).unwrap();
    assert_eq!(
        (q.dims(), a.dims(), s.dims()),
        (&[2, 4, 0][..], &[2, 4, 6][..], &[2, 4][..])
    );
    assert_eq!(la_testing::abs_sum(&a), 0.0);
}
