//! `cargo xtask fetch-weights` against a local stand-in for the Hub (HF_ENDPOINT), with the
//! real download code: hf-hub's requests, the cache under HF_HOME, the conversion.

mod common;

use std::path::Path;

use candle_core::{DType, Device, ModuleT, Tensor};
use common::*;

const REPO: &str = "timm/vgg16.tv_in1k";

fn served_vgg16() -> (Served, std::collections::HashMap<String, Tensor>) {
    let tensors = timm_state_dict(7, 1000, 1);
    (
        Served::new(REPO, "model.safetensors", safetensors_bytes(&tensors)),
        tensors,
    )
}

fn fetch(
    out: &Path,
    home: &Path,
    endpoint: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let home = home.to_str().unwrap();
    let mut envs = vec![("HF_HOME", home), ("HF_ENDPOINT", endpoint)];
    envs.extend_from_slice(env);
    let mut args = vec!["fetch-weights", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    xtask(&args, &envs)
}

fn resolve_path(repo: &str) -> String {
    format!("/{repo}/resolve/main/model.safetensors")
}

#[test]
fn downloads_converts_and_then_reuses_the_cache_with_the_server_stopped() {
    let (served, source) = served_vgg16();
    let mut server = HubServer::start(vec![served.clone()], Mode::Redirect);
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("vgg16-softmax-imagenet.safetensors");

    let o = fetch(
        &out,
        home.path(),
        &server.endpoint(),
        &[],
        &[("HF_TOKEN", "hf_test_token")],
    );
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("downloading"), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("source: timm layout, vgg16"), "{text}");
    assert!(text.contains("softmax attention in 5 blocks"), "{text}");

    // The requests hf-hub makes: a 1-byte range probe on /resolve/ (302 to the CDN, then the
    // CDN for Content-Range), then the download, following the redirect.
    let seen = server.requests();
    let resolve: Vec<_> = seen
        .iter()
        .filter(|r| r.path == resolve_path(REPO))
        .collect();
    assert!(!resolve.is_empty(), "{seen:?}");
    assert!(seen.iter().all(|r| r.method == "GET"), "{seen:?}");
    assert_eq!(
        resolve[0].headers.get("range").map(String::as_str),
        Some("bytes=0-0")
    );
    assert_eq!(
        resolve[0].headers.get("authorization").map(String::as_str),
        Some("Bearer hf_test_token"),
        "HF_TOKEN is sent"
    );
    assert!(seen.iter().any(|r| r.path.starts_with("/cdn/")
        && r.headers.get("range").map(String::as_str) == Some("bytes=0-")));

    // The standard cache layout under $HF_HOME/hub.
    let repo_dir = home.path().join("hub/models--timm--vgg16.tv_in1k");
    let commit = std::fs::read_to_string(repo_dir.join("refs/main")).unwrap();
    assert_eq!(commit, served.commit);
    let cached = repo_dir
        .join("snapshots")
        .join(&commit)
        .join("model.safetensors");
    assert_eq!(std::fs::read(&cached).unwrap(), *served.data);
    assert!(repo_dir.join("blobs").join(&served.sha256).exists());

    // The weights file: ours, complete, with its provenance, loadable as la-cli loads it.
    let w = la_vgg::load_weights(&out, &Device::Cpu).unwrap();
    assert_eq!(w.metadata.config.arch_name(), "vgg16");
    assert_eq!(w.metadata.config.num_classes, 1000);
    assert_eq!(
        w.metadata.config.attention.as_ref().unwrap().blocks,
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(w.metadata.normalization, Some(la_vgg::Normalize::IMAGENET));
    assert_eq!(w.metadata.other["source_sha256"], served.sha256);
    let src: serde_json::Value =
        serde_json::from_str(w.metadata.source.as_deref().unwrap()).unwrap();
    assert_eq!(src["repo"], REPO);
    assert_eq!(src["revision"], "main");
    assert_eq!(src["commit"], served.commit.as_str());
    assert_eq!(src["layout"], "timm");
    let fresh: Vec<String> = serde_json::from_str(&w.metadata.other["fresh"]).unwrap();
    assert_eq!(fresh.len(), 5 * 8, "{fresh:?}");
    assert!(fresh.iter().all(|n| n.contains(".attention.")), "{fresh:?}");
    assert_eq!(
        max_abs_diff(
            &w.tensors["blocks.4.convs.2.weight"],
            &source["features.28.weight"]
        ),
        0.0
    );
    let fc1 = source["pre_logits.fc1.weight"]
        .reshape((64, 32 * 49))
        .unwrap();
    assert_eq!(max_abs_diff(&w.tensors["head.fc1.weight"], &fc1), 0.0);
    assert_eq!(
        max_abs_diff(&w.tensors["head.logits.bias"], &source["head.fc.bias"]),
        0.0
    );
    let model = la_vgg::Vgg::from_weights(&w, DType::F32, &Device::Cpu).unwrap();
    let x = Rng::new(1).tensor(&[1, 3, 32, 32], 1.0);
    let logits = model.forward_t(&x, false).unwrap();
    assert_eq!(logits.dims(), &[1, 1000]);
    let v = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));

    // Second run with the server gone: the cache alone, no request, the same file.
    let requests_before = server.requests().len();
    server.stop();
    let out2 = out_dir.path().join("again.safetensors");
    let o = fetch(&out2, home.path(), &server.endpoint(), &[], &[]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("using the cached"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("downloading"), "{}", stderr(&o));
    assert_eq!(server.requests().len(), requests_before);
    // Same source and seed: the same tensors and metadata (the header's key order may differ).
    let again = la_vgg::load_weights(&out2, &Device::Cpu).unwrap();
    assert_eq!(again.metadata, w.metadata);
    assert_eq!(again.tensors.len(), w.tensors.len());
    for (name, t) in &w.tensors {
        assert_eq!(max_abs_diff(t, &again.tensors[name]), 0.0, "{name}");
    }
}

