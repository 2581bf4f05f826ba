//! Config table, summary figures, weights files and their error paths.

use std::collections::HashMap;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use la_attention::{AttentionConfig, AttentionKind};
use la_testing::{golden, golden_path as fixture};
use la_vgg::export::article_layout as export_article_layout;
use la_vgg::import::import_state_dict;
use la_vgg::summary::summarize;
use la_vgg::{
    load_weights, save_weights, AttentionSites, Error, HeadConfig, ModelMetadata, Normalize, Vgg,
    VggConfig,
};

fn softmax() -> Option<AttentionConfig> {
    Some(AttentionConfig::new(AttentionKind::Softmax))
}

fn params(config: &VggConfig) -> u64 {
    config
        .tensor_shapes()
        .iter()
        .filter(|(name, _)| !name.contains("running_"))
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

#[test]
fn summary_reports_the_true_cost_of_the_seed_model() {
    let vgg16 = VggConfig::vgg(16, 1000).unwrap();
    let s = summarize(&vgg16, 224);
    assert_eq!(s.params, 138_357_544);
    assert_eq!(format!("{:.2}", s.macs as f64 / 1e9), "15.47");
    assert_eq!(
        s.params,
        params(&vgg16),
        "summary and the model's tensors disagree"
    );

    let with_attention = vgg16.clone().with_attention(softmax());
    let s = summarize(&with_attention, 224);
    assert_eq!(s.params, 139_734_040); // not the article's 139.2 M
    assert_eq!(s.params - 138_357_544, 1_376_496);
    assert_eq!(format!("{:.2}", s.macs as f64 / 1e9), "224.57"); // not the article's 16.1
    assert_eq!(
        format!("{:.1}", s.attention_quadratic_macs as f64 / 1e9),
        "207.1"
    );
    let block1 = s
        .rows
        .iter()
        .find(|r| r.name == "blocks.0.attention")
        .unwrap();
    assert_eq!(block1.output, vec![64, 224, 224]);
    assert!(block1.layer.contains("N=50176"));
    assert_eq!(params(&with_attention), s.params);

    // CIFAR-100 at 32x32 with the ImageNet head (the article's set-up).
    let cifar = VggConfig::vgg(16, 100).unwrap();
    let s = summarize(&cifar, 32);
    assert_eq!(s.params, 134_670_244);
    assert_eq!(format!("{:.3}", s.macs as f64 / 1e9), "0.433");
    let s = summarize(&cifar.with_attention(softmax()), 32);
    assert_eq!(s.params, 136_046_740);
    assert_eq!(format!("{:.3}", s.macs as f64 / 1e9), "0.560");
}

#[test]
fn linear_kinds_cost_linear_time() {
    let base = VggConfig::vgg(16, 1000).unwrap();
    let plain = summarize(&base, 224).macs;
    for kind in [
        AttentionKind::Linear,
        AttentionKind::Efficient,
        AttentionKind::ReluLinear,
        AttentionKind::Performer,
        AttentionKind::Linformer,
    ] {
        let s = summarize(
            &base
                .clone()
                .with_attention(Some(AttentionConfig::new(kind)))
                .with_input_size(224),
            224,
        );
        assert_eq!(s.attention_quadratic_macs, 0);
        let extra = (s.macs - plain) as f64 / plain as f64;
        assert!(extra < 0.2, "{kind}: {:.1} % more MACs", extra * 100.0);
        assert!(s.to_string().contains(&format!("{kind} attention")));
    }
}

#[test]
fn standard_depths_have_torchvisions_parameter_counts() {
    for (depth, bn, want) in [
        (11, false, 132_863_336u64),
        (13, false, 133_047_848),
        (16, false, 138_357_544),
        (19, false, 143_667_240),
        (11, true, 132_868_840),
        (16, true, 138_365_992),
        (19, true, 143_678_248),
    ] {
        let config = VggConfig::vgg(depth, 1000).unwrap().with_batch_norm(bn);
        assert_eq!(summarize(&config, 224).params, want, "vgg{depth} bn={bn}");
        assert_eq!(params(&config), want);
        assert_eq!(
            config.arch_name(),
            if bn {
                format!("vgg{depth}_bn")
            } else {
                format!("vgg{depth}")
            }
        );
    }
    assert!(matches!(VggConfig::vgg(17, 10), Err(Error::Config(_))));
}

fn small_config(bn: bool, kind: Option<AttentionKind>) -> VggConfig {
    VggConfig::vgg(11, 7)
        .unwrap()
        .with_batch_norm(bn)
        .with_attention(kind.map(AttentionConfig::new))
        .with_head(HeadConfig::cifar(Some(32)))
        .with_width(0.125)
        .unwrap()
        .with_input_size(32)
}

#[test]
fn every_kind_and_batch_norm_build_train_and_evaluate() {
    let dev = Device::Cpu;
    for bn in [false, true] {
        let kinds = AttentionKind::ALL.map(Some);
        for kind in std::iter::once(None).chain(kinds) {
            let config = small_config(bn, kind);
            let varmap = VarMap::new();
            let vgg = Vgg::new(
                config.clone(),
                VarBuilder::from_varmap(&varmap, DType::F32, &dev),
            )
            .unwrap();
            let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
            let mut names_sorted = names.clone();
            names_sorted.sort();
            let mut want: Vec<String> =
                config.tensor_shapes().into_iter().map(|(n, _)| n).collect();
            want.sort();
            assert_eq!(names_sorted, want, "bn={bn} {kind:?}");

            let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &dev).unwrap();
            let train = vgg.forward_t(&x, true).unwrap();
            assert_eq!(train.dims(), &[4, 7]);
            let grads = train.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let first = varmap.data().lock().unwrap()["blocks.0.convs.0.weight"].clone();
            assert!(
                grads.get(first.as_tensor()).is_some(),
                "no gradient reaches the first conv"
            );
            let eval = vgg.forward_t(&x, false).unwrap();
            assert_eq!(eval.dims(), &[4, 7]);
            if bn {
                // Training mode updated the running statistics held in the VarMap.
                let mean = varmap.data().lock().unwrap()["blocks.0.norms.0.running_mean"]
                    .as_tensor()
                    .clone();
                let moved = la_testing::abs_sum(&mean);
                assert!(moved > 0.0, "running mean did not move");
            }
        }
    }
}

