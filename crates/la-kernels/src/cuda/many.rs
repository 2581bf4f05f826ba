//! Launches that reach many tensors at once through a table of their device pointers
//! (`plan::chunk_table`): the sums of squares of several tensors (`squares.cu`: two launches
//! and one read) and the optimisers' updates of many parameters (`sgd.cu`'s `sgd_many`,
//! `adamw.cu`'s `adamw_many`: one launch each).

use candle_core::backend::BackendStorage;
use std::cell::RefCell;
use std::collections::hash_map::{Entry, HashMap};

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{bail, Result, Storage, Tensor};

use super::kernels::{elementwise, function, grid, view, Float, Module, ADAMW, SGD};
use super::plan::chunk_table;

const SQUARES: Module = Module {
    name: "la_kernels_squares",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/squares.ptx")),
};

/// The CUDA storage and layout behind each tensor, locked for reading while the guards live.
fn cuda_storages<'a, G: std::ops::Deref<Target = Storage>>(
    guards: &'a [(G, &'a candle_core::Layout)],
) -> Result<Vec<(&'a candle_core::CudaStorage, &'a candle_core::Layout)>> {
    guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cuda(s) => Ok((s, *layout)),
            _ => bail!("a CUDA kernel over many tensors got one that is not on a CUDA device"),
        })
        .collect()
}

/// Runs `launch` with the device, the uploaded table of `tensors` (`plan::chunk_table`: the
/// tensors are its pointer columns one after another, each column one tensor per entry of
/// `lens`) and the number of chunks, while the tensors' storages stay locked.
fn with_table<T: Float, R>(
    tensors: &[&Tensor],
    lens: &[usize],
    launch: impl FnOnce(&CudaDevice, &CudaSlice<i64>, usize) -> Result<R>,
) -> Result<R> {
    let columns = tensors.len() / lens.len().max(1);
    let (mut table, chunks) = chunk_table(lens, columns);
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let cuda = cuda_storages(&guards)?;
    let Some(&(first, _)) = cuda.first() else {
        bail!("a CUDA kernel over many tensors got none")
    };
    let dev = first.device().clone();
    let stream = dev.cuda_stream();
    let views = cuda
        .iter()
        .map(|&(s, layout)| view::<T>(s, layout))
        .collect::<Result<Vec<_>>>()?;
    let pointers: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
    for (slot, (pointer, _)) in table.iter_mut().zip(&pointers) {
        *slot = *pointer as i64;
    }
    let table = upload(&dev, &table)?;
    let out = launch(&dev, &table, chunks);
    drop(pointers);
    out
}

thread_local! {
    /// Page-locked staging memory for the tables, one buffer per device, reused.
    static STAGING: RefCell<HashMap<DeviceId, PinnedHostSlice<i64>>> = RefCell::new(HashMap::new());
}

/// `values` in a new device buffer, copied from page-locked memory: an upload from ordinary
/// host memory would first wait for all the work queued on the stream (CUDA's rule for
/// pageable copies), a stall of the whole step, where this copy just takes its turn.
fn upload(dev: &CudaDevice, values: &[i64]) -> Result<CudaSlice<i64>> {
    let stream = dev.cuda_stream();
    let mut table = unsafe { dev.alloc::<i64>(values.len()) }?;
    STAGING.with(|staging| -> Result<()> {
        let mut staging = staging.borrow_mut();
        let buffer = match staging.entry(dev.id()) {
            Entry::Occupied(e) if e.get().len() == values.len() => e.into_mut(),
            entry => {
                // SAFETY: filled below before any read.
                let fresh = unsafe { stream.context().alloc_pinned::<i64>(values.len()) }.w()?;
                match entry {
                    Entry::Occupied(mut e) => {
                        e.insert(fresh);
                        e.into_mut()
                    }
                    Entry::Vacant(e) => e.insert(fresh),
                }
            }
        };
        // Waits for the buffer's previous copy (long done: it preceded the last launch).
        buffer.as_mut_slice().w()?.copy_from_slice(values);
        stream.memcpy_htod(&*buffer, &mut table).w()
    })?;
    Ok(table)
}

pub(crate) fn sums_of_squares<T: Float>(tensors: &[&Tensor]) -> Result<Vec<f64>> {
    let n = tensors.len();
    if n == 0 {
        return Ok(vec![]);
    }
    let lens: Vec<usize> = tensors.iter().map(|t| t.elem_count()).collect();
    // The kernels only read the tensors.
    with_table::<T, _>(tensors, &lens, |dev, table, chunks| {
        let stream = dev.cuda_stream();
        let (n_i, chunks_i) = (n as i64, chunks as i64);
        let mut partials = unsafe { dev.alloc::<f64>(chunks.max(1)) }?;
        if chunks > 0 {
            let f = function(dev, &SQUARES, "chunk_squares", T::SUFFIX)?;
            let mut launch = stream.launch_builder(&f);
            launch
                .arg(table)
                .arg(&n_i)
                .arg(&chunks_i)
                .arg(&mut partials);
            unsafe { launch.launch(grid((chunks as u32, 1), 0)) }.w()?;
        }
        let mut out = unsafe { dev.alloc::<f64>(n) }?;
        let f = function(dev, &SQUARES, "sum_chunks", "all")?;
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(table)
            .arg(&n_i)
            .arg(&chunks_i)
            .arg(&partials)
            .arg(&mut out);
        unsafe { launch.launch(elementwise(n)) }.w()?;
        stream.clone_dtoh(&out).w()
    })
}

