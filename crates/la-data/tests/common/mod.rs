//! Writers for the on-disk formats, so that tests read files they made themselves.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;

/// A deterministic byte for record `r`, offset `i`.
pub fn pixel(r: usize, i: usize) -> u8 {
    ((r * 31 + i * 7) % 251) as u8
}

/// `n` CIFAR-10 records (label, then 3072 CHW bytes) starting at record id `first`.
pub fn cifar10_records(first: usize, n: usize) -> (Vec<u8>, Vec<usize>) {
    let mut bytes = Vec::new();
    let mut labels = Vec::new();
    for r in first..first + n {
        let label = r % 10;
        bytes.push(label as u8);
        bytes.extend((0..3072).map(|i| pixel(r, i)));
        labels.push(label);
    }
    (bytes, labels)
}

/// `n` CIFAR-100 records (coarse, fine, 3072 bytes).
pub fn cifar100_records(first: usize, n: usize) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut bytes = Vec::new();
    let mut labels = Vec::new();
    for r in first..first + n {
        let (coarse, fine) = (r % 20, (r * 7) % 100);
        bytes.push(coarse as u8);
        bytes.push(fine as u8);
        bytes.extend((0..3072).map(|i| pixel(r, i)));
        labels.push((coarse, fine));
    }
    (bytes, labels)
}

pub const CIFAR10_NAMES: [&str; 10] = [
    "plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
];

/// Writes a `cifar-10-batches-bin` folder: 5 train batches of `per_batch` records,
/// a test batch of `test` records, and `batches.meta.txt`.
pub fn write_cifar10_folder(dir: &Path, per_batch: usize, test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for b in 0..5 {
        let (bytes, _) = cifar10_records(b * per_batch, per_batch);
        std::fs::write(dir.join(format!("data_batch_{}.bin", b + 1)), bytes).unwrap();
    }
    let (bytes, _) = cifar10_records(1000, test);
    std::fs::write(dir.join("test_batch.bin"), bytes).unwrap();
    std::fs::write(
        dir.join("batches.meta.txt"),
        CIFAR10_NAMES.join("\n") + "\n\n",
    )
    .unwrap();
}

/// Writes a `cifar-100-binary` folder with label-name files.
pub fn write_cifar100_folder(dir: &Path, train: usize, test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("train.bin"), cifar100_records(0, train).0).unwrap();
    std::fs::write(dir.join("test.bin"), cifar100_records(500, test).0).unwrap();
    let fine: Vec<String> = (0..100).map(|i| format!("fine{i}")).collect();
    let coarse: Vec<String> = (0..20).map(|i| format!("coarse{i}")).collect();
    std::fs::write(dir.join("fine_label_names.txt"), fine.join("\n")).unwrap();
    std::fs::write(dir.join("coarse_label_names.txt"), coarse.join("\n")).unwrap();
}

/// A `.tar.gz` of the files under `root/top`, stored as `top/...`.
pub fn tar_gz_folder(root: &Path, top: &str) -> Vec<u8> {
    let gz = GzEncoder::new(Vec::new(), Compression::fast());
    let mut builder = tar::Builder::new(gz);
    builder.append_dir_all(top, root.join(top)).unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

/// A `.tar.gz` of (name, bytes) regular files; names are written raw, unchecked, so
/// that hostile names (`../evil`, `/abs`) can be built.
pub fn tar_gz_raw(members: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = GzEncoder::new(Vec::new(), Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for (name, data) in members {
        let mut header = tar::Header::new_old();
        let field = &mut header.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// A `.tar.gz` with one directory, a regular file, and a symlink `link` -> `target`.
pub fn tar_gz_with_symlink(top: &str, link: &str, target: &str) -> Vec<u8> {
    let gz = GzEncoder::new(Vec::new(), Compression::fast());
    let mut builder = tar::Builder::new(gz);
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    builder
        .append_link(&mut header, format!("{top}/{link}"), target)
        .unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

/// IDX image file bytes (magic 0x803).
pub fn idx_images(n: usize, h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        out.extend((d as u32).to_be_bytes());
    }
    out.extend((0..n * h * w).map(|i| (i % 256) as u8));
    out
}

/// IDX label file bytes (magic 0x801).
pub fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, 1];
    out.extend((labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// Writes an RGB PNG with a solid colour.
pub fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            rgb[0].wrapping_add(x as u8),
            rgb[1].wrapping_add(y as u8),
            rgb[2],
        ])
    });
    img.save(path).unwrap();
}
