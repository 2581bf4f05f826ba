//! VGG's pools: 2x2 max-pooling whose gradient goes to the maximum (Candle 0.11's does not),
//! and adaptive average pooling (PyTorch's `AdaptiveAvgPool2d`), which Candle lacks.

use crate::cpu::{data, with_float, with_slices};
use crate::kernel::{apply, Grad, Input, Kernel};
use candle_core::{CpuStorage, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Pools [b, c, h, w] to [b, c, out, out] with PyTorch's bins: output cell i averages rows
/// floor(i h / out) .. ceil((i + 1) h / out). A 1x1 map is copied to every cell (what
/// torchvision's VGG does at 32x32), an exact multiple is a plain average pool.
pub fn adaptive_avg_pool2d(x: &Tensor, out: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h == out && w == out {
        return Ok(x.clone());
    }
    if h.is_multiple_of(out) && w.is_multiple_of(out) {
        return x.avg_pool2d((h / out, w / out));
    }
    if h == 1 && w == 1 {
        return x.broadcast_as((b, c, out, out))?.contiguous();
    }
    let bins = |size: usize| -> Vec<(usize, usize)> {
        (0..out)
            .map(|i| (i * size / out, ((i + 1) * size).div_ceil(out)))
            .collect()
    };
    let mut rows = Vec::with_capacity(out);
    for (y0, y1) in bins(h) {
        let band = x.narrow(2, y0, y1 - y0)?;
        let cells = bins(w)
            .into_iter()
            .map(|(x0, x1)| {
                band.narrow(3, x0, x1 - x0)?
                    .mean_keepdim(2)?
                    .mean_keepdim(3)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        rows.push(Tensor::cat(&cells, 3)?);
    }
    Tensor::cat(&rows, 2)
}

/// 2x2 max-pooling with stride 2 (odd trailing rows/columns dropped, as PyTorch's floor mode).
///
/// Candle 0.11's `max_pool2d` gradient is wrong: it multiplies the upstream gradient by the
/// fraction of window elements equal to the maximum (1/4 for a unique maximum) instead of
/// routing it to the maximum, so each pool of a VGG shrank the gradient about fourfold. This
/// op gives the whole gradient to the first maximum of each window in row-major order, as
/// PyTorch does, on every device: the CPU kernel below for f32/f64 on the CPU, one CUDA kernel
/// a pass for f32/f64 on CUDA, otherwise [`max_pool_2x2_generic`].
pub fn max_pool_2x2(x: &Tensor) -> candle_core::Result<Tensor> {
    x.dims4()?;
    #[cfg(feature = "cuda")]
    if crate::cuda_path(&[x])? {
        return crate::cuda::max_pool_2x2(x);
    }
    if !crate::fast_path(&[x])? {
        return max_pool_2x2_generic(x);
    }
    apply("max-pool-2x2", [&x.contiguous()?], MaxPool2x2)
}

/// [`max_pool_2x2`] from Candle ops, on any device and dtype: Candle's `max_pool2d` for the
/// values, and a backward that routes each gradient to the first maximum of its window in
/// row-major order (Candle's own max-pool gradient scales it by the share of maxima instead,
/// and its max reduction gives every tied maximum the whole gradient).
pub fn max_pool_2x2_generic(x: &Tensor) -> candle_core::Result<Tensor> {
    let x_values = x.detach();
    let pooled = x_values.max_pool2d(2)?;
    // Candle's max skips a NaN that is not first in its window; PyTorch's output is NaN.
    let has_nan = x_values
        .ne(&x_values)?
        .to_dtype(x.dtype())?
        .max_pool2d(2)?
        .ne(0.0)?;
    let pooled = has_nan.where_cond(&(pooled.ones_like()? * f64::NAN)?, &pooled)?;
    crate::precomputed::unary("max-pool-2x2-generic", x, pooled, |x, pooled, grad| {
        let (b, c, h, w) = x.dims4()?;
        let (oh, ow) = (h / 2, w / 2);
        let x = x.detach();
        let window = x
            .narrow(2, 0, 2 * oh)?
            .narrow(3, 0, 2 * ow)?
            .reshape((b, c, oh, 2, ow, 2))?;
        let is_max = window
            .broadcast_eq(&pooled.reshape((b, c, oh, 1, ow, 1))?)?
            .to_dtype(grad.dtype())?;
        let grad = grad.reshape((b, c, oh, 1, ow, 1))?;
        // The first maximum in the order (0, 0), (0, 1), (1, 0), (1, 1): each position takes
        // the gradient if it is a maximum and none before it was.
        let mut not_yet = Tensor::ones_like(&grad)?;
        let mut parts = Vec::with_capacity(4);
        for (i, j) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let first = is_max.narrow(3, i, 1)?.narrow(5, j, 1)?.mul(&not_yet)?;
            not_yet = (&not_yet - &first)?;
            parts.push(first.mul(&grad)?);
        }
        let top = Tensor::cat(&[&parts[0], &parts[1]], 5)?;
        let bottom = Tensor::cat(&[&parts[2], &parts[3]], 5)?;
        Tensor::cat(&[&top, &bottom], 3)?
            .reshape((b, c, 2 * oh, 2 * ow))?
            .pad_with_zeros(2, 0, h - 2 * oh)?
            .pad_with_zeros(3, 0, w - 2 * ow)
    })
}

struct MaxPool2x2;

/// The flat index, within a plane of width `w`, of the first maximum of the 2x2 window whose
/// top-left corner is `top`.
#[inline]
fn window_argmax<T: WithDType>(plane: &[T], top: usize, w: usize) -> usize {
    let mut best = top;
    for idx in [top + 1, top + w, top + w + 1] {
        // `>` keeps the first maximum; a NaN propagates as in PyTorch.
        if plane[idx] > plane[best] || plane[idx].partial_cmp(&plane[idx]).is_none() {
            best = idx;
        }
    }
    best
}

/// The maximum of a window, NaN if any element is NaN (as PyTorch), without branches: the
/// value is all the forward pass needs, and the argmax's data-dependent branches made the
/// pool after a 224x224 block take 5 ms.
#[inline]
fn max4<T: WithDType>(a: T, b: T, c: T, d: T) -> T {
    let max2 = |x: T, y: T| if x >= y { x } else { y };
    let m = max2(max2(a, b), max2(c, d));
    let nan = a.partial_cmp(&a).is_none()
        || b.partial_cmp(&b).is_none()
        || c.partial_cmp(&c).is_none()
        || d.partial_cmp(&d).is_none();
    if nan {
        a + b + c + d
    } else {
        m
    }
}

/// Planes per rayon task: whole planes, at least about 16K input elements.
fn planes_per_task(h: usize, w: usize) -> usize {
    (16_384 / (h * w).max(1)).max(1)
}

fn pool_forward<T: WithDType>(x: &[T], planes: usize, h: usize, w: usize) -> Vec<T> {
    let (oh, ow) = (h / 2, w / 2);
    let mut out = vec![T::zero(); planes * oh * ow];
    if out.is_empty() {
        return out;
    }
    let per_task = planes_per_task(h, w);
    out.par_chunks_mut(per_task * oh * ow)
        .zip(x.par_chunks(per_task * h * w))
        .for_each(|(out, x)| {
            for (out, plane) in out.chunks_exact_mut(oh * ow).zip(x.chunks_exact(h * w)) {
                for (i, out_row) in out.chunks_exact_mut(ow).enumerate() {
                    let top = &plane[2 * i * w..][..2 * ow];
                    let bottom = &plane[(2 * i + 1) * w..][..2 * ow];
                    for ((o, t), b) in out_row
                        .iter_mut()
                        .zip(top.chunks_exact(2))
                        .zip(bottom.chunks_exact(2))
                    {
                        *o = max4(t[0], t[1], b[0], b[1]);
                    }
                }
            }
        });
    out
}

/// Routes each output gradient, whole, to its window's first maximum; all else is zero.
fn pool_backward<T: WithDType>(x: &[T], grad: &[T], planes: usize, h: usize, w: usize) -> Vec<T> {
    let (oh, ow) = (h / 2, w / 2);
    let mut grad_in = vec![T::zero(); planes * h * w];
    if grad.is_empty() {
        return grad_in;
    }
    let per_task = planes_per_task(h, w);
    grad_in
        .par_chunks_mut(per_task * h * w)
        .zip(x.par_chunks(per_task * h * w))
        .zip(grad.par_chunks(per_task * oh * ow))
        .for_each(|((grad_in, x), grad)| {
            let planes = grad_in.chunks_exact_mut(h * w).zip(x.chunks_exact(h * w));
            for ((grad_in, plane), grad) in planes.zip(grad.chunks_exact(oh * ow)) {
                for (i, grad_row) in grad.chunks_exact(ow).enumerate() {
                    for (j, &g) in grad_row.iter().enumerate() {
                        grad_in[window_argmax(plane, 2 * i * w + 2 * j, w)] = g;
                    }
                }
            }
        });
    grad_in
}

impl Kernel<1> for MaxPool2x2 {
    fn cpu_forward(&self, inputs: [Input<CpuStorage>; 1]) -> Result<(CpuStorage, Shape)> {
        let [(storage, layout)] = inputs;
        let (b, c, h, w) = layout.shape().dims4()?;
        let shape = Shape::from((b, c, h / 2, w / 2));
        let storage = with_float!("max-pool-2x2", storage.dtype(), T => T::to_cpu_storage_owned(
            pool_forward::<T>(data(storage, layout)?, b * c, h, w),
        ));
        Ok((storage, shape))
    }

    fn backward(&self, g: Grad<1>) -> Result<[Option<Tensor>; 1]> {
        let (arg, grad_res) = (g.inputs[0], g.grad.contiguous()?);
        fn run<T: WithDType>(arg: &Tensor, grad: &Tensor) -> Result<Tensor> {
            let (b, c, h, w) = arg.dims4()?;
            let grad =
                with_slices::<T, _, 2>([arg, grad], |[x, g]| Ok(pool_backward(x, g, b * c, h, w)))?;
            Tensor::from_vec(grad, arg.shape(), arg.device())
        }
        let grad = with_float!("max-pool-2x2", arg.dtype(), T => run::<T>(arg, &grad_res)?);
        Ok([Some(grad)])
    }
}
