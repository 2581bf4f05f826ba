//! Reader round-trips on files the tests write, and the bad-input errors.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use la_data::{
    cifar, idx, image_folder, info, CifarKind, Dataset, Error, ImageFolderOptions, ImageSizes,
    Split,
};

fn err_text<T>(r: la_data::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn check_cifar10(ds: &dyn Dataset, per_batch: usize) {
    assert_eq!(ds.len(), 5 * per_batch);
    assert_eq!(ds.classes().len(), 10);
    assert_eq!(ds.classes()[0], "plane");
    for i in [0, per_batch, 5 * per_batch - 1] {
        let s = ds.get(i).unwrap();
        assert_eq!(s.label, i % 10);
        assert_eq!((s.image.height, s.image.width), (32, 32));
        // HWC from CHW: pixel (y, x) channel c is record byte c*1024 + y*32 + x.
        for (y, x) in [(0, 0), (5, 17), (31, 31)] {
            let p = s.image.pixel(y, x);
            for (c, &v) in p.iter().enumerate() {
                assert_eq!(v, pixel(i, c * 1024 + y * 32 + x));
            }
        }
    }
}

#[test]
fn cifar10_folder_parent_and_archive_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("cifar-10-batches-bin");
    write_cifar10_folder(&folder, 4, 3);

    let direct = cifar(&folder, CifarKind::Cifar10, Split::Train).unwrap();
    check_cifar10(&direct, 4);
    let parent = cifar(tmp.path(), CifarKind::Cifar10, Split::Train).unwrap();
    check_cifar10(&parent, 4);

    let archive = tmp.path().join("cifar-10-binary.tar.gz");
    std::fs::write(&archive, tar_gz_folder(tmp.path(), "cifar-10-batches-bin")).unwrap();
    let from_tar = cifar(&archive, CifarKind::Cifar10, Split::Train).unwrap();
    check_cifar10(&from_tar, 4);

    let test = cifar(&archive, CifarKind::Cifar10, Split::Test).unwrap();
    assert_eq!(test.len(), 3);
    assert_eq!(test.get(2).unwrap().label, 1002 % 10);
    assert_eq!(test.image_size(), Some((32, 32)));
}

#[test]
fn cifar100_fine_and_coarse_from_folder_and_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("cifar-100-binary");
    write_cifar100_folder(&folder, 7, 5);
    let archive = tmp.path().join("c100.tar.gz");
    std::fs::write(&archive, tar_gz_folder(tmp.path(), "cifar-100-binary")).unwrap();
    let (_, labels) = cifar100_records(0, 7);
    for path in [folder.as_path(), archive.as_path()] {
        let fine = cifar(path, CifarKind::Cifar100Fine, Split::Train).unwrap();
        let coarse = cifar(path, CifarKind::Cifar100Coarse, Split::Train).unwrap();
        assert_eq!(fine.len(), 7);
        assert_eq!(fine.classes().len(), 100);
        assert_eq!(coarse.classes().len(), 20);
        assert_eq!(fine.classes()[3], "fine3");
        assert_eq!(coarse.classes()[19], "coarse19");
        for (i, &(c, f)) in labels.iter().enumerate() {
            assert_eq!(fine.get(i).unwrap().label, f);
            assert_eq!(coarse.label(i).unwrap(), c);
            assert_eq!(fine.get(i).unwrap().image, coarse.get(i).unwrap().image);
        }
        assert_eq!(
            cifar(path, CifarKind::Cifar100Fine, Split::Test)
                .unwrap()
                .len(),
            5
        );
    }
}

#[test]
fn cifar_without_meta_uses_official_names() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10_folder(tmp.path(), 1, 1);
    std::fs::remove_file(tmp.path().join("batches.meta.txt")).unwrap();
    let ds = cifar(tmp.path(), CifarKind::Cifar10, Split::Test).unwrap();
    assert_eq!(ds.classes()[0], "airplane");
    assert_eq!(ds.classes()[9], "truck");
    let c100 = CifarKind::Cifar100Fine.default_classes();
    assert_eq!(c100.len(), 100);
    assert_eq!(CifarKind::Cifar100Coarse.default_classes().len(), 20);
}

