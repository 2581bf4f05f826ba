//! The CAM family against references written here, in f64 on the golden tiny VGG16 with
//! attention: the gradient methods' formulas applied to gradients taken another way (central
//! finite differences of the class score through `forward_from_block`), EigenCAM against a
//! power iteration, Score-CAM against a loop over masked images.

mod support;

use candle_core::{Device, Tensor};
use candle_nn::ModuleT;
use la_vgg::explain::{Cam, CamMethod};
use la_vgg::Vgg;
use support::tiny_golden_vgg;

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The block's activation [c * h * w] and its shape.
fn activation(vgg: &Vgg, image: &Tensor, block: usize) -> (Vec<f64>, usize, usize, usize) {
    let taps = vgg.forward_intermediates(image, &[block], false).unwrap();
    let (_, c, h, w) = taps.blocks[0].output.dims4().unwrap();
    (values(&taps.blocks[0].output), c, h, w)
}

/// d logit[class] / d activation by central differences.
fn finite_difference_gradient(
    vgg: &Vgg,
    block: usize,
    class: usize,
    a: &[f64],
    shape: (usize, usize, usize),
) -> Vec<f64> {
    let (c, h, w) = shape;
    let score = |values: &[f64]| -> f64 {
        let t = Tensor::from_vec(values.to_vec(), (1, c, h, w), &Device::Cpu).unwrap();
        let logits = vgg.forward_from_block(block, &t).unwrap();
        logits
            .get(0)
            .unwrap()
            .get(class)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let eps = 1e-5;
    (0..a.len())
        .map(|i| {
            let mut plus = a.to_vec();
            plus[i] += eps;
            let mut minus = a.to_vec();
            minus[i] -= eps;
            (score(&plus) - score(&minus)) / (2.0 * eps)
        })
        .collect()
}

/// The gradient method's map from A and G, written out per element as pytorch-grad-cam's
/// numpy code reads, then ReLU'd.
fn reference_map(method: CamMethod, a: &[f64], g: &[f64], c: usize, n: usize) -> Vec<f64> {
    let at = |ch: usize, p: usize| a[ch * n + p];
    let gt = |ch: usize, p: usize| g[ch * n + p];
    let channel_sum =
        |f: &dyn Fn(usize, usize) -> f64, ch: usize| (0..n).map(|p| f(ch, p)).sum::<f64>();
    let weights: Vec<f64> = (0..c)
        .map(|ch| match method {
            CamMethod::GradCam => channel_sum(&gt, ch) / n as f64,
            CamMethod::GradCamPlusPlus => {
                let sum_a = channel_sum(&at, ch);
                channel_sum(
                    &|ch, p| {
                        let gv = gt(ch, p);
                        let aij = if gv != 0.0 {
                            gv * gv / (2.0 * gv * gv + sum_a * gv * gv * gv + 1e-6)
                        } else {
                            0.0
                        };
                        gv.max(0.0) * aij
                    },
                    ch,
                )
            }
            CamMethod::XGradCam => {
                let sum_a = channel_sum(&at, ch);
                channel_sum(&|ch, p| gt(ch, p) * at(ch, p) / (sum_a + 1e-7), ch)
            }
            _ => 0.0,
        })
        .collect();
    (0..n)
        .map(|p| {
            let v: f64 = (0..c)
                .map(|ch| match method {
                    CamMethod::LayerCam => gt(ch, p).max(0.0) * at(ch, p),
                    CamMethod::HiResCam => gt(ch, p) * at(ch, p),
                    _ => weights[ch] * at(ch, p),
                })
                .sum();
            v.max(0.0)
        })
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], tolerance: f64, what: &str) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= tolerance * scale,
            "{what}: {got:?}\nwant {want:?}"
        );
    }
}

fn assert_scaled(cam: &Cam) {
    let map = values(&cam.map);
    let raw = values(&cam.raw);
    let (min, max) = raw.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    for (m, r) in map.iter().zip(&raw) {
        assert!((m - (r - min) / (max - min + 1e-7)).abs() < 1e-12);
    }
}

