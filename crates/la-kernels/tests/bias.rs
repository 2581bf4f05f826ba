//! The bias op against Candle's `broadcast_add`: values, gradients, bad shapes.

use candle_core::{DType, Device, Tensor, Var};

#[test]
fn add_bias_matches_broadcast_add_values_and_gradients() {
    let dev = Device::Cpu;
    for (shape, axis) in [
        (vec![2, 5, 3], 2),
        (vec![2, 5, 3], 1),
        (vec![3, 4], 0),
        (vec![70, 300, 7], 2),
    ] {
        let x =
            Var::from_tensor(&Tensor::randn(0f64, 1.0, shape.as_slice(), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape[axis], &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f64, 1.0, shape.as_slice(), &dev).unwrap();
        let mut bshape = vec![1; shape.len()];
        bshape[axis] = shape[axis];
        let ours = la_kernels::bias::add_bias(x.as_tensor(), b.as_tensor(), axis).unwrap();
        let reference = x
            .as_tensor()
            .broadcast_add(&b.as_tensor().reshape(bshape).unwrap())
            .unwrap();
        let diff = la_testing::max_abs_diff;
        assert_eq!(diff(&ours, &reference), 0.0);
        let grads = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (grads(ours), grads(reference));
        for v in [&x, &b] {
            let d = diff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(
                d < 1e-10,
                "{shape:?} axis {axis}: gradient differs by {d:e}"
            );
        }
    }
    let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let wrong = Tensor::zeros(4, DType::F32, &dev).unwrap();
    assert!(la_kernels::bias::add_bias(&x, &wrong, 1).is_err());
}