#[test]
fn direct_answers_bn_arch_and_options() {
    // A mirror that serves the bytes from /resolve/ itself (no CDN redirect), VGG11 with BN.
    let mut rng = Rng::new(11);
    let cfg = [
        Some(4),
        None,
        Some(8),
        None,
        Some(16),
        Some(16),
        None,
        Some(32),
        Some(32),
        None,
        Some(32),
        Some(32),
        None,
    ];
    let (feats, c) = features(&mut rng, &cfg);
    let mut t = std::collections::HashMap::new();
    // torchvision's vgg11_bn: conv, BN, ReLU per conv.
    let mut idx_map = Vec::new();
    let mut idx = 0;
    for e in cfg {
        match e {
            Some(_) => {
                idx_map.push(idx);
                idx += 3;
            }
            None => idx += 1,
        }
    }
    let mut k = 0;
    let mut old = 0;
    for e in cfg {
        match e {
            Some(w) => {
                let new = idx_map[k];
                t.insert(
                    format!("features.{new}.weight"),
                    feats[&format!("features.{old}.weight")].clone(),
                );
                t.insert(
                    format!("features.{new}.bias"),
                    feats[&format!("features.{old}.bias")].clone(),
                );
                t.insert(
                    format!("features.{}.weight", new + 1),
                    rng.tensor(&[w], 0.1).affine(1.0, 1.0).unwrap(),
                );
                t.insert(format!("features.{}.bias", new + 1), rng.tensor(&[w], 0.1));
                t.insert(
                    format!("features.{}.running_mean", new + 1),
                    rng.tensor(&[w], 0.1),
                );
                t.insert(
                    format!("features.{}.running_var", new + 1),
                    rng.tensor(&[w], 0.1)
                        .abs()
                        .unwrap()
                        .affine(1.0, 0.5)
                        .unwrap(),
                );
                t.insert(
                    format!("features.{}.num_batches_tracked", new + 1),
                    Tensor::new(&[3i64], &Device::Cpu)
                        .unwrap()
                        .squeeze(0)
                        .unwrap(),
                );
                k += 1;
                old += 2;
            }
            None => old += 1,
        }
    }
    t.insert(
        "pre_logits.fc1.weight".into(),
        rng.tensor(&[16, c, 7, 7], 0.05),
    );
    t.insert("pre_logits.fc1.bias".into(), rng.tensor(&[16], 0.05));
    t.insert(
        "pre_logits.fc2.weight".into(),
        rng.tensor(&[16, 16, 1, 1], 0.3),
    );
    t.insert("pre_logits.fc2.bias".into(), rng.tensor(&[16], 0.05));
    t.insert("head.fc.weight".into(), rng.tensor(&[1000, 16], 0.3));
    t.insert("head.fc.bias".into(), rng.tensor(&[1000], 0.05));
    let served = Served::new(
        "timm/vgg11_bn.tv_in1k",
        "model.safetensors",
        safetensors_bytes(&t),
    );
    let server = HubServer::start(vec![served.clone()], Mode::Direct);
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("w.safetensors");
    let o = fetch(
        &out,
        home.path(),
        &format!("{}/", server.endpoint()), // a trailing slash, as people write it
        &[
            "--arch",
            "vgg11",
            "--bn",
            "--attention",
            "linear",
            "--zero-init-attention",
            "--classes",
            "10",
            "--seed",
            "5",
        ],
        &[],
    );
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let seen = server.requests();
    assert!(
        seen.iter()
            .all(|r| r.path == resolve_path("timm/vgg11_bn.tv_in1k")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|r| !r.headers.contains_key("authorization")),
        "no token, no header"
    );
    let w = la_vgg::load_weights(&out, &Device::Cpu).unwrap();
    assert_eq!(w.metadata.config.arch_name(), "vgg11_bn");
    assert_eq!(w.metadata.config.num_classes, 10);
    assert_eq!(w.metadata.other["seed"], "5");
    let a = w.metadata.config.attention_config().unwrap();
    assert_eq!(a.kind, la_attention::AttentionKind::Linear);
    assert!(a.zero_init_out);
    let out_w = &w.tensors["blocks.3.attention.out.weight"];
    assert_eq!(la_testing::abs_sum(out_w), 0.0);
    assert_eq!(
        max_abs_diff(
            &w.tensors["blocks.2.norms.1.running_var"],
            &t["features.12.running_var"]
        ),
        0.0
    );
    assert_eq!(
        max_abs_diff(
            &w.tensors["head.fc2.weight"],
            &t["pre_logits.fc2.weight"].reshape((16, 16)).unwrap()
        ),
        0.0
    );
    assert_eq!(w.tensors["head.logits.weight"].dims(), &[10, 16]);
}

