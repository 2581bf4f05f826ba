//! Running the built `la-cli` binary as a user would, for the end-to-end tests.

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
