//! Augmentation properties: shapes, ranges, identities, seeding, mixing.

use la_data::pipeline::MixOutcome;
use la_data::rng::{sample_rng, SampleRng};
use la_data::transforms::{
    hflip, CenterCrop, ColorJitter, HorizontalFlip, RandomCrop, RandomResizedCrop, Resize,
};
use la_data::{Image, Mix, Normalize, Pipeline, Preset, Transform};
use rand::{RngCore, SeedableRng};

fn noise(h: usize, w: usize, seed: u64) -> Image {
    let mut data = vec![0u8; h * w * 3];
    SampleRng::seed_from_u64(seed).fill_bytes(&mut data);
    Image::new(data, h, w).unwrap()
}

fn rng(i: usize) -> SampleRng {
    sample_rng(7, 0, i)
}

#[test]
fn flip_twice_is_identity_and_mirrors() {
    let img = noise(5, 7, 1);
    let once = hflip(img.clone());
    assert_ne!(once, img);
    assert_eq!(once.pixel(2, 0), img.pixel(2, 6));
    assert_eq!(once.pixel(4, 3), img.pixel(4, 3));
    assert_eq!(hflip(once), img);

    let always = HorizontalFlip::new(1.0);
    let never = HorizontalFlip::new(0.0);
    assert_eq!(
        always.apply(img.clone(), &mut rng(0)).unwrap(),
        hflip(img.clone())
    );
    assert_eq!(never.apply(img.clone(), &mut rng(0)).unwrap(), img);
    // p = 0.5 flips some and not others.
    let flips = (0..200)
        .filter(|&i| {
            HorizontalFlip::default()
                .apply(img.clone(), &mut rng(i))
                .unwrap()
                != img
        })
        .count();
    assert!((60..140).contains(&flips), "{flips} of 200 flipped");
}

#[test]
fn random_crop_with_padding_keeps_size_and_content() {
    let img = noise(32, 32, 2);
    let crop = RandomCrop::new(32, 4);
    let mut saw_shift = false;
    for i in 0..100 {
        let out = crop.apply(img.clone(), &mut rng(i)).unwrap();
        assert_eq!(
            (out.height, out.width, out.data.len()),
            (32, 32, 32 * 32 * 3)
        );
        // The output is the input shifted by at most 4 px with zeros where padded:
        // find the shift from the position of a known interior pixel.
        let found = (-4i32..=4)
            .flat_map(|dy| (-4i32..=4).map(move |dx| (dy, dx)))
            .find(|&(dy, dx)| {
                (8..24).all(|y| {
                    (8..24).all(|x| {
                        out.pixel(y, x)
                            == img.pixel((y as i32 + dy) as usize, (x as i32 + dx) as usize)
                    })
                })
            });
        let (dy, dx) = found.expect("output is a shifted copy");
        if (dy, dx) != (0, 0) {
            saw_shift = true;
        }
        if dy < 0 {
            assert_eq!(out.pixel(0, 16), [0, 0, 0]);
        }
    }
    assert!(saw_shift);
    // Smaller image than the window: padded, never refused.
    let small = RandomCrop::new(10, 0)
        .apply(noise(4, 6, 3), &mut rng(0))
        .unwrap();
    assert_eq!((small.height, small.width), (10, 10));
}

#[test]
fn random_resized_crop_shapes_and_params() {
    let rrc = RandomResizedCrop::new(24);
    for i in 0..50 {
        let img = noise(40 + i, 60, i as u64);
        let (top, left, h, w) = rrc.params(img.height, img.width, &mut rng(i)).unwrap();
        assert!(top + h <= img.height && left + w <= img.width);
        let area = (h * w) as f64 / (img.height * img.width) as f64;
        assert!(area <= 1.0 && area > 0.05, "{area}");
        let out = rrc.apply(img, &mut rng(i)).unwrap();
        assert_eq!(
            (out.height, out.width, out.data.len()),
            (24, 24, 24 * 24 * 3)
        );
    }
    // An impossible ratio range forces the centre-crop fallback.
    let thin = RandomResizedCrop::new(8)
        .with_ratio(10.0, 20.0)
        .with_scale(0.9, 1.0);
    let (top, left, h, w) = thin.params(30, 30, &mut rng(0)).unwrap();
    assert_eq!((h, w), (3, 30));
    assert_eq!((top, left), (13, 0));
    // Bad parameters are an error, not a panic.
    assert!(RandomResizedCrop::new(8)
        .with_scale(1.0, 0.5)
        .apply(noise(9, 9, 0), &mut rng(0))
        .is_err());
}

