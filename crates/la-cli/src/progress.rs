//! Progress of a training run: an indicatif bar per epoch on a terminal, plain log lines
//! otherwise (CI logs, pipes).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use la_train::{Control, EpochRecord, Observer, StepInfo};

pub struct BarObserver {
    bar: Option<ProgressBar>,
    terminal: bool,
    last_logged: std::time::Instant,
}

impl BarObserver {
    pub fn new() -> Self {
        Self {
            bar: None,
            terminal: std::io::stderr().is_terminal(),
            last_logged: std::time::Instant::now(),
        }
    }
}

impl Observer for BarObserver {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize) {
        if self.terminal {
            let bar = ProgressBar::new(batches as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{epoch}/{epochs}"));
            self.bar = Some(bar);
        } else {
            eprintln!("epoch {epoch}/{epochs}: {batches} batches");
        }
        self.last_logged = std::time::Instant::now();
    }

    fn step(&mut self, s: &StepInfo) {
        let msg = format!(
            "loss {:.4} acc {:.2}% lr {:.2e} {:.0} img/s",
            s.running_loss,
            s.running_top1 * 100.0,
            s.lr,
            s.images_per_s
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(s.batch as u64);
                bar.set_message(msg);
            }
            None => {
                if self.last_logged.elapsed().as_secs() >= 10 || s.batch == s.batches {
                    eprintln!("  batch {}/{} {msg}", s.batch, s.batches);
                    self.last_logged = std::time::Instant::now();
                }
            }
        }
    }

    fn evaluating(&mut self, batches: usize) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("evaluating ({batches} batches)"));
        }
    }

    fn epoch_end(&mut self, r: &EpochRecord) -> Control {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let val = match (r.val_loss, r.val_top1, r.val_top5) {
            (Some(l), Some(t1), Some(t5)) => format!(
                " | val loss {l:.4} top-1 {:.2}% top-5 {:.2}%",
                t1 * 100.0,
                t5 * 100.0
            ),
            _ => String::new(),
        };
        let val = match r.ema_val_top1 {
            Some(t1) => format!("{val} (EMA top-1 {:.2}%)", t1 * 100.0),
            None => val,
        };
        eprintln!(
            "epoch {}: train loss {:.4} top-1 {:.2}%{val} | lr {:.2e} | {:.1} s, {:.0} img/s",
            r.epoch,
            r.train_loss,
            r.train_top1 * 100.0,
            r.lr,
            r.seconds,
            r.images_per_s
        );
        Control::Continue
    }

    fn message(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
}
