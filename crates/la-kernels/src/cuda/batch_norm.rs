//! Launches of `batch_norm.cu`: BatchNorm + ReLU over contiguous NCHW maps, training mode
//! (three launches forward, three backward), evaluation mode (two) and the running
//! statistics' update (one each). The batch statistics travel between the passes as one f64
//! buffer of 2c values: the means, then the biased variances.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, CudaStorage, Layout, Result, Tensor};

use super::kernels::{elementwise, function, grid, tensor, with_view, Float, Module};
use super::plan::{channel_chunks, Chunks, MAX_CHANNELS};

const BATCH_NORM: Module = Module {
    name: "la_kernels_batch_norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/batch_norm.ptx")),
};

/// An NCHW map's sizes as the kernels take them.
#[derive(Clone, Copy)]
pub(crate) struct Map {
    pub b: usize,
    pub c: usize,
    pub hw: usize,
}

impl Map {
    pub fn of(dims: &[usize]) -> Result<Self> {
        let &[b, c, h, w] = dims else {
            bail!("batch norm on CUDA: expected an NCHW map, got {dims:?}")
        };
        if c > MAX_CHANNELS {
            bail!("batch norm on CUDA: {c} channels, more than {MAX_CHANNELS}")
        }
        if b * h * w == 0 || c == 0 {
            bail!("batch norm on CUDA: an empty map {dims:?}")
        }
        Ok(Self { b, c, hw: h * w })
    }

    fn total(&self) -> usize {
        self.b * self.c * self.hw
    }

    /// Values per channel.
    fn count(&self) -> usize {
        self.b * self.hw
    }
}

/// `relu(x * scale + shift)` per channel into a new buffer.
fn apply<T: Float>(
    x: &CudaView<T>,
    map: Map,
    scale: &CudaSlice<T>,
    shift: &CudaSlice<T>,
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let mut y = unsafe { dev.alloc::<T>(map.total()) }?;
    let (c, hw, total) = (map.c as i64, map.hw as i64, map.total() as i64);
    let f = function(dev, &BATCH_NORM, "bn_relu_apply", T::SUFFIX)?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(x)
        .arg(&mut y)
        .arg(scale)
        .arg(shift)
        .arg(&c)
        .arg(&hw)
        .arg(&total);
    unsafe { launch.launch(elementwise(map.total())) }.w()?;
    Ok(y)
}

/// Training mode: `relu(bn(x))` with the batch's statistics, and those statistics (means,
/// then biased variances, f64).
pub(crate) fn train_forward<T: Float>(
    x: &CudaView<T>,
    map: Map,
    weight: &CudaView<T>,
    bias: &CudaView<T>,
    eps: f64,
    dev: &CudaDevice,
) -> Result<(CudaSlice<T>, CudaSlice<f64>)> {
    let Chunks { chunks, per_chunk } = channel_chunks(map.count());
    let mut partials = unsafe { dev.alloc::<f64>(2 * chunks * map.c) }?;
    let (b, c, hw, per_chunk_i) = (map.b as i64, map.c as i64, map.hw as i64, per_chunk as i64);
    let stream = dev.cuda_stream();
    let f = function(dev, &BATCH_NORM, "bn_chunk_stats", T::SUFFIX)?;
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(x)
        .arg(&mut partials)
        .arg(&b)
        .arg(&c)
        .arg(&hw)
        .arg(&per_chunk_i);
    unsafe { launch.launch(grid((chunks as u32, map.c as u32), 0)) }.w()?;

    let mut stats = unsafe { dev.alloc::<f64>(2 * map.c) }?;
    let mut scale = unsafe { dev.alloc::<T>(map.c) }?;
    let mut shift = unsafe { dev.alloc::<T>(map.c) }?;
    let (chunks_i, count) = (chunks as i64, map.count() as i64);
    let f = function(dev, &BATCH_NORM, "bn_finish_stats", T::SUFFIX)?;
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&partials)
        .arg(&mut stats)
        .arg(&mut scale)
        .arg(&mut shift)
        .arg(weight)
        .arg(bias)
        .arg(&c)
        .arg(&chunks_i)
        .arg(&count)
        .arg(&per_chunk_i)
        .arg(&eps);
    unsafe { launch.launch(elementwise(map.c)) }.w()?;

    Ok((apply(x, map, &scale, &shift, dev)?, stats))
}

/// Evaluation mode: `relu(bn(x))` with the running statistics.
pub(crate) fn eval_forward<T: Float>(
    x: &CudaView<T>,
    map: Map,
    [weight, bias, running_mean, running_var]: [&CudaView<T>; 4],
    eps: f64,
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let mut scale = unsafe { dev.alloc::<T>(map.c) }?;
    let mut shift = unsafe { dev.alloc::<T>(map.c) }?;
    let c = map.c as i64;
    let f = function(dev, &BATCH_NORM, "bn_eval_factors", T::SUFFIX)?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(running_mean)
        .arg(running_var)
        .arg(&mut scale)
        .arg(&mut shift)
        .arg(weight)
        .arg(bias)
        .arg(&c)
        .arg(&eps);
    unsafe { launch.launch(elementwise(map.c)) }.w()?;
    apply(x, map, &scale, &shift, dev)
}