#[test]
fn cifar_bad_inputs_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10_folder(tmp.path(), 2, 2);
    let test_file = tmp.path().join("test_batch.bin");

    // Truncated: not a whole number of records.
    let (mut bytes, _) = cifar10_records(0, 2);
    bytes.truncate(3073 + 100);
    std::fs::write(&test_file, &bytes).unwrap();
    let msg = err_text(cifar(tmp.path(), CifarKind::Cifar10, Split::Test));
    assert!(msg.contains("test_batch.bin"), "{msg}");
    assert!(msg.contains("whole number"), "{msg}");

    // Label 12 in CIFAR-10.
    let (mut bytes, _) = cifar10_records(0, 2);
    bytes[3073] = 12;
    std::fs::write(&test_file, &bytes).unwrap();
    let msg = err_text(cifar(tmp.path(), CifarKind::Cifar10, Split::Test));
    assert!(
        msg.contains("test_batch.bin") && msg.contains("record 1"),
        "{msg}"
    );
    assert!(msg.contains("label 12"), "{msg}");

    // Empty file.
    std::fs::write(&test_file, []).unwrap();
    let msg = err_text(cifar(tmp.path(), CifarKind::Cifar10, Split::Test));
    assert!(
        msg.contains("test_batch.bin") && msg.contains("empty"),
        "{msg}"
    );

    // A CIFAR-10 folder read as CIFAR-100: no train.bin.
    let msg = err_text(cifar(tmp.path(), CifarKind::Cifar100Fine, Split::Train));
    assert!(msg.contains("train.bin"), "{msg}");

    // Wrong number of class names.
    std::fs::write(tmp.path().join("batches.meta.txt"), "a\nb\n").unwrap();
    let msg = err_text(cifar(tmp.path(), CifarKind::Cifar10, Split::Train));
    assert!(
        msg.contains("batches.meta.txt") && msg.contains("2 class names"),
        "{msg}"
    );

    // Missing path.
    let missing = tmp.path().join("nope");
    let err = cifar(&missing, CifarKind::Cifar10, Split::Train).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("nope"));

    // A corrupt archive.
    let bad_archive = tmp.path().join("broken.tar.gz");
    std::fs::write(&bad_archive, b"\x1f\x8b\x08\x00garbage").unwrap();
    let msg = err_text(cifar(&bad_archive, CifarKind::Cifar10, Split::Train));
    assert!(msg.contains("broken.tar.gz"), "{msg}");
}

#[test]
fn idx_raw_and_gzip_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let labels: Vec<u8> = (0..6).map(|i| (i % 3) as u8).collect();
    let raw_i = tmp.path().join("imgs-idx3-ubyte");
    let raw_l = tmp.path().join("labs-idx1-ubyte");
    std::fs::write(&raw_i, idx_images(6, 4, 5)).unwrap();
    std::fs::write(&raw_l, idx_labels(&labels)).unwrap();
    let gz_i = tmp.path().join("imgs-idx3-ubyte.gz");
    let gz_l = tmp.path().join("labs-idx1-ubyte.gz");
    std::fs::write(&gz_i, gzip(&idx_images(6, 4, 5))).unwrap();
    std::fs::write(&gz_l, gzip(&idx_labels(&labels))).unwrap();

    let names = vec!["a".to_string(), "b".into(), "c".into()];
    let raw = idx(&raw_i, &raw_l, names.clone()).unwrap();
    let gz = idx(&gz_i, &gz_l, names).unwrap();
    assert_eq!(raw.len(), 6);
    assert_eq!(raw.image_size(), Some((4, 5)));
    for i in 0..6 {
        let (a, b) = (raw.get(i).unwrap(), gz.get(i).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.label, i % 3);
        assert_eq!((a.image.height, a.image.width), (4, 5));
        // Grey replicated to 3 channels, row-major.
        let v = ((i * 20 + 6) % 256) as u8; // pixel (1, 1) of image i
        assert_eq!(a.image.pixel(1, 1), [v, v, v]);
    }
    // Empty class list: "0".."max".
    let auto = idx(&raw_i, &raw_l, vec![]).unwrap();
    assert_eq!(auto.classes(), ["0", "1", "2"]);
}

