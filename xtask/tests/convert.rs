//! `cargo xtask convert`: the three PyTorch layouts, the options, the error paths, and the
//! exactness of `la_vgg::import::collapse_fc1`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, ModuleT, Tensor};
use common::*;
use la_attention::{AttentionConfig, AttentionKind};
use la_vgg::{VggConfig, WeightsFile};
use xtask::convert::{self, AttentionChoice, HeadChoice, ModelOptions};

fn convert(from: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "convert",
        "--from",
        from.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    xtask(&args, &[])
}

fn load(path: &Path) -> WeightsFile {
    la_vgg::load_weights(path, &Device::Cpu).unwrap()
}

fn logits(w: &WeightsFile, x: &Tensor) -> Tensor {
    la_vgg::Vgg::from_weights(w, DType::F32, &Device::Cpu)
        .unwrap()
        .forward_t(x, false)
        .unwrap()
}

fn golden_io(name: &str) -> HashMap<String, Tensor> {
    read_raw(&fixture(name))
}

#[test]
fn the_golden_torchvision_file_converts_with_fresh_softmax_attention() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let o = convert(
        &fixture("vgg16_tiny.safetensors"),
        &out,
        &["--attention", "softmax"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("source: torchvision layout, vgg16"), "{text}");
    assert!(
        text.contains("initialised fresh (seed 0): blocks.0.attention"),
        "{text}"
    );
    let w = load(&out);
    assert_eq!(
        w.metadata.config.attention_config().unwrap().kind,
        AttentionKind::Softmax
    );
    assert_eq!(
        w.metadata.config.attention.as_ref().unwrap().blocks,
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(w.metadata.config.num_classes, 10);
    let src: serde_json::Value =
        serde_json::from_str(w.metadata.source.as_deref().unwrap()).unwrap();
    assert_eq!(src["layout"], "torchvision");
    let bytes = std::fs::read(fixture("vgg16_tiny.safetensors")).unwrap();
    assert_eq!(w.metadata.other["source_sha256"], sha256_hex(&bytes));
    // Fresh attention is Kaiming-normal (fan in), not zero; the convs are the file's.
    let q = &w.tensors["blocks.2.attention.query.weight"];
    let std = la_testing::rms(q) as f32;
    let expected = (2.0f32 / 32.0).sqrt();
    assert!(
        (std / expected - 1.0).abs() < 0.35,
        "std {std}, Kaiming {expected}"
    );
    let raw = read_raw(&fixture("vgg16_tiny.safetensors"));
    assert_eq!(
        max_abs_diff(
            &w.tensors["blocks.1.convs.1.weight"],
            &raw["features.7.weight"]
        ),
        0.0
    );
    let io = golden_io("vgg16_tiny_io.safetensors");
    let y = logits(&w, &io["input"]);
    assert!(y
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
}

/// Class probabilities of `logits` [b, k].
fn probabilities(logits: &Tensor) -> Tensor {
    let shifted = logits
        .broadcast_sub(&logits.max_keepdim(1).unwrap())
        .unwrap()
        .exp()
        .unwrap();
    shifted
        .broadcast_div(&shifted.sum_keepdim(1).unwrap())
        .unwrap()
}

#[test]
fn attention_inserted_by_default_keeps_the_pretrained_predictions() {
    // The mission's path: take a torchvision or timm VGG16 and insert attention with the
    // defaults. The modules start as the identity, so the converted model predicts PyTorch's
    // probabilities; `--attention-init kaiming` (the article's advice) does not.
    let dir = tempfile::tempdir().unwrap();
    let io = golden_io("vgg16_tiny_io.safetensors");
    let expected = probabilities(&io["logits"]);
    let timm = dir.path().join("timm.safetensors");
    write_safetensors(
        &timm,
        &torchvision_to_timm(&read_raw(&fixture("vgg16_tiny.safetensors"))),
    );
    for (layout, source) in [
        ("torchvision", fixture("vgg16_tiny.safetensors")),
        ("timm", timm),
    ] {
        let out = dir.path().join(format!("{layout}-softmax.safetensors"));
        let o = convert(&source, &out, &[]);
        assert!(o.status.success(), "{layout}: {}", stderr(&o));
        assert!(
            stdout(&o).contains(&format!("source: {layout} layout")),
            "{}",
            stdout(&o)
        );
        let w = load(&out);
        assert_eq!(
            w.metadata.config.attention_config().unwrap().kind,
            AttentionKind::Softmax
        );
        assert_eq!(
            w.metadata.config.attention.as_ref().unwrap().blocks,
            vec![0, 1, 2, 3, 4]
        );
        let d = max_abs_diff(&probabilities(&logits(&w, &io["input"])), &expected);
        assert!(d < 1e-5, "{layout}: probabilities differ by {d}");

        let kaiming = dir.path().join(format!("{layout}-kaiming.safetensors"));
        let o = convert(&source, &kaiming, &["--attention-init", "kaiming"]);
        assert!(o.status.success(), "{layout}: {}", stderr(&o));
        let d = max_abs_diff(
            &probabilities(&logits(&load(&kaiming), &io["input"])),
            &expected,
        );
        assert!(d > 1e-3, "{layout}: Kaiming modules changed nothing ({d})");
    }
    let o = convert(
        &fixture("vgg16_tiny.safetensors"),
        &dir.path().join("x.safetensors"),
        &["--attention-init", "zero"],
    );
    assert_eq!(o.status.code(), Some(2), "a usage error");
    assert!(
        stderr(&o).contains("expected identity or kaiming"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn without_attention_the_golden_torchvision_file_gives_pytorchs_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let o = convert(
        &fixture("vgg16_tiny.safetensors"),
        &out,
        &["--attention", "none"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let w = load(&out);
    assert!(w.metadata.config.attention.is_none());
    let fresh: Vec<String> = serde_json::from_str(&w.metadata.other["fresh"]).unwrap();
    assert!(fresh.is_empty());
    let io = golden_io("vgg16_tiny_io.safetensors");
    let d = max_abs_diff(&logits(&w, &io["input"]), &io["logits"]);
    assert!(d < 1e-4, "{d}");
}

#[test]
fn the_golden_seed_file_keeps_its_attention_and_gives_pytorchs_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let o = convert(&fixture("vgg16_la_tiny.safetensors"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("every tensor comes from the source"),
        "{}",
        stdout(&o)
    );
    let w = load(&out);
    let io = golden_io("vgg16_la_tiny_io.safetensors");
    let d = max_abs_diff(&logits(&w, &io["input"]), &io["intended.logits"]);
    assert!(d < 1e-4, "{d}");

    // Another kind: the softmax modules are replaced by fresh ones of that kind.
    let out2 = dir.path().join("y.safetensors");
    let o = convert(
        &fixture("vgg16_la_tiny.safetensors"),
        &out2,
        &["--attention", "efficient"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("dropped for fresh efficient ones"),
        "{}",
        stdout(&o)
    );
    let w2 = load(&out2);
    assert_eq!(
        w2.metadata.config.attention_config().unwrap().kind,
        AttentionKind::Efficient
    );
    assert!(
        max_abs_diff(
            &w2.tensors["blocks.0.attention.value.weight"],
            &w.tensors["blocks.0.attention.value.weight"]
        ) > 0.0
    );

    // None: the modules go.
    let o = convert(
        &fixture("vgg16_la_tiny.safetensors"),
        &out2,
        &["--attention", "none"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let w3 = load(&out2);
    assert!(w3.tensors.keys().all(|k| !k.contains("attention")));
}

/// The synthetic tiny VGG16 in the three layouts, from the same tensors.
fn three_layouts(dir: &Path) -> (PathBuf, PathBuf, PathBuf, HashMap<String, Tensor>) {
    // Widths / 8: with / 16, block 0's 4 channels would have 4/8 -> 1 query channel, which
    // the article's file cannot tell from a reduction of 4.
    let timm = timm_state_dict(3, 1000, 2);
    let timm_path = dir.join("timm.safetensors");
    write_safetensors(&timm_path, &timm);
    let tv = timm_to_torchvision(&timm);
    let tv_path = dir.join("torchvision.safetensors");
    write_safetensors(&tv_path, &tv);
    // The article's layout: the same convs and classifier, attention modules in every block.
    let imported = la_vgg::import::import_state_dict(tv).unwrap();
    let config = imported
        .config
        .with_attention(Some(AttentionConfig::new(AttentionKind::Softmax)));
    let attention = random_attention(&mut Rng::new(9), &config);
    let mut ours = imported.tensors;
    ours.extend(attention.clone());
    let seed = la_vgg::export::article_layout(&config, &ours).unwrap();
    let seed_path = dir.join("seed.safetensors");
    write_safetensors(&seed_path, &seed);
    (timm_path, tv_path, seed_path, attention)
}

#[test]
fn the_three_layouts_convert_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let (timm, tv, seed, attention) = three_layouts(dir.path());
    let mut outs = Vec::new();
    for (name, path) in [("timm", &timm), ("torchvision", &tv), ("article", &seed)] {
        let out = dir.path().join(format!("out-{name}.safetensors"));
        let o = convert(path, &out, &["--seed", "3"]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(
            stdout(&o).contains(&format!("source: {name} layout, vgg16")),
            "{}",
            stdout(&o)
        );
        outs.push(load(&out));
    }
    let (a, b, c) = (&outs[0], &outs[1], &outs[2]);
    assert_eq!(a.metadata.config, b.metadata.config);
    assert_eq!(a.metadata.config, c.metadata.config);
    assert_eq!(a.metadata.config.head.hidden, vec![64, 64]);
    for (name, t) in &a.tensors {
        assert_eq!(
            max_abs_diff(t, &b.tensors[name]),
            0.0,
            "{name}: timm vs torchvision"
        );
        let from_seed = &c.tensors[name];
        if name.contains(".attention.") {
            // The article-layout file's own modules, not fresh ones.
            assert_eq!(max_abs_diff(from_seed, &attention[name]), 0.0, "{name}");
        } else {
            assert_eq!(max_abs_diff(t, from_seed), 0.0, "{name}: timm vs article");
        }
    }
    // Our own files convert too (the layout is `la-vgg`), unchanged with the same options.
    let again = dir.path().join("again.safetensors");
    let o = convert(&dir.path().join("out-article.safetensors"), &again, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("source: la-vgg layout"),
        "{}",
        stdout(&o)
    );
    let d = load(&again);
    for (name, t) in &c.tensors {
        assert_eq!(max_abs_diff(t, &d.tensors[name]), 0.0, "{name}");
    }
}

#[test]
fn classes_head_and_zero_init_options() {
    let dir = tempfile::tempdir().unwrap();
    let (timm, _, _, _) = three_layouts(dir.path());
    let raw = read_raw(&timm);

    let out = dir.path().join("c10.safetensors");
    let o = convert(&timm, &out, &["--classes", "10", "--zero-init-attention"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let w = load(&out);
    assert_eq!(w.tensors["head.logits.weight"].dims(), &[10, 64]);
    let fc2 = raw["pre_logits.fc2.weight"].reshape((64, 64)).unwrap();
    assert_eq!(
        max_abs_diff(&w.tensors["head.fc2.weight"], &fc2),
        0.0,
        "fc2 kept"
    );
    let fresh: Vec<String> = serde_json::from_str(&w.metadata.other["fresh"]).unwrap();
    assert!(fresh.contains(&"head.logits.weight".to_string()));
    assert!(!fresh.iter().any(|n| n.starts_with("head.fc")));
    let sum = |t: &Tensor| la_testing::abs_sum(t);
    assert_eq!(sum(&w.tensors["blocks.0.attention.out.weight"]), 0.0);
    assert!(sum(&w.tensors["blocks.0.attention.query.weight"]) > 0.0);
    // A zero output projection: the attention model computes exactly the pretrained network.
    let plain = dir.path().join("plain.safetensors");
    assert!(
        convert(&timm, &plain, &["--classes", "10", "--attention", "none"])
            .status
            .success()
    );
    let p = load(&plain);
    let x = Rng::new(4).tensor(&[2, 3, 32, 32], 1.0);
    assert!(max_abs_diff(&logits(&w, &x), &logits(&p, &x)) < 1e-6);

    let out = dir.path().join("cifar.safetensors");
    let o = convert(
        &timm,
        &out,
        &[
            "--head",
            "cifar",
            "--classes",
            "10",
            "--attention",
            "relu-linear",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let w = load(&out);
    assert_eq!(w.metadata.config.head, la_vgg::HeadConfig::cifar(None));
    assert_eq!(w.metadata.config.num_classes, 10);
    assert_eq!(w.tensors["head.logits.weight"].dims(), &[10, 64]);
    assert!(!w.tensors.contains_key("head.fc1.weight"));
    assert_eq!(
        w.metadata.config.attention_config().unwrap().kind,
        AttentionKind::ReluLinear
    );

    let o = convert(&timm, &out, &["--attention", "quadratic"]);
    assert_eq!(o.status.code(), Some(2), "a usage error");
    assert!(
        stderr(&o).contains("softmax, linear, efficient, relu-linear"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn default_names() {
    let config = VggConfig::vgg(16, 1000).unwrap();
    let opts = ModelOptions::default();
    let result = config
        .clone()
        .with_attention(Some(AttentionConfig::new(AttentionKind::Softmax)));
    assert_eq!(
        convert::default_file_name(&config, &opts, &result),
        "vgg16-softmax-imagenet.safetensors"
    );
    let opts = ModelOptions {
        attention: AttentionChoice(None),
        head: HeadChoice::Cifar,
        classes: Some(10),
        ..ModelOptions::default()
    };
    let bn = config.clone().with_batch_norm(true);
    assert_eq!(
        convert::default_file_name(&config, &opts, &bn),
        "vgg16_bn-none-imagenet-cifar-head-10-classes.safetensors"
    );
    assert_eq!(xtask::timm_repo(11, true), "timm/vgg11_bn.tv_in1k");
    assert_eq!(xtask::timm_repo(16, false), "timm/vgg16.tv_in1k");
}

/// A small random VGG16 (widths / 8, hidden 64) in torchvision's layout, imported.
fn small_random_vgg16(seed: u64) -> (VggConfig, HashMap<String, Tensor>) {
    let cfg: Vec<Option<usize>> = TINY_CFG.iter().map(|e| e.map(|w| w * 2)).collect();
    let mut rng = Rng::new(seed);
    let (mut t, c) = features(&mut rng, &cfg);
    let h = 64;
    t.insert(
        "classifier.0.weight".into(),
        rng.tensor(&[h, c * 49], (2.0 / (c * 49) as f64).sqrt()),
    );
    t.insert("classifier.0.bias".into(), rng.tensor(&[h], 0.1));
    t.insert(
        "classifier.3.weight".into(),
        rng.tensor(&[h, h], (2.0 / h as f64).sqrt()),
    );
    t.insert("classifier.3.bias".into(), rng.tensor(&[h], 0.1));
    t.insert(
        "classifier.6.weight".into(),
        rng.tensor(&[10, h], (2.0 / h as f64).sqrt()),
    );
    t.insert("classifier.6.bias".into(), rng.tensor(&[10], 0.1));
    let imported = la_vgg::import::import_state_dict(t).unwrap();
    (imported.config, imported.tensors)
}

#[test]
fn collapse_fc1_is_exact_for_32x32_inputs() {
    let (config, tensors) = small_random_vgg16(21);
    assert_eq!(config.blocks[0], vec![8, 8]);
    assert_eq!(
        config.head,
        la_vgg::HeadConfig {
            pool: 7,
            hidden: vec![64, 64],
            dropout: 0.5
        }
    );
    let (collapsed, ctensors) = la_vgg::import::collapse_fc1(&config, &tensors).unwrap();
    assert_eq!(
        collapsed.head,
        la_vgg::HeadConfig {
            pool: 1,
            hidden: vec![64, 64],
            dropout: 0.5
        }
    );
    assert_eq!(ctensors["head.fc1.weight"].dims(), &[64, 64]);
    // fc1 [64, 64*49] -> [64, 64, 49] summed over the 49 positions.
    let manual = tensors["head.fc1.weight"]
        .reshape((64, 64, 49))
        .unwrap()
        .sum(2)
        .unwrap();
    assert_eq!(max_abs_diff(&ctensors["head.fc1.weight"], &manual), 0.0);
    collapsed.check_tensors(&ctensors).unwrap();

    let file = |config: VggConfig, tensors| WeightsFile {
        metadata: la_vgg::ModelMetadata::new(config),
        tensors,
    };
    let before = file(config.clone(), tensors.clone());
    let after = file(collapsed, ctensors);
    let x = Rng::new(5).tensor(&[4, 3, 32, 32], 1.0);
    let (y0, y1) = (logits(&before, &x), logits(&after, &x));
    let scale = y0
        .abs()
        .unwrap()
        .max_keepdim(1)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(scale > 0.1, "logits too small to test anything: {scale}");
    let d = max_abs_diff(&y0, &y1);
    assert!(d <= 1e-5, "collapsed logits differ by {d}");

    // Not exact (and not claimed) for larger inputs: at 64x64 the last map is 2x2.
    let x = Rng::new(6).tensor(&[1, 3, 64, 64], 1.0);
    assert!(max_abs_diff(&logits(&before, &x), &logits(&after, &x)) > 1e-3);

    // Without hidden layers the logits layer is the one collapsed.
    let mut no_hidden = config.clone();
    no_hidden.head.hidden.clear();
    let mut t = tensors.clone();
    t.retain(|k, _| !k.starts_with("head."));
    t.insert(
        "head.logits.weight".into(),
        Rng::new(2).tensor(&[10, 64 * 49], 0.01),
    );
    t.insert("head.logits.bias".into(), Rng::new(3).tensor(&[10], 0.01));
    let (c2, t2) = la_vgg::import::collapse_fc1(&no_hidden, &t).unwrap();
    assert_eq!(t2["head.logits.weight"].dims(), &[10, 64]);
    assert_eq!(c2.head.pool, 1);
}

#[test]
fn collapse_fc1_refuses_heads_it_cannot_collapse() {
    let (config, tensors) = small_random_vgg16(22);
    let mut pool1 = config.clone();
    pool1.head = la_vgg::HeadConfig::cifar(Some(64));
    let err = la_vgg::import::collapse_fc1(&pool1, &tensors)
        .unwrap_err()
        .to_string();
    assert!(err.contains("pools to 1 x 1"), "{err}");
    let mut t = tensors.clone();
    t.insert(
        "head.fc1.weight".into(),
        Tensor::zeros((64, 100), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = la_vgg::import::collapse_fc1(&config, &t)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("head.fc1.weight") && err.contains("[64, 100]"),
        "{err}"
    );
    t.remove("head.fc1.weight");
    let err = la_vgg::import::collapse_fc1(&config, &t)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("head.fc1.weight") && err.contains("missing"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let o = convert(
        &fixture("vgg16_tiny.safetensors"),
        &out,
        &["--collapse-fc1", "--head", "cifar"],
    );
    let err = assert_clean_failure(&o);
    assert!(err.contains("choose one"), "{err}");
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn the_collapsed_golden_file_gives_pytorchs_logits_at_32x32() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let o = convert(
        &fixture("vgg16_tiny.safetensors"),
        &out,
        &["--collapse-fc1", "--attention", "none"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let w = load(&out);
    assert_eq!(w.metadata.config.head.pool, 1);
    assert_eq!(w.tensors["head.fc1.weight"].dims(), &[64, 64]);
    assert_eq!(w.metadata.input_size, Some(32));
    let io = golden_io("vgg16_tiny_io.safetensors");
    let d = max_abs_diff(&logits(&w, &io["input"]), &io["logits"]);
    assert!(d < 1e-4, "{d}");
}

#[test]
fn half_precision_sources_are_read_as_f32() {
    let dir = tempfile::tempdir().unwrap();
    let raw = read_raw(&fixture("vgg16_tiny.safetensors"));
    for dtype in [DType::BF16, DType::F16] {
        let half: HashMap<String, Tensor> = raw
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(dtype).unwrap()))
            .collect();
        let src = dir.path().join(format!("{dtype:?}.safetensors"));
        write_safetensors(&src, &half);
        let out = dir.path().join(format!("out-{dtype:?}.safetensors"));
        let o = convert(&src, &out, &["--attention", "none"]);
        assert!(o.status.success(), "{}", stderr(&o));
        // Stored as f32 in the file, equal to the half values widened.
        let stored = read_raw(&out);
        let t = &stored["blocks.3.convs.0.weight"];
        assert_eq!(t.dtype(), DType::F32);
        let widened = half["features.17.weight"].to_dtype(DType::F32).unwrap();
        assert_eq!(max_abs_diff(t, &widened), 0.0);
        let io = golden_io("vgg16_tiny_io.safetensors");
        let d = max_abs_diff(&logits(&load(&out), &io["input"]), &io["logits"]);
        assert!(d < 0.1, "{dtype:?}: {d}");
    }
}

/// Converting a broken copy of the golden torchvision file fails naming `tensor`, exit 1,
/// nothing written.
fn assert_rejected(broken: HashMap<String, Tensor>, tensor: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("broken.safetensors");
    write_safetensors(&src, &broken);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let o = convert(&src, &out_dir.join("x.safetensors"), &[]);
    let err = assert_clean_failure(&o);
    assert!(
        err.contains(&format!("`{tensor}`")),
        "names the tensor: {err}"
    );
    assert!(err.contains(reason), "{err}");
    assert!(err.contains("broken.safetensors"), "names the file: {err}");
    assert!(files_in(&out_dir).is_empty(), "{:?}", files_in(&out_dir));
}

#[test]
fn broken_sources_are_rejected_naming_the_tensor() {
    let golden = read_raw(&fixture("vgg16_tiny.safetensors"));

    let mut t = golden.clone();
    t.remove("features.2.bias");
    assert_rejected(t, "features.2.bias", "missing");

    let mut t = golden.clone();
    t.remove("classifier.3.weight");
    assert_rejected(t, "classifier.3.weight", "missing");

    let mut t = golden.clone();
    t.insert(
        "features.5.weight".into(),
        Tensor::zeros((16, 7, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    assert_rejected(
        t,
        "features.5.weight",
        "has shape [16, 7, 3, 3], expected [16, 8, 3, 3]",
    );

    let mut t = golden.clone();
    t.insert(
        "classifier.3.weight".into(),
        Tensor::zeros((64, 63), DType::F32, &Device::Cpu).unwrap(),
    );
    assert_rejected(
        t,
        "classifier.3.weight",
        "has shape [64, 63], expected [64, 64]",
    );

    let mut t = golden.clone();
    let mut v = t["classifier.3.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[17] = f32::NAN;
    t.insert(
        "classifier.3.weight".into(),
        Tensor::from_vec(v, (64, 64), &Device::Cpu).unwrap(),
    );
    assert_rejected(t, "classifier.3.weight", "NaN");

    let mut t = golden.clone();
    let w = t["features.0.weight"].affine(0.0, f64::INFINITY).unwrap();
    t.insert("features.0.weight".into(), w);
    assert_rejected(t, "features.0.weight", "infinite");

    let mut t = golden;
    t.insert(
        "features.99.extra".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    assert_rejected(t, "features.99.extra", "");
}

#[test]
fn unreadable_sources_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not safetensors at all").unwrap();
    let err = assert_clean_failure(&convert(&junk, &out, &[]));
    assert!(
        err.contains("junk.safetensors: not a valid safetensors file"),
        "{err}"
    );
    let missing = dir.path().join("absent.safetensors");
    let err = assert_clean_failure(&convert(&missing, &out, &[]));
    assert!(err.contains("absent.safetensors: cannot read"), "{err}");
    assert!(!out.exists());
}
