//! What the explanation tests share: the golden tiny VGG16 with attention, in f64.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use la_vgg::{load_weights, Vgg};

/// The golden tiny VGG16 with the article's attention (tests/fixtures/golden, from the
/// PyTorch reference) in f64, and the first of its golden input images [1, 3, 32, 32].
pub fn tiny_golden_vgg() -> (Vgg, Tensor) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden");
    let weights = load_weights(&dir.join("vgg16_la_tiny.safetensors"), &Device::Cpu).unwrap();
    let vgg = Vgg::from_weights(&weights, DType::F64, &Device::Cpu).unwrap();
    let io = candle_core::safetensors::load(dir.join("vgg16_la_tiny_io.safetensors"), &Device::Cpu)
        .unwrap();
    let image = io["input"].narrow(0, 0, 1).unwrap();
    (vgg, image.to_dtype(DType::F64).unwrap())
}