#[test]
fn idx_bad_inputs_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("i.idx");
    let labs = tmp.path().join("l.idx");
    std::fs::write(&labs, idx_labels(&[0, 1, 2])).unwrap();

    let mut wrong_magic = idx_images(3, 2, 2);
    wrong_magic[2] = 0x0d;
    std::fs::write(&imgs, &wrong_magic).unwrap();
    let msg = err_text(idx(&imgs, &labs, vec![]));
    assert!(msg.contains("i.idx") && msg.contains("0x0d"), "{msg}");

    // Label file given as images.
    let msg = err_text(idx(&labs, &labs, vec![]));
    assert!(msg.contains("l.idx") && msg.contains("dimensions"), "{msg}");

    let mut truncated = idx_images(3, 2, 2);
    truncated.pop();
    std::fs::write(&imgs, &truncated).unwrap();
    let msg = err_text(idx(&imgs, &labs, vec![]));
    assert!(msg.contains("i.idx") && msg.contains("truncated"), "{msg}");

    let mut trailing = idx_images(3, 2, 2);
    trailing.push(0);
    std::fs::write(&imgs, &trailing).unwrap();
    assert!(err_text(idx(&imgs, &labs, vec![])).contains("after"));

    // Label >= class count.
    std::fs::write(&imgs, idx_images(3, 2, 2)).unwrap();
    let msg = err_text(idx(&imgs, &labs, vec!["x".into(), "y".into()]));
    assert!(msg.contains("l.idx") && msg.contains("label 2"), "{msg}");

    // Count mismatch.
    std::fs::write(&labs, idx_labels(&[0, 1])).unwrap();
    let msg = err_text(idx(&imgs, &labs, vec![]));
    assert!(msg.contains("2 labels for the 3 images"), "{msg}");

    // Bad gzip.
    std::fs::write(&imgs, [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
    let msg = err_text(idx(&imgs, &labs, vec![]));
    assert!(msg.contains("i.idx") && msg.contains("gzip"), "{msg}");

    // Missing.
    let msg = err_text(idx(&tmp.path().join("none"), &labs, vec![]));
    assert!(msg.contains("none"), "{msg}");

    // Fashion-MNIST reader on a folder without the files.
    let msg = err_text(la_data::fashion_mnist(tmp.path(), Split::Train));
    assert!(msg.contains("train-images-idx3-ubyte.gz"), "{msg}");
}

fn make_folder(root: &Path) {
    write_png(&root.join("cat/a.png"), 6, 4, [10, 20, 30]);
    write_png(&root.join("cat/b.PNG"), 5, 5, [40, 50, 60]);
    write_png(&root.join("dog/x.png"), 3, 7, [70, 80, 90]);
    write_png(&root.join("ant/nested/z.png"), 2, 2, [1, 2, 3]);
    std::fs::write(root.join("dog/notes.txt"), "not an image").unwrap();
}

#[test]
fn image_folder_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    make_folder(tmp.path());
    let ds = image_folder(tmp.path(), ImageFolderOptions::default()).unwrap();
    assert_eq!(ds.classes(), ["ant", "cat", "dog"]);
    assert_eq!(ds.len(), 4);
    let labels: Vec<usize> = (0..4).map(|i| ds.label(i).unwrap()).collect();
    assert_eq!(labels, [0, 1, 1, 2]);
    let s = ds.get(1).unwrap();
    assert_eq!((s.image.height, s.image.width), (4, 6));
    assert_eq!(s.image.pixel(0, 0), [10, 20, 30]);
    assert_eq!(s.image.pixel(3, 5), [15, 23, 30]);
    assert_eq!(ds.get(3).unwrap().image.height, 7);

    let report = info(&ds);
    assert_eq!(report.histogram, [1, 2, 1]);
    assert!(matches!(
        report.sizes,
        ImageSizes::Varying {
            min: (2, 2),
            max: (5, 5),
            sampled: 4
        }
    ));

    // A validation root labelled with the training root's classes.
    let val = tempfile::tempdir().unwrap();
    write_png(&val.path().join("dog/v.png"), 2, 2, [0, 0, 0]);
    let opts = ImageFolderOptions {
        classes: Some(ds.classes().to_vec()),
        ..Default::default()
    };
    let v = image_folder(val.path(), opts).unwrap();
    assert_eq!(v.label(0).unwrap(), 2);

    let (train, valid) =
        la_data::folder::image_folder_split(tmp.path(), ImageFolderOptions::default(), 0.25, 3)
            .unwrap();
    assert_eq!((train.len(), valid.len()), (3, 1));
}