#[test]
fn a_wrong_repo_id_is_a_short_404_error_and_writes_nothing() {
    let (served, _) = served_vgg16();
    let server = HubServer::start(vec![served], Mode::Redirect);
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("w.safetensors");
    // The server has only VGG16: timm/vgg19.tv_in1k is not there.
    let o = fetch(
        &out,
        home.path(),
        &server.endpoint(),
        &["--arch", "vgg19"],
        &[],
    );
    let err = assert_clean_failure(&o);
    assert!(
        err.contains("repository `timm/vgg19.tv_in1k` not found"),
        "{err}"
    );
    assert!(err.contains("HTTP 404"), "{err}");
    assert!(err.contains("cargo xtask convert --from FILE"), "{err}");
    assert!(err.contains("HF_ENDPOINT"), "{err}");
    assert!(
        files_in(out_dir.path()).is_empty(),
        "{:?}",
        files_in(out_dir.path())
    );
    assert!(!home
        .path()
        .join("hub/models--timm--vgg19.tv_in1k/snapshots")
        .exists());

    let o = fetch(
        &out,
        home.path(),
        &server.endpoint(),
        &["--repo", "someone/not-a-repo"],
        &[],
    );
    let err = assert_clean_failure(&o);
    assert!(err.contains("`someone/not-a-repo` not found"), "{err}");
}

#[test]
fn a_missing_file_or_revision_is_named() {
    let (served, _) = served_vgg16();
    let other = Served::new("timm/vgg13.tv_in1k", "pytorch_model.bin", vec![1, 2, 3]);
    let server = HubServer::start(vec![served, other], Mode::Redirect);
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("w.safetensors");
    let o = fetch(
        &out,
        home.path(),
        &server.endpoint(),
        &["--arch", "vgg13"],
        &[],
    );
    let err = assert_clean_failure(&o);
    assert!(
        err.contains("file `model.safetensors` not found in timm/vgg13.tv_in1k"),
        "{err}"
    );
    let o = fetch(
        &out,
        home.path(),
        &server.endpoint(),
        &["--revision", "v9"],
        &[],
    );
    let err = assert_clean_failure(&o);
    assert!(err.contains("revision `v9` not found"), "{err}");
    assert!(files_in(out_dir.path()).is_empty());
}