#[test]
fn color_jitter_ranges_identity_and_seeding() {
    let img = noise(16, 16, 4);
    let none = ColorJitter::new(0.0, 0.0, 0.0, 0.0);
    assert_eq!(none.apply(img.clone(), &mut rng(0)).unwrap(), img);
    let cj = ColorJitter::new(0.4, 0.4, 0.4, 0.1);
    let a = cj.apply(img.clone(), &mut rng(1)).unwrap();
    let b = cj.apply(img.clone(), &mut rng(1)).unwrap();
    let c = cj.apply(img.clone(), &mut rng(2)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, img);
    assert_eq!(a.data.len(), img.data.len());
    // Saturation 0 of a grey image and hue of grey change nothing.
    let grey = Image::from_gray(&[0, 50, 100, 200], 2, 2).unwrap();
    let sat_hue = ColorJitter::new(0.0, 0.0, 0.9, 0.5);
    for i in 0..10 {
        let out = sat_hue.apply(grey.clone(), &mut rng(i)).unwrap();
        let diff = out
            .data
            .iter()
            .zip(&grey.data)
            .map(|(&x, &y)| (x as i32 - y as i32).abs())
            .max()
            .unwrap();
        assert!(diff <= 1, "{diff}");
    }
    // Brightness factor in [0.6, 1.4]: a mid-grey pixel stays within it.
    let mid = Image::from_gray(&[100; 4], 2, 2).unwrap();
    for i in 0..50 {
        let v = ColorJitter::new(0.4, 0.0, 0.0, 0.0)
            .apply(mid.clone(), &mut rng(i))
            .unwrap()
            .data[0];
        assert!((59..=141).contains(&v), "{v}");
    }
}

#[test]
fn resize_and_center_crop() {
    let img = noise(20, 40, 5);
    let r = Resize::shorter_side(10)
        .apply(img.clone(), &mut rng(0))
        .unwrap();
    assert_eq!((r.height, r.width), (10, 20));
    let c = CenterCrop::new(10).apply(r, &mut rng(0)).unwrap();
    assert_eq!((c.height, c.width), (10, 10));
    let exact = Resize::exact(7, 3).apply(img.clone(), &mut rng(0)).unwrap();
    assert_eq!((exact.height, exact.width, exact.data.len()), (7, 3, 63));
    // Same size: untouched.
    assert_eq!(
        Resize::exact(20, 40)
            .apply(img.clone(), &mut rng(0))
            .unwrap(),
        img
    );
    // Centre crop picks the middle.
    let cc = CenterCrop::new(2)
        .apply(noise(4, 4, 6), &mut rng(0))
        .unwrap();
    assert_eq!(cc.pixel(0, 0), noise(4, 4, 6).pixel(1, 1));
    // A constant image stays constant through bilinear up-scaling.
    let flat = Image::from_gray(&[77; 64], 8, 8).unwrap();
    let up = Resize::exact(32, 32).apply(flat, &mut rng(0)).unwrap();
    assert!(up.data.iter().all(|&v| v == 77));
}

#[test]
fn eval_pipeline_on_native_size_only_normalises() {
    let img = noise(32, 32, 8);
    let p = Pipeline::eval(32, Normalize::CIFAR10);
    let (chw, h, w) = p.process(img.clone(), &mut rng(0)).unwrap();
    assert_eq!((h, w, chw.len()), (32, 32, 3 * 32 * 32));
    for (y, x) in [(0, 0), (13, 29), (31, 31)] {
        for c in 0..3 {
            let expect = (img.pixel(y, x)[c] as f32 / 255.0 - Normalize::CIFAR10.mean[c])
                / Normalize::CIFAR10.std[c];
            assert!((chw[c * 1024 + y * 32 + x] - expect).abs() < 1e-6);
        }
    }
    // A bigger, non-square image comes out size x size.
    let (_, h, w) = p.process(noise(50, 80, 9), &mut rng(0)).unwrap();
    assert_eq!((h, w), (32, 32));
}

