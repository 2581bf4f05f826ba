//! `mpirun -n 2 la-cli train ...` (built with `--features mpi`) against one process, as a
//! user runs it: the same loss at every step and the same final weights with `--sync-bn`
//! and without BatchNorm; a run stopped and resumed ends bitwise equal to an uninterrupted
//! one; a rank fed corrupt files ends the job with the error; `kill -9` of a rank ends the
//! job and leaves a checkpoint that resumes. Needs Open MPI's `mpirun` on the PATH
//! (.ci/run installs it).

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use support::{la_cli, stderr};

const LA_CLI: &str = env!("CARGO_BIN_EXE_la-cli");

/// `mpirun` for this machine: as root (CI), two ranks on two cores, shared memory only.
fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "--bind-to", "none"])
        .args(["--mca", "btl", "self,vader"])
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"])
        .stdin(Stdio::null());
    c
}

fn on_ranks(ranks: usize, args: &[&str]) -> Output {
    mpirun()
        .args(["-n", &ranks.to_string(), LA_CLI])
        .args(args)
        .output()
        .expect("mpirun runs")
}

/// A tiny VGG on 320 of the digits in batches of 32: 10 steps an epoch, 1 thread a rank.
fn train_args<'a>(runs: &'a str, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--width",
        "0.125",
        "--train-subset",
        "320",
        "--batch-size",
        "32",
        "--threads",
        "1",
        "--runs-dir",
        runs,
        "--name",
        name,
    ];
    args.extend_from_slice(extra);
    args
}

fn succeeded(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        stderr(out),
        support::stdout(out)
    );
}

/// The loss of every optimiser step, from the run's metrics.jsonl.
fn step_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

fn checkpoint_weights(run: &Path) -> HashMap<String, Tensor> {
    la_train::checkpoint::load_checkpoint(run, &Device::Cpu)
        .unwrap()
        .model
}

/// Largest difference relative to each tensor's largest value (at least 1).
fn weights_gap(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, t)| {
            let scale = la_testing::values(t)
                .iter()
                .fold(1.0f64, |m, v| m.max(v.abs()));
            la_testing::max_abs_diff(t, &b[name]) / scale
        })
        .fold(0.0, f64::max)
}

fn assert_two_ranks_train_as_one_process(label: &str, model: &[&str]) {
    let tmp = la_testing::tempdir(label);
    let runs = tmp.path().to_str().unwrap();
    // Noise images, not the digits: the digits' flat backgrounds give whole regions of a map
    // the same value, so a rounding difference flips the ReLU of all of them at once and two
    // runs that agree to 1e-7 part by 1e-3 a few steps later (PyTorch's DDP tests feed
    // random inputs for the same reason). VGG11 at a small rate: with BatchNorm over 32
    // images, a deeper net or a larger rate is chaotic even so (at 0.005 the rounding of
    // two kernel forms in one process, LA_KERNELS, parts the losses by 3e-4 within 20 steps;
    // at 0.001 by 1e-7, and the loss still falls from 1.42 to 1.24).
    let data = tmp.path().join("noise");
    noise_image_folder(&data);
    let mut extra = vec![
        "--data",
        "imagefolder",
        "--data-dir",
        data.to_str().unwrap(),
        "--arch",
        "vgg11",
        "--lr",
        "0.001",
        "--max-steps",
        "20",
        "--epochs",
        "3",
    ];
    extra.extend_from_slice(model);
    let one = la_cli(&train_args(runs, "one", &extra));
    succeeded(&one, "one process");
    let two = on_ranks(2, &train_args(runs, "two", &extra));
    succeeded(&two, "two ranks");
    assert!(
        stderr(&two).contains("data-parallel over 2 ranks (MPI)"),
        "{}",
        stderr(&two)
    );
    // Rank 0 alone reports.
    assert_eq!(
        stderr(&two).matches("run directory:").count(),
        1,
        "{}",
        stderr(&two)
    );

    let (a, b) = (
        step_losses(&tmp.path().join("one")),
        step_losses(&tmp.path().join("two")),
    );
    assert_eq!((a.len(), b.len()), (20, 20));
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() < 1e-5,
            "step {}: loss {x} in one process, {y} on two ranks",
            step + 1
        );
    }
    assert!(
        a.iter().any(|l| (l - a[0]).abs() > 1e-2),
        "the run should learn: {a:?}"
    );
    let gap = weights_gap(
        &checkpoint_weights(&tmp.path().join("one")),
        &checkpoint_weights(&tmp.path().join("two")),
    );
    assert!(gap < 1e-5, "final weights {gap:e} apart");
    // Both ran two epochs with validation: the same figures, whole-set counts.
    let csv =
        |name: &str| std::fs::read_to_string(tmp.path().join(name).join("epochs.csv")).unwrap();
    let val_top1 = |text: String| -> Vec<String> {
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        let col = header.iter().position(|h| *h == "val_top1").unwrap();
        lines
            .map(|l| l.split(',').nth(col).unwrap().to_string())
            .collect()
    };
    assert_eq!(val_top1(csv("one")), val_top1(csv("two")));
}