/// [`crate::sgd::apply_many`] on CUDA: every parameter's update in one launch; `params` are
/// (weight, gradient, buffer), `rates` (learning rate, weight decay).
pub(crate) fn sgd_many<T: Float>(
    params: &[[&Tensor; 3]],
    rates: &[[f64; 2]],
    momentum: f64,
    nesterov: bool,
) -> Result<()> {
    let n = params.len();
    if n == 0 {
        return Ok(());
    }
    let lens: Vec<usize> = params.iter().map(|[w, _, _]| w.elem_count()).collect();
    if rates.len() != n
        || params
            .iter()
            .any(|[w, g, b]| g.elem_count() != w.elem_count() || b.elem_count() != w.elem_count())
    {
        bail!("sgd on CUDA: a gradient, buffer or rate does not match its weight")
    }
    // Columns: weights, gradients, buffers.
    let tensors: Vec<&Tensor> = (0..3)
        .flat_map(|column| params.iter().map(move |p| p[column]))
        .collect();
    let rates: Vec<f64> = (0..2)
        .flat_map(|column| rates.iter().map(move |r| r[column]))
        .collect();
    // Writing through read-locked storage: the kernel writes the weights and buffers on the
    // stream in order, as the per-parameter in-place ops do under their write locks; no host
    // code reads or writes these tensors' device memory meanwhile (the optimiser's step owns
    // them), and nothing on the host holds a reference into it.
    with_table::<T, _>(&tensors, &lens, |dev, table, chunks| {
        if chunks == 0 {
            return Ok(());
        }
        let stream = dev.cuda_stream();
        let bits: Vec<i64> = rates.iter().map(|r| r.to_bits() as i64).collect();
        let rates = upload(dev, &bits)?;
        let (n_i, chunks_i) = (n as i64, chunks as i64);
        let (momentum, nesterov) = (T::from_f64(momentum), nesterov as i32);
        let f = function(dev, &SGD, "sgd_many", T::SUFFIX)?;
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(table)
            .arg(&rates)
            .arg(&n_i)
            .arg(&chunks_i)
            .arg(&momentum)
            .arg(&nesterov);
        unsafe { launch.launch(grid((chunks as u32, 1), 0)) }.w()?;
        Ok(())
    })
}

/// [`crate::adamw::apply_many`] on CUDA: every parameter's update in one launch; `params` are
/// (weight, gradient, first moment, second moment), `factors` (decay, step, sqrt_bias2, eps).
pub(crate) fn adamw_many<T: Float>(
    params: &[[&Tensor; 4]],
    factors: &[[f64; 4]],
    [beta1, beta2]: [f64; 2],
) -> Result<()> {
    let n = params.len();
    if n == 0 {
        return Ok(());
    }
    let lens: Vec<usize> = params.iter().map(|p| p[0].elem_count()).collect();
    if factors.len() != n
        || params
            .iter()
            .any(|p| p.iter().any(|t| t.elem_count() != p[0].elem_count()))
    {
        bail!("adamw on CUDA: a gradient, moment or factor does not match its weight")
    }
    let tensors: Vec<&Tensor> = (0..4)
        .flat_map(|column| params.iter().map(move |p| p[column]))
        .collect();
    let bits: Vec<i64> = factors
        .iter()
        .flatten()
        .map(|f| f.to_bits() as i64)
        .collect();
    // Writes the weights and moments through read-locked storage, as `sgd_many` does.
    with_table::<T, _>(&tensors, &lens, |dev, table, chunks| {
        if chunks == 0 {
            return Ok(());
        }
        let stream = dev.cuda_stream();
        let factors = upload(dev, &bits)?;
        let (n_i, chunks_i) = (n as i64, chunks as i64);
        let (beta1, beta2) = (T::from_f64(beta1), T::from_f64(beta2));
        let f = function(dev, &ADAMW, "adamw_many", T::SUFFIX)?;
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(table)
            .arg(&factors)
            .arg(&n_i)
            .arg(&chunks_i)
            .arg(&beta1)
            .arg(&beta2);
        unsafe { launch.launch(grid((chunks as u32, 1), 0)) }.w()?;
        Ok(())
    })
}
