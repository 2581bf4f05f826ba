//! The tiny VGG16 of the PyTorch reference (tests/fixtures/golden), imported from each of the
//! three PyTorch layouts, gives PyTorch's logits.

use std::collections::HashMap;

use candle_core::{DType, Device, ModuleT, Tensor};
use la_testing::max_abs_diff;
use la_vgg::export::article_layout as export_article_layout;
use la_vgg::import::{import_state_dict, SourceLayout};
use la_vgg::{ModelMetadata, Vgg, WeightsFile};

fn load(name: &str) -> HashMap<String, Tensor> {
    la_testing::golden(name)
}

fn model(tensors: HashMap<String, Tensor>) -> (Vgg, SourceLayout) {
    let imported = import_state_dict(tensors).unwrap();
    let layout = imported.layout;
    let weights = WeightsFile {
        metadata: ModelMetadata::new(imported.config),
        tensors: imported.tensors,
    };
    (
        Vgg::from_weights(&weights, DType::F32, &Device::Cpu).unwrap(),
        layout,
    )
}

/// The golden model `name` imported from its PyTorch file, its layout and its recorded
/// inputs and outputs.
fn golden_model(name: &str) -> (Vgg, SourceLayout, HashMap<String, Tensor>) {
    let (vgg, layout) = model(load(&format!("{name}.safetensors")));
    (vgg, layout, load(&format!("{name}_io.safetensors")))
}

#[test]
fn plain_vgg16_from_torchvision_names_matches_pytorch() {
    let (vgg, layout, io) = golden_model("vgg16_tiny");
    assert_eq!(layout, SourceLayout::Torchvision);
    let config = vgg.config();
    assert_eq!(config.arch_name(), "vgg16");
    assert_eq!(config.blocks[2], vec![32, 32, 32]);
    assert_eq!(
        (
            config.head.pool,
            config.head.hidden.clone(),
            config.num_classes
        ),
        (7, vec![64, 64], 10)
    );
    assert!(config.attention.is_none());

    let features = vgg.forward_features(&io["input"], false).unwrap();
    assert!(max_abs_diff(&features, &io["features.out"]) < 1e-4);
    let logits = vgg.forward_t(&io["input"], false).unwrap();
    let diff = max_abs_diff(&logits, &io["logits"]);
    assert!(diff < 1e-4, "max |ours - PyTorch| = {diff}");
}

#[test]
fn vgg16_with_attention_from_seed_names_matches_the_intended_module() {
    let (vgg, layout, io) = golden_model("vgg16_la_tiny");
    assert_eq!(layout, SourceLayout::Article);
    let config = vgg.config();
    let sites = config.attention.as_ref().unwrap();
    assert_eq!(sites.blocks, vec![0, 1, 2, 3, 4]);
    assert_eq!(sites.config.reduction, 8);

    let taps = vgg
        .forward_intermediates(&io["input"], &[0, 1, 2, 3, 4], false)
        .unwrap();
    let logits = vgg.forward_head(&taps.features, false).unwrap();
    let diff = max_abs_diff(&logits, &io["intended.logits"]);
    assert!(diff < 1e-4, "max |ours - PyTorch intended| = {diff}");
    // Each block's pre-pool output is the attention module's output recorded by PyTorch.
    for (block, index) in [4, 10, 18, 26, 34].into_iter().enumerate() {
        let d = max_abs_diff(
            &taps.blocks[block].output,
            &io[&format!("intended.features.{index}.out")],
        );
        assert!(d < 1e-4, "block {block}: {d}");
    }
    // The article's literal code (.view patched to .reshape) gives other logits: we must not.
    let reshape = max_abs_diff(&logits, &io["reshape.logits"]);
    assert!(reshape > 0.1, "matches the scrambled variant ({reshape})");
    // f32 against PyTorch's f64 run of the same weights.
    let f64_logits = io["intended.logits_f64"].to_dtype(DType::F32).unwrap();
    assert!(max_abs_diff(&logits, &f64_logits) < 1e-4);
}

/// torchvision names -> timm names, as timm's own pretrained filter does.
fn to_timm(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "classifier.0.weight" => (
                "pre_logits.fc1.weight".into(),
                v.reshape((64, 64, 7, 7)).unwrap(),
            ),
            "classifier.0.bias" => ("pre_logits.fc1.bias".into(), v),
            "classifier.3.weight" => (
                "pre_logits.fc2.weight".into(),
                v.reshape((64, 64, 1, 1)).unwrap(),
            ),
            "classifier.3.bias" => ("pre_logits.fc2.bias".into(), v),
            "classifier.6.weight" => ("head.fc.weight".into(), v),
            "classifier.6.bias" => ("head.fc.bias".into(), v),
            _ => (k, v),
        })
        .collect()
}

#[test]
fn timm_layout_gives_the_same_logits() {
    let io = load("vgg16_tiny_io.safetensors");
    let (vgg, layout) = model(to_timm(load("vgg16_tiny.safetensors")));
    assert_eq!(layout, SourceLayout::Timm);
    let logits = vgg.forward_t(&io["input"], false).unwrap();
    assert!(max_abs_diff(&logits, &io["logits"]) < 1e-4);
}

#[test]
fn half_precision_sources_are_converted_to_f32() {
    let io = load("vgg16_tiny_io.safetensors");
    let half: HashMap<String, Tensor> = load("vgg16_tiny.safetensors")
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
        .collect();
    let (vgg, _) = model(half);
    // bf16 keeps 8 bits of mantissa: the logits move, but stay close.
    let logits = vgg.forward_t(&io["input"], false).unwrap();
    assert_eq!(logits.dtype(), DType::F32);
    let diff = max_abs_diff(&logits, &io["logits"]);
    assert!(diff > 0.0 && diff < 0.2, "{diff}");
}

#[test]
fn export_to_the_seed_layout_round_trips_exactly() {
    for file in ["vgg16_la_tiny.safetensors", "vgg16_tiny.safetensors"] {
        let original = load(file);
        let imported = import_state_dict(original.clone()).unwrap();
        let exported = export_article_layout(&imported.config, &imported.tensors).unwrap();
        let mut want: Vec<&String> = original.keys().collect();
        let mut got: Vec<&String> = exported.keys().collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{file}: exported names differ");
        for (name, t) in &original {
            assert_eq!(max_abs_diff(t, &exported[name]), 0.0, "{file}: {name}");
        }
    }
}
