//! `la-cli`: VGG networks with spatial attention, from the command line.

mod commands;
mod cpu_peak;
mod data_args;
mod device;
mod heatmap;
mod model_args;
mod model_file;
mod precision;
mod progress;
mod ranks;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

// glibc's malloc returns the large activation buffers of every step to the system and takes
// them back on the next: a large share of a training step went to system time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Spins of Candle's pool workers before they sleep (read when the pool starts).
const CANDLE_SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[derive(Parser)]
#[command(
    name = "la-cli",
    version,
    about = "VGG with spatial attention: inspect, train and run models",
    after_help = "Examples:\n  la-cli summary --arch vgg16 --attention softmax --size 224\n  la-cli summary --weights weights/vgg16-softmax-imagenet.safetensors --size 32"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (with no flags: VGG16 + softmax attention on the built-in digits).
    Train(Box<commands::train::Args>),
    /// A grid of training settings x seeds, resumable, summarised as mean ± std with each
    /// setting's paired difference from no attention, and the curves.
    Study(commands::study::Args),
    /// Top-1/top-5, per-class accuracy and a confusion matrix on a data set.
    Eval(commands::eval::Args),
    /// Classify image files.
    Predict(commands::predict::Args),
    /// Write a model as a PyTorch state dict in the article's, torchvision's or timm's layout.
    Export(commands::export::Args),
    /// Print every layer's output shape, parameters and multiply-accumulates.
    Summary(commands::summary::Args),
    /// Training or inference images/s on random data, with a per-block breakdown.
    Bench(commands::bench::Args),
    /// Download data sets and describe them.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
    /// Class-activation maps (Grad-CAM and six more) over an image, side by side, with
    /// faithfulness scores (PNG).
    Gradcam(commands::gradcam::GradcamArgs),
    /// What one position attends to, for every attention module, in one grid (PNG).
    AttentionMap(commands::attention_map::AttentionMapArgs),
    /// Check a device (a GPU) against the CPU: every op, a training step, a run, the benches.
    Selftest(commands::selftest::Args),
}

fn main() -> std::process::ExitCode {
    // Die quietly when the reader of our output goes away (`la-cli data info ... | head`),
    // as command-line tools do, instead of panicking on a failed print.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Keep freed memory instead of returning it to the system after 10 ms (mimalloc's
    // default): every training step frees and reallocates the same activation sizes, and the
    // kernel zeroing the returned pages took about 9 % of a VGG16 step. As PyTorch's caching,
    // the resident size then stays at the peak of a step.
    // SAFETY: sets a plain option value, before any other thread starts.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
    // Candle's CPU ops run on their own thread pool, whose workers spin 25,000 times after
    // each op before sleeping. On a machine with as many cores as rayon threads, that spinning
    // takes the cores our ops run on: VGG16 + linear attention at 224x224 took 0.126-0.130 s
    // per image on average with it, 0.114-0.116 s without. A value the user set is kept.
    if std::env::var_os(CANDLE_SPIN_LIMIT).is_none() {
        // SAFETY: no other thread exists yet that could read the environment concurrently.
        unsafe { std::env::set_var(CANDLE_SPIN_LIMIT, "0") };
    }
    // `train`'s options are all optional (they layer over a file and presets), so clap cannot
    // show their defaults: they are written into the help from the one table of defaults.
    let command = Cli::command().mut_subcommand("train", commands::train::document_defaults);
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Train(args) => commands::train::run(*args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Predict(args) => commands::predict::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Summary(args) => commands::summary::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Data(command) => commands::data::run(command),
        Command::Study(args) => commands::study::run(args),
        Command::Gradcam(args) => commands::gradcam::run_gradcam(args),
        Command::AttentionMap(args) => commands::attention_map::run_attention_map(args),
        Command::Selftest(args) => commands::selftest::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// UTC time as YYYYmmdd-HHMMSS, for run names.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}