/// In place on contiguous `running` of c values: `(1 - momentum) running + momentum * factor
/// * batch`, `batch` the first c of `stats` (the means) or the last c (the variances).
pub(crate) fn running_update<T: Float>(
    (running, layout): (&mut CudaStorage, &Layout),
    stats: &CudaView<f64>,
    variance: bool,
    momentum: f64,
    factor: f64,
) -> Result<()> {
    let c = layout.shape().elem_count();
    if !layout.is_contiguous() || stats.len() != 2 * c {
        bail!("batch norm's running statistics on CUDA: expected {c} contiguous values")
    }
    let dev = running.device().clone();
    let start = layout.start_offset();
    let mut running = running
        .as_cuda_slice_mut::<T>()?
        .slice_mut(start..start + c);
    let batch = stats.slice(if variance { c..2 * c } else { 0..c });
    let c_i = c as i64;
    let f = function(&dev, &BATCH_NORM, "bn_running_update", T::SUFFIX)?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&mut running)
        .arg(&batch)
        .arg(&c_i)
        .arg(&momentum)
        .arg(&factor);
    unsafe { launch.launch(elementwise(c)) }.w()?;
    Ok(())
}

/// Training mode's backward from the contiguous input `x`, output `y`, the output's gradient
/// and the forward's `stats`: the gradients of x, the weight and the bias.
pub(crate) fn train_backward<T: Float>(
    [x, weight, y, grad]: [&Tensor; 4],
    stats: &Tensor,
    eps: f64,
) -> Result<[Tensor; 3]> {
    let map = Map::of(x.dims())?;
    if y.dims() != x.dims() || grad.dims() != x.dims() || stats.elem_count() != 2 * map.c {
        bail!(
            "batch norm backward on CUDA: x {:?}, y {:?}, gradient {:?}, {} statistics",
            x.dims(),
            y.dims(),
            grad.dims(),
            stats.elem_count()
        )
    }
    let Chunks { chunks, per_chunk } = channel_chunks(map.count());
    let (b, c, hw, per_chunk_i, chunks_i, total) = (
        map.b as i64,
        map.c as i64,
        map.hw as i64,
        per_chunk as i64,
        chunks as i64,
        map.total() as i64,
    );
    let count = map.count() as f64;
    with_view::<T, _>(x, |xs, dev| {
        with_view::<T, _>(y, |ys, _| {
            with_view::<T, _>(grad, |gs, _| {
                with_view::<f64, _>(stats, |stats, _| {
                    with_view::<T, _>(weight, |ws, _| {
                        let stream = dev.cuda_stream();
                        let mut partials = unsafe { dev.alloc::<f64>(2 * chunks * map.c) }?;
                        let f = function(dev, &BATCH_NORM, "bn_backward_chunks", T::SUFFIX)?;
                        let mut launch = stream.launch_builder(&f);
                        launch
                            .arg(xs)
                            .arg(ys)
                            .arg(gs)
                            .arg(stats)
                            .arg(&mut partials)
                            .arg(&b)
                            .arg(&c)
                            .arg(&hw)
                            .arg(&per_chunk_i)
                            .arg(&eps);
                        unsafe { launch.launch(grid((chunks as u32, map.c as u32), 0)) }.w()?;

                        let mut sums = unsafe { dev.alloc::<f64>(2 * map.c) }?;
                        let mut dweight = unsafe { dev.alloc::<T>(map.c) }?;
                        let mut dbias = unsafe { dev.alloc::<T>(map.c) }?;
                        let f = function(dev, &BATCH_NORM, "bn_backward_sums", T::SUFFIX)?;
                        let mut launch = stream.launch_builder(&f);
                        launch
                            .arg(&partials)
                            .arg(&mut sums)
                            .arg(&mut dweight)
                            .arg(&mut dbias)
                            .arg(&c)
                            .arg(&chunks_i);
                        unsafe { launch.launch(elementwise(map.c)) }.w()?;

                        let mut dx = unsafe { dev.alloc::<T>(map.total()) }?;
                        let f = function(dev, &BATCH_NORM, "bn_backward_input", T::SUFFIX)?;
                        let mut launch = stream.launch_builder(&f);
                        launch
                            .arg(xs)
                            .arg(ys)
                            .arg(gs)
                            .arg(ws)
                            .arg(stats)
                            .arg(&sums)
                            .arg(&mut dx)
                            .arg(&c)
                            .arg(&hw)
                            .arg(&total)
                            .arg(&count)
                            .arg(&eps);
                        unsafe { launch.launch(elementwise(map.total())) }.w()?;
                        Ok([
                            tensor(dx, dev, x.shape().clone()),
                            tensor(dweight, dev, weight.shape().clone()),
                            tensor(dbias, dev, weight.shape().clone()),
                        ])
                    })
                })
            })
        })
    })
}
