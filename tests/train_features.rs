//! End-to-end: `la-cli train`'s augmentation policies, `--shuffle false --augment none`,
//! `--max-steps` and `--dump-batches` on the built-in digits.

mod support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use la_testing::{max_abs_diff, read_tensors, tempdir};
use support::{la_cli, stderr, stdout};

/// Trains with `extra` flags for at most `steps` steps and returns the dumped batches.
fn dump(dir: &Path, name: &str, steps: usize, extra: &[&str]) -> HashMap<String, Tensor> {
    let file = dir.join(format!("{name}.safetensors"));
    let steps = steps.to_string();
    let mut args = vec![
        "train",
        "--width",
        "0.125",
        "--batch-size",
        "64",
        "--max-steps",
        &steps,
        "--dump-batches",
        file.to_str().unwrap(),
        "--runs-dir",
        dir.to_str().unwrap(),
        "--name",
        name,
    ];
    args.extend_from_slice(extra);
    let out = la_cli(&args);
    assert!(out.status.success(), "{name}: {}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("reached the step limit after step {steps}"))
            || stdout(&out).contains("done: 1 epochs"),
        "{name}: {}{}",
        stderr(&out),
        stdout(&out)
    );
    read_tensors(&file)
}

fn labels(batches: &HashMap<String, Tensor>, n: usize) -> Vec<i64> {
    batches[&format!("labels.{n}")].to_vec1::<i64>().unwrap()
}

#[test]
fn unshuffled_unaugmented_batches_repeat_every_epoch() {
    let tmp = tempdir("train-dump");
    // 1438 training digits: 22 full batches of 64 an epoch.
    let flags = ["--epochs", "2", "--shuffle", "false", "--augment", "none"];
    let batches = dump(tmp.path(), "plain", 24, &flags);
    assert_eq!(
        batches.keys().filter(|k| k.starts_with("images.")).count(),
        24
    );
    for (a, b) in [(0, 22), (1, 23)] {
        let (x, y) = (
            &batches[&format!("images.{a}")],
            &batches[&format!("images.{b}")],
        );
        assert_eq!(x.dims(), &[64, 3, 32, 32]);
        assert_eq!(max_abs_diff(x, y), 0.0, "batch {a} against {b}");
        assert_eq!(labels(&batches, a), labels(&batches, b));
    }
    assert_ne!(labels(&batches, 0), labels(&batches, 1));
    // A stop mid-epoch leaves a resumable checkpoint, and a larger limit goes on from it.
    let run = tmp.path().join("plain");
    assert!(run.join("checkpoint.safetensors").exists());
    let dumped = std::fs::read(tmp.path().join("plain.safetensors")).unwrap();
    let out = la_cli(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--max-steps",
        "30",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("reached the step limit after step 30 (epoch 2, batch 8)"),
        "{}",
        stderr(&out)
    );
    let after = std::fs::read(tmp.path().join("plain.safetensors")).unwrap();
    assert!(
        after == dumped,
        "resuming must not replace the first command's dump"
    );
}

#[test]
fn trivial_augment_and_rand_augment_change_images_the_same_way_every_time() {
    let tmp = tempdir("train-policies");
    let order = ["--shuffle", "false"];
    let plain = dump(tmp.path(), "standard", 1, &order);
    fn with<'a>(order: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [order, extra].concat()
    }
    let ta = dump(
        tmp.path(),
        "ta",
        1,
        &with(&order, &["--auto-augment", "trivial-augment"]),
    );
    let ta_again = dump(
        tmp.path(),
        "ta-one-thread",
        1,
        &with(&order, &["--auto-augment", "ta-wide", "--threads", "1"]),
    );
    let ra = dump(
        tmp.path(),
        "ra",
        1,
        &with(
            &order,
            &[
                "--auto-augment",
                "ra",
                "--ra-num-ops",
                "3",
                "--ra-magnitude",
                "20",
            ],
        ),
    );
    let image = |b: &HashMap<String, Tensor>| b["images.0"].clone();
    assert_eq!(
        labels(&plain, 0),
        labels(&ta, 0),
        "same order, other pixels"
    );
    assert!(max_abs_diff(&image(&plain), &image(&ta)) > 0.5);
    assert_eq!(
        max_abs_diff(&image(&ta), &image(&ta_again)),
        0.0,
        "same seed, same images, whatever the thread count"
    );
    assert!(max_abs_diff(&image(&ta), &image(&ra)) > 0.5);
}

#[test]
fn policy_flags_that_cannot_work_are_refused() {
    for (args, expected) in [
        (
            &["--augment", "none", "--auto-augment", "ta-wide"][..],
            "cannot go with --augment none",
        ),
        (
            &["--auto-augment", "ra", "--ra-magnitude", "31"][..],
            "magnitude 31",
        ),
        (&["--ra-num-ops", "0"][..], "--ra-num-ops 0"),
        (&["--auto-augment", "autoaugment"][..], "invalid value"),
    ] {
        let tmp = tempdir("train-refused");
        let runs = tmp.path().join("runs");
        let base = ["train", "--runs-dir", runs.to_str().unwrap()];
        let out = la_cli(&[&base[..], args].concat());
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            !runs.exists(),
            "{args:?}: a refused run writes no run directory"
        );
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}