#[test]
fn two_ranks_with_synchronised_batch_norm_train_as_one_process() {
    assert_two_ranks_train_as_one_process("mpi-sync-bn", &["--bn", "--sync-bn"]);
}

#[test]
fn two_ranks_without_batch_norm_train_as_one_process() {
    assert_two_ranks_train_as_one_process("mpi-no-bn", &["--bn", "false"]);
}

#[test]
fn a_two_rank_run_stopped_and_resumed_ends_as_an_uninterrupted_one() {
    let tmp = la_testing::tempdir("mpi-resume");
    let runs = tmp.path().to_str().unwrap();
    let model = ["--bn", "--epochs", "3"];
    let straight = on_ranks(
        2,
        &train_args(
            runs,
            "straight",
            &[&model[..], &["--max-steps", "25"]].concat(),
        ),
    );
    succeeded(&straight, "uninterrupted");
    let first = on_ranks(
        2,
        &train_args(
            runs,
            "resumed",
            &[&model[..], &["--max-steps", "15"]].concat(),
        ),
    );
    succeeded(&first, "first half");
    let resumed_dir = tmp.path().join("resumed");
    let rest = on_ranks(
        2,
        &[
            "train",
            "--resume",
            resumed_dir.to_str().unwrap(),
            "--max-steps",
            "25",
            "--threads",
            "1",
        ],
    );
    succeeded(&rest, "resumed");
    let (a, b) = (
        checkpoint_weights(&tmp.path().join("straight")),
        checkpoint_weights(&resumed_dir),
    );
    for (name, t) in &a {
        assert_eq!(la_testing::max_abs_diff(t, &b[name]), 0.0, "{name}");
    }
}

/// 4 classes of 100 noise images, each class a little brighter in one colour: 320 to train
/// on (the 80 % the run keeps), 80 to validate.
fn noise_image_folder(root: &Path) {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 56) as u8
    };
    for class in 0..4usize {
        let dir = root.join(format!("class{class}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..100 {
            let image = image::RgbImage::from_fn(32, 32, |_, _| {
                let mut pixel = [noise() / 2, noise() / 2, noise() / 2];
                if class < 3 {
                    pixel[class] += 96;
                }
                image::Rgb(pixel)
            });
            image.save(dir.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// `root/<class>/<i>.png` folders of small images; with `corrupt`, every file holds bytes
/// that are no image.
fn image_folder(root: &Path, corrupt: bool) {
    for class in ["a", "b"] {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..24u8 {
            let path = dir.join(format!("{i}.png"));
            if corrupt {
                std::fs::write(&path, b"not a png").unwrap();
            } else {
                image::RgbImage::from_fn(32, 32, |x, y| {
                    image::Rgb([x as u8 * 8, y as u8 * 8, i * 10])
                })
                .save(&path)
                .unwrap();
            }
        }
    }
}

#[test]
fn a_rank_fed_corrupt_files_ends_every_rank_with_the_error() {
    let tmp = la_testing::tempdir("mpi-corrupt");
    let (good, bad) = (tmp.path().join("good"), tmp.path().join("bad"));
    image_folder(&good, false);
    image_folder(&bad, true);
    let runs = tmp.path().join("runs");
    let args = |dir: &PathBuf| -> Vec<String> {
        [
            "train",
            "--data",
            "imagefolder",
            "--size",
            "32",
            "--width",
            "0.125",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--name",
            "corrupt",
            "--runs-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            runs.to_str().unwrap().to_string(),
            "--data-dir".into(),
            dir.to_str().unwrap().into(),
        ])
        .collect()
    };
    let started = Instant::now();
    // Rank 0 reads the good folder, rank 1 the corrupt one (MPI's MPMD form).
    let out = mpirun()
        .args(["-n", "1", LA_CLI])
        .args(args(&good))
        .arg(":")
        .args(["-n", "1", LA_CLI])
        .args(args(&bad))
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let err = stderr(&out);
    assert!(
        err.contains(bad.to_str().unwrap()),
        "the error names the corrupt file: {err}"
    );
    // Rank 0, which had nothing wrong, was told why it stops.
    assert!(err.contains("rank 1 failed:"), "{err}");
}

/// The process of rank `rank` of the job whose ranks carry `tag` in their environment.
fn rank_pid(tag: &str, rank: usize) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
            let has = |v: &str| vars.contains(&v.as_bytes());
            (has(&format!("LA_TEST_TAG={tag}")) && has(&format!("OMPI_COMM_WORLD_RANK={rank}")))
                .then_some(pid)
        })
}

