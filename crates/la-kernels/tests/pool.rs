//! The pools against PyTorch's definitions: adaptive average pooling's bins, and a max-pool
//! whose gradient goes to the first maximum of each window (in both forms).

use candle_core::{DType, Device, Tensor};
use la_kernels::{with_form, Form};

#[test]
fn adaptive_pool_follows_pytorchs_bins() {
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, 25.0, &dev)
        .unwrap()
        .reshape((1, 1, 5, 5))
        .unwrap();
    // PyTorch: AdaptiveAvgPool2d(3) on 5x5 uses bins [0,2), [1,4), [3,5).
    let y = la_kernels::pool::adaptive_avg_pool2d(&x, 3).unwrap();
    let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let mean = |r: std::ops::Range<usize>, c: std::ops::Range<usize>| {
        let mut s = 0.0;
        let mut n = 0.0;
        for i in r {
            for j in c.clone() {
                s += (i * 5 + j) as f32;
                n += 1.0;
            }
        }
        s / n
    };
    let bins = [0..2, 1..4, 3..5];
    let want: Vec<f32> = bins
        .iter()
        .flat_map(|r| bins.iter().map(move |c| mean(r.clone(), c.clone())))
        .collect();
    assert_eq!(got, want);
    // 1x1 is copied to every cell; 14x14 -> 7x7 is a 2x2 average.
    let one = Tensor::new(&[[[[3f32]]]], &dev).unwrap();
    let y = la_kernels::pool::adaptive_avg_pool2d(&one, 7).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![3.0; 49]
    );
}

#[test]
fn max_pool_matches_candle_forward_and_routes_gradients_to_the_maximum() {
    for form in [Form::Fast, Form::Generic] {
        with_form(form, max_pool_checks);
    }
}

fn max_pool_checks() {
    let dev = Device::Cpu;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 7, 6), &dev).unwrap())
        .unwrap();
    let ours = la_kernels::pool::max_pool_2x2(x.as_tensor()).unwrap();
    let candle = x.as_tensor().max_pool2d(2).unwrap();
    assert_eq!(ours.dims(), &[2, 3, 3, 3]);
    let diff = (&ours - &candle)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // PyTorch's gradient: each output's gradient lands, whole, on its window's maximum.
    let g = (ours * 1.0).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = la_testing::values(g.get(x.as_tensor()).unwrap());
    assert_eq!(grad.iter().sum::<f64>(), 2.0 * 3.0 * 9.0);
    assert!(grad.iter().all(|&v| v == 0.0 || v == 1.0));
    // A random output gradient, against a loop: each value lands on its window's maximum.
    let probe = Tensor::randn(0f64, 1.0, (2, 3, 3, 3), &dev).unwrap();
    let g = la_kernels::pool::max_pool_2x2(x.as_tensor())
        .unwrap()
        .mul(&probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = la_testing::values(g.get(x.as_tensor()).unwrap());
    let xs: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let ps: Vec<f64> = probe.flatten_all().unwrap().to_vec1().unwrap();
    let mut expected = vec![0f64; xs.len()];
    for plane in 0..6 {
        for i in 0..3 {
            for j in 0..3 {
                let window = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .map(|(dy, dx)| plane * 42 + (2 * i + dy) * 6 + 2 * j + dx);
                let best = window
                    .into_iter()
                    .fold(window[0], |b, k| if xs[k] > xs[b] { k } else { b });
                expected[best] = ps[plane * 9 + i * 3 + j];
            }
        }
    }
    assert_eq!(grad, expected);
    // A NaN anywhere in a window makes its output NaN, as in PyTorch.
    let with_nan = Tensor::new(&[[[[1f32, f32::NAN], [3.0, 2.0]]]], &dev).unwrap();
    let pooled: Vec<f32> = la_kernels::pool::max_pool_2x2(&with_nan)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(pooled[0].is_nan(), "{pooled:?}");
    // Ties (a ReLU'd window of zeros): only the first element gets the gradient.
    let zeros = candle_core::Var::zeros((1, 1, 2, 2), DType::F32, &dev).unwrap();
    let g = la_kernels::pool::max_pool_2x2(zeros.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        g.get(zeros.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![1.0, 0.0, 0.0, 0.0]
    );
}
