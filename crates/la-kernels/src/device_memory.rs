//! The most device memory the process's tensors have held at once, for `la-cli bench`: the
//! counterpart of PyTorch's `torch.cuda.max_memory_allocated`.
//!
//! Candle allocates through cudarc, which on GPUs with stream-ordered allocation (all
//! current ones) takes every buffer from the device's memory pool; the pool's high-water
//! mark of memory in use (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`) is then exactly the peak of live
//! buffers (tensors, cuDNN's workspace), without the CUDA context or cuBLAS's own workspace.

use candle_core::{Device, Result};

/// Peak bytes in use on `device` since the process started: `None` on the CPU, in a build
/// without the `cuda` feature, or on a GPU without stream-ordered allocation.
pub fn peak(device: &Device) -> Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda_peak(dev),
        _ => Ok(None),
    }
}

#[cfg(feature = "cuda")]
fn cuda_peak(dev: &candle_core::CudaDevice) -> Result<Option<u64>> {
    use candle_core::cuda_backend::WrapErr;
    use cudarc::driver::sys;

    let stream = dev.cuda_stream();
    let context = stream.context();
    if !context.has_async_alloc() {
        return Ok(None);
    }
    context.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut bytes: u64 = 0;
    // SAFETY: the out-pointers are valid for the calls; the device is the context's own.
    unsafe {
        sys::cuDeviceGetMemPool(&mut pool, context.cu_device())
            .result()
            .w()?;
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut bytes as *mut u64).cast(),
        )
        .result()
        .w()?;
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cpu_has_no_device_memory_to_report() {
        assert_eq!(super::peak(&candle_core::Device::Cpu).unwrap(), None);
    }
}
