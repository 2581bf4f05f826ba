//! End-to-end: run the built `la-cli` binary as a user would and check what it prints.

use std::path::PathBuf;
use std::process::{Command, Output};

fn la_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_la-cli"))
        .args(args)
        .output()
        .expect("la-cli runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

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
