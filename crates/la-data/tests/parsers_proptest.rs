//! Random and truncated bytes into the CIFAR and IDX parsers: they may accept or
//! refuse, but never panic, and what they accept is self-consistent.

mod common;

use std::path::Path;

use common::*;
use la_data::idx::{decode_maybe_gzip, parse_images, parse_labels, IdxDataset};
use la_data::{CifarDataset, CifarKind, Dataset};
use proptest::prelude::*;

const KINDS: [CifarKind; 3] = [
    CifarKind::Cifar10,
    CifarKind::Cifar100Fine,
    CifarKind::Cifar100Coarse,
];

fn check_cifar(bytes: &[u8]) {
    for kind in KINDS {
        if let Ok(ds) = CifarDataset::parse(bytes, kind, Path::new("fuzz.bin")) {
            assert_eq!(ds.len() * kind.record_len(), bytes.len());
            for i in 0..ds.len() {
                let s = ds.get(i).unwrap();
                assert!(s.label < kind.num_classes());
                assert_eq!(s.image.data.len(), 32 * 32 * 3);
            }
            assert!(ds.get(ds.len()).is_err());
        }
    }
}

fn check_idx(bytes: Vec<u8>) {
    let name = Path::new("fuzz.idx");
    let Ok(bytes) = decode_maybe_gzip(bytes, name) else {
        return;
    };
    if let Ok(img) = parse_images(&bytes, name) {
        assert_eq!(img.pixels.len(), img.count * img.height * img.width);
        let labels = vec![0u8; img.count];
        let ds = IdxDataset::from_parts(img, labels, vec![], name, name).unwrap();
        for i in 0..ds.len().min(4) {
            ds.get(i).unwrap();
        }
    }
    if let Ok(labels) = parse_labels(&bytes, name) {
        let img = la_data::idx::IdxImages {
            count: labels.len(),
            height: 1,
            width: 1,
            pixels: vec![0; labels.len()],
        };
        let classes: Vec<String> = (0..3).map(|c| c.to_string()).collect();
        let ok = IdxDataset::from_parts(img, labels.clone(), classes, name, name).is_ok();
        assert_eq!(ok, labels.iter().all(|&l| l < 3));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn cifar_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..8000)) {
        check_cifar(&bytes);
    }

    #[test]
    fn cifar_truncated_and_corrupted(cut in 0usize..4 * 3074, pos in 0usize..4 * 3074, val in any::<u8>()) {
        let (mut bytes, _) = cifar10_records(0, 4);
        let p = pos % bytes.len();
        bytes[p] = val;
        bytes.truncate(cut);
        check_cifar(&bytes);
        let (mut c100, _) = cifar100_records(0, 4);
        let p = pos % c100.len();
        c100[p] = val;
        c100.truncate(cut);
        check_cifar(&c100);
    }

    #[test]
    fn idx_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        check_idx(bytes);
    }

    #[test]
    fn idx_random_headers(magic in 0u8..6, dims in proptest::collection::vec(0u32..40, 0..4), extra in 0usize..200) {
        let mut bytes = vec![0, 0, 8, magic];
        for d in &dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend((0..extra).map(|i| i as u8));
        check_idx(bytes.clone());
        check_idx(gzip(&bytes));
    }

    #[test]
    fn idx_truncated_and_corrupted(cut in 0usize..400, pos in 0usize..400, val in any::<u8>(), zip in any::<bool>()) {
        for mut bytes in [idx_images(5, 6, 7)[..].to_vec(), idx_labels(&[0, 1, 2, 1, 0])] {
            let p = pos % bytes.len();
            bytes[p] = val;
            bytes.truncate(cut);
            if zip {
                let mut z = gzip(&bytes);
                let c = cut % (z.len() + 1);
                z.truncate(c.max(2));
                check_idx(z);
            } else {
                check_idx(bytes);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Truncated or corrupted `.tar.gz` archives through the CIFAR reader.
    #[test]
    fn cifar_archive_truncated_and_corrupted(cut in 0usize..100_000, pos in 0usize..100_000, val in any::<u8>()) {
        let src = tempfile::tempdir().unwrap();
        write_cifar10_folder(&src.path().join("cifar-10-batches-bin"), 2, 2);
        let mut archive = tar_gz_folder(src.path(), "cifar-10-batches-bin");
        let p = pos % archive.len();
        archive[p] ^= val;
        archive.truncate(cut % (archive.len() + 1));
        let path = src.path().join("c.tar.gz");
        std::fs::write(&path, &archive).unwrap();
        for split in [la_data::Split::Train, la_data::Split::Test] {
            if let Ok(ds) = la_data::cifar(&path, CifarKind::Cifar10, split) {
                for i in 0..ds.len() {
                    prop_assert!(ds.get(i).unwrap().label < 10);
                }
            }
        }
    }
}
