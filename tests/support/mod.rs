//! Running the built `la-cli` binary as a user would, for the end-to-end tests.

use std::path::Path;
use std::process::{Command, Output};

pub fn la_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_la-cli"))
        .args(args)
        .output()
        .expect("la-cli runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `la-cli train` of a tiny model on the built-in digits (1 epoch, width 0.125) into
/// `runs/tiny`; the caller checks the output.
#[allow(dead_code)] // not every test binary that includes this module trains one
pub fn train_tiny_digits(runs: &Path) -> Output {
    la_cli(&[
        "train",
        "--epochs",
        "1",
        "--width",
        "0.125",
        "--runs-dir",
        runs.to_str().unwrap(),
        "--name",
        "tiny",
        "--threads",
        "2",
    ])
}
