//! The collective operations of data-parallel training (all-reduce, broadcast, barrier,
//! abort) behind one trait, so the trainer is the same code in one process and in N.
//!
//! - [`SingleProcess`]: one rank; every operation leaves its data as it is.
//! - [`ThreadGroup`]: N ranks as threads of one process, for tests and for trying the
//!   distributed path without a launcher.
//! - `mpi::MpiCollective` (feature `mpi`): processes started by `mpirun`/`srun`, CPU tensors.
//! - `nccl::NcclCollective` (feature `nccl`): GPU tensors summed by NCCL, beside a host
//!   collective (MPI, or one process).
//!
//! [`agree`] makes a step's outcome common: every rank learns whether any rank failed, and
//! then fails too, with that rank's error, instead of waiting for it forever.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::{DType, Tensor};

use crate::{Error, Result};

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

/// The operations data-parallel training needs. Every rank calls the same operations in
/// the same order with buffers of the same length; rank 0 is the one that writes files.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This process's rank, 0 to `size() - 1`.
    fn rank(&self) -> usize;
    /// How many ranks take part.
    fn size(&self) -> usize;
    /// Replaces `values` by their element-wise sum over every rank.
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()>;
    /// As [`Collective::all_reduce_sum_f32`], for counts and losses.
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Replaces `values` by rank `root`'s (the lengths agree).
    fn broadcast_f32(&self, values: &mut [f32], root: usize) -> Result<()>;
    /// Replaces `bytes` by rank `root`'s, whatever the lengths.
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Waits until every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank's process now, for an error the other ranks cannot be told of
    /// (they may be waiting in an operation this rank will never call).
    fn abort(&self, code: i32) -> !;
    /// What carries the operations, for messages: "MPI", "threads".
    fn transport(&self) -> &'static str;
    /// Whether [`Collective::all_reduce_sum`] takes whole tensors on `device` (NCCL on its
    /// GPU): the gradient buckets are then built there, not staged in host memory.
    fn reduces_tensors_on(&self, _device: &candle_core::Device) -> bool {
        false
    }

    /// The element-wise sum of `t` over every rank (f32 or f64, any device). The default
    /// goes through host memory; a transport that reduces device memory itself overrides it.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(t.clone());
        }
        let flat = t.flatten_all()?;
        let summed = match t.dtype() {
            DType::F64 => {
                let mut v = flat.to_vec1::<f64>()?;
                self.all_reduce_sum_f64(&mut v)?;
                Tensor::from_vec(v, t.shape(), t.device())?
            }
            dtype => {
                let mut v = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                self.all_reduce_sum_f32(&mut v)?;
                Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(dtype)?
            }
        };
        Ok(summed)
    }

    /// Rank `root`'s `t` (f32) on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(t.clone());
        }
        let mut v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.broadcast_f32(&mut v, root)?;
        Ok(Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?)
    }
}

/// One process: rank 0 of 1.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _: &mut [f32], _: usize) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>, _: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn transport(&self) -> &'static str {
        "one process"
    }
}

/// `values` of every rank, for the rank-ordered sums of [`ThreadGroup`].
#[derive(Debug, Default)]
struct Slots {
    f32s: Vec<Vec<f32>>,
    f64s: Vec<Vec<f64>>,
    bytes: Vec<u8>,
}

/// N ranks as N threads of one process, each holding one member; sums are taken in rank
/// order, so every member gets the same bits.
#[derive(Debug)]
pub struct ThreadGroup {
    rank: usize,
    size: usize,
    shared: Arc<(Mutex<Slots>, Barrier)>,
}

