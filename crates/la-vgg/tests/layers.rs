//! The layer walk, the stored config forms, the typed metadata and timm's forward entry
//! points.

use std::collections::HashMap;

use candle_core::{DType, Device, ModuleT, Tensor};
use la_attention::{AttentionConfig, AttentionKind};
use la_testing::max_abs_diff;
use la_vgg::{
    load_weights, save_weights, AttentionSites, HeadConfig, LayerKind, ModelMetadata, Normalize,
    VggConfig,
};

fn tiny(attention: Option<AttentionConfig>) -> VggConfig {
    VggConfig::vgg(11, 4)
        .unwrap()
        .with_batch_norm(true)
        .with_attention(attention)
        .with_head(HeadConfig::cifar(Some(8)))
        .with_width(1.0 / 16.0)
        .unwrap()
}

#[test]
fn the_layer_walk_names_every_variable_the_model_creates() {
    let config = tiny(Some(AttentionConfig::new(AttentionKind::Efficient)));
    let (_, varmap) =
        la_vgg::trainable(config.clone(), HashMap::new(), 0, DType::F32, &Device::Cpu).unwrap();
    let mut created: Vec<(String, Vec<usize>)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.dims().to_vec()))
        .collect();
    created.sort();
    let mut walked = config.tensor_shapes();
    walked.sort();
    assert_eq!(created, walked);
    // Five blocks of conv(+BN) units, attention and a pool; then the head's pool and Linears.
    let layers = config.layers();
    let pools = layers
        .iter()
        .filter(|l| l.kind == LayerKind::MaxPool)
        .count();
    assert_eq!(pools, 5);
    assert_eq!(layers.last().unwrap().name, "head.logits");
    // The summary's parameter count is the model's (running statistics are not parameters).
    let summary = la_vgg::summary::summarize(&config, 32);
    let params: usize = walked
        .iter()
        .filter(|(name, _)| !name.contains("running_"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(summary.params, params as u64);
    assert_eq!(summary.rows.len(), layers.len());
}

#[test]
fn files_written_before_attention_sites_were_one_field_still_read() {
    let new = tiny(None);
    let mut with_sites = new.clone();
    with_sites.attention = Some(AttentionSites {
        config: AttentionConfig::new(AttentionKind::Linear),
        blocks: vec![1, 3],
        input_size: None,
    });
    // The current form round-trips.
    let json = serde_json::to_string(&with_sites).unwrap();
    assert_eq!(
        serde_json::from_str::<VggConfig>(&json).unwrap(),
        with_sites
    );
    // The older form: the module and its blocks side by side.
    let mut old: serde_json::Value = serde_json::to_value(&new).unwrap();
    old["attention"] = serde_json::json!({"kind": "linear", "reduction": 8});
    old["attention_blocks"] = serde_json::json!([1, 3]);
    let read: VggConfig = serde_json::from_value(old.clone()).unwrap();
    assert_eq!(read, with_sites);
    // A module with no blocks was no attention at all.
    old["attention_blocks"] = serde_json::json!([]);
    let read: VggConfig = serde_json::from_value(old.clone()).unwrap();
    assert_eq!(read.attention, None);
    // Blocks without a module cannot mean anything.
    old["attention"] = serde_json::Value::Null;
    old["attention_blocks"] = serde_json::json!([0]);
    assert!(serde_json::from_value::<VggConfig>(old).is_err());
    // Sites out of order or repeated are refused by validation.
    let mut bad = with_sites.clone();
    bad.attention.as_mut().unwrap().blocks = vec![3, 1];
    assert!(bad.validate().is_err());
}

#[test]
fn metadata_is_typed_and_keeps_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny(None);
    let (_, varmap) =
        la_vgg::trainable(config.clone(), HashMap::new(), 1, DType::F32, &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = la_testing::var_tensors(&varmap);
    let metadata = ModelMetadata {
        normalization: Some(Normalize::CIFAR10),
        classes: Some(vec!["a".into(), "b".into(), "c".into(), "d".into()]),
        input_size: Some(32),
        source: Some("test".into()),
        epoch: Some(3),
        other: HashMap::from([("note".to_string(), "kept".to_string())]),
        ..ModelMetadata::new(config.clone())
    };
    let path = dir.path().join("w.safetensors");
    save_weights(&path, &metadata, &tensors).unwrap();
    assert_eq!(
        load_weights(&path, &Device::Cpu).unwrap().metadata,
        metadata
    );

    // Class names that do not match the outputs are refused, naming the key.
    let mut wrong = metadata.clone();
    wrong.classes = Some(vec!["a".into()]);
    save_weights(&path, &wrong, &tensors).unwrap();
    let err = load_weights(&path, &Device::Cpu).unwrap_err();
    // The cause is kept as the error's source, not flattened into its text.
    assert!(std::error::Error::source(&err).is_some());
    let err = la_testing::error_chain(&err);
    assert!(
        err.contains("w.safetensors") && err.contains("`classes`"),
        "{err}"
    );
}

#[test]
fn forward_entry_points_agree_and_a_bad_block_is_an_error() {
    let config = tiny(Some(AttentionConfig {
        zero_init_out: false,
        ..AttentionConfig::new(AttentionKind::Softmax)
    }));
    let (vgg, _) = la_vgg::trainable(config, HashMap::new(), 2, DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let logits = vgg.forward_t(&x, false).unwrap();
    let features = vgg.forward_features(&x, false).unwrap();
    assert_eq!(
        max_abs_diff(&vgg.forward_head(&features, false).unwrap(), &logits),
        0.0
    );
    let taps = vgg.forward_intermediates(&x, &[3, 0], false).unwrap();
    assert_eq!(max_abs_diff(&taps.features, &features), 0.0);
    assert_eq!(
        taps.blocks.iter().map(|t| t.block).collect::<Vec<_>>(),
        [3, 0]
    );
    assert_eq!(taps.blocks[1].output.dims(), &[2, 4, 32, 32]);
    // Kaiming-initialised attention changes the map: input and output differ.
    assert!(max_abs_diff(&taps.blocks[1].attention_input, &taps.blocks[1].output) > 1e-3);
    let from = vgg.forward_from_block(3, &taps.blocks[0].output).unwrap();
    assert!(max_abs_diff(&from, &logits) < 1e-5);
    // Per-layer observation sees every conv unit, attention module and pool, then the head.
    let mut seen = Vec::new();
    let observed = vgg
        .forward_observed(&x, false, &mut |name, _| {
            seen.push(name.to_string());
            Ok(())
        })
        .unwrap();
    assert_eq!(max_abs_diff(&observed, &logits), 0.0);
    assert_eq!(seen.first().unwrap(), "blocks.0.convs.0");
    assert!(seen.contains(&"blocks.4.attention".to_string()));
    assert_eq!(seen.last().unwrap(), "head");
    // No panic on a block that does not exist.
    let err = vgg.forward_intermediates(&x, &[5], false).unwrap_err();
    assert!(err.to_string().contains("block 5 does not exist"), "{err}");
    assert!(vgg.forward_from_block(9, &taps.blocks[0].output).is_err());
}
