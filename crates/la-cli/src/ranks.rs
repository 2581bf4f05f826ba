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
