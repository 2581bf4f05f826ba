//! Launches of `squares.cu`: the sums of squares of several contiguous CUDA tensors of one
//! dtype in two launches and one read, through a table of their device pointers.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, Result, Storage, Tensor};

use super::kernels::{elementwise, function, grid, view, Float, Module};
use super::plan::squares_table;

const SQUARES: Module = Module {
    name: "la_kernels_squares",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/squares.ptx")),
};

pub(crate) fn sums_of_squares<T: Float>(tensors: &[&Tensor]) -> Result<Vec<f64>> {
    let lens: Vec<usize> = tensors.iter().map(|t| t.elem_count()).collect();
    let (mut table, chunks) = squares_table(&lens);
    let n = tensors.len();
    // The storages stay locked (read) until the kernels have been queued.
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut cuda = Vec::with_capacity(n);
    for (storage, layout) in &guards {
        let Storage::Cuda(s) = &**storage else {
            bail!("sums of squares on CUDA: a tensor is not on a CUDA device")
        };
        cuda.push((s, *layout));
    }
    let Some(&(first, _)) = cuda.first() else {
        return Ok(vec![]);
    };
    let dev = first.device().clone();
    let stream = dev.cuda_stream();
    let views = cuda
        .iter()
        .map(|&(s, layout)| view::<T>(s, layout))
        .collect::<Result<Vec<_>>>()?;
    // The pointers are only read by the kernels below, queued on this same stream.
    let pointers: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
    for (slot, (pointer, _)) in table.iter_mut().zip(&pointers) {
        *slot = *pointer as i64;
    }
    let table = stream.clone_htod(&table).w()?;
    let (n_i, chunks_i) = (n as i64, chunks as i64);
    let mut partials = unsafe { dev.alloc::<f64>(chunks.max(1)) }?;
    if chunks > 0 {
        let f = function(&dev, &SQUARES, "chunk_squares", T::SUFFIX)?;
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(&table)
            .arg(&n_i)
            .arg(&chunks_i)
            .arg(&mut partials);
        unsafe { launch.launch(grid((chunks as u32, 1), 0)) }.w()?;
    }
    let mut out = unsafe { dev.alloc::<f64>(n) }?;
    let f = function(&dev, &SQUARES, "sum_chunks", "all")?;
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&table)
        .arg(&n_i)
        .arg(&chunks_i)
        .arg(&partials)
        .arg(&mut out);
    unsafe { launch.launch(elementwise(n)) }.w()?;
    drop(pointers);
    stream.clone_dtoh(&out).w()
}
