//! Which ranks this process trains with: one process, or one of the N that `mpirun` (or
//! `srun`) started, joined through MPI.

use std::sync::Arc;

use anyhow::Result;
use la_train::{Collective, SingleProcess};

/// The ranks of this run: MPI's when a launcher started several processes, else one.
pub fn join() -> Result<Arc<dyn Collective>> {
    match la_train::collective::launched_ranks() {
        None | Some(0 | 1) => Ok(Arc::new(SingleProcess)),
        Some(n) => with_mpi(n),
    }
}

#[cfg(feature = "mpi")]
fn with_mpi(launched: usize) -> Result<Arc<dyn Collective>> {
    let mpi = la_train::collective::mpi::MpiCollective::init()?;
    if mpi.size() != launched {
        anyhow::bail!(
            "the launcher announced {launched} processes, but MPI joined {}: is this la-cli linked against the MPI whose mpirun started it?",
            mpi.size()
        );
    }
    Ok(Arc::new(mpi))
}

#[cfg(not(feature = "mpi"))]
fn with_mpi(launched: usize) -> Result<Arc<dyn Collective>> {
    anyhow::bail!(
        "started as one of {launched} processes (by mpirun or srun), but this la-cli was built without MPI: \
         rebuild it with `cargo build --release -p la-cli --features mpi` (docs/distributed.md)"
    )
}

/// The collective for tensors on `device`: with several ranks on GPUs and the `nccl`
/// feature, NCCL between the ranks' GPUs beside `host`; otherwise `host` itself.
pub fn on_device(
    host: Arc<dyn Collective>,
    device: &candle_core::Device,
) -> Result<Arc<dyn Collective>> {
    #[cfg(feature = "nccl")]
    if host.size() > 1 && device.is_cuda() {
        let nccl = la_train::collective::nccl::NcclCollective::init(host, device)?;
        return Ok(Arc::new(nccl));
    }
    let _ = device;
    Ok(host)
}

/// The `--device` of this rank: `cuda` means the GPU of this rank's place on its machine
/// (its local rank), unless the launcher left each rank one visible GPU
/// (`CUDA_VISIBLE_DEVICES` of one entry, as Slurm's `--gpus-per-task=1`); any other
/// spelling is kept.
pub fn rank_device(spec: &str, ranks: usize) -> String {
    let local_rank = [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.parse::<usize>().ok());
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    device_for(spec, ranks, local_rank, visible.as_deref())
}

fn device_for(
    spec: &str,
    ranks: usize,
    local_rank: Option<usize>,
    visible: Option<&str>,
) -> String {
    let one_visible = visible.is_some_and(|v| !v.is_empty() && !v.contains(','));
    match (spec, local_rank) {
        ("cuda", Some(local)) if ranks > 1 && !one_visible => format!("cuda:{local}"),
        _ => spec.to_string(),
    }
}

/// Ends this run after `error`: with other ranks, every rank is ended through the launcher
/// (MPI's abort), since they may be waiting for this one in an operation it will never
/// join; a failure every rank already knows of ends each rank on its own.
pub fn end_on_error(collective: &dyn Collective, error: &anyhow::Error) {
    if collective.size() == 1 {
        return;
    }
    let known_to_all = error.chain().any(|e| {
        e.is::<Interrupted>()
            || matches!(
                e.downcast_ref::<la_train::Error>(),
                Some(la_train::Error::Rank { .. } | la_train::Error::Reported(_))
            )
    });
    if !known_to_all {
        eprintln!("error (rank {}): {error:#}", collective.rank());
        collective.abort(1);
    }
}

/// A run stopped by Ctrl-C: every rank stopped at the same step, nothing to end.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

#[cfg(test)]
mod tests {
    use super::device_for;

    #[test]
    fn each_rank_takes_the_gpu_of_its_local_rank() {
        assert_eq!(device_for("cuda", 4, Some(2), None), "cuda:2");
        assert_eq!(device_for("cuda", 4, Some(2), Some("0,1,2,3")), "cuda:2");
        // One GPU left visible to each rank: it is device 0.
        assert_eq!(device_for("cuda", 4, Some(2), Some("2")), "cuda");
        // A named device, the CPU, or one process: as given.
        assert_eq!(device_for("cuda:1", 4, Some(2), None), "cuda:1");
        assert_eq!(device_for("cpu", 4, Some(2), None), "cpu");
        assert_eq!(device_for("cuda", 1, Some(0), None), "cuda");
        assert_eq!(device_for("cuda", 4, None, None), "cuda");
    }
}
