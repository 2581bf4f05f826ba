//! The fused training-mode BatchNorm + ReLU against candle-nn's BatchNorm followed by a ReLU:
//! outputs, gradients of the input, weight and bias, and the running statistics.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{BatchNorm, ModuleT, VarBuilder, VarMap};

/// A candle-nn BatchNorm over `c` channels with the given weight, bias and running stats.
fn batch_norm(c: usize, dtype: DType, init: &[Tensor; 4]) -> (BatchNorm, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let bn = candle_nn::batch_norm(c, 1e-5, vb).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let value = match name.as_str() {
            "weight" => &init[0],
            "bias" => &init[1],
            "running_mean" => &init[2],
            "running_var" => &init[3],
            other => panic!("unexpected variable {other}"),
        };
        var.set(&value.to_dtype(dtype).unwrap()).unwrap();
    }
    (bn, varmap)
}

use la_testing::max_rel_diff;

#[test]
fn fused_training_batch_norm_matches_candle_nn() {
    let dev = Device::Cpu;
    for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 1e-4)] {
        for (b, c, h, w) in [(4, 3, 5, 7), (2, 8, 16, 16), (1, 2, 3, 1)] {
            let init = [
                (Tensor::randn(0f64, 1.0, c, &dev).unwrap() + 1.0).unwrap(),
                Tensor::randn(0f64, 1.0, c, &dev).unwrap(),
                Tensor::randn(0f64, 1.0, c, &dev).unwrap(),
                (Tensor::randn(0f64, 0.1, c, &dev).unwrap().abs().unwrap() + 0.5).unwrap(),
            ];
            let (ours, ours_vars) = batch_norm(c, dtype, &init);
            let (reference, ref_vars) = batch_norm(c, dtype, &init);
            let x0 = (Tensor::randn(0f64, 2.0, (b, c, h, w), &dev).unwrap() + 0.3)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let probe = Tensor::randn(0f64, 1.0, (b, c, h, w), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let case = format!("{dtype:?} {:?}", (b, c, h, w));

            let x = Var::from_tensor(&x0).unwrap();
            let y = la_kernels::norm::batch_norm_relu_train(&ours, x.as_tensor()).unwrap();
            let x_ref = Var::from_tensor(&x0).unwrap();
            let y_ref = reference
                .forward_t(x_ref.as_tensor(), true)
                .unwrap()
                .relu()
                .unwrap();
            assert!(max_rel_diff(&y, &y_ref) < tol, "{case}: outputs differ");

            let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (y_ref * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let d = max_rel_diff(
                g.get(x.as_tensor()).unwrap(),
                g_ref.get(x_ref.as_tensor()).unwrap(),
            );
            assert!(d < tol, "{case}: input gradients differ by {d:e}");
            let (ours_params, ref_params) = (
                ours_vars.data().lock().unwrap(),
                ref_vars.data().lock().unwrap(),
            );
            for name in ["weight", "bias"] {
                let (a, b) = (&ours_params[name], &ref_params[name]);
                let d = max_rel_diff(
                    g.get(a.as_tensor()).unwrap(),
                    g_ref.get(b.as_tensor()).unwrap(),
                );
                assert!(d < tol, "{case}: {name} gradients differ by {d:e}");
            }
            for name in ["running_mean", "running_var"] {
                let d = max_rel_diff(ours_params[name].as_tensor(), ref_params[name].as_tensor());
                assert!(d < tol, "{case}: {name} differs by {d:e}");
            }
        }
    }
}
