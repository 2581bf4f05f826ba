//! Progress of a training run: an indicatif bar per epoch on a terminal, plain log lines
//! otherwise (CI logs, pipes).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use la_train::{Control, EpochRecord, Observer, StepInfo};

/// Set by SIGUSR1: as Ctrl-C, a stop after the current step with a resumable checkpoint.
/// Under `mpirun`, Ctrl-C ends the ranks at once, but Open MPI forwards SIGUSR1 to every rank
/// (`kill -USR1 <mpirun's pid>`, or Slurm's `scancel --signal=USR1`).
static STOP_SIGNAL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP_SIGNAL.store(true, Ordering::SeqCst);
}

pub struct BarObserver {
    bar: Option<ProgressBar>,
    terminal: bool,
    last_logged: std::time::Instant,
    /// Set by Ctrl-C: the run stops after the current step with a resumable checkpoint.
    interrupted: Arc<AtomicBool>,
    /// Shows nothing (the ranks other than 0 of a data-parallel run), but still stops on
    /// Ctrl-C.
    quiet: bool,
}

impl BarObserver {
    pub fn new() -> Self {
        Self {
            bar: None,
            terminal: std::io::stderr().is_terminal(),
            last_logged: std::time::Instant::now(),
            interrupted: Arc::new(AtomicBool::new(false)),
            quiet: false,
        }
    }

    /// An observer that shows nothing when `quiet`.
    pub fn quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    /// Whether Ctrl-C (or SIGUSR1) stopped the run.
    pub fn was_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    /// Makes the first Ctrl-C stop the run cleanly (a second one exits at once).
    pub fn stop_on_ctrl_c(self) -> Self {
        let flag = Arc::clone(&self.interrupted);
        let installed = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: stopping after this step (Ctrl-C again to quit now)");
        });
        if let Err(e) = installed {
            eprintln!("note: Ctrl-C will not stop the run cleanly: {e}");
        }
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                libc::SIGUSR1,
                on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
        self
    }
}

impl Observer for BarObserver {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize) {
        if self.quiet {
            return;
        }
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

    fn step(&mut self, s: &StepInfo) -> Control {
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
            None if self.quiet => {}
            None => {
                if self.last_logged.elapsed().as_secs() >= 10 || s.batch == s.batches {
                    eprintln!("  batch {}/{} {msg}", s.batch, s.batches);
                    self.last_logged = std::time::Instant::now();
                }
            }
        }
        if STOP_SIGNAL.load(Ordering::SeqCst)
            && !self.interrupted.swap(true, Ordering::SeqCst)
            && !self.quiet
        {
            self.message("SIGUSR1: stopping after this step");
        }
        if self.interrupted.load(Ordering::SeqCst) {
            Control::Stop
        } else {
            Control::Continue
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
        if self.quiet {
            return Control::Continue;
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
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
}
