//! TrivialAugmentWide's and RandAugment's operations and magnitude tables against
//! torchvision's, from tests/fixtures/torchvision_augment.safetensors (written by
//! scripts/torchvision-augment-golden.py with torchvision 0.29).

use la_data::rng::sample_rng;
use la_data::{AugmentOp, AutoAugment, Image, Transform};
use safetensors::SafeTensors;

const GOLDEN: &[u8] = include_bytes!("fixtures/torchvision_augment.safetensors");

fn golden() -> SafeTensors<'static> {
    SafeTensors::deserialize(GOLDEN).expect("the fixture is a safetensors file")
}

fn image(st: &SafeTensors, name: &str) -> Image {
    let view = st.tensor(name).unwrap();
    let shape = view.shape();
    Image::new(view.data().to_vec(), shape[0], shape[1]).unwrap()
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Pixels (of all) where two images differ.
fn differing_pixels(a: &Image, b: &Image) -> usize {
    a.data
        .chunks_exact(3)
        .zip(b.data.chunks_exact(3))
        .filter(|(p, q)| p != q)
        .count()
}

/// The fixture's entries under `prefix`: (name, its three `/`-separated fields, tensor).
fn entries<'a>(
    st: &'a SafeTensors<'static>,
    prefix: &str,
) -> Vec<(String, [String; 3], safetensors::tensor::TensorView<'a>)> {
    st.tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let rest = name.strip_prefix(prefix)?;
            let parts: Vec<String> = rest.split('/').map(str::to_string).collect();
            let fields: [String; 3] = parts.try_into().ok()?;
            Some((name, fields, view))
        })
        .collect()
}

#[test]
fn every_operation_matches_torchvision() {
    let st = golden();
    let mut checked = 0;
    for (name, [input, op, magnitude], _) in entries(&st, "op/") {
        let op: AugmentOp = op.parse().unwrap();
        let magnitude = magnitude.parse::<f64>().unwrap() as f32;
        let expected = image(&st, &name);
        let ours = op
            .apply(image(&st, &format!("input/{input}")), magnitude)
            .unwrap();
        assert_eq!((ours.height, ours.width), (expected.height, expected.width));
        // Bit for bit, the geometric ones included: the grid is float32 in torchvision's
        // order of operations, so nearest-neighbour rounding ties go the same way.
        let diff = differing_pixels(&ours, &expected);
        assert_eq!(diff, 0, "{name}: {diff} pixels differ from torchvision's");
        checked += 1;
    }
    assert!(checked > 200, "only {checked} cases in the fixture");
}

#[test]
fn magnitude_tables_match_torchvision() {
    let st = golden();
    let mut checked = 0;
    for (name, [policy, input, op], view) in entries(&st, "table/") {
        let policy = match policy.as_str() {
            "wide" => AutoAugment::trivial_augment_wide(),
            _ => AutoAugment::rand_augment(2, 9).unwrap(),
        };
        let img = image(&st, &format!("input/{input}"));
        let (ours, _) = policy
            .magnitudes(op.parse().unwrap(), img.height, img.width)
            .unwrap_or_else(|| panic!("{name}: no table"));
        let theirs = floats(view.data());
        assert_eq!(ours.len(), theirs.len(), "{name}");
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{name}[{i}]: {a} against torchvision's {b}"
            );
        }
        checked += 1;
    }
    // 10 tables per policy and image (Identity, AutoContrast and Equalize have none).
    assert_eq!(checked, 2 * 2 * 11);
}

#[test]
fn policies_are_seeded_and_change_images() {
    let st = golden();
    let input = image(&st, "input/square");
    for policy in [
        AutoAugment::trivial_augment_wide(),
        AutoAugment::rand_augment(2, 9).unwrap(),
    ] {
        let run = |seed: u64| {
            (0..64)
                .map(|i| {
                    policy
                        .apply(input.clone(), &mut sample_rng(seed, 0, i))
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (run(1), run(1));
        assert_eq!(a, b, "{policy:?}: same seed, same images");
        let changed = a.iter().filter(|img| **img != input).count();
        // TrivialAugment draws Identity (or a zero magnitude) now and then, never mostly.
        assert!(
            changed > 48,
            "{policy:?}: only {changed} of 64 images changed"
        );
        assert_ne!(a, run(2), "{policy:?}: another seed, other images");
    }
}