#[test]
fn a_killed_rank_ends_the_job_and_the_checkpoint_resumes() {
    let tmp = la_testing::tempdir("mpi-kill");
    let runs = tmp.path().to_str().unwrap();
    let tag = tmp.path().display().to_string();
    let mut job = mpirun()
        .env("LA_TEST_TAG", &tag)
        .args(["-x", "LA_TEST_TAG", "-n", "2", LA_CLI])
        .args(train_args(
            runs,
            "killed",
            &["--bn", "--epochs", "50", "--recovery-interval", "2"],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = tmp.path().join("killed");
    let checkpoint = run.join(la_train::checkpoint::CHECKPOINT);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !checkpoint.exists() {
        assert!(Instant::now() < deadline, "no checkpoint after 120 s");
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = rank_pid(&tag, 1).expect("rank 1 is running");
    // SAFETY: sends a signal to a process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let status = loop {
        if let Some(status) = job.try_wait().unwrap() {
            break status;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the job outlived its rank by 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    // The last checkpoint reads, and the run goes on from it on two ranks.
    let saved = la_train::checkpoint::load_checkpoint(&run, &Device::Cpu).unwrap();
    let step = saved.state.step;
    assert!(step >= 2);
    let more = (step + 2).to_string();
    let resumed = on_ranks(
        2,
        &[
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--max-steps",
            &more,
            "--threads",
            "1",
        ],
    );
    succeeded(&resumed, "resumed after the kill");
    assert_eq!(
        la_train::checkpoint::load_checkpoint(&run, &Device::Cpu)
            .unwrap()
            .state
            .step,
        step + 2
    );
}

#[test]
fn without_mpirun_the_same_binary_trains_in_one_process() {
    let tmp = la_testing::tempdir("mpi-none");
    let runs = tmp.path().to_str().unwrap();
    let out = la_cli(&train_args(runs, "alone", &["--max-steps", "2"]));
    succeeded(&out, "one process");
    assert!(!stderr(&out).contains("data-parallel"), "{}", stderr(&out));
}

#[test]
fn a_study_trains_every_run_data_parallel_through_its_launcher() {
    let tmp = la_testing::tempdir("mpi-study");
    let config = tmp.path().join("grid.toml");
    std::fs::write(
        &config,
        "seeds = [0]\n[base]\nwidth = 0.125\ntrain-subset = 64\nbatch-size = 32\nepochs = 1\nthreads = 1\n[grid]\nattention = [\"none\"]\n",
    )
    .unwrap();
    let launcher = "mpirun --oversubscribe --bind-to none --mca btl self,vader -n 2";
    let study = |extra: &[&str]| {
        Command::new(LA_CLI)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .args(["study", "--config", config.to_str().unwrap(), "--dir"])
            .arg(tmp.path().join("study"))
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = study(&["--launcher", launcher]);
    succeeded(&out, "study");
    assert!(
        stderr(&out).contains("data-parallel over 2 ranks (MPI)"),
        "{}",
        stderr(&out)
    );
    assert!(tmp.path().join("study/study.md").exists());
    // Under mpirun itself, the study says how to do it instead of running the grid twice.
    let nested = mpirun()
        .args([
            "-n",
            "2",
            LA_CLI,
            "study",
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!nested.status.success());
    assert!(
        stderr(&nested).contains("--launcher"),
        "{}",
        stderr(&nested)
    );
}
