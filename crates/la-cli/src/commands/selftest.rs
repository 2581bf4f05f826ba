//! `la-cli selftest`: the checks that a device runs the network the CPU runs, in one binary
//! that travels to a GPU machine without a Rust toolchain.
//!
//! Every op's generic form on the device against its fast CPU form (values and gradients,
//! f64 and f32), one SGD step of VGG16_bn (width 0.25) with each attention kind on both (on a
//! GPU also its own kernels, "fast form", against the CPU's), then (unless `--quick`) the
//! default digits run on the device beside the CPU's and the `la-cli bench` rows on the
//! device. One line per check, a summary line, and a non-zero exit
//! when a check fails. With `--device cpu` it compares the CPU's generic form with its fast
//! one; the test suite runs it that way, so the GPU check cannot rot.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use la_attention::{AttentionConfig, AttentionKind};
use la_kernels::Form;
use la_vgg::{HeadConfig, VggConfig};

use crate::device::{describe, parse_device, set_threads};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  la-cli selftest --device cuda\n  la-cli selftest --device cpu --quick"
)]
pub struct Args {
    /// The device whose generic form is checked against the CPU's fast kernels: cpu, cuda or
    /// cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Only the op and training-step comparisons (no digits run, no benchmarks).
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    threads: Option<usize>,
}

/// Passed and failed checks, printed as they come.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: Vec<String>,
}

