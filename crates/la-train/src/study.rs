//! A study's statistics: for each setting (a point of a grid of options), its runs over
//! several seeds summarised as mean and standard deviation, and each setting's paired
//! difference from a baseline over the same seeds, so that a gain can be read against the
//! noise between seeds.

use crate::record::EpochRecord;

/// One finished run of a setting.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub seed: u64,
    pub history: Vec<EpochRecord>,
}

impl RunResult {
    fn val(&self, top5: bool) -> impl Iterator<Item = f64> + '_ {
        self.history
            .iter()
            .filter_map(move |r| if top5 { r.val_top5 } else { r.val_top1 })
    }

    /// The best validation top-1 or top-5 over the epochs, in percent.
    pub fn best(&self, top5: bool) -> Option<f64> {
        self.val(top5).reduce(f64::max).map(|v| v * 100.0)
    }

    /// The last epoch's validation top-1 or top-5, in percent.
    pub fn last(&self, top5: bool) -> Option<f64> {
        self.val(top5).last().map(|v| v * 100.0)
    }

    /// Training images per second over the whole run.
    pub fn images_per_s(&self) -> Option<f64> {
        let images: f64 = self
            .history
            .iter()
            .map(|r| r.images_per_s * r.seconds)
            .sum();
        let seconds: f64 = self.history.iter().map(|r| r.seconds).sum();
        (seconds > 0.0).then(|| images / seconds)
    }
}

/// Mean and sample standard deviation (n - 1; 0 for a single value).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

pub fn mean_std(values: &[f64]) -> Option<MeanStd> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Some(MeanStd {
        mean,
        std: var.sqrt(),
        n,
    })
}

/// A setting's difference from its baseline over the seeds both have: the mean of the
/// per-seed differences and its standard error (std / sqrt(n)).
#[derive(Clone, Debug, PartialEq)]
pub struct Paired {
    pub baseline: String,
    pub mean: f64,
    /// None for a single pair: one difference says nothing of the noise.
    pub standard_error: Option<f64>,
    pub n: usize,
}

/// The paired difference of `runs` from `baseline` in best top-1, over common seeds.
pub fn paired_best_top1(runs: &[RunResult], baseline: &[RunResult], name: &str) -> Option<Paired> {
    let diffs: Vec<f64> = runs
        .iter()
        .filter_map(|r| {
            let b = baseline.iter().find(|b| b.seed == r.seed)?;
            Some(r.best(false)? - b.best(false)?)
        })
        .collect();
    let s = mean_std(&diffs)?;
    Some(Paired {
        baseline: name.to_string(),
        mean: s.mean,
        standard_error: (s.n > 1).then(|| s.std / (s.n as f64).sqrt()),
        n: s.n,
    })
}

/// One row of the study's table.
#[derive(Clone, Debug)]
pub struct SettingSummary {
    pub label: String,
    pub runs: usize,
    pub best_top1: Option<MeanStd>,
    pub final_top1: Option<MeanStd>,
    pub best_top5: Option<MeanStd>,
    pub final_top5: Option<MeanStd>,
    pub images_per_s: Option<MeanStd>,
    pub params: u64,
    pub macs: u64,
    pub paired: Option<Paired>,
}

impl SettingSummary {
    pub fn new(label: &str, runs: &[RunResult], params: u64, macs: u64) -> Self {
        let stat = |f: &dyn Fn(&RunResult) -> Option<f64>| {
            mean_std(&runs.iter().filter_map(f).collect::<Vec<_>>())
        };
        SettingSummary {
            label: label.to_string(),
            runs: runs.len(),
            best_top1: stat(&|r| r.best(false)),
            final_top1: stat(&|r| r.last(false)),
            best_top5: stat(&|r| r.best(true)),
            final_top5: stat(&|r| r.last(true)),
            images_per_s: stat(&|r| r.images_per_s()),
            params,
            macs,
            paired: None,
        }
    }
}

fn pm(s: &Option<MeanStd>, digits: usize) -> String {
    s.map_or("-".into(), |s| {
        format!("{:.digits$} ± {:.digits$}", s.mean, s.std)
    })
}

fn paired_text(p: &Option<Paired>) -> String {
    p.as_ref().map_or("-".into(), |p| match p.standard_error {
        Some(se) => format!("{:+.2} ± {se:.2} (n = {})", p.mean, p.n),
        None => format!("{:+.2} (n = 1)", p.mean),
    })
}

