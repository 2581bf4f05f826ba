//! `la-cli study`: a grid of `la-cli train` settings x seeds, one run directory each,
//! resumable, ending with a table of mean ± std per setting, each setting's paired
//! difference from `attention = "none"`, and the validation curves.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use la_train::study::{self, RunResult, SettingSummary};

#[derive(clap::Args)]
#[command(after_help = "A study file (TOML):
  seeds = [0, 1, 2]
  preset = \"cifar100-fast\"        # optional: a train --preset under the options
  [base]                       # any `la-cli train` option, as in a --config file
  data = \"fashion-mnist\"
  data-dir = \"/usr/share/datasets/fashion-mnist\"
  epochs = 2
  [grid]                       # every combination of these values is a setting
  attention = [\"none\", \"softmax\", \"linear\"]
  attention-blocks = [[5], [4, 5]]

Runs go to <dir>/<setting>/seed-<seed>; a finished run is skipped, a broken one resumed.
The table is written to <dir>/study.md and study.csv, the curves to <dir>/study.png.")]
pub struct Args {
    /// The study file.
    #[arg(long)]
    config: PathBuf,
    /// The study's directory [default: runs/<the file's name>].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Start every run through this command, to train each data-parallel: for example
    /// "mpirun -n 4" or "srun" (words split at spaces). The study itself runs once, not
    /// under mpirun.
    #[arg(long, value_name = "COMMAND")]
    launcher: Option<String>,
}

/// A study file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StudyFile {
    seeds: Vec<u64>,
    /// A `la-cli train --preset` under the base options.
    #[serde(default)]
    preset: Option<String>,
    #[serde(default)]
    base: toml::Table,
    #[serde(default)]
    grid: toml::Table,
}

/// One point of the grid: (option, value) pairs.
#[derive(Clone, Debug)]
struct Setting {
    values: Vec<(String, toml::Value)>,
}

fn shown(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) => items.iter().map(shown).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

