//! Launches of `cross_entropy.cu`: the mean label-smoothed cross-entropy of contiguous
//! logits [rows, k] against targets of the same shape or hard labels (u32 [rows]), two
//! launches forward (the rows, then their mean) and one backward. The rows' statistics (loss, log-normaliser, target sum;
//! f64) travel from the forward to the backward.

use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, Result, Tensor};

use super::kernels::{elementwise, function, grid, tensor, with_view, Float, Module};

const CROSS_ENTROPY: Module = Module {
    name: "la_kernels_cross_entropy",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx")),
};

/// Rows of one launch at most (the grid's x dimension).
const MAX_ROWS: usize = i32::MAX as usize;

/// What the logits are measured against: a target matrix, or hard labels.
pub(crate) enum Against<'a, T> {
    Targets(&'a CudaView<'a, T>),
    Labels(&'a CudaView<'a, u32>),
}

impl<T: Float> Against<'_, T> {
    /// The two pointer arguments, (targets, labels), one of them null.
    fn push<'b>(&'b self, launch: &mut cudarc::driver::LaunchArgs<'b>, null: &'b u64) {
        match self {
            Against::Targets(t) => launch.arg(*t).arg(null),
            Against::Labels(l) => launch.arg(null).arg(*l),
        };
    }
}

/// The loss (one value) and the rows' statistics (3 per row, f64).
pub(crate) fn forward<T: Float>(
    logits: &CudaView<T>,
    against: &Against<T>,
    [rows, k]: [usize; 2],
    smoothing: f64,
    dev: &CudaDevice,
) -> Result<(CudaSlice<T>, CudaSlice<f64>)> {
    if rows == 0 || k == 0 || rows > MAX_ROWS {
        bail!("cross-entropy on CUDA: logits of {rows} rows of {k} classes")
    }
    let stream = dev.cuda_stream();
    let mut row_stats = unsafe { dev.alloc::<f64>(3 * rows) }?;
    let (k_i, null) = (k as i64, 0u64);
    let f = function(dev, &CROSS_ENTROPY, "cross_entropy_rows", T::SUFFIX)?;
    let mut launch = stream.launch_builder(&f);
    launch.arg(logits);
    against.push(&mut launch, &null);
    launch.arg(&mut row_stats).arg(&k_i).arg(&smoothing);
    unsafe { launch.launch(grid((rows as u32, 1), 0)) }.w()?;

    let mut loss = unsafe { dev.alloc::<T>(1) }?;
    let rows_i = rows as i64;
    let f = function(dev, &CROSS_ENTROPY, "cross_entropy_mean", T::SUFFIX)?;
    let mut launch = stream.launch_builder(&f);
    launch.arg(&row_stats).arg(&mut loss).arg(&rows_i);
    unsafe { launch.launch(grid((1, 1), 0)) }.w()?;
    Ok((loss, row_stats))
}

/// The logits' gradient, given the loss's gradient `grad` (one value, read on the device);
/// `against` is the target matrix, or the labels when `labels`.
pub(crate) fn backward<T: Float>(
    [logits, against, grad]: [&Tensor; 3],
    labels: bool,
    row_stats: &Tensor,
    smoothing: f64,
) -> Result<Tensor> {
    let (rows, k) = logits.dims2()?;
    let expected: &[usize] = if labels { &[rows] } else { &[rows, k] };
    if against.dims() != expected || grad.elem_count() != 1 || row_stats.elem_count() != 3 * rows {
        bail!(
            "cross-entropy backward on CUDA: logits {:?}, targets {:?}, gradient {:?}",
            logits.dims(),
            against.dims(),
            grad.dims()
        )
    }
    let run = |against: &Against<T>| {
        with_view::<T, _>(logits, |xs, dev| {
            with_view::<T, _>(grad, |gs, _| {
                with_view::<f64, _>(row_stats, |stats, _| {
                    let mut dlogits = unsafe { dev.alloc::<T>(rows * k) }?;
                    let (rows_i, k_i, null) = (rows as i64, k as i64, 0u64);
                    let f = function(dev, &CROSS_ENTROPY, "cross_entropy_backward", T::SUFFIX)?;
                    let stream = dev.cuda_stream();
                    let mut launch = stream.launch_builder(&f);
                    launch.arg(xs);
                    against.push(&mut launch, &null);
                    launch
                        .arg(stats)
                        .arg(gs)
                        .arg(&mut dlogits)
                        .arg(&rows_i)
                        .arg(&k_i)
                        .arg(&smoothing);
                    unsafe { launch.launch(elementwise(rows * k)) }.w()?;
                    Ok(tensor(dlogits, dev, logits.shape().clone()))
                })
            })
        })
    };
    if labels {
        with_view::<u32, _>(against, |l, _| run(&Against::Labels(l)))
    } else {
        with_view::<T, _>(against, |t, _| run(&Against::Targets(t)))
    }
}
