//! The collective operations over MPI (the `mpi` feature): processes started by `mpirun`,
//! `mpiexec` or Slurm's `srun`, on one machine or several, with CPU tensors.
//!
//! rsmpi has no in-place all-reduce, so each sum goes into a receive buffer kept between
//! steps and is copied back.

use std::sync::Mutex;

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use super::Collective;
use crate::{Error, Result};

/// The world communicator of an MPI job. MPI is initialised when it is made and finalised
/// when it is dropped; only one can exist in a process.
pub struct MpiCollective {
    rank: usize,
    size: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    world: SimpleCommunicator,
    receive_f32: Vec<f32>,
    receive_f64: Vec<f64>,
    /// Finalises MPI when dropped, after the communicator.
    _universe: Universe,
}

// SAFETY: MPI is initialised with `Threading::Serialized` (checked in `init`): calls may come
// from any thread as long as no two run at once, and every call goes through the mutex.
unsafe impl Send for Inner {}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiCollective(rank {} of {})", self.rank, self.size)
    }
}

impl MpiCollective {
    /// Joins the MPI job this process was started in (a process started by hand is a job
    /// of one).
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| {
                Error::Collective("MPI was already initialised in this process".into())
            })?;
        if matches!(threading, Threading::Single | Threading::Funneled) {
            return Err(Error::Collective(format!(
                "this MPI offers only {threading:?} threading; la-cli calls MPI from its worker threads one at a time (MPI_THREAD_SERIALIZED)"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            rank,
            size,
            inner: Mutex::new(Inner {
                world,
                receive_f32: Vec::new(),
                receive_f64: Vec::new(),
                _universe: universe,
            }),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// MPI counts are C ints.
fn count(len: usize) -> Result<()> {
    if len > i32::MAX as usize {
        return Err(Error::Collective(format!(
            "{len} values in one MPI message; at most {} fit",
            i32::MAX
        )));
    }
    Ok(())
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        count(values.len())?;
        let mut inner = self.inner();
        let Inner {
            world, receive_f32, ..
        } = &mut *inner;
        receive_f32.resize(values.len(), 0.0);
        world.all_reduce_into(&*values, &mut receive_f32[..], SystemOperation::sum());
        values.copy_from_slice(receive_f32);
        Ok(())
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        count(values.len())?;
        let mut inner = self.inner();
        let Inner {
            world, receive_f64, ..
        } = &mut *inner;
        receive_f64.resize(values.len(), 0.0);
        world.all_reduce_into(&*values, &mut receive_f64[..], SystemOperation::sum());
        values.copy_from_slice(receive_f64);
        Ok(())
    }

    fn broadcast_f32(&self, values: &mut [f32], root: usize) -> Result<()> {
        count(values.len())?;
        let inner = self.inner();
        inner
            .world
            .process_at_rank(root as i32)
            .broadcast_into(values);
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        let inner = self.inner();
        let process = inner.world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        process.broadcast_into(&mut len);
        count(len as usize)?;
        bytes.resize(len as usize, 0);
        process.broadcast_into(&mut bytes[..]);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.inner().world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        // Not through the mutex: the thread that aborts may hold it, waiting in a call.
        mpi::topology::SimpleCommunicator::world().abort(code)
    }

    fn transport(&self) -> &'static str {
        "MPI"
    }
}