#[test]
fn image_folder_bad_images_and_structure() {
    let tmp = tempfile::tempdir().unwrap();
    make_folder(tmp.path());
    let bad = tmp.path().join("cat/broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();

    let ds = image_folder(tmp.path(), ImageFolderOptions::default()).unwrap();
    assert_eq!(ds.len(), 5);
    let i = (0..ds.len())
        .find(|&i| ds.path(i) == Some(bad.as_path()))
        .unwrap();
    let err = ds.get(i).unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    assert!(err.to_string().contains("broken.png"));

    let skipping = image_folder(
        tmp.path(),
        ImageFolderOptions {
            skip_bad: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(skipping.len(), 4);
    assert_eq!(skipping.skipped().len(), 1);
    assert_eq!(skipping.skipped()[0].0, bad);
    for i in 0..skipping.len() {
        skipping.get(i).unwrap();
    }

    // Empty class folder.
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    let msg = err_text(image_folder(tmp.path(), ImageFolderOptions::default()));
    assert!(
        msg.contains("empty") && msg.contains("empty class folder"),
        "{msg}"
    );

    // Not a folder / missing / no classes.
    let msg = err_text(image_folder(&bad, ImageFolderOptions::default()));
    assert!(msg.contains("not a folder"), "{msg}");
    let msg = err_text(image_folder(
        &tmp.path().join("gone"),
        ImageFolderOptions::default(),
    ));
    assert!(msg.contains("gone"), "{msg}");
    let lone = tempfile::tempdir().unwrap();
    let msg = err_text(image_folder(lone.path(), ImageFolderOptions::default()));
    assert!(msg.contains("no class folders"), "{msg}");
}

#[test]
fn subset_and_split_are_deterministic() {
    let ds: Arc<dyn Dataset> = Arc::new(la_data::VecDataset::synthetic(101, 2, 2, 5, 1));
    let (a, b) = la_data::split(ds.clone(), 0.3, 9);
    let (a2, b2) = la_data::split(ds.clone(), 0.3, 9);
    let (a3, _) = la_data::split(ds.clone(), 0.3, 10);
    assert_eq!(a.len(), 30);
    assert_eq!(b.len(), 71);
    assert_eq!(a.indices(), a2.indices());
    assert_eq!(b.indices(), b2.indices());
    assert_ne!(a.indices(), a3.indices());
    let mut all: Vec<usize> = a.indices().iter().chain(b.indices()).copied().collect();
    all.sort();
    assert_eq!(all, (0..101).collect::<Vec<_>>());
    assert_eq!(a.get(0).unwrap(), ds.get(a.indices()[0]).unwrap());
    assert!(matches!(
        a.get(30),
        Err(Error::Index { index: 30, len: 30 })
    ));
    assert!(la_data::Subset::new(ds, vec![101]).is_err());
}

#[test]
fn info_reports_and_prints() {
    let ds = la_data::VecDataset::synthetic(25, 3, 4, 5, 0);
    let report = info(&ds);
    assert_eq!(report.count, 25);
    assert_eq!(report.histogram, [5; 5]);
    assert_eq!(
        report.sizes,
        ImageSizes::Fixed {
            height: 3,
            width: 4
        }
    );
    let text = report.to_string();
    assert!(text.contains("samples:     25"), "{text}");
    assert!(text.contains("3 x 4"), "{text}");
    assert_eq!(text.matches("20.0%").count(), 5, "{text}");
}
