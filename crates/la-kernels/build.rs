//! With the `cuda` feature, compiles each `src/cuda/*.cu` to PTX in OUT_DIR with nvcc, as
//! candle-kernels does for Candle's own kernels; the PTX is embedded by `src/cuda/kernels.rs`
//! and loaded on first use. Without the feature this does nothing, so the default build needs
//! no CUDA toolkit.
//!
//! Why by hand rather than a build-helper crate: it is one nvcc call per file, and the same
//! two settings Candle's build reads (`CUDA_COMPUTE_CAP`, nvcc from `CUDA_HOME` or the PATH)
//! keep both sets of kernels built for the same GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = compute_cap();
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|home| Path::new(&home).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir("src/cuda")
        .expect("src/cuda is readable")
        .map(|entry| entry.expect("src/cuda entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for source in sources {
        let stem = source.file_stem().expect("a .cu file has a name");
        let ptx = out_dir.join(stem).with_extension("ptx");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("--gpu-architecture=sm_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "la-kernels: cannot run {} for the cuda feature ({e}); set CUDA_HOME or put \
                     nvcc on the PATH (docs/gpu.md)",
                    nvcc.display()
                )
            });
        assert!(
            status.success(),
            "la-kernels: nvcc failed on {}",
            source.display()
        );
    }
}

/// The GPU's compute capability: `CUDA_COMPUTE_CAP` (90 for an H100/H200), else what
/// nvidia-smi reports, the rule of Candle's kernels.
fn compute_cap() -> String {
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        return cap.replace('.', "");
    }
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .expect("la-kernels: set CUDA_COMPUTE_CAP (e.g. 90) where nvidia-smi cannot report it");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .expect("nvidia-smi printed a compute capability")
        .trim()
        .replace('.', "")
}
