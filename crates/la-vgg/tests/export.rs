//! Export to torchvision's and timm's layouts: names and shapes that their VGGs load, a
//! lossless round trip through the importer, and clear refusals where a layout cannot hold
//! the model.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use la_attention::{AttentionConfig, AttentionKind};
use la_vgg::config::{HeadConfig, VggConfig};
use la_vgg::export::{state_dict, torchvision_builder, Layout};
use la_vgg::import::{import_state_dict, SourceLayout};

fn random_tensors(config: &VggConfig) -> HashMap<String, Tensor> {
    config
        .tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let t = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
            (name, t)
        })
        .collect()
}

#[test]
fn torchvision_and_timm_exports_round_trip_through_the_importer() {
    let config = VggConfig::vgg(11, 7).unwrap().with_batch_norm(true);
    assert_eq!(
        torchvision_builder(Layout::Timm, &config).unwrap(),
        "vgg11_bn"
    );
    let ours = random_tensors(&config);
    for (layout, source) in [
        (Layout::Torchvision, SourceLayout::Torchvision),
        (Layout::Timm, SourceLayout::Timm),
    ] {
        let exported = state_dict(layout, &config, &ours).unwrap();
        // vgg11_bn: conv 0, BN 1, ReLU 2, pool 3, conv 4 ...; the classifier at 0, 3, 6.
        assert_eq!(exported["features.4.weight"].dims(), &[128, 64, 3, 3]);
        assert!(exported.contains_key("features.1.running_var"));
        match layout {
            Layout::Timm => {
                assert_eq!(exported["pre_logits.fc1.weight"].dims(), &[4096, 512, 7, 7]);
                assert_eq!(
                    exported["pre_logits.fc2.weight"].dims(),
                    &[4096, 4096, 1, 1]
                );
                assert_eq!(exported["head.fc.weight"].dims(), &[7, 4096]);
            }
            _ => assert_eq!(exported["classifier.6.weight"].dims(), &[7, 4096]),
        }
        let imported = import_state_dict(exported).unwrap();
        assert_eq!(imported.layout, source);
        assert_eq!(imported.config.blocks, config.blocks);
        assert!(imported.config.batch_norm);
        assert_eq!(imported.config.head.hidden, config.head.hidden);
        assert_eq!(imported.config.num_classes, 7);
        for (name, t) in &ours {
            let back = imported.tensors[name].reshape(t.dims()).unwrap();
            assert_eq!(la_testing::max_abs_diff(t, &back), 0.0, "{layout}: {name}");
        }
    }
}

#[test]
fn layouts_that_cannot_hold_a_model_say_why() {
    let plain = VggConfig::vgg(16, 10).unwrap();
    let cases = [
        (
            plain
                .clone()
                .with_attention(Some(AttentionConfig::new(AttentionKind::Softmax))),
            "has no attention module",
        ),
        (
            plain.clone().with_width(0.5).unwrap(),
            "not VGG's standard ones",
        ),
        (
            plain.clone().with_head(HeadConfig::cifar(None)),
            "is not the ImageNet head",
        ),
    ];
    for (config, expected) in cases {
        for layout in [Layout::Torchvision, Layout::Timm] {
            let err = state_dict(layout, &config, &HashMap::new())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(expected) && err.contains("--format article"),
                "{err}"
            );
        }
    }
    let linear = plain.with_attention(Some(AttentionConfig::new(AttentionKind::Linear)));
    let err = state_dict(Layout::Article, &linear, &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("linear attention cannot be exported"), "{err}");
}