impl Setting {
    /// `attention=softmax attention-blocks=4,5`, or `base` for a study without a grid.
    fn label(&self) -> String {
        if self.values.is_empty() {
            return "base".into();
        }
        self.values
            .iter()
            .map(|(k, v)| format!("{k}={}", shown(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The label as a directory name: `attention-softmax_attention-blocks-4-5`.
    fn dir_name(&self) -> String {
        let clean = |s: String| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect()
        };
        if self.values.is_empty() {
            return "base".into();
        }
        self.values
            .iter()
            .map(|(k, v)| clean(format!("{k}-{}", shown(v))))
            .collect::<Vec<_>>()
            .join("_")
    }

    fn get(&self, key: &str) -> Option<&toml::Value> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The same setting with `key` set to `value`.
    fn with(&self, key: &str, value: toml::Value) -> Setting {
        let values = self
            .values
            .iter()
            .map(|(k, v)| (k.clone(), if k == key { value.clone() } else { v.clone() }))
            .collect();
        Setting { values }
    }
}

/// Options that mean nothing without attention: a setting with `attention = "none"` leaves
/// them out, so that the baseline is trained once, not once per value.
const ATTENTION_ONLY: [&str; 2] = ["attention-blocks", "attention-init"];

impl Setting {
    fn without_attention(&self) -> bool {
        self.get("attention").map(shown).as_deref() == Some("none")
    }

    fn normalised(mut self) -> Setting {
        if self.without_attention() {
            self.values
                .retain(|(k, _)| !ATTENTION_ONLY.contains(&k.as_str()));
        }
        self
    }

    /// The setting this one is compared with: the same, without attention.
    fn baseline(&self) -> Option<Setting> {
        (self.get("attention").is_some() && !self.without_attention()).then(|| {
            self.with("attention", toml::Value::String("none".into()))
                .normalised()
        })
    }
}

/// Every combination of the grid's values (its keys in the file's order of names), the
/// baselines without attention counted once.
fn expand(grid: &toml::Table) -> Result<Vec<Setting>> {
    let mut settings = vec![Setting { values: Vec::new() }];
    for (key, values) in grid {
        let toml::Value::Array(values) = values else {
            bail!("grid.{key}: expected a list of values");
        };
        if values.is_empty() {
            bail!("grid.{key}: the list is empty");
        }
        settings = settings
            .into_iter()
            .flat_map(|s| {
                values.iter().map(move |v| {
                    let mut values = s.values.clone();
                    values.push((key.clone(), v.clone()));
                    Setting { values }
                })
            })
            .collect();
    }
    let mut distinct: Vec<Setting> = Vec::new();
    for s in settings.into_iter().map(Setting::normalised) {
        if !distinct.iter().any(|d| d.dir_name() == s.dir_name()) {
            distinct.push(s);
        }
    }
    Ok(distinct)
}

/// Marks a run the study saw finish.
const DONE: &str = "study-done.json";

/// Runs `la-cli args` (through `launcher`'s words first, when given).
fn la_cli(launcher: &[String], args: &[&str]) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find la-cli itself")?;
    let mut command = match launcher.split_first() {
        Some((program, launcher_args)) => {
            let mut c = Command::new(program);
            c.args(launcher_args).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let status = command
        .args(args)
        .status()
        .with_context(|| match launcher.first() {
            Some(program) => format!("cannot start la-cli train through `{program}`"),
            None => "cannot start la-cli train".into(),
        })?;
    if !status.success() {
        let prefix: String = launcher.iter().map(|w| format!("{w} ")).collect();
        bail!("`{prefix}la-cli {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Trains (or resumes, or skips) one run.
fn run_one(
    file: &toml::Table,
    preset: Option<&str>,
    setting_dir: &Path,
    seed: u64,
    launcher: &[String],
) -> Result<bool> {
    let name = format!("seed-{seed}");
    let run = setting_dir.join(&name);
    // The setting's options, as its runs were started with: a study file edited since would
    // mix runs of two recipes in one row.
    let config = setting_dir.join("run.toml");
    let mut options = toml::to_string(file)?;
    if let Some(preset) = preset {
        options = format!("# with la-cli train --preset {preset}\n{options}");
    }
    match std::fs::read_to_string(&config) {
        Ok(old) if old != options => bail!(
            "{}: the study's options for this setting changed since its runs were started; give another --dir, or remove {}",
            config.display(),
            setting_dir.display()
        ),
        Ok(_) => {}
        Err(_) => {
            std::fs::create_dir_all(setting_dir)
                .with_context(|| format!("{}: cannot create", setting_dir.display()))?;
            la_core::write_atomically(&config, options.as_bytes())?;
        }
    }
    if run.join(DONE).exists() {
        return Ok(false);
    }
    if run.join("checkpoint.safetensors").exists() {
        la_cli(
            launcher,
            &["train", "--resume", run.to_str().context("non-UTF-8 path")?],
        )?;
    } else {
        if run.exists() {
            // Killed before its first checkpoint: nothing to keep.
            std::fs::remove_dir_all(&run)
                .with_context(|| format!("{}: cannot remove the broken run", run.display()))?;
        }
        let seed = seed.to_string();
        let mut args = vec![
            "train",
            "--config",
            config.to_str().context("non-UTF-8 path")?,
            "--seed",
            &seed,
            "--runs-dir",
            setting_dir.to_str().context("non-UTF-8 path")?,
            "--name",
            &name,
        ];
        if let Some(preset) = preset {
            args.extend(["--preset", preset]);
        }
        la_cli(launcher, &args)?;
    }
    la_core::write_atomically(
        &run.join(DONE),
        serde_json::json!({ "seed": seed, "finished": true })
            .to_string()
            .as_bytes(),
    )?;
    Ok(true)
}

fn minutes(seconds: f64) -> String {
    format!(
        "{}m {:02}s",
        (seconds / 60.0) as u64,
        (seconds % 60.0) as u64
    )
}

pub fn run(args: Args) -> Result<()> {
    if la_train::collective::launched_ranks().is_some_and(|n| n > 1) {
        bail!("la-cli study runs its grid once, not as MPI ranks: start it without mpirun and give --launcher \"mpirun -n N\" to train every run data-parallel");
    }
    let launcher: Vec<String> = args
        .launcher
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(String::from)
        .collect();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("{}: cannot read", args.config.display()))?;
    let file: StudyFile = toml::from_str(&text)
        .with_context(|| format!("{}: not a study file", args.config.display()))?;
    if file.seeds.is_empty() {
        bail!("{}: `seeds` is empty", args.config.display());
    }
    for key in ["seed", "name", "runs-dir", "resume"] {
        if file.base.contains_key(key) || file.grid.contains_key(key) {
            bail!(
                "{}: `{key}` is set by the study, not the file",
                args.config.display()
            );
        }
    }
    let dir = args.dir.clone().unwrap_or_else(|| {
        let stem = args
            .config
            .file_stem()
            .map_or("study".into(), |s| s.to_string_lossy().into_owned());
        PathBuf::from("runs").join(stem)
    });
    let settings = expand(&file.grid)?;
    let total = settings.len() * file.seeds.len();
    let started = Instant::now();
    let (mut done, mut trained) = (0usize, 0usize);
    for setting in &settings {
        let mut options = file.base.clone();
        options.extend(setting.values.iter().cloned());
        let setting_dir = dir.join(setting.dir_name());
        for &seed in &file.seeds {
            done += 1;
            let eta = if trained > 0 {
                let per_run = started.elapsed().as_secs_f64() / trained as f64;
                format!(
                    ", about {} left",
                    minutes(per_run * (total - done + 1) as f64)
                )
            } else {
                String::new()
            };
            eprintln!(
                "study: run {done}/{total}: {} seed {seed} ({} so far{eta})",
                setting.label(),
                minutes(started.elapsed().as_secs_f64())
            );
            if run_one(
                &options,
                file.preset.as_deref(),
                &setting_dir,
                seed,
                &launcher,
            )? {
                trained += 1;
            } else {
                eprintln!("study: already finished, skipped");
            }
        }
    }
    report(&dir, &settings, &file.seeds)
}

/// Reads every run back and writes the table and the curves.
fn report(dir: &Path, settings: &[Setting], seeds: &[u64]) -> Result<()> {
    let mut results = Vec::new();
    for setting in settings {
        let setting_dir = dir.join(setting.dir_name());
        let mut runs = Vec::new();
        for &seed in seeds {
            let run = setting_dir.join(format!("seed-{seed}"));
            runs.push(RunResult {
                seed,
                history: la_train::metrics::read_csv(&run)?,
            });
        }
        let first = setting_dir.join(format!("seed-{}", seeds[0]));
        let weights =
            la_vgg::load_weights(&first.join("best.safetensors"), &candle_core::Device::Cpu)?;
        let options = crate::commands::train::read_options(&first)?;
        let size = options.size.unwrap_or(32);
        let summary = la_vgg::summary::summarize(weights.config(), size);
        results.push((setting.clone(), runs, summary.params, summary.macs));
    }
    let rows: Vec<SettingSummary> = results
        .iter()
        .map(|(setting, runs, params, macs)| {
            let mut row = SettingSummary::new(&setting.label(), runs, *params, *macs);
            if let Some(baseline) = setting.baseline() {
                if let Some((b, base_runs, _, _)) = results
                    .iter()
                    .find(|(s, ..)| s.dir_name() == baseline.dir_name())
                {
                    row.paired = study::paired_best_top1(runs, base_runs, &b.label());
                }
            }
            row
        })
        .collect();
    let markdown = study::markdown_table(&rows);
    la_core::write_atomically(&dir.join("study.md"), markdown.as_bytes())?;
    la_core::write_atomically(&dir.join("study.csv"), study::csv_table(&rows).as_bytes())?;
    let curves: Vec<(String, Vec<study::CurvePoint>)> = results
        .iter()
        .map(|(s, runs, ..)| (s.label(), study::mean_curve(runs)))
        .collect();
    la_train::plot::study_curves(&dir.join("study.png"), &curves)?;
    println!("{markdown}");
    println!(
        "table: {} and {}; curves: {}",
        dir.join("study.md").display(),
        dir.join("study.csv").display(),
        dir.join("study.png").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_is_trained_once_whatever_the_attention_only_options() {
        let grid: toml::Table = toml::from_str(
            "attention = [\"none\", \"softmax\"]\nattention-blocks = [[5], [4, 5]]\nlr = [0.1, 0.01]",
        )
        .unwrap();
        let settings = expand(&grid).unwrap();
        let labels: Vec<String> = settings.iter().map(Setting::label).collect();
        assert_eq!(
            labels,
            [
                "attention=none lr=0.1",
                "attention=none lr=0.01",
                "attention=softmax attention-blocks=5 lr=0.1",
                "attention=softmax attention-blocks=5 lr=0.01",
                "attention=softmax attention-blocks=4,5 lr=0.1",
                "attention=softmax attention-blocks=4,5 lr=0.01",
            ]
        );
        // Each is compared with the baseline of its own learning rate.
        let baseline = settings[5].baseline().unwrap();
        assert_eq!(baseline.dir_name(), settings[1].dir_name());
        assert!(settings[0].baseline().is_none());
        assert_eq!(
            settings[4].dir_name(),
            "attention-softmax_attention-blocks-4-5_lr-0.1"
        );
        assert!(expand(&toml::from_str("attention = []").unwrap()).is_err());
    }
}
