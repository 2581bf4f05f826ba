//! The GEMM 3x3 conv against Candle's own conv2d (values and gradients) and finite differences.

use candle_core::{DType, Device, Tensor, Var};
use la_kernels::conv::conv3x3;

/// The kernel with a layer's arguments, as la-vgg's `Conv3x3` calls it.
struct Conv3x3 {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Conv3x3 {
    fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        conv3x3(x, &self.weight, self.bias.as_ref(), false)
    }

    fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        conv3x3(x, &self.weight, self.bias.as_ref(), true)
    }
}

/// (batch, c_in, c_out, h, w): odd, 1x1, non-square, one task per image, several images per
/// task (and an uneven last task), images cut into row tiles (h * w > 1024), one-row tiles;
/// maps of at most 2x2 (the dense form: 1x1, 1x2, 2x1, 2x2); a whole batch in one task
/// (batch * h * w <= 4 c_out, with more than one thread); Winograd (c_in >= 32 for the forward,
/// c_out >= 32 for the input gradient, both and not a whole-batch task for the weight
/// gradient): odd sizes, one of the three, several bands of tile rows; and fewer images than
/// threads, whose forward runs those bands in parallel (on three threads: odd sizes, one band
/// per tile row, and several rows a band).
const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (1, 40, 33, 23, 17),
    (2, 33, 32, 3, 5),
    (3, 32, 40, 5, 7),
    (4, 8, 33, 8, 8),
    (2, 40, 36, 9, 6),
    (2, 32, 32, 100, 94),
    (4, 32, 33, 9, 7),
    (1, 3, 1, 1, 1),
    (3, 3, 16, 1, 1),
    (3, 5, 7, 1, 2),
    (4, 6, 5, 2, 1),
    (1, 8, 16, 5, 7),
    (3, 17, 33, 5, 7),
    (3, 8, 1, 8, 8),
    (1, 17, 33, 13, 2),
    (3, 3, 16, 32, 32),
    (2, 3, 8, 40, 36),
    (1, 2, 3, 3, 1030),
    (5, 8, 16, 2, 2),
];

fn randn(dtype: DType, shape: &[usize]) -> Tensor {
    Tensor::randn(0f64, 1.0, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

use la_testing::values;

/// Largest difference, relative to the reference's largest magnitude (at least 1).
fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims());
    let (a, b) = (values(ours), values(reference));
    let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// Candle's conv2d with the same parameters, plus the bias as candle-nn adds it.
fn candle_conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let y = x.conv2d(w, 1, 1, 1, 1).unwrap();
    match b {
        Some(b) => y
            .broadcast_add(&b.reshape((1, b.elem_count(), 1, 1)).unwrap())
            .unwrap(),
        None => y,
    }
}

#[test]
fn forward_matches_candle_conv2d() {
    check_forward();
}

/// Runs `check` on pools of 1 and 3 threads: the plan (tasks per thread, whole batch, row
/// tiles, Winograd's tasks) depends on the thread count.
fn on_one_and_three_threads(check: fn()) {
    for threads in [1, 3] {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(check);
    }
}

#[test]
fn forward_matches_candle_conv2d_on_one_and_three_threads() {
    on_one_and_three_threads(check_forward);
}

fn check_forward() {
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-10)] {
        for (k, &(b, ci, co, h, w)) in SHAPES.iter().enumerate() {
            let x = randn(dtype, &[b, ci, h, w]);
            let weight = randn(dtype, &[co, ci, 3, 3]);
            let bias = (k % 2 == 0).then(|| randn(dtype, &[co]));
            let conv = Conv3x3::new(weight.clone(), bias.clone());
            let reference = candle_conv(&x, &weight, bias.as_ref());
            let err = rel_err(&conv.forward(&x).unwrap(), &reference);
            assert!(
                err < tol,
                "{dtype:?} {:?}: error {err:e}",
                (b, ci, co, h, w)
            );
            let fused = conv.forward_relu(&x).unwrap();
            let err = rel_err(&fused, &reference.relu().unwrap());
            assert!(
                err < tol,
                "{dtype:?} {:?} + relu: error {err:e}",
                (b, ci, co, h, w)
            );
        }
    }
}

