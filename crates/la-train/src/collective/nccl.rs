//! Sums of GPU tensors over NCCL (the `nccl` feature, with `cuda`): the gradients stay in GPU
//! memory and travel over NVLink, PCIe or InfiniBand. Everything on the host (figures, error
//! messages, the weight check) goes through the host collective the ranks already share:
//! MPI in a job of several ranks, which also carries NCCL's unique id from rank 0 to the
//! others (as NCCL's documentation and llm.c bootstrap it), or one process.

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};

use super::Collective;
use crate::{Error, Result};

/// A communicator of one rank per GPU, beside the host collective that started it.
pub struct NcclCollective {
    host: Arc<dyn Collective>,
    device: Device,
    comm: Mutex<SendComm>,
}

/// NCCL's communicator holds raw pointers.
struct SendComm(Comm);

// SAFETY: a communicator may be used from any thread as long as calls do not overlap, and
// every call goes through the mutex.
unsafe impl Send for SendComm {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclCollective(rank {} of {} over {})",
            self.host.rank(),
            self.host.size(),
            self.host.transport()
        )
    }
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Collective(format!("NCCL {what}: {e:?}"))
}

impl NcclCollective {
    /// Joins every rank of `host` in an NCCL communicator on `device` (this rank's GPU):
    /// rank 0 makes the unique id and `host` carries it to the others.
    pub fn init(host: Arc<dyn Collective>, device: &Device) -> Result<Self> {
        let cuda = device.as_cuda_device()?;
        let mut id_bytes = if host.rank() == 0 {
            let id = Id::new().map_err(|e| nccl_error("unique id", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        host.broadcast_bytes(&mut id_bytes, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id_bytes.len() != internal.len() {
            return Err(Error::Collective(format!(
                "NCCL's unique id arrived with {} bytes, not {}",
                id_bytes.len(),
                internal.len()
            )));
        }
        for (slot, &b) in internal.iter_mut().zip(&id_bytes) {
            *slot = b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            host.rank(),
            host.size(),
            Id::uninit(internal),
        )
        .map_err(|e| nccl_error("communicator", e))?;
        Ok(Self {
            host,
            device: device.clone(),
            comm: Mutex::new(SendComm(comm)),
        })
    }

    /// The sum over the ranks of `t`, an f32 tensor on this communicator's GPU, computed by
    /// NCCL into a new buffer.
    fn all_reduce_on_device(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            return Err(Error::Collective("NCCL sums GPU tensors only".into()));
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::Collective("a non-contiguous tensor".into()))?;
        let source = cuda.as_cuda_slice::<f32>()?.slice(start..end);
        let device = cuda.device.clone();
        let mut sum = device.alloc_zeros::<f32>(end - start)?;
        {
            let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            comm.0
                .all_reduce(&source, &mut sum, &ReduceOp::Sum)
                .map_err(|e| nccl_error("all-reduce", e))?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(sum, device));
        Ok(Tensor::from_storage(
            storage,
            t.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn size(&self) -> usize {
        self.host.size()
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.host.all_reduce_sum_f32(values)
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.host.all_reduce_sum_f64(values)
    }
    fn broadcast_f32(&self, values: &mut [f32], root: usize) -> Result<()> {
        self.host.broadcast_f32(values, root)
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        self.host.broadcast_bytes(bytes, root)
    }
    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.host.abort(code)
    }
    fn transport(&self) -> &'static str {
        "NCCL"
    }
    fn reduces_tensors_on(&self, device: &Device) -> bool {
        device.same_device(&self.device)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if t.dtype() == DType::F32 && self.reduces_tensors_on(t.device()) {
            self.all_reduce_on_device(t)
        } else {
            self.host.all_reduce_sum(t)
        }
    }
}