#[test]
fn batch_norm_models_round_trip_through_the_torchvision_layout() {
    let dev = Device::Cpu;
    let config = small_config(true, Some(AttentionKind::Softmax));
    let varmap = VarMap::new();
    let vgg = Vgg::new(
        config.clone(),
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
    vgg.forward_t(&x, true).unwrap(); // move the running stats away from 0 / 1
    let ours = la_testing::varmap_tensors(&varmap);
    let exported = export_article_layout(&config, &ours).unwrap();
    assert!(
        exported.contains_key("features.1.running_var"),
        "BN sits after the first conv"
    );
    let imported = import_state_dict(exported).unwrap();
    assert_eq!(imported.config.blocks, config.blocks);
    assert!(imported.config.batch_norm);
    assert_eq!(imported.config.attention, config.attention);
    for (name, t) in &ours {
        let diff = la_testing::max_abs_diff(t, &imported.tensors[name]);
        assert_eq!(diff, 0.0, "{name}");
    }
}

#[test]
fn only_softmax_attention_exports_to_the_seed_layout() {
    let config = small_config(false, Some(AttentionKind::Linear));
    let err = export_article_layout(&config, &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("linear attention cannot be exported"), "{err}");
}

fn import_error(mut edit: impl FnMut(&mut HashMap<String, Tensor>)) -> String {
    let mut t = golden("vgg16_la_tiny.safetensors");
    edit(&mut t);
    import_state_dict(t).unwrap_err().to_string()
}

#[test]
fn import_errors_name_the_tensor_and_the_problem() {
    let err = import_error(|t| {
        t.remove("features.14.bias");
    });
    assert!(
        err.contains("features.14.bias") && err.contains("missing"),
        "{err}"
    );

    let err = import_error(|t| {
        t.insert(
            "features.12.weight".into(),
            Tensor::zeros((32, 16, 5, 5), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(
        err.contains("features.12.weight")
            && err.contains("[32, 16, 5, 5]")
            && err.contains("[32, 16, 3, 3]"),
        "{err}"
    );

    let err = import_error(|t| {
        let w = t["features.10.linear_key.weight"].clone();
        let nan = (w.zeros_like().unwrap() / 0.0).unwrap();
        t.insert("features.10.linear_key.weight".into(), nan);
    });
    assert!(
        err.contains("features.10.linear_key.weight") && err.contains("NaN"),
        "{err}"
    );

    let err = import_error(|t| {
        t.insert(
            "features.40.something".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(
        err.contains("features.40.something") && err.contains("does not fit"),
        "{err}"
    );

    let err = import_error(|t| {
        t.insert(
            "classifier.0.weight".into(),
            Tensor::zeros((64, 3000), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(
        err.contains("classifier.0.weight") && err.contains("3000 inputs"),
        "{err}"
    );

    let mut other = HashMap::new();
    other.insert(
        "encoder.layer.0.weight".to_string(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = import_state_dict(other).unwrap_err().to_string();
    assert!(
        err.contains("encoder.layer.0.weight") && err.contains("fits no known layout"),
        "{err}"
    );
}

#[test]
fn weights_files_carry_their_config_and_bad_files_are_named() {
    let tmp = la_testing::tempdir("vgg-model");
    let dir = tmp.path().to_path_buf();
    let imported = import_state_dict(golden("vgg16_la_tiny.safetensors")).unwrap();
    let path = dir.join("tiny.safetensors");
    let metadata = ModelMetadata {
        normalization: Some(Normalize::IMAGENET),
        source: Some("golden".into()),
        ..ModelMetadata::new(imported.config.clone())
    };
    save_weights(&path, &metadata, &imported.tensors).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");

    let loaded = load_weights(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.metadata.config, imported.config);
    assert_eq!(loaded.metadata.normalization, Some(Normalize::IMAGENET));
    assert_eq!(loaded.metadata.source.as_deref().unwrap(), "golden");
    let vgg = Vgg::from_weights(&loaded, DType::F32, &Device::Cpu).unwrap();
    let io = golden("vgg16_la_tiny_io.safetensors");
    let logits = vgg.forward_t(&io["input"], false).unwrap();
    let diff = (logits - &io["intended.logits"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4);

    // A PyTorch file loads too, converted on the way in.
    let torch = load_weights(&fixture("vgg16_tiny.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(torch.metadata.config.arch_name(), "vgg16");
    assert!(torch.metadata.normalization.is_none());

    // Truncated: the error names the file.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_weights(&cut, &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("cut.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );

    // Missing file.
    let err = load_weights(&dir.join("nope.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope.safetensors") && err.contains("cannot read"),
        "{err}"
    );

    // Config and tensors that disagree.
    let mut config = imported.config.clone();
    config.num_classes = 11;
    let err = save_weights(
        &dir.join("bad.safetensors"),
        &ModelMetadata::new(config),
        &imported.tensors,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("head.logits") && err.contains("[11]"), "{err}");

    // An unwritable destination keeps the old file intact and names the path.
    let err = save_weights(
        &dir.join("no/such/dir/w.safetensors"),
        &ModelMetadata::new(imported.config.clone()),
        &imported.tensors,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("no/such/dir/w.safetensors") && err.contains("cannot write"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inputs_too_small_or_with_wrong_channels_are_rejected() {
    let config = small_config(false, None);
    let vgg = Vgg::new(config, VarBuilder::zeros(DType::F32, &Device::Cpu)).unwrap();
    let ok = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(vgg.check_input(&ok).is_ok());
    let small = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(vgg
        .check_input(&small)
        .unwrap_err()
        .to_string()
        .contains("h, w >= 32"));
    let grey = Tensor::zeros((1, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(vgg.check_input(&grey).is_err());
}

#[test]
fn trainable_models_are_seeded_and_take_pretrained_tensors() {
    let dev = Device::Cpu;
    let config = small_config(false, Some(AttentionKind::Softmax)).with_head(HeadConfig {
        pool: 1,
        hidden: vec![16],
        dropout: 0.5,
    });
    let values = |varmap: &VarMap, name: &str| -> Vec<f32> {
        varmap.data().lock().unwrap()[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (_, a) = la_vgg::trainable(config.clone(), HashMap::new(), 7, DType::F32, &dev).unwrap();
    let (_, b) = la_vgg::trainable(config.clone(), HashMap::new(), 7, DType::F32, &dev).unwrap();
    let (_, c) = la_vgg::trainable(config.clone(), HashMap::new(), 8, DType::F32, &dev).unwrap();
    for name in [
        "blocks.0.convs.0.weight",
        "blocks.2.attention.query.weight",
        "head.fc1.weight",
    ] {
        assert_eq!(
            values(&a, name),
            values(&b, name),
            "{name}: same seed, other values"
        );
        assert_ne!(
            values(&a, name),
            values(&c, name),
            "{name}: other seed, same values"
        );
    }
    // Kaiming fan-out for convs: std = sqrt(2 / (out * 9)).
    let w = values(&a, "blocks.3.convs.0.weight");
    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    let want = (2.0f32 / (64.0 * 9.0)).sqrt();
    assert!(
        (std / want - 1.0).abs() < 0.1,
        "conv std {std}, want {want}"
    );

    // Pretrained tensors become the variables' starting values.
    let mut initial = HashMap::new();
    initial.insert(
        "head.logits.bias".to_string(),
        Tensor::ones(7, DType::F32, &dev).unwrap(),
    );
    let (_, d) = la_vgg::trainable(config.clone(), initial.clone(), 7, DType::F32, &dev).unwrap();
    assert_eq!(values(&d, "head.logits.bias"), vec![1.0; 7]);
    // A tensor the model does not have is an error, not silently ignored.
    initial.insert(
        "head.fc9.weight".to_string(),
        Tensor::ones(7, DType::F32, &dev).unwrap(),
    );
    let err = match la_vgg::trainable(config.clone(), initial, 7, DType::F32, &dev) {
        Ok(_) => panic!("an unknown tensor was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("head.fc9.weight"), "{err}");

    // Dropout masks follow the dropout seed.
    let (vgg, _) = la_vgg::trainable(config, HashMap::new(), 7, DType::F32, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
    let run = |seed: u64| {
        vgg.set_dropout_seed(seed);
        vgg.forward_t(&x, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
    let eval: Vec<f32> = vgg
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(eval, run(1));
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    // f64, every layer kind: BatchNorm in training mode, softmax attention, both pools, the head.
    let dev = Device::Cpu;
    let config = VggConfig {
        blocks: vec![vec![3], vec![4], vec![4]],
        batch_norm: true,
        attention: Some(AttentionSites {
            config: AttentionConfig::new(AttentionKind::Softmax),
            blocks: vec![0, 2],
            input_size: None,
        }),
        head: HeadConfig {
            pool: 2,
            hidden: vec![5],
            dropout: 0.0,
        },
        num_classes: 3,
        in_channels: 3,
    };
    let (vgg, varmap) = la_vgg::trainable(config, HashMap::new(), 1, DType::F64, &dev).unwrap();
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 16, 16), &dev).unwrap())
        .unwrap();
    let probe = Tensor::randn(0f64, 1.0, (2, 3), &dev).unwrap();
    let loss = |x: &Tensor| {
        (vgg.forward_t(x, true).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(x.as_tensor()).backward().unwrap();
    let mut targets: Vec<(String, candle_core::Var)> = vec![("input".into(), x.clone())];
    for name in [
        "blocks.0.convs.0.weight",
        "blocks.0.norms.0.weight",
        "blocks.0.attention.query.weight",
        "blocks.2.attention.out.bias",
        "head.fc1.weight",
    ] {
        targets.push((name.into(), varmap.data().lock().unwrap()[name].clone()));
    }
    for (name, var) in targets {
        let analytic = la_testing::values(grads.get(var.as_tensor()).unwrap());
        let base = la_testing::values(var.as_tensor());
        let shape = var.as_tensor().shape().clone();
        for idx in (0..base.len()).step_by((base.len() / 6).max(1)) {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, shape.clone(), &dev).unwrap())
                    .unwrap();
                let l = loss(x.as_tensor()).to_scalar::<f64>().unwrap();
                var.set(&Tensor::from_vec(base.clone(), shape.clone(), &dev).unwrap())
                    .unwrap();
                l
            };
            let numeric = (eval(1e-6) - eval(-1e-6)) / 2e-6;
            assert!(
                (numeric - analytic[idx]).abs() < 1e-5 * (1.0 + numeric.abs()),
                "d loss / d {name}[{idx}]: autograd {} vs finite differences {numeric}",
                analytic[idx]
            );
        }
    }
}

#[test]
fn the_reduction_is_inferred_from_all_modules_together() {
    // Widths / 16: block 1 has 4 channels (1-wide queries, any reduction >= 3 fits), the
    // others pin it to 8.
    let dev = Device::Cpu;
    let config = VggConfig::vgg(16, 10)
        .unwrap()
        .with_attention(softmax())
        .with_head(HeadConfig::cifar(None))
        .with_width(1.0 / 16.0)
        .unwrap();
    assert_eq!(config.blocks[0], vec![4, 4]);
    let (_, varmap) =
        la_vgg::trainable(config.clone(), HashMap::new(), 0, DType::F32, &dev).unwrap();
    let ours: HashMap<String, Tensor> = la_testing::var_tensors(&varmap);
    let imported = import_state_dict(export_article_layout(&config, &ours).unwrap()).unwrap();
    assert_eq!(imported.config.attention_config().unwrap().reduction, 8);
    assert_eq!(imported.config, config);
}