/// The table in markdown: mean ± std over the seeds, accuracies in percent.
pub fn markdown_table(rows: &[SettingSummary]) -> String {
    let mut out = String::from(
        "| setting | runs | best top-1 % | final top-1 % | best top-5 % | final top-5 % | best top-1 vs baseline (± s.e.) | params | MMACs | train img/s |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |\n",
            r.label,
            r.runs,
            pm(&r.best_top1, 2),
            pm(&r.final_top1, 2),
            pm(&r.best_top5, 2),
            pm(&r.final_top5, 2),
            paired_text(&r.paired),
            la_vgg::summary::thousands(r.params),
            r.macs as f64 / 1e6,
            pm(&r.images_per_s, 0),
        ));
    }
    out
}

/// A CSV field, quoted (RFC 4180) when it holds a comma or a quote: labels such as
/// `attention-blocks=4,5` do.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The same table as CSV, one column per figure.
pub fn csv_table(rows: &[SettingSummary]) -> String {
    let mut out = String::from(
        "setting,runs,best_top1_mean,best_top1_std,final_top1_mean,final_top1_std,best_top5_mean,best_top5_std,final_top5_mean,final_top5_std,vs_baseline,vs_baseline_mean,vs_baseline_se,params,macs,images_per_s_mean,images_per_s_std\n",
    );
    let f =
        |s: &Option<MeanStd>| s.map_or(",".to_string(), |s| format!("{:.4},{:.4}", s.mean, s.std));
    for r in rows {
        let paired = r.paired.as_ref().map_or(",,".to_string(), |p| {
            let se = p
                .standard_error
                .map_or(String::new(), |se| format!("{se:.4}"));
            format!("{},{:.4},{se}", csv_field(&p.baseline), p.mean)
        });
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            csv_field(&r.label),
            r.runs,
            f(&r.best_top1),
            f(&r.final_top1),
            f(&r.best_top5),
            f(&r.final_top5),
            paired,
            r.params,
            r.macs,
            f(&r.images_per_s),
        ));
    }
    out
}

/// (epoch, mean, std) of a setting's validation top-1 in percent.
pub type CurvePoint = (usize, f64, f64);

/// Per epoch, the validation top-1 over the runs that reached it.
pub fn mean_curve(runs: &[RunResult]) -> Vec<CurvePoint> {
    let epochs = runs.iter().map(|r| r.history.len()).max().unwrap_or(0);
    (0..epochs)
        .filter_map(|e| {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.history.get(e).and_then(|h| h.val_top1).map(|v| v * 100.0))
                .collect();
            mean_std(&values).map(|s| (e + 1, s.mean, s.std))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64, top1: &[f64]) -> RunResult {
        let history = top1
            .iter()
            .enumerate()
            .map(|(i, &v)| EpochRecord {
                epoch: i + 1,
                lr: 0.1,
                train_loss: 1.0,
                train_top1: 0.5,
                val_loss: Some(1.0),
                val_top1: Some(v),
                val_top5: Some(1.0),
                ema_val_loss: None,
                ema_val_top1: None,
                seconds: 10.0,
                images_per_s: 100.0,
            })
            .collect();
        RunResult { seed, history }
    }

    #[test]
    fn statistics_pair_runs_by_seed() {
        let none = [run(1, &[0.5, 0.6]), run(2, &[0.7, 0.6])];
        let kind = [run(2, &[0.8, 0.75]), run(1, &[0.6, 0.62])];
        let s = SettingSummary::new("k", &kind, 1, 1);
        let best = s.best_top1.unwrap();
        assert!((best.mean - 71.0).abs() < 1e-9 && (best.std - 162f64.sqrt()).abs() < 1e-9);
        // Seed 1: 62 - 60; seed 2: 80 - 70.
        let p = paired_best_top1(&kind, &none, "none").unwrap();
        assert!((p.mean - 6.0).abs() < 1e-9);
        assert!((p.standard_error.unwrap() - 4.0).abs() < 1e-9);
        let one = paired_best_top1(&kind[..1], &none, "none").unwrap();
        assert_eq!((one.n, one.standard_error), (1, None));
        assert_eq!(
            csv_field("attention-blocks=4,5"),
            "\"attention-blocks=4,5\""
        );
        let curve = mean_curve(&none);
        let want = [(1, 60.0, 200f64.sqrt()), (2, 60.0, 0.0)];
        assert_eq!(curve.len(), 2);
        for (got, want) in curve.iter().zip(want) {
            assert!(
                got.0 == want.0 && (got.1 - want.1).abs() < 1e-9 && (got.2 - want.2).abs() < 1e-6
            );
        }
    }
}