#[test]
fn forward_accepts_non_contiguous_input() {
    let x = randn(DType::F32, &[2, 4, 7, 5]).transpose(2, 3).unwrap();
    assert!(!x.is_contiguous());
    let weight = randn(DType::F32, &[6, 4, 3, 3]);
    let ours = Conv3x3::new(weight.clone(), None).forward(&x).unwrap();
    let reference = candle_conv(&x.contiguous().unwrap(), &weight, None);
    assert!(rel_err(&ours, &reference) < 1e-4);
}

#[test]
fn other_dtypes_fall_back_to_candle() {
    let x = randn(DType::F16, &[2, 3, 6, 5]);
    let weight = randn(DType::F16, &[4, 3, 3, 3]);
    let bias = randn(DType::F16, &[4]);
    let ours = Conv3x3::new(weight.clone(), Some(bias.clone()))
        .forward(&x)
        .unwrap();
    assert_eq!(ours.dtype(), DType::F16);
    let reference = candle_conv(&x, &weight, Some(&bias));
    assert_eq!(values(&ours), values(&reference));
}

#[test]
fn gradients_match_candle_conv2d() {
    check_gradients();
}

#[test]
fn gradients_match_candle_conv2d_on_one_and_three_threads() {
    on_one_and_three_threads(check_gradients);
}

