//! `--device` and `--threads`.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// `cpu`, `cuda`, `cuda:N` or `auto` (a GPU when there is one, else the CPU with a notice).
pub fn parse_device(spec: &str) -> Result<Device> {
    let cuda = |ordinal: usize| -> Result<Device> {
        if !candle_core::utils::cuda_is_available() {
            bail!("--device {spec}: this la-cli was built without CUDA support (rebuild with `--features cuda`)");
        }
        Device::new_cuda(ordinal)
            .with_context(|| format!("--device {spec}: no usable CUDA device {ordinal}"))
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        "auto" => {
            if !candle_core::utils::cuda_is_available() {
                eprintln!("note: no CUDA device (this la-cli was built without the `cuda` feature); using the CPU");
                return Ok(Device::Cpu);
            }
            match Device::new_cuda(0) {
                Ok(d) => Ok(d),
                Err(e) => {
                    let first = e.to_string().lines().next().unwrap_or("").to_string();
                    eprintln!("note: no CUDA device ({first}); using the CPU");
                    Ok(Device::Cpu)
                }
            }
        }
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => bail!("--device {other}: expected cpu, cuda, cuda:N or auto"),
        },
    }
}

pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!("the CPU ({} threads)", rayon::current_num_threads()),
        Device::Cuda(_) => "CUDA".to_string(),
        _ => format!("{device:?}"),
    }
}

/// Sizes the thread pool shared by Candle's kernels and the data loader.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // Candle's CPU kernels read RAYON_NUM_THREADS; the loader uses the global pool.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot size the thread pool")?;
    }
    Ok(())
}