#[test]
fn offline_is_a_connection_error_with_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("w.safetensors");
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let o = fetch(&out, home.path(), &endpoint, &[], &[]);
    let err = assert_clean_failure(&o);
    assert!(
        err.contains(&format!("cannot connect to {endpoint}")),
        "{err}"
    );
    assert!(err.contains("cargo xtask convert --from FILE"), "{err}");
    assert!(
        err.contains("timm/vgg16.tv_in1k/resolve/main/model.safetensors"),
        "{err}"
    );
    assert!(files_in(out_dir.path()).is_empty());

    // HF_HUB_OFFLINE: not even a connection attempt, and a message that says so.
    let o = fetch(
        &out,
        home.path(),
        &endpoint,
        &[],
        &[("HF_HUB_OFFLINE", "1")],
    );
    let err = assert_clean_failure(&o);
    assert!(err.contains("HF_HUB_OFFLINE is set"), "{err}");
}

#[test]
fn a_truncated_download_fails_cleanly_then_resumes() {
    let (served, _) = served_vgg16();
    let server = HubServer::start(vec![served.clone()], Mode::Truncate);
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("w.safetensors");
    let o = fetch(&out, home.path(), &server.endpoint(), &[], &[]);
    let err = assert_clean_failure(&o);
    assert!(err.contains("cut short"), "{err}");
    assert!(err.contains("run the command again to resume"), "{err}");
    assert!(files_in(out_dir.path()).is_empty());
    let repo_dir = home.path().join("hub/models--timm--vgg16.tv_in1k");
    assert!(
        !repo_dir.join("snapshots").exists(),
        "nothing half-written is published"
    );

    // The server recovers: the next run asks only for the rest and ends with a good file.
    server.set_mode(Mode::Redirect);
    let before = server.requests().len();
    let o = fetch(&out, home.path(), &server.endpoint(), &[], &[]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let half = served.data.len() / 2;
    let resumed = server.requests()[before..]
        .iter()
        .any(|r| r.headers.get("range") == Some(&format!("bytes={half}-")));
    assert!(resumed, "{:?}", server.requests());
    let w = la_vgg::load_weights(&out, &Device::Cpu).unwrap();
    assert_eq!(w.metadata.other["source_sha256"], served.sha256);
}

#[test]
fn a_download_that_does_not_match_the_hubs_sha256_is_not_kept() {
    let (served, _) = served_vgg16();
    let server = HubServer::start(vec![served], Mode::WrongEtag);
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("w.safetensors");
    let o = fetch(&out, home.path(), &server.endpoint(), &[], &[]);
    let err = assert_clean_failure(&o);
    assert!(err.contains("corrupt or truncated"), "{err}");
    assert!(files_in(out_dir.path()).is_empty());
    let snapshot = home
        .path()
        .join("hub/models--timm--vgg16.tv_in1k/snapshots");
    let left: Vec<_> = walk(&snapshot);
    assert!(left.is_empty(), "removed from the cache: {left:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn hf_hub_cache_token_path_and_commit_revisions_are_honoured() {
    let (served, _) = served_vgg16();
    let mut server = HubServer::start(vec![served.clone()], Mode::Redirect);
    let home = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let token_file = home.path().join("my-token");
    std::fs::write(&token_file, "hf_from_file\n").unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("w.safetensors");
    let envs = [
        ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
        ("HF_TOKEN_PATH", token_file.to_str().unwrap()),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ];
    let o = fetch(&out, home.path(), &server.endpoint(), &[], &envs);
    assert!(o.status.success(), "{}", stderr(&o));
    let seen = server.requests();
    assert_eq!(
        seen[0].headers.get("authorization").map(String::as_str),
        Some("Bearer hf_from_file")
    );
    let snapshot = cache
        .path()
        .join("models--timm--vgg16.tv_in1k/snapshots")
        .join(&served.commit)
        .join("model.safetensors");
    assert!(snapshot.exists(), "the download lands in HF_HUB_CACHE");
    assert!(!home.path().join("hub").exists());

    // Asking for the commit itself: its snapshot is used, with the server gone.
    server.stop();
    let o = fetch(
        &out,
        home.path(),
        &server.endpoint(),
        &["--revision", &served.commit],
        &envs,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("using the cached"), "{}", stderr(&o));
    let w = la_vgg::load_weights(&out, &Device::Cpu).unwrap();
    let src: serde_json::Value =
        serde_json::from_str(w.metadata.source.as_deref().unwrap()).unwrap();
    assert_eq!(src["revision"], served.commit.as_str());
    assert_eq!(src["commit"], served.commit.as_str());
}
