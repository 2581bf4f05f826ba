//! The projection op at the attention modules' shapes against its generic form (Candle's
//! matmul, broadcast_add and transposes): values and gradients in f64 and f32, an input
//! without a gradient, and bad shapes. (The odd small sizes are in the parity cases.)

use candle_core::{DType, Device, Tensor, Var};
use la_kernels::projection::{project, project_generic, Order};
use la_kernels::{with_form, Form};

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    la_kernels::parity::relative_error(a, b).unwrap()
}

#[test]
fn matches_the_generic_form_at_attention_shapes() {
    let dev = Device::Cpu;
    // Block 1's query (64 -> 8) and output (64 -> 64) projections on a 33x33 map, for one
    // map (the gemm's threads) and three (a map per task); and maps of 2x2 and 4x4 positions
    // as at blocks 5 and 4 for 32x32 images, which run several maps per product.
    for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for (batch, c_in, c_out, n) in [
            (1, 64, 8, 33 * 33),
            (3, 64, 64, 33 * 33),
            (3, 16, 24, 33 * 33),
            (9, 48, 40, 4),
            (7, 40, 48, 16),
        ] {
            for (from, to) in [
                (Order::Channels, Order::Tokens),
                (Order::Tokens, Order::Channels),
            ] {
                let x_dims = match from {
                    Order::Channels => [batch, c_in, n],
                    Order::Tokens => [batch, n, c_in],
                };
                let var = |dims: &[usize]| {
                    Var::from_tensor(
                        &Tensor::randn(0f64, 1.0, dims, &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )
                    .unwrap()
                };
                let (x, w, b) = (var(&x_dims), var(&[c_out, c_in]), var(&[c_out]));
                let ours = project(x.as_tensor(), w.as_tensor(), b.as_tensor(), from, to).unwrap();
                let reference =
                    project_generic(x.as_tensor(), w.as_tensor(), b.as_tensor(), from, to).unwrap();
                let label = format!("{dtype:?} batch {batch} {c_in}->{c_out} {from:?}->{to:?}");
                assert!(max_rel(&ours, &reference) < tolerance, "{label}: values");
                let probe = Tensor::randn(0f64, 1.0, ours.dims(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let grads =
                    |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let (g1, g2) = (grads(ours), grads(reference));
                for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                    let (a, r) = (
                        g1.get(v.as_tensor()).unwrap(),
                        g2.get(v.as_tensor()).unwrap(),
                    );
                    let error = max_rel(a, r);
                    // The bias gradient sums n x batch terms in another order.
                    assert!(
                        error < tolerance * 10.0,
                        "{label}: {name} gradient off by {error:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn an_input_without_gradient_still_gives_the_weight_gradient() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f64, 1.0, (2, 5, 9), &dev).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 5), &dev).unwrap()).unwrap();
    let b = Tensor::zeros(3, DType::F64, &dev).unwrap();
    // The fast op itself (also under `LA_KERNELS=generic`), which computes no input gradient
    // for an input that has none.
    let y = with_form(Form::Fast, || {
        project(&x, w.as_tensor(), &b, Order::Channels, Order::Tokens)
    })
    .unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let reference = project_generic(&x, w.as_tensor(), &b, Order::Channels, Order::Tokens)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (ours, theirs) = (
        grads.get(w.as_tensor()).unwrap(),
        reference.get(w.as_tensor()).unwrap(),
    );
    assert!(max_rel(ours, theirs) < 1e-12);
    assert!(grads.get(&x).is_none());
}

#[test]
fn shapes_that_do_not_fit_are_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 5, 9), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
    let b = Tensor::zeros(3, DType::F32, &dev).unwrap();
    // [2, 5, 9] read as tokens has 9 channels, not the weight's 5.
    let err = project(&x, &w, &b, Order::Tokens, Order::Channels).unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
    let short_bias = Tensor::zeros(2, DType::F32, &dev).unwrap();
    assert!(project(&x, &w, &short_bias, Order::Channels, Order::Tokens).is_err());
    assert!(project(&x, &w, &b, Order::Channels, Order::Tokens).is_ok());
}