fn check_gradients() {
    for (dtype, tol, relu) in [
        (DType::F32, 1e-4, false),
        (DType::F64, 1e-9, false),
        (DType::F32, 1e-4, true),
        (DType::F64, 1e-9, true),
    ] {
        for (k, &(b, ci, co, h, w)) in SHAPES.iter().enumerate() {
            let x = Var::from_tensor(&randn(dtype, &[b, ci, h, w])).unwrap();
            let weight = Var::from_tensor(&randn(dtype, &[co, ci, 3, 3])).unwrap();
            let bias = Var::from_tensor(&randn(dtype, &[co])).unwrap();
            let with_bias = k % 3 != 1;
            let probe = randn(dtype, &[b, co, h, w]);
            let grads = |out: Tensor| {
                let g = (out * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                [&x, &weight, &bias].map(|v| g.get(v.as_tensor()).cloned())
            };
            let b_ours = with_bias.then(|| bias.as_tensor().clone());
            let conv = Conv3x3::new(weight.as_tensor().clone(), b_ours);
            let reference = candle_conv(
                x.as_tensor(),
                weight.as_tensor(),
                with_bias.then_some(bias.as_tensor()),
            );
            let (ours, reference) = if relu {
                let fused = conv.forward_relu(x.as_tensor()).unwrap();
                // The ReLU as a fixed mask from our own output: a pre-activation within
                // rounding of zero may take either sign in the two sums, and its gradient
                // with it; this compares everything else exactly.
                let mask = fused.gt(0.0).unwrap().to_dtype(dtype).unwrap().detach();
                (grads(fused), grads((reference * mask).unwrap()))
            } else {
                (
                    grads(conv.forward(x.as_tensor()).unwrap()),
                    grads(reference),
                )
            };
            for (name, (o, r)) in ["input", "weight", "bias"]
                .iter()
                .zip(ours.iter().zip(&reference))
            {
                let (o, r) = match (o, r) {
                    (Some(o), Some(r)) => (o, r),
                    (None, None) => continue,
                    _ => panic!("grad {name}: ours {o:?}, candle {r:?}"),
                };
                let err = rel_err(o, r);
                assert!(
                    err < tol,
                    "{dtype:?} {:?} relu {relu} grad {name}: error {err:e}",
                    (b, ci, co, h, w)
                );
            }
        }
    }
}

#[test]
fn an_untracked_input_gets_no_gradient() {
    // The images into the first conv: the fast kernel skips their gradient (Candle's conv2d,
    // the generic form, computes it anyway), the others are unchanged; through im2col (3
    // channels) and through Winograd (32).
    la_kernels::with_form(la_kernels::Form::Fast, untracked_input_checks);
}

fn untracked_input_checks() {
    for (b, ci, co, h, w) in [(3, 3, 4, 6, 5), (4, 32, 33, 9, 7)] {
        let x = randn(DType::F64, &[b, ci, h, w]);
        let weight = Var::from_tensor(&randn(DType::F64, &[co, ci, 3, 3])).unwrap();
        let bias = Var::from_tensor(&randn(DType::F64, &[co])).unwrap();
        let probe = randn(DType::F64, &[b, co, h, w]);
        let conv = Conv3x3::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
        let ours = (conv.forward_relu(&x).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let fused = conv.forward_relu(&x).unwrap();
        let mask = fused.gt(0.0).unwrap().to_dtype(DType::F64).unwrap();
        let reference = candle_conv(&x, weight.as_tensor(), Some(bias.as_tensor()));
        let reference = ((reference * mask).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(ours.get(&x).is_none());
        for v in [&weight, &bias] {
            let (o, r) = (ours.get(v.as_tensor()), reference.get(v.as_tensor()));
            assert!(rel_err(o.unwrap(), r.unwrap()) < 1e-9);
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&randn(DType::F64, &[2, 2, 3, 4])).unwrap();
    let weight = Var::from_tensor(&randn(DType::F64, &[3, 2, 3, 3])).unwrap();
    let bias = Var::from_tensor(&randn(DType::F64, &[3])).unwrap();
    let probe = randn(DType::F64, &[2, 3, 3, 4]);
    let loss = || {
        let conv = Conv3x3::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
        (conv.forward(x.as_tensor()).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss().backward().unwrap();
    for var in [&x, &weight, &bias] {
        let analytic = values(grads.get(var.as_tensor()).unwrap());
        let base = values(var.as_tensor());
        let shape = var.as_tensor().shape().clone();
        for idx in 0..base.len() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, shape.clone(), &dev).unwrap())
                    .unwrap();
                loss().to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(1e-6) - eval(-1e-6)) / 2e-6;
            var.set(&Tensor::from_vec(base.clone(), shape.clone(), &dev).unwrap())
                .unwrap();
            assert!(
                (numeric - analytic[idx]).abs() < 1e-6 * (1.0 + numeric.abs()),
                "{shape:?}[{idx}]: numeric {numeric} vs analytic {}",
                analytic[idx]
            );
        }
    }
}

/// The same inputs give bit-identical gradients: partial sums are added in a fixed order, not
/// in whatever order rayon's threads finish (which made the default training run differ in
/// the last digits from one run to the next).
#[test]
fn gradients_are_reproducible() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    // im2col weight gradient, Winograd weight gradient, bias sums.
    for (b, ci, co, h, w) in [(7, 8, 16, 12, 10), (7, 32, 33, 12, 10)] {
        let x = Var::from_tensor(&randn(DType::F32, &[b, ci, h, w])).unwrap();
        let weight = Var::from_tensor(&randn(DType::F32, &[co, ci, 3, 3])).unwrap();
        let bias = Var::from_tensor(&randn(DType::F32, &[co])).unwrap();
        let probe = randn(DType::F32, &[b, co, h, w]);
        let grads = || {
            pool.install(|| {
                let conv = Conv3x3::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
                let g = (conv.forward_relu(x.as_tensor()).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                [&x, &weight, &bias].map(|v| values(g.get(v.as_tensor()).unwrap()))
            })
        };
        let first = grads();
        for _ in 0..5 {
            assert!(
                grads() == first,
                "{:?}: gradients differ between runs",
                (b, ci, co, h, w)
            );
        }
    }
}

/// Empty outputs and inputs (no output channels, an empty batch) give empty results rather
/// than panics, on every path (Winograd, dense, im2col).
#[test]
fn empty_shapes_are_not_errors() {
    for (b, ci, co, h, w) in [
        (3, 32, 0, 5, 5),
        (0, 32, 8, 5, 5),
        (3, 8, 0, 2, 2),
        (2, 3, 0, 6, 6),
    ] {
        let x = Var::from_tensor(&randn(DType::F32, &[b, ci, h, w])).unwrap();
        let weight = Var::from_tensor(&randn(DType::F32, &[co, ci, 3, 3])).unwrap();
        let conv = Conv3x3::new(weight.as_tensor().clone(), None);
        let y = conv.forward_relu(x.as_tensor()).unwrap();
        assert_eq!(y.dims(), &[b, co, h, w]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let dx = grads.get(x.as_tensor()).unwrap();
        assert_eq!(dx.dims(), &[b, ci, h, w]);
        assert!(values(dx).iter().all(|&v| v == 0.0));
    }
}
