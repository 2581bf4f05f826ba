//! bf16 products through the public ops: the projection (one product) against its generic
//! form on operands rounded to bf16, to f32 accuracy; the 3x3 conv (Winograd and the dense
//! form) within bf16's accuracy of f32, values and gradients, and measurably not f32; f64
//! untouched; and a clear error on a CPU without AVX512_BF16. One test, since the precision
//! is the process's.

use candle_core::{DType, Result, Tensor, Var};
use la_kernels::conv::{conv3x3, conv3x3_generic};
use la_kernels::parity::{relative_error, uniform};
use la_kernels::projection::{project, project_generic, Order};
use la_kernels::{precision, set_precision, with_form, Form, Precision};

fn rounded(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::BF16)?.to_dtype(t.dtype())
}

fn f32_uniform(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    uniform(shape, -scale, scale, seed)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// The conv's output and its input and weight gradients for `precision`, in the fast form.
/// (No ReLU: where bf16 moves an output across zero, its mask would pass a whole gradient.)
fn conv_step(x: &Var, w: &Var, b: &Tensor, probe: &Tensor, p: Precision) -> [Tensor; 3] {
    set_precision(p).unwrap();
    let y = with_form(Form::Fast, || {
        conv3x3(x.as_tensor(), w.as_tensor(), Some(b), false)
    })
    .unwrap();
    let grads = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    set_precision(Precision::F32).unwrap();
    [
        y,
        grads.get(x.as_tensor()).unwrap().clone(),
        grads.get(w.as_tensor()).unwrap().clone(),
    ]
}

#[test]
fn bf16_products_round_the_operands_and_nothing_else() {
    if !la_kernels::precision::bf16_supported() {
        let err = set_precision(Precision::Bf16).unwrap_err();
        assert!(err.to_string().contains("AVX512_BF16"), "{err}");
        assert_eq!(precision(), Precision::F32);
        return;
    }

    // The projection is one product, its bias added in f32: bf16 changes only the operands.
    let x = f32_uniform(&[2, 24, 37], 1.0, 1);
    let w = f32_uniform(&[8, 24], 0.5, 2);
    let b = f32_uniform(&[8], 0.5, 3);
    set_precision(Precision::Bf16).unwrap();
    let ours = with_form(Form::Fast, || {
        project(&x, &w, &b, Order::Channels, Order::Tokens)
    })
    .unwrap();
    set_precision(Precision::F32).unwrap();
    let reference = project_generic(
        &rounded(&x).unwrap(),
        &rounded(&w).unwrap(),
        &b,
        Order::Channels,
        Order::Tokens,
    )
    .unwrap();
    let exact = project_generic(&x, &w, &b, Order::Channels, Order::Tokens).unwrap();
    let error = relative_error(&ours, &reference).unwrap();
    assert!(
        error < 1e-5,
        "projection against rounded operands: {error:e}"
    );
    let from_f32 = relative_error(&ours, &exact).unwrap();
    assert!(
        from_f32 > 1e-4,
        "bf16 products were not used ({from_f32:e} from f32)"
    );

    // The conv at a Winograd shape and at maps small enough for the dense form.
    for (seed, (c_in, c_out, hw)) in [(16, 32, 16), (64, 64, 4), (32, 16, 2)]
        .into_iter()
        .enumerate()
    {
        let seed = 10 * seed as u64;
        let x = Var::from_tensor(&f32_uniform(&[2, c_in, hw, hw], 1.0, seed + 4)).unwrap();
        let w = Var::from_tensor(&f32_uniform(&[c_out, c_in, 3, 3], 0.2, seed + 5)).unwrap();
        let b = f32_uniform(&[c_out], 0.2, seed + 6);
        let probe = f32_uniform(&[2, c_out, hw, hw], 1.0, seed + 7);
        let exact = conv_step(&x, &w, &b, &probe, Precision::F32);
        let ours = conv_step(&x, &w, &b, &probe, Precision::Bf16);
        for (name, (ours, exact)) in ["output", "input gradient", "weight gradient"]
            .iter()
            .zip(ours.iter().zip(&exact))
        {
            let error = relative_error(ours, exact).unwrap();
            let label = format!("conv {c_in}->{c_out} {hw}x{hw} {name}");
            // bf16 keeps 8 significant bits: a relative error of 2^-9 an operand.
            assert!(error < 2e-2, "{label}: {error:e} from f32");
            assert!(
                error > 1e-5,
                "{label}: bf16 products were not used ({error:e})"
            );
        }
        let generic = conv3x3_generic(
            &rounded(x.as_tensor()).unwrap(),
            &rounded(w.as_tensor()).unwrap(),
            Some(&b),
            false,
        )
        .unwrap();
        let error = relative_error(&ours[0], &generic).unwrap();
        assert!(
            error < 2e-2,
            "conv {c_in}->{c_out} {hw}x{hw}: {error:e} from the generic form on rounded operands"
        );
    }

    // f64 products stay f64.
    set_precision(Precision::Bf16).unwrap();
    let x = uniform(&[1, 8, 6, 6], -1.0, 1.0, 40).unwrap();
    let w = uniform(&[8, 8, 3, 3], -0.3, 0.3, 41).unwrap();
    let ours = with_form(Form::Fast, || conv3x3(&x, &w, None, false)).unwrap();
    set_precision(Precision::F32).unwrap();
    let reference = conv3x3_generic(&x, &w, None, false).unwrap();
    let error = relative_error(&ours, &reference).unwrap();
    assert!(error < 1e-12, "f64 conv under bf16: {error:e}");
}
