//! A bias added along one axis, with a cheap gradient.

use candle_core::{CpuStorage, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu::{data as contiguous_data, sum_lanes, with_float};
use crate::kernel::{apply, Grad, Input, Kernel};

/// `x + bias`, with `bias` [size of `axis`] broadcast along the other dims of `x`: a Linear
/// layer's bias on tokens (`axis` last) or on a channel-first map (`axis` 1).
///
/// Why not `broadcast_add`: Candle 0.11 differentiates it by summing the gradient over the
/// broadcast dims one element at a time: 35 ms forward + backward for a [64, 1024, 64]
/// attention output, against 13 ms here (`examples/op_speed.rs`). This op sums rows (or contiguous runs)
/// in parallel, vectorised; on CUDA one kernel adds it (two sum its gradient). On other devices
/// and dtypes it is [`add_bias_generic`].
pub fn add_bias(x: &Tensor, bias: &Tensor, axis: usize) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    if axis >= dims.len() || bias.dims() != [dims[axis]] {
        candle_core::bail!(
            "add_bias: bias {:?} does not match axis {axis} of {:?}",
            bias.dims(),
            dims
        );
    }
    #[cfg(feature = "cuda")]
    if crate::cuda_path(&[x, bias])? {
        return crate::cuda::add_bias(x, bias, axis);
    }
    if !crate::fast_path(&[x, bias])? {
        return add_bias_generic(x, bias, axis);
    }
    apply(
        "add-bias",
        [&x.contiguous()?, &bias.contiguous()?],
        AddBias { axis },
    )
}

/// [`add_bias`] as Candle's `broadcast_add`, on any device and dtype.
pub fn add_bias_generic(x: &Tensor, bias: &Tensor, axis: usize) -> candle_core::Result<Tensor> {
    let mut shape = vec![1; x.rank()];
    shape[axis] = bias.elem_count();
    x.broadcast_add(&bias.reshape(shape)?)
}

struct AddBias {
    axis: usize,
}

impl AddBias {
    /// (outer, len, inner): x viewed as [outer, len, inner] with the bias along `len`.
    fn split(&self, dims: &[usize]) -> (usize, usize, usize) {
        crate::cuda::plan::split_at_axis(dims, self.axis)
    }
}

fn add_bias_forward<T: WithDType>(x: &[T], bias: &[T], len: usize, inner: usize) -> Vec<T> {
    let mut out = x.to_vec();
    if inner >= 1024 {
        // Long runs (channel-first maps): one run of a single bias value per task.
        out.par_chunks_mut(inner)
            .enumerate()
            .for_each(|(r, run)| run.iter_mut().for_each(|v| *v += bias[r % len]));
    } else {
        // Short runs (tokens): whole [len, inner] blocks, about 64K elements per task.
        let block = (len * inner).max(1);
        out.par_chunks_mut(block * (65_536 / block).max(1))
            .for_each(|blocks| {
                for block in blocks.chunks_mut(block) {
                    for (run, &b) in block.chunks_mut(inner.max(1)).zip(bias) {
                        run.iter_mut().for_each(|v| *v += b);
                    }
                }
            });
    }
    out
}

/// The bias gradient: the sum of `grad` [outer, len, inner] over outer and inner.
fn bias_grad<T: WithDType>(grad: &[T], len: usize, inner: usize) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let block = (len * inner).max(1);
    // About 64K elements per task.
    let blocks_per_task = (65_536 / block).max(1);
    grad.par_chunks(block * blocks_per_task)
        .map(|blocks| {
            let mut acc = vec![zero; len];
            for block in blocks.chunks_exact(block) {
                if inner == 1 {
                    acc.iter_mut().zip(block).for_each(|(a, &g)| *a += g);
                } else {
                    for (a, run) in acc.iter_mut().zip(block.chunks_exact(inner)) {
                        *a += sum_lanes(run);
                    }
                }
            }
            acc
        })
        .collect::<Vec<_>>()
        .into_iter()
        // Added in order, not in rayon's reduction tree (which depends on how the work was
        // split): a run gives the same gradient every time.
        .fold(vec![zero; len], |mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, &b)| *a += b);
            a
        })
}

impl Kernel<2> for AddBias {
    fn cpu_forward(&self, inputs: [Input<CpuStorage>; 2]) -> Result<(CpuStorage, Shape)> {
        let [(s1, l1), (s2, l2)] = inputs;
        let (_, len, inner) = self.split(l1.dims());
        let out = with_float!("add_bias", s1.dtype(), T => T::to_cpu_storage_owned(
            add_bias_forward::<T>(contiguous_data(s1, l1)?, contiguous_data(s2, l2)?, len, inner),
        ));
        Ok((out, l1.shape().clone()))
    }

    fn backward(&self, g: Grad<2>) -> Result<[Option<Tensor>; 2]> {
        let (_, len, inner) = self.split(g.inputs[0].dims());
        let grad = g.grad.contiguous()?;
        fn sums<T: WithDType>(grad: &Tensor, len: usize, inner: usize) -> Result<Tensor> {
            let sums =
                crate::cpu::with_slices::<T, _, 1>([grad], |[g]| Ok(bias_grad(g, len, inner)))?;
            Tensor::from_vec(sums, len, grad.device())
        }
        let grad_bias = with_float!("add_bias", grad.dtype(), T => sums::<T>(&grad, len, inner)?);
        Ok([Some(grad), Some(grad_bias)])
    }
}