#[test]
fn gradient_methods_match_their_formulas_on_finite_difference_gradients() {
    let (vgg, image) = tiny_golden_vgg();
    let gradient_methods: Vec<CamMethod> = CamMethod::ALL
        .into_iter()
        .filter(|m| m.uses_gradients())
        .collect();
    assert_eq!(gradient_methods.len(), 5);
    for (block, classes) in [(3usize, 0..4), (4, 0..10)] {
        let (a, c, h, w) = activation(&vgg, &image, block);
        let mut informative = 0;
        for class in classes {
            let g = finite_difference_gradient(&vgg, block, class, &a, (c, h, w));
            for &method in &gradient_methods {
                let cam = vgg.cam(&image, block, Some(class), method).unwrap();
                assert_eq!((cam.class, cam.method), (class, method));
                assert_eq!(cam.map.dims(), [h, w]);
                let want = reference_map(method, &a, &g, c, h * w);
                let got = values(&cam.raw);
                if want.iter().all(|&v| v == 0.0) {
                    assert!(
                        got.iter().all(|&v| v.abs() < 1e-9),
                        "{method} block {block} class {class}: {got:?}"
                    );
                    continue;
                }
                informative += 1;
                assert_close(
                    &got,
                    &want,
                    1e-6,
                    &format!("{method} block {block} class {class}"),
                );
                assert_scaled(&cam);
            }
        }
        // All-zero maps (every weighted sum negative) test little: most must be informative.
        assert!(
            informative >= 10,
            "block {block}: only {informative} non-zero maps"
        );
    }
}

#[test]
fn eigen_cam_is_the_activation_first_principal_component() {
    let (vgg, image) = tiny_golden_vgg();
    for block in [2usize, 3, 4] {
        let (a, c, h, w) = activation(&vgg, &image, block);
        let n = h * w;
        // Centred tokens X [n, c], then the top eigenvector of X^T X by power iteration.
        let mean: Vec<f64> = (0..c)
            .map(|ch| (0..n).map(|p| a[ch * n + p]).sum::<f64>() / n as f64)
            .collect();
        let x = |p: usize, ch: usize| a[ch * n + p] - mean[ch];
        let mut v = vec![1.0; c];
        for _ in 0..5000 {
            let xv: Vec<f64> = (0..n)
                .map(|p| (0..c).map(|ch| x(p, ch) * v[ch]).sum())
                .collect();
            let next: Vec<f64> = (0..c)
                .map(|ch| (0..n).map(|p| x(p, ch) * xv[p]).sum())
                .collect();
            let norm = next.iter().map(|e| e * e).sum::<f64>().sqrt();
            v = next.iter().map(|e| e / norm).collect();
        }
        let mut projection: Vec<f64> = (0..n)
            .map(|p| (0..c).map(|ch| x(p, ch) * v[ch]).sum())
            .collect();
        let (min, max) = projection
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &e| {
                (lo.min(e), hi.max(e))
            });
        if min.abs() > max.abs() {
            projection.iter_mut().for_each(|e| *e = -*e);
        }
        let want: Vec<f64> = projection.iter().map(|e| e.max(0.0)).collect();
        for class in [None, Some(3)] {
            let cam = vgg.cam(&image, block, class, CamMethod::EigenCam).unwrap();
            assert_close(
                &values(&cam.raw),
                &want,
                1e-8,
                &format!("EigenCAM block {block}"),
            );
            assert_scaled(&cam);
        }
    }
}

/// torch.nn.UpsamplingBilinear2d (corners aligned) of one [h, w] plane to [size, size].
fn upsample_aligned(plane: &[f64], h: usize, w: usize, size: usize) -> Vec<f64> {
    let coordinate = |i: usize, from: usize| -> (usize, usize, f64) {
        let x = if size > 1 {
            i as f64 * (from - 1) as f64 / (size - 1) as f64
        } else {
            0.0
        };
        let lo = (x.floor() as usize).min(from - 1);
        ((lo), (lo + 1).min(from - 1), x - lo as f64)
    };
    let mut out = Vec::with_capacity(size * size);
    for i in 0..size {
        let (y0, y1, fy) = coordinate(i, h);
        for j in 0..size {
            let (x0, x1, fx) = coordinate(j, w);
            let at = |y: usize, x: usize| plane[y * w + x];
            out.push(
                (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x1))
                    + fy * ((1.0 - fx) * at(y1, x0) + fx * at(y1, x1)),
            );
        }
    }
    out
}

