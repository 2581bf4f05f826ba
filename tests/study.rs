//! `la-cli study` end to end on the digits: a 2-setting grid over 2 seeds, killed after its
//! first run and started again; the table's figures are checked against the runs' own
//! epochs.csv files.

mod support;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{la_cli, stderr, stdout};

const STUDY: &str = "seeds = [3, 4]
[base]
epochs = 2
width = 0.125
threads = 2
[grid]
attention = [\"none\", \"relu-linear\"]
";

/// (best, final) validation top-1 in percent of one run, from its epochs.csv.
fn run_figures(run: &Path) -> (f64, f64) {
    let text = std::fs::read_to_string(run.join("epochs.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let column = header.iter().position(|h| *h == "val_top1").unwrap();
    let values: Vec<f64> = lines
        .map(|l| l.split(',').nth(column).unwrap().parse::<f64>().unwrap() * 100.0)
        .collect();
    assert_eq!(values.len(), 2, "{}: two epochs", run.display());
    (
        values.iter().cloned().fold(f64::MIN, f64::max),
        *values.last().unwrap(),
    )
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
    (mean, var.sqrt())
}

#[test]
fn a_killed_study_resumes_and_its_table_matches_the_runs() {
    let tmp = la_testing::tempdir("cli-study");
    let dir = tmp.path();
    let config = dir.join("tiny.toml");
    std::fs::write(&config, STUDY).unwrap();
    let study = dir.join("study");
    let args = [
        "study",
        "--config",
        config.to_str().unwrap(),
        "--dir",
        study.to_str().unwrap(),
    ];

    // Kill the whole study (the runner and its training process) once the first run is done.
    let mut child = Command::new(env!("CARGO_BIN_EXE_la-cli"))
        .args(args)
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = study.join("attention-none/seed-3/study-done.json");
    let started = Instant::now();
    while !first.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the first run never finished"
        );
        assert!(child.try_wait().unwrap().is_none(), "the study ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500)); // into the second run
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    child.wait().unwrap();
    assert!(!study.join("study.md").exists(), "killed before the table");

    let out = la_cli(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(
        log.contains("study: run 1/4: attention=none seed 3"),
        "{log}"
    );
    assert!(log.contains("already finished, skipped"), "{log}");
    assert!(
        log.contains("study: run 4/4: attention=relu-linear seed 4"),
        "{log}"
    );
    for setting in ["attention-none", "attention-relu-linear"] {
        for seed in [3, 4] {
            assert!(study
                .join(format!("{setting}/seed-{seed}/study-done.json"))
                .exists());
        }
    }
    assert!(
        stdout(&out).contains("| attention=relu-linear | 2 |"),
        "{}",
        stdout(&out)
    );
    assert!(study.join("study.png").exists() && study.join("study.md").exists());

    // The CSV's figures are the runs' own.
    let csv = std::fs::read_to_string(study.join("study.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<String>> = lines
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    assert_eq!(rows.len(), 2);
    let mut best_by_setting = Vec::new();
    for (row, setting) in rows.iter().zip(["attention-none", "attention-relu-linear"]) {
        let figures: Vec<(f64, f64)> = [3, 4]
            .iter()
            .map(|s| run_figures(&study.join(format!("{setting}/seed-{s}"))))
            .collect();
        let best: Vec<f64> = figures.iter().map(|f| f.0).collect();
        let last: Vec<f64> = figures.iter().map(|f| f.1).collect();
        for (name, values) in [("best_top1", &best), ("final_top1", &last)] {
            let (mean, std) = mean_std(values);
            let got_mean: f64 = row[col(&format!("{name}_mean"))].parse().unwrap();
            let got_std: f64 = row[col(&format!("{name}_std"))].parse().unwrap();
            assert!(
                (got_mean - mean).abs() < 1e-3 && (got_std - std).abs() < 1e-3,
                "{setting} {name}: {row:?}"
            );
        }
        assert_eq!(row[col("runs")], "2");
        assert!(
            row[col("params")].parse::<u64>().unwrap() > 0
                && row[col("macs")].parse::<u64>().unwrap() > 0
        );
        best_by_setting.push(best);
    }
    // The paired difference: relu-linear minus none, seed by seed, with its standard error.
    let diffs: Vec<f64> = best_by_setting[1]
        .iter()
        .zip(&best_by_setting[0])
        .map(|(a, b)| a - b)
        .collect();
    let (mean, std) = mean_std(&diffs);
    let row = &rows[1];
    assert_eq!(row[col("vs_baseline")], "attention=none");
    let got: f64 = row[col("vs_baseline_mean")].parse().unwrap();
    let se: f64 = row[col("vs_baseline_se")].parse().unwrap();
    assert!(
        (got - mean).abs() < 1e-3 && (se - std / 2f64.sqrt()).abs() < 1e-3,
        "{row:?}"
    );
    assert_eq!(
        rows[0][col("vs_baseline")],
        "",
        "the baseline has no difference from itself"
    );

    // A second start finds everything done and only rewrites the table.
    let again = la_cli(&args);
    assert!(again.status.success());
    assert_eq!(
        stderr(&again).matches("already finished, skipped").count(),
        4
    );
    assert_eq!(
        std::fs::read_to_string(study.join("study.csv")).unwrap(),
        csv
    );

    // Bad study files are refused with the file named.
    std::fs::write(&config, "seeds = []\n").unwrap();
    let out = la_cli(&args);
    assert!(
        !out.status.success() && stderr(&out).contains("`seeds` is empty"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&config, "seeds = [1]\n[grid]\nattention = \"softmax\"\n").unwrap();
    let out = la_cli(&args);
    assert!(
        stderr(&out).contains("grid.attention: expected a list"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&config, "seeds = [1]\n[base]\nseed = 3\n").unwrap();
    let out = la_cli(&args);
    assert!(
        stderr(&out).contains("`seed` is set by the study"),
        "{}",
        stderr(&out)
    );
}
