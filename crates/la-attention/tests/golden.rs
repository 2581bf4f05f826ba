//! The `softmax` kind against the PyTorch reference (tests/fixtures/golden at the workspace
//! root): each of the five attention modules of the tiny seed model, run on its recorded
//! input with its recorded weights, must give the recorded `intended` output, and must not
//! give the `reshape` output (the article's code with `.view` patched to `.reshape`).

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use la_attention::{AttentionConfig, AttentionKind, SpatialAttention};
use la_testing::{golden, max_abs_diff};

fn seed_module(weights: &HashMap<String, Tensor>, index: usize) -> SpatialAttention {
    let mut renamed = HashMap::new();
    for (seed_name, ours) in [
        ("linear_query", "query"),
        ("linear_key", "key"),
        ("linear_value", "value"),
        ("out_proj", "out"),
    ] {
        for leaf in ["weight", "bias"] {
            let t = weights[&format!("features.{index}.{seed_name}.{leaf}")].clone();
            renamed.insert(format!("{ours}.{leaf}"), t);
        }
    }
    let channels = renamed["value.weight"].dim(0).unwrap();
    let vb = VarBuilder::from_tensors(renamed, DType::F32, &Device::Cpu);
    SpatialAttention::new(channels, AttentionConfig::new(AttentionKind::Softmax), vb).unwrap()
}

#[test]
fn softmax_kind_reproduces_the_intended_seed_module() {
    let weights = golden("vgg16_la_tiny.safetensors");
    let io = golden("vgg16_la_tiny_io.safetensors");
    for index in [4, 10, 18, 26, 34] {
        let module = seed_module(&weights, index);
        let input = &io[&format!("intended.features.{index}.in")];
        let want = &io[&format!("intended.features.{index}.out")];
        let got = module.forward(input).unwrap();
        let diff = max_abs_diff(&got, want);
        assert!(
            diff < 1e-4,
            "features.{index}: max |ours - PyTorch| = {diff}"
        );

        // The article's literal code (with .reshape) scrambles channels before out_proj: we
        // must not reproduce it. The difference is of order 0.1-1 on these maps.
        let reshape_in = &io[&format!("reshape.features.{index}.in")];
        let reshape_out = &io[&format!("reshape.features.{index}.out")];
        let ours_on_reshape_in = module.forward(reshape_in).unwrap();
        let diff = max_abs_diff(&ours_on_reshape_in, reshape_out);
        assert!(
            diff > 1e-2,
            "features.{index}: unexpectedly matches the scrambled variant ({diff})"
        );
    }
}