#[test]
fn score_cam_matches_a_loop_over_masked_images() {
    let (vgg, image) = tiny_golden_vgg();
    let size = image.dim(3).unwrap();
    let pixels = values(&image);
    for block in [3usize, 4] {
        let (a, c, h, w) = activation(&vgg, &image, block);
        let n = h * w;
        let class = 7;
        let scores: Vec<f64> = (0..c)
            .map(|ch| {
                let up = upsample_aligned(&a[ch * n..(ch + 1) * n], h, w, size);
                let (min, max) = up
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &e| {
                        (lo.min(e), hi.max(e))
                    });
                let masked: Vec<f64> = pixels
                    .iter()
                    .enumerate()
                    .map(|(i, &px)| px * (up[i % (size * size)] - min) / (max - min + 1e-8))
                    .collect();
                let x = Tensor::from_vec(masked, (1, 3, size, size), &Device::Cpu).unwrap();
                let logits = vgg.forward_t(&x, false).unwrap();
                logits
                    .get(0)
                    .unwrap()
                    .get(class)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .collect();
        let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = scores.iter().map(|s| (s - top).exp()).sum();
        let weights: Vec<f64> = scores.iter().map(|s| (s - top).exp() / total).collect();
        let want: Vec<f64> = (0..n)
            .map(|p| {
                (0..c)
                    .map(|ch| weights[ch] * a[ch * n + p])
                    .sum::<f64>()
                    .max(0.0)
            })
            .collect();
        let cam = vgg
            .cam(&image, block, Some(class), CamMethod::ScoreCam)
            .unwrap();
        assert_close(
            &values(&cam.raw),
            &want,
            1e-9,
            &format!("Score-CAM block {block}"),
        );
        assert_scaled(&cam);
    }
}

#[test]
fn upsampled_maps_span_zero_to_one_at_the_input_size() {
    let (vgg, image) = tiny_golden_vgg();
    let cam = vgg.cam(&image, 4, None, CamMethod::LayerCam).unwrap();
    let up = cam.upsampled(32, 32).unwrap();
    assert_eq!(up.dims(), [32, 32]);
    let v = values(&up);
    let (min, max) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &e| {
            (lo.min(e), hi.max(e))
        });
    assert!(min.abs() < 1e-12 && (max - 1.0).abs() < 1e-6, "{min} {max}");
    // Half-pixel centres (cv2.resize): a 2x2 map blown up 16x keeps each value at its
    // corner, so the corner pixel is the map's, rescaled.
    let map = values(&cam.map);
    let map_max = map.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    assert!(
        (v[0] - map[0] / (map_max + 1e-7)).abs() < 1e-9,
        "{} vs {}",
        v[0],
        map[0]
    );
}

#[test]
fn bad_requests_are_errors_that_say_what_is_wrong() {
    let (vgg, image) = tiny_golden_vgg();
    let err = vgg
        .cam(&image, 5, None, CamMethod::GradCam)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("block 5 does not exist"), "{err}");
    let err = vgg
        .cam(&image, 4, Some(10), CamMethod::ScoreCam)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("class 10 does not exist"), "{err}");
    let two = Tensor::cat(&[&image, &image], 0).unwrap();
    let err = vgg
        .cam(&two, 4, None, CamMethod::HiResCam)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("one image at a time"), "{err}");
    for method in CamMethod::ALL {
        assert_eq!(method.name().parse::<CamMethod>().unwrap(), method);
    }
    assert!("gradcam".parse::<CamMethod>().is_ok());
    assert!("smooth-grad"
        .parse::<CamMethod>()
        .unwrap_err()
        .contains("grad-cam++"));
}
