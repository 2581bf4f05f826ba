//! The faithfulness metrics against references written here: ROAD's imputation against a dense
//! solve of the equations it stands for, the perturbations against their definitions, and the
//! scores against the model's own probabilities.

mod support;

use candle_core::{Device, Tensor};
use candle_nn::ModuleT;
use la_vgg::explain::metric::{percentile_of, road_perturbed, CamMetric};
use la_vgg::explain::{CamMethod, NoisyLinearImputer};
use la_vgg::Vgg;
use rand::{Rng, SeedableRng};
use support::tiny_golden_vgg;

/// Solves the imputation's equations by Gaussian elimination: each removed pixel times the
/// weight of its in-image neighbours equals the weighted sum of those neighbours.
fn dense_reference(plane: &[f64], h: usize, w: usize, keep: &[bool]) -> Vec<f64> {
    let removed: Vec<usize> = (0..h * w).filter(|&p| !keep[p]).collect();
    let m = removed.len();
    let index = |p: usize| removed.iter().position(|&q| q == p);
    let mut a = vec![vec![0.0; m + 1]; m];
    for (row, &p) in removed.iter().enumerate() {
        let (r, c) = ((p / w) as isize, (p % w) as isize);
        for dr in -1isize..=1 {
            for dc in -1isize..=1 {
                let (nr, nc) = (r + dr, c + dc);
                if (dr, dc) == (0, 0) || nr < 0 || nc < 0 || nr >= h as isize || nc >= w as isize {
                    continue;
                }
                let weight = if dr == 0 || dc == 0 {
                    1.0 / 6.0
                } else {
                    1.0 / 12.0
                };
                let q = nr as usize * w + nc as usize;
                a[row][row] += weight;
                match index(q) {
                    Some(col) => a[row][col] -= weight,
                    None => a[row][m] += weight * plane[q],
                }
            }
        }
    }
    for col in 0..m {
        let pivot = (col..m)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap();
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (row, equation) in a.iter_mut().enumerate() {
            if row != col {
                let f = equation[col] / pivot_row[col];
                for (e, p) in equation.iter_mut().zip(&pivot_row).skip(col) {
                    *e -= f * p;
                }
            }
        }
    }
    let mut out = plane.to_vec();
    for (row, &p) in removed.iter().enumerate() {
        out[p] = a[row][m] / a[row][row];
    }
    out
}

#[test]
fn imputation_solves_the_neighbour_mean_equations() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (h, w) = (7, 9);
    let planes: Vec<Vec<f64>> = (0..3)
        .map(|_| {
            (0..h * w)
                .map(|_| rng.random::<f64>() * 2.0 - 1.0)
                .collect()
        })
        .collect();
    for fraction in [0.2, 0.5, 0.9] {
        let keep: Vec<bool> = (0..h * w).map(|_| rng.random::<f64>() > fraction).collect();
        let exact = NoisyLinearImputer { noise: 0.0 }.impute(&planes, h, w, &keep, &mut rng);
        for (plane, got) in planes.iter().zip(&exact) {
            let want = dense_reference(plane, h, w, &keep);
            for p in 0..h * w {
                assert!(
                    (got[p] - want[p]).abs() < 1e-8,
                    "pixel {p}: {} vs {}",
                    got[p],
                    want[p]
                );
                if keep[p] {
                    assert_eq!(got[p], plane[p], "a kept pixel changed");
                }
            }
        }
        // The noise is Gaussian with standard deviation 0.01 on removed pixels only, and seeded.
        let seeded = |seed| {
            NoisyLinearImputer::default().impute(
                &planes,
                h,
                w,
                &keep,
                &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            )
        };
        let noisy = seeded(1);
        assert_eq!(noisy, seeded(1));
        let deltas: Vec<f64> = (0..3)
            .flat_map(|c| (0..h * w).filter(|&p| !keep[p]).map(move |p| (c, p)))
            .map(|(c, p)| noisy[c][p] - exact[c][p])
            .collect();
        let rms = (deltas.iter().map(|d| d * d).sum::<f64>() / deltas.len() as f64).sqrt();
        assert!((0.005..0.015).contains(&rms), "noise rms {rms}");
    }
    // Nothing kept: no neighbour to interpolate from, so the mean of normalised data, 0.
    let none =
        NoisyLinearImputer { noise: 0.0 }.impute(&planes, h, w, &vec![false; h * w], &mut rng);
    assert!(none.iter().flatten().all(|&v| v == 0.0));
}

#[test]
fn percentiles_interpolate_as_numpy() {
    let v = [4.0, 1.0, 3.0, 2.0, 5.0];
    assert_eq!(percentile_of(&v, 50.0), 3.0);
    assert!((percentile_of(&v, 80.0) - 4.2).abs() < 1e-12); // numpy.percentile([1..5], 80)
    assert!((percentile_of(&v, 10.0) - 1.4).abs() < 1e-12);
}

