//! What the workspace's tests share, in one place (a dev-dependency of the other crates,
//! never a dependency): the paths of the fixtures and the PyTorch golden files, the largest
//! difference of two tensors, and temporary directories that are removed when the test ends,
//! failed or not.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/<name>` at the workspace root.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A file of the PyTorch reference's golden outputs, `tests/fixtures/golden/<name>`.
pub fn golden_path(name: &str) -> PathBuf {
    fixture("golden").join(name)
}

/// The tensors of a safetensors file (on the CPU, as stored), panicking with the file's name.
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tensors of a golden file.
pub fn golden(name: &str) -> HashMap<String, Tensor> {
    read_tensors(&golden_path(name))
}

/// max |a - b| over all elements, in f64 whatever the dtypes; the shapes must agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "max_abs_diff of different shapes");
    if a.elem_count() == 0 {
        return 0.0;
    }
    let to64 = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    (to64(a) - to64(b))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A new empty directory `la-<label>-XXXX` under the system's temporary directory, removed
/// when the returned guard is dropped (also when the test panics).
pub fn tempdir(label: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("la-{label}-"))
        .tempdir()
        .expect("a temporary directory")
}

/// An error and its causes, as `la-cli` prints them (`{:#}` of anyhow): "outer: inner: ...".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
