//! End-to-end: run the built `la-cli` binary as a user would and check what it prints.

mod support;

use la_testing::fixture;
use std::path::PathBuf;
use std::process::Command;
use support::{la_cli, stderr, stdout, train_tiny_digits};

#[test]
fn summary_prints_the_true_cost_of_vgg16_with_softmax_attention() {
    let out = la_cli(&[
        "summary",
        "--arch",
        "vgg16",
        "--attention",
        "softmax",
        "--size",
        "224",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("total parameters: 139,734,040"), "{text}");
    assert!(text.contains("(224.57 GMAC)"), "{text}");
    assert!(text.contains("blocks.0.attention"), "{text}");
    assert!(text.contains("N=50176"), "{text}");

    let out = la_cli(&["summary", "--attention", "none"]);
    let text = stdout(&out);
    assert!(text.contains("total parameters: 138,357,544"), "{text}");
    assert!(text.contains("(15.47 GMAC)"), "{text}");
}

#[test]
fn summary_reads_the_architecture_from_a_weights_file() {
    let weights = fixture("golden/vgg16_la_tiny.safetensors");
    let out = la_cli(&[
        "summary",
        "--weights",
        weights.to_str().unwrap(),
        "--size",
        "32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("vgg16 with softmax attention"), "{text}");
    assert!(text.contains("total parameters: 458,016"), "{text}"); // as the golden README says
}

#[test]
fn bad_flags_and_files_give_one_line_errors_and_exit_codes() {
    let out = la_cli(&["summary", "--attention", "quadratic"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid value 'quadratic'"),
        "{}",
        stderr(&out)
    );

    let out = la_cli(&["summary", "--weights", "/nonexistent/w.safetensors"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("/nonexistent/w.safetensors") && err.contains("cannot read"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = la_cli(&["summary", "--size", "16"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("too small"), "{}", stderr(&out));
}

/// A digit from the embedded data set as an 8x8 grey PNG (the way a user would feed one).
fn digit_png(dir: &std::path::Path) -> PathBuf {
    let digits = la_data::digits().unwrap();
    let sample = la_data::Dataset::get(&digits, 0).unwrap();
    let img = image::RgbImage::from_raw(
        sample.image.width as u32,
        sample.image.height as u32,
        sample.image.data,
    )
    .unwrap();
    let path = dir.join(format!("digit-{}.png", sample.label));
    img.save(&path).unwrap();
    path
}

#[test]
fn train_eval_predict_explain_and_resume_on_digits() {
    let tmp = la_testing::tempdir("cli-digits");
    let dir = tmp.path().to_path_buf();
    let runs = dir.join("runs");
    let out = train_tiny_digits(&runs);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = runs.join("tiny");
    assert!(
        stdout(&out).contains(run.to_str().unwrap()),
        "train must say where the run is: {}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("epoch 1: train loss"),
        "{}",
        stderr(&out)
    );
    for f in [
        "best.safetensors",
        "last.safetensors",
        "checkpoint.safetensors",
        "options.json",
        "epochs.csv",
        "curves.png",
        "metrics.jsonl",
    ] {
        assert!(run.join(f).exists(), "{f} missing from the run directory");
    }

    let out = la_cli(&["eval", "--run", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("359 images of digits (the run's validation data")
            && text.contains("top-1")
            && text.contains("per-class accuracy"),
        "{text}"
    );
    assert!(run.join("confusion.csv").exists() && run.join("confusion.png").exists());
    let csv = std::fs::read_to_string(run.join("confusion.csv")).unwrap();
    let total: u64 = csv
        .lines()
        .skip(1)
        .flat_map(|l| l.split(',').skip(1).map(|v| v.parse::<u64>().unwrap()))
        .sum();
    assert_eq!(total, 359);

    // predict needs no architecture flags: the file carries them, and the class names.
    let png = digit_png(&dir);
    let best = run.join("best.safetensors");
    let out = la_cli(&[
        "predict",
        "--weights",
        best.to_str().unwrap(),
        "--image",
        png.to_str().unwrap(),
        "--json",
        "--top-k",
        "3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let top = json[0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    let p: f64 = top.iter().map(|t| t["probability"].as_f64().unwrap()).sum();
    assert!(p > 0.0 && p <= 1.0 + 1e-6);
    // Every logit, and the top class is the largest one.
    let logits: Vec<f64> = json[0]["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(logits.len(), 10);
    let largest = (0..10)
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap();
    assert_eq!(top[0]["class"].as_u64().unwrap() as usize, largest);
    assert!(
        top[0]["name"].as_str().unwrap().len() == 1,
        "digit class names: {json}"
    );

    // Resuming refuses options that would change the run.
    let out = la_cli(&["train", "--resume", run.to_str().unwrap(), "--lr", "0.1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--lr cannot change a run being resumed"),
        "{}",
        stderr(&out)
    );

    // Resume for one more epoch.
    let out = la_cli(&["train", "--resume", run.to_str().unwrap(), "--epochs", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("resuming") && stderr(&out).contains("epoch 2: train loss"),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_to_train_and_predict_are_one_line_errors() {
    let tmp = la_testing::tempdir("cli-bad");
    let dir = tmp.path().to_path_buf();
    let check = |args: &[&str], needle: &str| {
        let out = la_cli(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    };
    check(
        &[
            "train",
            "--data",
            "fashion-mnist",
            "--data-dir",
            "/nonexistent/fm",
        ],
        "/nonexistent/fm: no such file",
    );
    check(&["train", "--data", "cifar10"], "needs --data-dir");
    check(
        &["train", "--runs-dir", "/proc/la-cli-test", "--epochs", "1"],
        "/proc/la-cli-test",
    );
    check(&["train", "--lr", "0"], "--lr 0 must be a positive number");
    // Refused, not replaced by the default (the layering once turned NaN into "unset").
    check(
        &["train", "--lr", "nan"],
        "--lr NaN must be a finite number",
    );
    check(
        &["train", "--momentum", "inf"],
        "--momentum inf must be a finite number",
    );
    check(
        &["train", "--label-smoothing", "1.5"],
        "--label-smoothing 1.5 must be in [0, 1)",
    );
    check(
        &[
            "train",
            "--attention-init",
            "kaiming",
            "--zero-init-attention",
            "true",
        ],
        "--attention-init kaiming and --zero-init-attention true disagree",
    );
    let nan_toml = dir.join("nan.toml");
    std::fs::write(
        &nan_toml,
        "weight-decay = nan
",
    )
    .unwrap();
    check(
        &["train", "--config", nan_toml.to_str().unwrap()],
        &format!(
            "--weight-decay NaN (in {}) must be a finite number",
            nan_toml.display()
        ),
    );
    check(
        &["train", "--device", "tpu"],
        "expected cpu, cuda, cuda:N or auto",
    );
    let toml = dir.join("bad.toml");
    std::fs::write(&toml, "epochs = 3\nlearning-rate = 0.1\n").unwrap();
    check(
        &["train", "--config", toml.to_str().unwrap()],
        "not a valid options file",
    );

    // A PyTorch pickle given as weights: named as such, with the way out.
    let pth = dir.join("model.pth");
    let mut zip = b"PK\x03\x04".to_vec();
    zip.extend([0u8; 64]);
    std::fs::write(&pth, &zip).unwrap();
    check(
        &["train", "--weights", pth.to_str().unwrap(), "--epochs", "1"],
        "model.pth: a PyTorch pickle (.pth/.pt from torch.save), not a safetensors file",
    );

    let png = digit_png(&dir);
    // A truncated weights file.
    let bytes = std::fs::read(fixture("golden/vgg16_la_tiny.safetensors")).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    check(
        &[
            "predict",
            "--weights",
            cut.to_str().unwrap(),
            "--image",
            png.to_str().unwrap(),
        ],
        "cut.safetensors",
    );
    // An image that is not one.
    let fake = dir.join("fake.png");
    std::fs::write(&fake, b"not a png").unwrap();
    let weights = fixture("golden/vgg16_la_tiny.safetensors");
    check(
        &[
            "predict",
            "--weights",
            weights.to_str().unwrap(),
            "--image",
            fake.to_str().unwrap(),
            "--size",
            "32",
        ],
        "fake.png",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn training_starts_from_a_pytorch_weights_file_without_architecture_flags() {
    // The golden tiny VGG16 + attention, in the article's PyTorch layout, 10 classes like digits.
    let tmp = la_testing::tempdir("cli-finetune");
    let dir = tmp.path().to_path_buf();
    let weights = fixture("golden/vgg16_la_tiny.safetensors");
    let out = la_cli(&[
        "train",
        "--weights",
        weights.to_str().unwrap(),
        "--epochs",
        "1",
        "--runs-dir",
        dir.to_str().unwrap(),
        "--name",
        "ft",
        "--threads",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("vgg16 with softmax attention: 458,016 parameters"),
        "{err}"
    );
    let trained =
        la_vgg::load_weights(&dir.join("ft/best.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(
        trained.metadata.config.blocks[0],
        vec![8, 8],
        "the file's widths, not the default --width"
    );
    assert_eq!(
        trained.metadata.normalization,
        Some(la_vgg::Normalize::IMAGENET),
        "pretrained weights keep their normalisation"
    );

    // Flags that contradict the file's architecture are refused, naming both.
    let out = la_cli(&[
        "train",
        "--weights",
        weights.to_str().unwrap(),
        "--arch",
        "vgg11",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("holds a vgg16")
            && err.contains("vgg11")
            && err.contains("vgg16_la_tiny.safetensors"),
        "{err}"
    );

    // A file whose classes differ gets a new last layer, and says so: a 3-class image folder.
    let folder = dir.join("folder");
    for (c, name) in ["cat", "dog", "fox"].iter().enumerate() {
        std::fs::create_dir_all(folder.join(name)).unwrap();
        for i in 0..5u8 {
            let img = image::RgbImage::from_fn(12, 10, |x, y| {
                image::Rgb([(x as u8) * 20, (y as u8) * 20 + i, 80 * c as u8])
            });
            img.save(folder.join(name).join(format!("{i}.png")))
                .unwrap();
        }
    }
    let out = la_cli(&[
        "train",
        "--weights",
        weights.to_str().unwrap(),
        "--data",
        "imagefolder",
        "--data-dir",
        folder.to_str().unwrap(),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--runs-dir",
        dir.to_str().unwrap(),
        "--name",
        "three",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("has 10 classes, the data 3: the last layer is replaced"),
        "{}",
        stderr(&out)
    );
    let trained = la_vgg::load_weights(
        &dir.join("three/last.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(trained.metadata.config.num_classes, 3);
    assert_eq!(
        trained.metadata.classes.as_deref(),
        Some(&["cat".to_string(), "dog".into(), "fox".into()][..])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn device_auto_falls_back_to_the_cpu_with_a_notice() {
    let tmp = la_testing::tempdir("cli-auto");
    let dir = tmp.path().to_path_buf();
    let png = digit_png(&dir);
    let weights = fixture("golden/vgg16_la_tiny.safetensors");
    let out = la_cli(&[
        "predict",
        "--weights",
        weights.to_str().unwrap(),
        "--image",
        png.to_str().unwrap(),
        "--size",
        "32",
        "--device",
        "auto",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let notes: Vec<String> = stderr(&out)
        .lines()
        .filter(|l| l.contains("using the CPU"))
        .map(String::from)
        .collect();
    assert_eq!(notes.len(), 1, "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A one-shot HTTP server on 127.0.0.1 answering every request with `status` and `body`.
fn serve(status: &'static str, body: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (url, handle)
}

#[test]
fn data_fetch_checks_the_archive_and_leaves_nothing_behind() {
    let tmp = la_testing::tempdir("cli-fetch");
    let dir = tmp.path().to_path_buf();
    // A server that answers with the wrong bytes: the MD5 check must reject them.
    let (url, server) = serve("200 OK", b"not the CIFAR-10 archive".to_vec());
    let out = la_cli(&[
        "data",
        "fetch",
        "cifar10",
        "--dir",
        dir.to_str().unwrap(),
        "--base-url",
        &url,
    ]);
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out).to_lowercase();
    assert!(err.contains("md5") || err.contains("checksum"), "{err}");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "files left behind"
    );
    // A 404 names the URL.
    let (url, server) = serve("404 Not Found", b"no".to_vec());
    let out = la_cli(&[
        "data",
        "fetch",
        "cifar100",
        "--dir",
        dir.to_str().unwrap(),
        "--base-url",
        &url,
    ]);
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "files left behind"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn selftest_compares_the_generic_form_with_the_fast_kernels() {
    // What `la-cli selftest --device cuda` runs on a GPU, here CPU against CPU.
    let out = la_cli(&["selftest", "--device", "cpu", "--quick"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("PASS op F32 conv3x3 winograd"), "{text}");
    assert!(
        text.contains("PASS op F64 softmax_attention n=300 (chunks of 64)"),
        "{text}"
    );
    assert!(
        text.contains("PASS training step F32 vgg16_bn x0.25 + softmax"),
        "{text}"
    );
    let summary = text.lines().last().unwrap_or("");
    assert!(
        summary.starts_with("selftest: ") && summary.ends_with(" passed, 0 failed"),
        "{summary}"
    );
    let passed: usize = summary["selftest: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(passed >= 60, "{summary}");
    assert!(!text.contains("FAIL"), "{text}");

    let bad = la_cli(&["selftest", "--device", "gpu7"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--device gpu7"), "{}", stderr(&bad));
}

/// A benchmark small enough for a test: plain VGG16 on two 32x32 images, one step.
const TINY_BENCH: [&str; 16] = [
    "bench",
    "--attention",
    "none",
    "--head",
    "cifar",
    "--classes",
    "10",
    "--size",
    "32",
    "--batch",
    "2",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--no-breakdown",
];

#[test]
fn an_unknown_kernel_form_is_an_error_not_a_guess() {
    let out = Command::new(env!("CARGO_BIN_EXE_la-cli"))
        .args(TINY_BENCH)
        .env("LA_KERNELS", "gpu")
        .output()
        .expect("la-cli runs");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("LA_KERNELS=gpu: unknown kernel form"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bf16_precision_runs_where_the_cpu_has_it_and_says_why_not_elsewhere() {
    let run = |env: Option<&str>| {
        let mut args = TINY_BENCH.to_vec();
        args.extend(["--precision", "bf16"]);
        let mut command = Command::new(env!("CARGO_BIN_EXE_la-cli"));
        command.args(&args).env_remove("LA_KERNELS");
        if let Some(form) = env {
            command.env("LA_KERNELS", form);
        }
        command.output().expect("la-cli runs")
    };
    let out = run(None);
    if la_kernels::precision::bf16_supported() {
        assert!(out.status.success(), "{}", stderr(&out));
        let header = stdout(&out).lines().next().unwrap_or("").to_string();
        assert!(header.ends_with(" precision=bf16"), "{header}");
        let rate = stdout(&out)
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("images/s: "))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(rate.is_some_and(|r| r > 0.0), "{}", stdout(&out));
    } else {
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("AVX512_BF16"), "{}", stderr(&out));
    }
    // The generic form has no bf16 products: an error, not a silent f32 run.
    let generic = run(Some("generic"));
    assert_eq!(generic.status.code(), Some(1));
    let err = stderr(&generic);
    assert!(
        err.contains("--precision bf16") && err.contains("LA_KERNELS=generic"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn boolean_options_take_the_same_forms_in_every_command() {
    // `--bn` alone, `--bn true` and `--bn false`, whether the command is bench, summary or train.
    let bench = |bn: &[&str]| {
        let mut args = TINY_BENCH.to_vec();
        args.extend_from_slice(bn);
        let out = la_cli(&args);
        assert!(out.status.success(), "{bn:?}: {}", stderr(&out));
        stdout(&out).lines().next().unwrap_or("").to_string()
    };
    assert!(bench(&["--bn"]).starts_with("model=vgg16_bn "));
    assert!(bench(&["--bn", "true"]).starts_with("model=vgg16_bn "));
    assert!(bench(&["--bn", "false"]).starts_with("model=vgg16 "));
    let summary = la_cli(&["summary", "--bn", "--attention", "none", "--size", "32"]);
    assert!(
        stdout(&summary).starts_with("vgg16_bn "),
        "{}",
        stdout(&summary)
    );
    // train parses both forms too (stopped here by the learning rate, before any training).
    for bn in [&["--bn"][..], &["--bn", "false"][..]] {
        let mut args = vec!["train"];
        args.extend_from_slice(bn);
        args.extend(["--nesterov", "--lr", "0"]);
        let out = la_cli(&args);
        assert!(
            stderr(&out).contains("--lr 0 must be a positive number"),
            "{bn:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn export_writes_the_article_layout_and_refuses_what_torchvision_cannot_hold() {
    let tmp = la_testing::tempdir("cli-export");
    let weights = fixture("golden/vgg16_la_tiny.safetensors");
    let out = tmp.path().join("article.safetensors");
    let run = |format: &str, out: &std::path::Path| {
        la_cli(&[
            "export",
            "--weights",
            weights.to_str().unwrap(),
            "--format",
            format,
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let done = run("article", &out);
    assert!(done.status.success(), "{}", stderr(&done));
    let tensors = la_testing::read_tensors(&out);
    assert!(
        tensors.contains_key("features.4.linear_query.weight"),
        "{:?}",
        tensors.keys()
    );
    let refused = run("torchvision", &tmp.path().join("tv.safetensors"));
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("has no attention module"),
        "{}",
        stderr(&refused)
    );
    assert!(
        !tmp.path().join("tv.safetensors").exists(),
        "nothing written on an error"
    );
    // onnxruntime runs such graphs in crates/la-vgg/tests/onnx.rs.
    let done = run("onnx", &tmp.path().join("m.onnx"));
    assert!(stdout(&done).contains("opset 17"), "{}", stderr(&done));
    assert!(std::fs::metadata(tmp.path().join("m.onnx")).unwrap().len() > 10_000);
}