impl ThreadGroup {
    /// The `size` members of a new group, rank 0 first: give one to each thread.
    pub fn new(size: usize) -> Vec<ThreadGroup> {
        let slots = Slots {
            f32s: vec![Vec::new(); size],
            f64s: vec![Vec::new(); size],
            bytes: Vec::new(),
        };
        let shared = Arc::new((Mutex::new(slots), Barrier::new(size)));
        (0..size)
            .map(|rank| ThreadGroup {
                rank,
                size,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self) {
        self.shared.1.wait();
    }

    /// Every rank puts its values in its slot; after a barrier each sums the slots in rank
    /// order; a second barrier keeps the slots until all have read them.
    fn sum<T: Copy + std::ops::Add<Output = T>>(
        &self,
        values: &mut [T],
        slot: impl Fn(&mut Slots) -> &mut Vec<Vec<T>>,
    ) {
        slot(&mut self.slots())[self.rank] = values.to_vec();
        self.wait();
        {
            let mut slots = self.slots();
            let all = slot(&mut slots);
            for (i, v) in values.iter_mut().enumerate() {
                *v = all.iter().skip(1).fold(all[0][i], |acc, s| acc + s[i]);
            }
        }
        self.wait();
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.sum(values, |s| &mut s.f32s);
        Ok(())
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.sum(values, |s| &mut s.f64s);
        Ok(())
    }
    fn broadcast_f32(&self, values: &mut [f32], root: usize) -> Result<()> {
        let mut bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.broadcast_bytes(&mut bytes, root)?;
        for (v, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        if self.rank == root {
            self.slots().bytes = bytes.clone();
        }
        self.wait();
        if self.rank != root {
            bytes.clone_from(&self.slots().bytes);
        }
        self.wait();
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.wait();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        // The other threads may be waiting at a barrier: only ending the process frees them.
        eprintln!("rank {} of the thread group aborts the process", self.rank);
        std::process::exit(code)
    }
    fn transport(&self) -> &'static str {
        "threads"
    }
    /// The bucket tensors' path, which NCCL takes on a GPU, so the CPU tests run it too.
    fn reduces_tensors_on(&self, device: &candle_core::Device) -> bool {
        device.is_cpu()
    }
}

/// The outcome of a step on every rank, made common. When every rank succeeded, each gets
/// its own value and the element-wise sum of every rank's `len` figures. When any failed,
/// every rank fails: a failing rank with its own error (as [`Error::Reported`]), the others
/// with [`Error::Rank`] carrying the first failing rank's error text.
pub fn agree<T>(
    c: &dyn Collective,
    local: Result<(T, Vec<f64>)>,
    len: usize,
) -> Result<(T, Vec<f64>)> {
    if c.size() == 1 {
        return local;
    }
    // [failed flag of each rank..., figures...]; a failed rank adds zero figures.
    let size = c.size();
    let mut buffer = vec![0.0; size + len];
    match &local {
        Ok((_, figures)) if figures.len() == len => buffer[size..].copy_from_slice(figures),
        Ok((_, figures)) => {
            return Err(Error::Collective(format!(
                "rank {} has {} figures to sum, the step {len}",
                c.rank(),
                figures.len()
            )))
        }
        Err(_) => buffer[c.rank()] = 1.0,
    }
    c.all_reduce_sum_f64(&mut buffer)?;
    let Some(failed) = buffer[..size].iter().position(|&f| f != 0.0) else {
        let (value, _) = local?;
        return Ok((value, buffer[size..].to_vec()));
    };
    let mut message = match &local {
        Err(e) if failed == c.rank() => error_chain(e).into_bytes(),
        _ => Vec::new(),
    };
    c.broadcast_bytes(&mut message, failed)?;
    match local {
        Err(e) => Err(Error::Reported(Box::new(e))),
        Ok(_) => Err(Error::Rank {
            rank: failed,
            message: String::from_utf8_lossy(&message).into_owned(),
        }),
    }
}

/// Whether `flag` is true on any rank.
pub fn any(c: &dyn Collective, flag: bool) -> Result<bool> {
    if c.size() == 1 {
        return Ok(flag);
    }
    let mut v = [f64::from(u8::from(flag))];
    c.all_reduce_sum_f64(&mut v)?;
    Ok(v[0] > 0.0)
}

/// An error and its causes, as one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// A collective as the BatchNorm layers' [`la_kernels::norm::ReplicaSum`]: `--sync-bn`.
#[derive(Debug, Clone)]
pub struct ReplicaSum(pub Arc<dyn Collective>);

impl la_kernels::norm::ReplicaSum for ReplicaSum {
    fn sum(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        self.0
            .all_reduce_sum(&t.contiguous()?)
            .map_err(candle_core::Error::wrap)
    }
}

/// How many processes a launcher started with this one, from the variables it sets (Open
/// MPI's `mpirun`, MPICH's and Intel MPI's Hydra, Slurm's `srun`): `None` for a process
/// started by hand. A batch script's own `SLURM_NTASKS` does not count: only a step started
/// by `srun` is several processes.
pub fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.parse::<usize>().ok())
}
