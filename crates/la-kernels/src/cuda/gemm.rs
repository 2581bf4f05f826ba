//! Launches of `gemm.cu`: one strided product (`plan::GemmShape`) per launch, for the
//! projections between maps and tokens (`crate::projection`), forward and backward.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;

use super::kernels::{function, Float, Module};
use super::plan::{GemmShape, BLOCK};

const GEMM: Module = Module {
    name: "la_kernels_gemm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/gemm.ptx")),
};

// SAFETY: a #[repr(C)] struct of integers, laid out as gemm.cu's `GemmShape`.
unsafe impl DeviceRepr for GemmShape {}

/// `c = start + a b` as `shape` says, for `batch` products (`start` is the bias of C's row
/// when `bias` is given and `shape.bias_rows` is set, C's old value when `shape.accumulate`
/// is, else 0).
pub(crate) fn gemm<T: Float>(
    [a, b]: [&CudaView<T>; 2],
    c: &mut CudaSlice<T>,
    bias: Option<&CudaView<T>>,
    shape: GemmShape,
    batch: usize,
    dev: &CudaDevice,
) -> Result<()> {
    let f = function(dev, &GEMM, "gemm_strided", T::SUFFIX)?;
    let stream = dev.cuda_stream();
    let null = 0u64;
    let mut launch = stream.launch_builder(&f);
    launch.arg(a).arg(b).arg(c);
    match bias {
        Some(bias) => launch.arg(bias),
        None => launch.arg(&null),
    };
    launch.arg(&shape);
    let config = LaunchConfig {
        grid_dim: shape.blocks(batch),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { launch.launch(config) }.w()?;
    Ok(())
}