fn probability(vgg: &Vgg, x: &Tensor, class: usize) -> f64 {
    let p = candle_nn::ops::softmax(&vgg.forward_t(x, false).unwrap(), 1).unwrap();
    p.get(0).unwrap().get(class).unwrap().to_scalar().unwrap()
}

#[test]
fn road_removes_the_ranked_pixels_and_keeps_the_rest() {
    let (_, image) = tiny_golden_vgg();
    let map = Tensor::arange(0f64, 1024.0, &Device::Cpu)
        .unwrap()
        .affine(1.0 / 1023.0, 0.0)
        .unwrap()
        .reshape((32, 32))
        .unwrap();
    let pixels: Vec<f64> = image.flatten_all().unwrap().to_vec1().unwrap();
    let mut rng = la_core::rng::labelled(0, "test");
    for (least, percentile, removed_from) in [(false, 80.0, 819usize), (true, 20.0, 0)] {
        let out = road_perturbed(&image, &map, percentile, least, &mut rng).unwrap();
        let out: Vec<f64> = out.flatten_all().unwrap().to_vec1().unwrap();
        // MoRF 80: values >= the 80th percentile (pixels 819.. of the ramp) are imputed;
        // LeRF 20 ranks 1 - map, so everything but the top 20 % (pixels ..818) goes.
        for p in 0..1024 {
            let removed = if least { p <= 818 } else { p >= removed_from };
            let same = (0..3).all(|c| out[c * 1024 + p] == pixels[c * 1024 + p]);
            assert_eq!(same, !removed, "least {least}: pixel {p}");
        }
    }
}

#[test]
fn scores_are_probability_changes_of_the_perturbed_images() {
    let (vgg, image) = tiny_golden_vgg();
    let cam = vgg.cam(&image, 3, None, CamMethod::GradCam).unwrap();
    let map = cam.upsampled(32, 32).unwrap();
    let class = cam.class;
    let before = probability(&vgg, &image, class);

    let change = vgg
        .cam_metric(&image, &map, class, CamMetric::ConfidenceChange, 0)
        .unwrap();
    let multiplied = image
        .broadcast_mul(&map.unsqueeze(0).unwrap().unsqueeze(0).unwrap())
        .unwrap();
    assert!((change - (probability(&vgg, &multiplied, class) - before)).abs() < 1e-12);

    let morf = CamMetric::RoadMostRelevantFirst { percentile: 80.0 };
    let score = vgg.cam_metric(&image, &map, class, morf, 5).unwrap();
    let mut rng = la_core::rng::labelled(5, "road");
    let perturbed = road_perturbed(&image, &map, 80.0, false, &mut rng).unwrap();
    assert!((score - (probability(&vgg, &perturbed, class) - before)).abs() < 1e-12);
    assert_eq!(
        score,
        vgg.cam_metric(&image, &map, class, morf, 5).unwrap(),
        "seeded"
    );

    // ROADCombined is (mean LeRF - mean MoRF) / 2 over the nine percentiles; every term is a
    // difference of probabilities, so it lies in [-1, 1].
    let combined = vgg
        .cam_metric(&image, &map, class, CamMetric::RoadCombined, 5)
        .unwrap();
    assert!(combined.abs() <= 1.0 && combined != 0.0);

    let err = vgg
        .cam_metric(&image, &cam.map, class, CamMetric::ConfidenceChange, 0)
        .err()
        .unwrap();
    assert!(err.to_string().contains("upsample the map"), "{err}");
    let two = Tensor::cat(&[&image, &image], 0).unwrap();
    let err = vgg
        .cam_metric(&two, &map, class, CamMetric::ConfidenceChange, 0)
        .err()
        .unwrap();
    assert!(err.to_string().contains("one image at a time"), "{err}");
    let err = vgg
        .cam_metric(&image, &map, 10, CamMetric::RoadCombined, 0)
        .err()
        .unwrap();
    assert!(err.to_string().contains("class 10 does not exist"), "{err}");
}

#[test]
fn metric_names_parse_with_their_percentiles() {
    assert_eq!(CamMetric::parse("road").unwrap(), CamMetric::RoadCombined);
    assert_eq!(
        CamMetric::parse("confidence-change").unwrap(),
        CamMetric::ConfidenceChange
    );
    assert_eq!(
        CamMetric::parse("road-morf").unwrap(),
        CamMetric::RoadMostRelevantFirst { percentile: 80.0 }
    );
    assert_eq!(
        CamMetric::parse("road-lerf=30").unwrap(),
        CamMetric::RoadLeastRelevantFirst { percentile: 30.0 }
    );
    assert!(CamMetric::parse("road-morf=100")
        .unwrap_err()
        .contains("between 0 and 100"));
    assert!(CamMetric::parse("deletion")
        .unwrap_err()
        .contains("unknown metric"));
}
