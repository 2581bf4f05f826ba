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

/// Every element of `t`, in f64, on the CPU.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| over all elements, in f64 whatever the dtypes; the shapes must agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "max_abs_diff of different shapes");
    // NaN anywhere makes the result NaN (`f64::max` would drop it), so no comparison passes.
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| {
            if d.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(d)
            }
        })
}

/// max |a - b| relative to the largest |b| (at least 1), for comparing a kernel with its
/// reference across scales.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = values(b).iter().fold(1f64, |m, v| m.max(v.abs()));
    max_abs_diff(a, b) / scale
}

/// sum |t| in f64: zero exactly when every element is.
pub fn abs_sum(t: &Tensor) -> f64 {
    values(t).iter().map(|v| v.abs()).sum()
}

/// sqrt(mean(t^2)) in f64.
pub fn rms(t: &Tensor) -> f64 {
    let v = values(t);
    (v.iter().map(|x| x * x).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

pub use tempfile::TempDir;

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

/// The current value of every variable of `varmap`, by name.
pub fn var_tensors(varmap: &candle_nn::VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect()
}

/// Copies of a `VarMap`'s tensors by name, detached from it.
pub fn varmap_tensors(varmap: &candle_nn::VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().expect("a copy")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_is_never_close() {
        let a = Tensor::new(&[1.0f32, f32::NAN], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        assert!(max_abs_diff(&a, &b).is_nan());
        assert!(max_abs_diff(&b, &a).is_nan());
        assert_eq!(max_abs_diff(&b, &b), 0.0);
        assert!(abs_sum(&a).is_nan());
    }
}