#[test]
fn presets_shapes_ranges_and_seeding() {
    for preset in Preset::ALL {
        let size = if matches!(preset, Preset::ImageNet | Preset::ArticleRecipe) {
            48
        } else {
            32
        };
        let p = Pipeline::train_preset(preset, size);
        let input = match preset {
            Preset::FashionMnist => noise(28, 28, 1),
            Preset::Digits => noise(8, 8, 1),
            Preset::ImageNet | Preset::ArticleRecipe => noise(70, 90, 1),
            _ => noise(32, 32, 1),
        };
        let (a, h, w) = p.process(input.clone(), &mut rng(3)).unwrap();
        let (b, ..) = p.process(input.clone(), &mut rng(3)).unwrap();
        let differs = (4..20).any(|i| p.process(input.clone(), &mut rng(i)).unwrap().0 != a);
        assert_eq!((h, w), (size, size), "{preset}");
        assert_eq!(a.len(), 3 * size * size);
        assert_eq!(a, b, "{preset}: same seed, same output");
        assert!(differs, "{preset}: different seeds differ");
        let n = preset.normalization();
        for c in 0..3 {
            let (lo, hi) = (-n.mean[c] / n.std[c], (1.0 - n.mean[c]) / n.std[c]);
            let plane = &a[c * size * size..(c + 1) * size * size];
            assert!(
                plane.iter().all(|&v| v >= lo - 1e-5 && v <= hi + 1e-5),
                "{preset}"
            );
        }
        assert_eq!(preset.to_string().parse::<Preset>().unwrap(), preset);
    }
    assert!("nonsense".parse::<Preset>().is_err());
}

fn batch(b: usize, per: usize) -> Vec<f32> {
    (0..b * per).map(|i| (i / per) as f32).collect()
}

#[test]
fn mixup_soft_targets_sum_to_one() {
    let labels = [0usize, 1, 2, 3, 4, 0, 1, 2];
    let per = 3 * 4 * 4;
    let mut images = batch(8, per);
    let mix = Mix::MixUp { alpha: 0.4 };
    let out: MixOutcome = mix
        .apply(&mut images, (3, 4, 4), &labels, 5, &mut rng(0))
        .unwrap();
    assert_eq!(out.soft.len(), 8 * 5);
    for (i, row) in out.soft.chunks(5).enumerate() {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(row.iter().all(|&v| (0.0..=1.0).contains(&v)));
        let j = out.partners[i];
        // The image is the same blend as the targets.
        let expect = out.lambda * i as f32 + (1.0 - out.lambda) * j as f32;
        assert!((images[i * per] - expect).abs() < 1e-5);
        let dominant = if out.lambda >= 0.5 {
            labels[i]
        } else {
            labels[j]
        };
        assert_eq!(out.dominant[i], dominant);
    }
    let mut again = batch(8, per);
    let out2 = mix
        .apply(&mut again, (3, 4, 4), &labels, 5, &mut rng(0))
        .unwrap();
    assert_eq!(out, out2);
    assert_eq!(images, again);
}

#[test]
fn cutmix_lambda_is_the_kept_area() {
    let labels = [0usize, 1, 2, 3];
    let (h, w) = (16, 16);
    let per = 3 * h * w;
    let mix = Mix::CutMix { alpha: 1.0 };
    let mut saw_box = false;
    for seed in 0..20 {
        let mut images = batch(4, per);
        let out = mix
            .apply(&mut images, (3, h, w), &labels, 4, &mut rng(seed))
            .unwrap();
        for (i, row) in out.soft.chunks(4).enumerate() {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            let j = out.partners[i];
            let pasted = images[i * per..(i + 1) * per]
                .iter()
                .filter(|&&v| v != i as f32)
                .count();
            if i != j {
                let kept = 1.0 - pasted as f32 / per as f32;
                assert!(
                    (kept - out.lambda).abs() < 1e-6,
                    "kept {kept} lambda {}",
                    out.lambda
                );
                saw_box |= pasted > 0;
            }
        }
    }
    assert!(saw_box);
    let either = Mix::Either {
        mixup_alpha: 0.2,
        cutmix_alpha: 1.0,
        prob_cutmix: 0.5,
    };
    let mut images = batch(4, per);
    let out = either
        .apply(&mut images, (3, h, w), &labels, 4, &mut rng(1))
        .unwrap();
    assert!(out
        .soft
        .chunks(4)
        .all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-6));
    // Invalid parameters: an error, not a panic.
    assert!(Mix::MixUp { alpha: 0.0 }.validate().is_err());
    assert!(Mix::CutMix { alpha: f32::NAN }
        .apply(&mut images, (3, h, w), &labels, 4, &mut rng(0))
        .is_err());
}