impl Tally {
    fn record(&mut self, ok: bool, name: &str, detail: &str) {
        println!("{} {name}: {detail}", if ok { "PASS" } else { "FAIL" });
        if ok {
            self.passed += 1;
        } else {
            self.failed.push(name.to_string());
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    set_threads(args.threads)?;
    if args.device == "auto" {
        bail!("--device auto: name the device to check (cpu, cuda or cuda:N)");
    }
    let device = parse_device(&args.device)?;
    println!(
        "selftest: the generic form on {} against the fast kernels on the CPU ({} threads)",
        describe(&device),
        rayon::current_num_threads()
    );
    let mut tally = Tally::default();
    for dtype in [DType::F64, DType::F32] {
        ops(&device, dtype, &mut tally);
    }
    training_steps(&device, &mut tally);
    #[cfg(feature = "nccl")]
    nccl_step(&device, &mut tally);
    if !args.quick {
        digits_runs(&args.device, &mut tally);
        benches(&args.device, &mut tally);
    }
    println!(
        "selftest: {} passed, {} failed",
        tally.passed,
        tally.failed.len()
    );
    if !tally.failed.is_empty() {
        bail!("failed checks: {}", tally.failed.join("; "));
    }
    Ok(())
}

fn ops(device: &Device, dtype: DType, tally: &mut Tally) {
    match la_kernels::parity::compare_all(device, dtype) {
        Ok(comparisons) => {
            for c in comparisons {
                let detail = format!(
                    "values {:.1e}, gradients {:.1e} (tolerance {:.0e})",
                    c.value_error, c.grad_error, c.tolerance
                );
                tally.record(c.passed(), &format!("op {dtype:?} {}", c.name), &detail);
            }
        }
        Err(e) => tally.record(false, &format!("ops {dtype:?}"), &format!("{e:#}")),
    }
    // The optimisers' in-place updates and the gradients' squares, in the device's own
    // kernels (on a GPU one launch for several parameters) against the CPU's.
    match la_kernels::parity::compare_updates(Form::Fast, device, dtype) {
        Ok(comparisons) => {
            for c in comparisons {
                let detail = format!(
                    "values {:.1e} (tolerance {:.0e})",
                    c.value_error, c.tolerance
                );
                tally.record(c.passed(), &format!("update {dtype:?} {}", c.name), &detail);
            }
        }
        Err(e) => tally.record(false, &format!("updates {dtype:?}"), &format!("{e:#}")),
    }
}

/// One SGD step of VGG16_bn at width 0.25 per attention kind: in f64 the loss and the
/// gradients within 1e-9; in f32 within 1e-3 of each other and of the f64 step.
fn training_steps(device: &Device, tally: &mut Tally) {
    let kinds = [
        None,
        Some(AttentionKind::Softmax),
        Some(AttentionKind::Linear),
        Some(AttentionKind::Efficient),
        Some(AttentionKind::ReluLinear),
    ];
    for kind in kinds {
        let name = kind.map_or("none".to_string(), |k| k.to_string());
        let config = VggConfig::vgg(16, 10)
            .and_then(|c| {
                c.with_batch_norm(true)
                    .with_head(HeadConfig::cifar(None))
                    .with_width(0.25)
            })
            .map(|c| c.with_attention(kind.map(AttentionConfig::new)));
        let config = match config {
            Ok(c) => c,
            Err(e) => return tally.record(false, "training step", &format!("{e:#}")),
        };
        // On a GPU, its generic form and its own kernels (the fast form there).
        let forms: &[Form] = if device.is_cpu() {
            &[Form::Generic]
        } else {
            &[Form::Generic, Form::Fast]
        };
        for (dtype, &form) in [DType::F64, DType::F32]
            .into_iter()
            .flat_map(|d| forms.iter().map(move |f| (d, f)))
        {
            let suffix = if form == Form::Fast {
                " (fast form)"
            } else {
                ""
            };
            let label = format!("training step {dtype:?} vgg16_bn x0.25 + {name}{suffix}");
            let step =
                la_train::parity::compare_training_step_in(form, &config, 4, 32, dtype, device);
            match step {
                Ok(s) => {
                    let tolerance = if dtype == DType::F64 { 1e-9 } else { 1e-3 };
                    let ok = s.loss_error <= tolerance
                        && s.grad_error <= tolerance
                        && s.fast_error_vs_f64 <= tolerance
                        && s.generic_error_vs_f64 <= tolerance;
                    let detail = format!(
                        "loss {:.6} / {:.6} (error {:.1e}), gradients {:.1e} (worst {}), parameters after SGD {:.1e}{}",
                        s.loss_fast, s.loss_generic, s.loss_error, s.grad_error, s.worst_grad, s.param_error,
                        if dtype == DType::F64 { String::new() } else {
                            format!("; against the f64 step: CPU {:.1e}, device {:.1e}", s.fast_error_vs_f64, s.generic_error_vs_f64)
                        }
                    );
                    tally.record(ok, &label, &detail);
                }
                Err(e) => tally.record(false, &label, &format!("{e:#}")),
            }
        }
        if device.is_cuda() {
            tf32_step(&config, &name, device, tally);
        }
    }
}

/// One f32 step of `config` in the GPU's own kernels with TF32 products (`--precision tf32`,
/// its default) against the CPU's f32 step and the f64 step: within 3e-2, TF32's 10-bit
/// mantissa over a step's products (f32's own checks ask 1e-3).
fn tf32_step(config: &VggConfig, name: &str, device: &Device, tally: &mut Tally) {
    let label = format!("training step tf32 vgg16_bn x0.25 + {name} (fast form)");
    let step = la_kernels::set_precision(la_kernels::Precision::Tf32).and_then(|()| {
        let step = la_train::parity::compare_training_step_in(
            Form::Fast,
            config,
            4,
            32,
            DType::F32,
            device,
        );
        la_kernels::set_precision(la_kernels::Precision::F32)?;
        step.map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    });
    match step {
        Ok(s) => {
            let tolerance = 3e-2;
            let ok = s.loss_error <= tolerance
                && s.grad_error <= tolerance
                && s.generic_error_vs_f64 <= tolerance;
            let detail = format!(
                "loss {:.6} / {:.6} (error {:.1e}), gradients {:.1e} from the CPU's f32 (worst {}), \
                 {:.1e} from the f64 step (tolerance {tolerance:.0e})",
                s.loss_fast, s.loss_generic, s.loss_error, s.grad_error, s.worst_grad,
                s.generic_error_vs_f64
            );
            tally.record(ok, &label, &detail);
        }
        Err(e) => tally.record(false, &label, &format!("{e:#}")),
    }
}

/// A training step with its gradients summed by NCCL over one rank (the GPU machine has one
/// GPU) must be the step without it.
#[cfg(feature = "nccl")]
fn nccl_step(device: &Device, tally: &mut Tally) {
    if !device.is_cuda() {
        return;
    }
    let label = "NCCL: a training step summed over a one-rank communicator";
    let host = std::sync::Arc::new(la_train::SingleProcess);
    let difference = || -> Result<f64> {
        let nccl = la_train::collective::nccl::NcclCollective::init(host, device)?;
        Ok(la_train::data_parallel::one_rank_step_difference(
            &nccl, device,
        )?)
    };
    match difference() {
        Ok(d) => tally.record(
            d == 0.0,
            label,
            &format!("parameters after the step {d:.1e} from the step without NCCL"),
        ),
        Err(e) => tally.record(false, label, &format!("{e:#}")),
    }
}

/// Runs this binary with `args`; its stdout, or why it failed.
fn la_cli(args: &[&str]) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let out = Command::new(&exe)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        bail!(
            "la-cli {} exited with {}: {}",
            args.join(" "),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (epoch, validation top-1 in %, seconds) of each epoch in a run's epochs.csv.
fn epochs(run: &Path) -> Result<Vec<(String, f64, f64)>> {
    let path = run.join("epochs.csv");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        let number = |i: usize| -> Result<f64> {
            cells
                .get(i)
                .and_then(|c| c.parse().ok())
                .with_context(|| format!("{}: bad row {line:?}", path.display()))
        };
        let top1 = number(5)?;
        rows.push((
            cells[0].to_string(),
            if top1 <= 1.0 { top1 * 100.0 } else { top1 },
            number(7)?,
        ));
    }
    Ok(rows)
}

/// The default training run (VGG16_bn + softmax attention on the digits) on the CPU and on
/// the device (on a GPU in f32 and in tf32, its default), side by side; each device run must
/// reach 98 % validation top-1.
fn digits_runs(device: &str, tally: &mut Tally) {
    let dir = std::env::temp_dir().join(format!("la-selftest-{}", std::process::id()));
    let dir_arg = dir.display().to_string();
    let mut runs = vec![("cpu".to_string(), "cpu", "f32")];
    if device != "cpu" {
        runs.push((format!("{device} f32"), device, "f32"));
        runs.push((format!("{device} tf32"), device, "tf32"));
    }
    let mut tables = Vec::new();
    for (i, (label, spec, precision)) in runs.iter().enumerate() {
        let name = format!("digits-{i}");
        let run = la_cli(&[
            "train",
            "--device",
            spec,
            "--precision",
            precision,
            "--runs-dir",
            &dir_arg,
            "--name",
            &name,
        ])
        .and_then(|_| epochs(&dir.join(&name)));
        match run {
            Ok(rows) => tables.push((label.clone(), rows)),
            Err(e) => tally.record(false, &format!("digits run on {label}"), &format!("{e:#}")),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if tables.is_empty() {
        return;
    }
    println!("digits run (validation top-1 %, seconds per epoch):");
    let header: Vec<String> = tables.iter().map(|(l, _)| format!("{l:>18}")).collect();
    println!("  epoch | {}", header.join(" | "));
    for (i, (epoch, _, _)) in tables[0].1.iter().enumerate() {
        let cells: Vec<String> = tables
            .iter()
            .map(|(_, rows)| {
                let cell = rows
                    .get(i)
                    .map_or("-".to_string(), |(_, t, s)| format!("{t:6.2} {s:7.1} s"));
                format!("{cell:>18}")
            })
            .collect();
        println!("  {epoch:>5} | {}", cells.join(" | "));
    }
    let last = |rows: &[(String, f64, f64)]| rows.last().map_or(0.0, |r| r.1);
    let cpu = last(&tables[0].1);
    for (label, rows) in &tables[usize::from(device != "cpu")..] {
        let top1 = last(rows);
        tally.record(
            top1 >= 98.0,
            &format!("digits run on {label}"),
            &format!("final validation top-1 {top1:.2} % (CPU {cpu:.2} %; needs 98 %)"),
        );
    }
}

/// The rows of scripts/bench-vs-pytorch.sh on the device: images/s and peak RSS.
fn benches(device: &str, tally: &mut Tally) {
    let rows: [(&str, &str); 5] = [
        ("train VGG16, cifar head, 32x32, b64", "--mode train --attention none --head cifar --classes 100 --size 32 --batch 64 --steps 5"),
        ("train VGG16 + softmax, cifar head, 32x32, b64", "--mode train --attention softmax --head cifar --classes 100 --size 32 --batch 64 --steps 5"),
        ("inference VGG16, 224x224, b1", "--mode infer --attention none --head imagenet --classes 1000 --size 224 --batch 1 --steps 5"),
        ("inference VGG16 + softmax, 224x224, b1", "--mode infer --attention softmax --head imagenet --classes 1000 --size 224 --batch 1 --steps 2 --warmup 1"),
        ("train VGG16 + softmax, 224x224, b1", "--mode train --attention softmax --head imagenet --classes 1000 --size 224 --batch 1 --steps 2 --warmup 1"),
    ];
    for (name, flags) in rows {
        let mut args = vec!["bench"];
        args.extend(flags.split_whitespace());
        args.extend(["--device", device, "--no-breakdown"]);
        match la_cli(&args) {
            Ok(out) => {
                let pick = |prefix: &str| {
                    out.lines()
                        .rev()
                        .find(|l| l.starts_with(prefix))
                        .map_or("?".to_string(), |l| l[prefix.len()..].trim().to_string())
                };
                let detail = format!(
                    "{} images/s, peak RSS {} GiB",
                    pick("images/s:"),
                    pick("peak RSS:").trim_end_matches(" GiB")
                );
                tally.record(true, &format!("bench {name}"), &detail);
            }
            Err(e) => tally.record(false, &format!("bench {name}"), &format!("{e:#}")),
        }
    }
}
