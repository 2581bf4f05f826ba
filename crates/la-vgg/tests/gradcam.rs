//! Grad-CAM against the same map computed from gradients taken another way: central finite
//! differences of the class score through `forward_from_block`, in f64, on the golden tiny
//! VGG16 with attention.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use la_vgg::{load_weights, Vgg};

#[test]
fn grad_cam_matches_finite_difference_gradients() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden");
    let weights = load_weights(&dir.join("vgg16_la_tiny.safetensors"), &Device::Cpu).unwrap();
    let vgg = Vgg::from_weights(&weights, DType::F64, &Device::Cpu).unwrap();
    let io = candle_core::safetensors::load(dir.join("vgg16_la_tiny_io.safetensors"), &Device::Cpu)
        .unwrap();
    let image = io["input"]
        .narrow(0, 0, 1)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();

    for block in [3usize, 4] {
        let mut informative = 0;
        for class in 0..10 {
            let cam = vgg.grad_cam(&image, block, Some(class)).unwrap();
            assert_eq!(cam.class, class);
            let taps = vgg.forward_intermediates(&image, &[block], false).unwrap();
            let activation = taps.blocks[0].output.clone();
            let logits = vgg.forward_head(&taps.features, false).unwrap();
            let (_, c, h, w) = activation.dims4().unwrap();
            let base: Vec<f64> = activation.flatten_all().unwrap().to_vec1().unwrap();
            let score = |values: &[f64]| -> f64 {
                let a = Tensor::from_vec(values.to_vec(), (1, c, h, w), &Device::Cpu).unwrap();
                let logits = vgg.forward_from_block(block, &a).unwrap();
                logits
                    .get(0)
                    .unwrap()
                    .get(class)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            // forward_from_block reproduces the model from that block on.
            let full = logits
                .get(0)
                .unwrap()
                .get(class)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!((score(&base) - full).abs() < 1e-12);

            let eps = 1e-5;
            let mut weights = vec![0.0; c];
            for (i, _) in base.iter().enumerate() {
                let mut plus = base.clone();
                plus[i] += eps;
                let mut minus = base.clone();
                minus[i] -= eps;
                weights[i / (h * w)] +=
                    (score(&plus) - score(&minus)) / (2.0 * eps) / (h * w) as f64;
            }
            let want: Vec<f64> = (0..h * w)
                .map(|p| {
                    (0..c)
                        .map(|ch| weights[ch] * base[ch * h * w + p])
                        .sum::<f64>()
                        .max(0.0)
                })
                .collect();
            let got: Vec<f64> = cam.raw.flatten_all().unwrap().to_vec1().unwrap();
            if !want.iter().any(|&v| v > 0.0) {
                assert!(
                    got.iter().all(|&v| v == 0.0),
                    "block {block} class {class}: {got:?}, want zeros"
                );
                continue;
            }
            informative += 1;
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-6 * (1.0 + w.abs()),
                    "block {block}: {got:?} vs {want:?}"
                );
            }
            let map: Vec<f64> = cam.map.flatten_all().unwrap().to_vec1().unwrap();
            let max = map.iter().cloned().fold(0.0, f64::max);
            assert!((max - 1.0).abs() < 1e-12 && map.iter().all(|&v| (0.0..=1.0).contains(&v)));
        }
        // All-zero maps (every weighted sum negative) test little: most classes must give a map.
        assert!(
            informative >= 5,
            "block {block}: only {informative} classes with a non-zero map"
        );
    }
    assert!(vgg.grad_cam(&image, 5, None).is_err(), "block out of range");
    assert!(
        vgg.grad_cam(&image, 4, Some(10)).is_err(),
        "class out of range"
    );
}