#[test]
fn normalize_constants() {
    assert_eq!(Normalize::IMAGENET.mean, [0.485, 0.456, 0.406]);
    assert_eq!(Normalize::FASHION_MNIST.std, [0.3530; 3]);
    assert!(Normalize {
        mean: [0.0; 3],
        std: [0.0, 1.0, 1.0]
    }
    .validate()
    .is_err());
    // The digits constants match the embedded data.
    let ds = la_data::digits().unwrap();
    let (mut sum, mut sq, mut n) = (0f64, 0f64, 0f64);
    for i in 0..la_data::Dataset::len(&ds) {
        for &v in la_data::Dataset::get(&ds, i)
            .unwrap()
            .image
            .data
            .iter()
            .step_by(3)
        {
            let x = v as f64 / 255.0;
            sum += x;
            sq += x * x;
            n += 1.0;
        }
    }
    let mean = sum / n;
    let std = (sq / n - mean * mean).sqrt();
    assert!(
        (mean - Normalize::DIGITS.mean[0] as f64).abs() < 1e-3,
        "{mean}"
    );
    assert!(
        (std - Normalize::DIGITS.std[0] as f64).abs() < 1e-3,
        "{std}"
    );
}

/// timm's per-pixel random erasing: with probability 1 exactly one rectangle of 2 % to 1/3
/// of the image, the same in every channel, becomes N(0, 1) noise; the rest is untouched;
/// probability 0 changes nothing; the same generator gives the same rectangle.
#[test]
fn random_erasing_replaces_one_rectangle_with_noise() {
    use la_data::RandomErasing;
    let (h, w) = (32usize, 32usize);
    let base: Vec<f32> = (0..3 * h * w).map(|i| 100.0 + i as f32).collect();
    let mut boxes = Vec::new();
    let mut noise = Vec::new();
    for index in 0..200 {
        let mut chw = base.clone();
        let mut rng = la_data::rng::sample_rng(7, 0, index);
        RandomErasing::new(1.0).apply(&mut chw, (3, h, w), &mut rng);
        let changed: Vec<usize> = (0..chw.len()).filter(|&i| chw[i] != base[i]).collect();
        if changed.is_empty() {
            continue; // ten tries without a fitting rectangle: possible, rare
        }
        let plane: Vec<(usize, usize)> = changed
            .iter()
            .filter(|&&i| i < h * w)
            .map(|&i| (i / w, i % w))
            .collect();
        let (rows, cols): (Vec<usize>, Vec<usize>) = plane.iter().copied().unzip();
        let (top, bottom) = (*rows.iter().min().unwrap(), *rows.iter().max().unwrap());
        let (left, right) = (*cols.iter().min().unwrap(), *cols.iter().max().unwrap());
        let area = (bottom - top + 1) * (right - left + 1);
        assert_eq!(plane.len(), area, "a rectangle");
        assert_eq!(changed.len(), 3 * area, "in every channel");
        let fraction = area as f64 / (h * w) as f64;
        assert!((0.015..0.40).contains(&fraction), "area {fraction}");
        boxes.push(area);
        noise.extend(changed.iter().map(|&i| chw[i] as f64));
        // Same generator, same rectangle and noise.
        let mut again = base.clone();
        RandomErasing::new(1.0).apply(
            &mut again,
            (3, h, w),
            &mut la_data::rng::sample_rng(7, 0, index),
        );
        assert_eq!(again, chw);
    }
    assert!(boxes.len() > 190, "{} of 200 erased", boxes.len());
    let mean = noise.iter().sum::<f64>() / noise.len() as f64;
    let std = (noise.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / noise.len() as f64).sqrt();
    assert!(
        mean.abs() < 0.02 && (std - 1.0).abs() < 0.02,
        "N(0, 1)? mean {mean} std {std}"
    );
    let mut untouched = base.clone();
    let mut rng = la_data::rng::sample_rng(7, 0, 0);
    RandomErasing::new(0.0).apply(&mut untouched, (3, h, w), &mut rng);
    assert_eq!(untouched, base);
    assert!(RandomErasing::new(1.5).validate().is_err());
}

/// timm's --mixup-off-epoch: the mix applies to the epochs before it, none after.
#[test]
fn the_mix_stops_at_its_off_epoch() {
    let mix = Mix::CutMix { alpha: 1.0 };
    let p = Pipeline::eval(32, Normalize::CIFAR10)
        .with_mix(Some(mix))
        .with_mix_off_epoch(Some(2));
    assert_eq!(p.mix_at(0), Some(mix));
    assert_eq!(p.mix_at(1), Some(mix));
    assert_eq!(p.mix_at(2), None);
    assert_eq!(p.clone().with_mix_off_epoch(None).mix_at(100), Some(mix));
}
