//! The ONNX export run by onnxruntime: every attention kind, with and without BatchNorm,
//! and the ImageNet head's 7x7 pool, give la-vgg's logits within 1e-4.
//!
//! onnxruntime comes from PyPI into a venv under target/ the first time (set
//! LA_ONNXRUNTIME_PYTHON to a python that has it to use another).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use la_attention::{AttentionConfig, AttentionKind};
use la_vgg::config::{HeadConfig, VggConfig};
use la_vgg::Vgg;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A python with onnxruntime: LA_ONNXRUNTIME_PYTHON, or a venv made in target/.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("LA_ONNXRUNTIME_PYTHON") {
        return p.into();
    }
    let venv = workspace().join("target/venv-onnxruntime");
    let python = venv.join("bin/python");
    let ready = |p: &Path| {
        Command::new(p)
            .args(["-c", "import onnxruntime, numpy"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs");
        assert!(made.success(), "python3 -m venv {} failed", venv.display());
        let installed = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "onnxruntime", "numpy"])
            .status()
            .expect("pip runs");
        assert!(
            installed.success(),
            "pip install onnxruntime numpy failed (PyPI reachable?)"
        );
    }
    python
}

fn write_f32(path: &Path, t: &Tensor) {
    let bytes: Vec<u8> = t
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(path, bytes).unwrap();
}

/// Exports `config` with random (BatchNorm statistics moved) weights, and writes an input
/// and la-vgg's logits beside it.
fn write_case(dir: &Path, name: &str, config: VggConfig, size: usize) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vgg = Vgg::new(
        config.clone(),
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 3, size, size), &dev).unwrap();
    vgg.forward_t(&x, true).unwrap(); // moves the running statistics off 0 and 1
    let tensors = la_testing::varmap_tensors(&varmap);
    let logits = vgg.forward_t(&x, false).unwrap();
    let onnx = la_vgg::onnx::export(&config, &tensors, size).unwrap();
    std::fs::write(dir.join(format!("{name}.onnx")), onnx).unwrap();
    write_f32(&dir.join(format!("{name}.input.bin")), &x);
    write_f32(&dir.join(format!("{name}.logits.bin")), &logits);
    let shapes = serde_json::json!({"input": x.dims(), "logits": logits.dims()});
    std::fs::write(dir.join(format!("{name}.json")), shapes.to_string()).unwrap();
    tensors
}

#[test]
fn onnxruntime_gives_our_logits_for_every_attention_kind() {
    let tmp = la_testing::tempdir("onnx");
    let small = |bn: bool, kind: Option<AttentionKind>| {
        VggConfig::vgg(11, 7)
            .unwrap()
            .with_batch_norm(bn)
            .with_attention(kind.map(AttentionConfig::new))
            .with_head(HeadConfig::cifar(Some(24)))
            .with_width(0.125)
            .unwrap()
            .with_input_size(32)
    };
    let kinds: Vec<Option<AttentionKind>> = std::iter::once(None)
        .chain(AttentionKind::ALL.map(Some))
        .collect();
    let mut cases = 0;
    for bn in [false, true] {
        for &kind in &kinds {
            let name = format!("{}-bn{bn}", kind.map_or("none", |k| k.name()));
            let _ = write_case(tmp.path(), &name, small(bn, kind), 32);
            cases += 1;
        }
    }
    // The ImageNet head: its 7x7 adaptive pool of a 1x1 map repeats it; of a 2x2 map (at
    // 64) it has no ONNX operator and is refused.
    let imagenet = small(true, Some(AttentionKind::Linear)).with_head(HeadConfig {
        pool: 7,
        hidden: vec![24, 24],
        dropout: 0.5,
    });
    let tensors = write_case(tmp.path(), "imagenet-head", imagenet.clone(), 32);
    cases += 1;
    let out = Command::new(python())
        .arg(workspace().join("scripts/onnxruntime-check.py"))
        .arg(tmp.path())
        .output()
        .expect("the check runs");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "onnxruntime disagrees:\n{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.ends_with(")") && l.contains(" ok "))
            .count(),
        cases
    );

    let err = la_vgg::onnx::export(&imagenet, &tensors, 64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("adaptive pool from 2x2 to 7x7"), "{err}");
}
