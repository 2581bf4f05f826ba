//! BatchNorm + ReLU in training mode as one CPU op, forward and backward.
//!
//! Why: candle-nn's `BatchNorm::forward_train` transposes the map to [c, b h w] (a copy),
//! then normalises, scales and shifts with broadcast ops whose gradients Candle sums over the
//! broadcast dims element by element. In VGG16-BN at 32x32, batch 64, that made a training
//! step about 1.6x as long as without BatchNorm. Here the statistics and the normalisation +
//! ReLU are one pass each, forward and backward. The parameters and running statistics stay
//! in candle-nn's `BatchNorm` (same names, same checkpoints); evaluation mode uses
//! candle-nn's own forward ([`batch_norm_relu_eval`]), and other devices the composition of
//! Candle ops ([`batch_norm_relu_train_generic`]). On CUDA both modes run this crate's
//! kernels (`cuda/batch_norm.cu`): three launches a pass in training, one in evaluation. [`batch_norm_relu_train_synced`] is the same
//! composition with the statistics taken over every replica of a data-parallel run
//! (PyTorch's `SyncBatchNorm`).

use std::sync::{Arc, Mutex};

use crate::cpu::{data, with_float, with_slices};
use crate::kernel::{apply, Grad, Input, Kernel};
use candle_core::{CpuStorage, DType, Result, Shape, Tensor, Var, WithDType};
use candle_nn::BatchNorm;
use rayon::prelude::*;

/// Sums a tensor element-wise over the replicas of a data-parallel run: every replica calls
/// it with a tensor of the same shape, in the same order, and gets the same sum back.
/// [`batch_norm_relu_train_synced`] sends its statistics and their gradients through it.
pub trait ReplicaSum: Send + Sync + std::fmt::Debug {
    fn sum(&self, t: &Tensor) -> Result<Tensor>;
}

/// Per channel: (mean, biased variance) of the batch.
type Stats = Arc<Mutex<Option<(Vec<f64>, Vec<f64>)>>>;

/// `relu(bn(x))` with batch statistics (training mode), updating `bn`'s running mean and
/// variance as PyTorch does (momentum, unbiased variance). The CPU kernel for f32/f64 on the
/// CPU, otherwise [`batch_norm_relu_train_generic`]; a BatchNorm without affine parameters
/// runs candle-nn's own forward.
pub fn batch_norm_relu_train(bn: &BatchNorm, x: &Tensor) -> Result<Tensor> {
    let Some((weight, bias)) = bn.weight_and_bias() else {
        return candle_nn::ModuleT::forward_t(bn, x, true)?.relu();
    };
    x.dims4()?;
    #[cfg(feature = "cuda")]
    if crate::cuda_path(&[x, weight, bias, bn.running_mean(), bn.running_var()])? {
        let (y, stats) = crate::cuda::batch_norm_relu_train(x, weight, bias, bn.eps())?;
        let unbiased = unbiased_factor(local_count(x)?);
        crate::cuda::update_running_stats(
            bn.running_mean(),
            bn.running_var(),
            &stats,
            bn.momentum(),
            unbiased,
        )?;
        return Ok(y);
    }
    let (y, mean, var) = if crate::fast_path(&[x, weight, bias])? {
        let stats = Stats::default();
        let op = BatchNormRelu {
            eps: bn.eps(),
            stats: stats.clone(),
        };
        let y = apply("batch-norm-relu", [&x.contiguous()?, weight, bias], op)?;
        let (mean, var) = stats
            .lock()
            .expect("poisoned stats lock")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("batch norm: no statistics".into()))?;
        let channels = mean.len();
        (
            y,
            Tensor::from_vec(mean, channels, x.device())?,
            Tensor::from_vec(var, channels, x.device())?,
        )
    } else {
        let (y, mean, var, _) = normalise_relu(x, weight, bias, bn.eps(), None)?;
        (y, mean, var)
    };
    update_running_stats(bn, local_count(x)?, &mean, &var)?;
    Ok(y)
}

/// `relu(bn(x))` in evaluation mode (the running statistics): on CUDA one fused pass
/// (`cuda/batch_norm.cu`), elsewhere candle-nn's own forward and a ReLU.
pub fn batch_norm_relu_eval(bn: &BatchNorm, x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some((weight, bias)) = bn.weight_and_bias() {
        let (mean, var) = (bn.running_mean(), bn.running_var());
        if x.rank() == 4 && crate::cuda_path(&[x, weight, bias, mean, var])? {
            return crate::cuda::batch_norm_relu_eval(x, weight, bias, [mean, var], bn.eps());
        }
    }
    candle_nn::ModuleT::forward_t(bn, x, false)?.relu()
}

/// [`batch_norm_relu_train`] from Candle ops, on any device and dtype (sums in f64),
/// running statistics updated the same way.
pub fn batch_norm_relu_train_generic(bn: &BatchNorm, x: &Tensor) -> Result<Tensor> {
    let Some((weight, bias)) = bn.weight_and_bias() else {
        return candle_nn::ModuleT::forward_t(bn, x, true)?.relu();
    };
    let (y, mean, var, count) = normalise_relu(x, weight, bias, bn.eps(), None)?;
    update_running_stats(bn, count, &mean, &var)?;
    Ok(y)
}

/// [`batch_norm_relu_train_generic`] with the batch statistics of all replicas together:
/// the mean and variance of the union of their batches, and in the backward pass the sums
/// the input gradient needs, all summed through `replicas`. N replicas each given a shard
/// of a batch compute what one process computes on the whole batch (up to rounding); the
/// parameters' gradients stay each replica's own, to be summed with the other gradients.
pub fn batch_norm_relu_train_synced(
    bn: &BatchNorm,
    x: &Tensor,
    replicas: Arc<dyn ReplicaSum>,
) -> Result<Tensor> {
    let Some((weight, bias)) = bn.weight_and_bias() else {
        candle_core::bail!("a synchronised BatchNorm needs its affine weight and bias")
    };
    let (y, mean, var, count) = normalise_relu(x, weight, bias, bn.eps(), Some(replicas))?;
    update_running_stats(bn, count, &mean, &var)?;
    Ok(y)
}

/// Values per channel of an NCHW map: b h w.
fn local_count(x: &Tensor) -> Result<f64> {
    Ok((x.elem_count() / x.dim(1)?.max(1)) as f64)
}

/// `relu((x - mean) / sqrt(var + eps) * weight + bias)` with the batch's per-channel mean and
/// biased variance (returned beside it, [c], detached, with the count of values per channel
/// they were taken over), from Candle ops with the fast kernel's backward:
/// dx = w r / n (n g' - sum g' - x_hat sum g' x_hat), g' the gradient masked by the ReLU.
/// With `replicas`, the statistics and the two sums of the backward are those of every
/// replica's batch together.
///
/// Why not Candle's autograd over the same ops: its f32 sums run in sequence, and the
/// normalisation's backward subtracts nearly equal sums; in a VGG16_bn step that moved block
/// 1's gradients by up to 1.4 % (crates/la-train/tests/parity.rs). Here the sums are taken
/// in f64 (f32 on Metal, which has no f64), as the fast kernel's are.
fn normalise_relu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    replicas: Option<Arc<dyn ReplicaSum>>,
) -> Result<(Tensor, Tensor, Tensor, f64)> {
    let c = x.dim(1)?;
    let dtype = x.dtype();
    let acc = if x.device().is_metal() {
        DType::F32
    } else {
        DType::F64
    };
    let per_channel = |t: &Tensor| t.detach().reshape((1, c, 1, 1));
    let x64 = x.detach().to_dtype(acc)?;
    let (mean, var, n) = match &replicas {
        None => {
            let mean = x64.mean_keepdim((0, 2, 3))?;
            let var = x64.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
            (mean, var, local_count(x)?)
        }
        Some(replicas) => {
            // One sum for the channel sums and the count, a second for the squared
            // deviations from the common mean (two passes, as the unsynchronised form).
            let count = Tensor::new(&[local_count(x)? as f32], x.device())?.to_dtype(acc)?;
            let sums = Tensor::cat(&[&x64.sum_keepdim((0, 2, 3))?.flatten_all()?, &count], 0)?;
            let sums = replicas.sum(&sums)?;
            let n = sums.get(c)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let mean = (sums.narrow(0, 0, c)? / n)?.reshape((1, c, 1, 1))?;
            let squares = x64.broadcast_sub(&mean)?.sqr()?.sum_keepdim((0, 2, 3))?;
            let var = (replicas.sum(&squares)? / n)?;
            (mean, var, n)
        }
    };
    drop(x64);
    let inv_std = (&var + eps)?.sqrt()?.recip()?;
    let (m, r) = (mean.to_dtype(dtype)?, inv_std.to_dtype(dtype)?);
    let x_hat = |x: &Tensor| x.broadcast_sub(&m)?.broadcast_mul(&r);
    let y = x_hat(&x.detach())?
        .broadcast_mul(&per_channel(weight)?)?
        .broadcast_add(&per_channel(bias)?)?
        .relu()?;
    let (m, r) = (m.clone(), r.clone());
    let y = crate::precomputed::ternary(
        "batch-norm-relu-generic",
        [x, weight, bias],
        y,
        move |[x, weight, _], y, grad| {
            let x_hat = x.broadcast_sub(&m)?.broadcast_mul(&r)?;
            let g = grad.mul(&y.gt(0.0)?.to_dtype(dtype)?)?;
            let sum = |t: &Tensor| t.to_dtype(acc)?.sum_keepdim((0, 2, 3));
            let dbias = sum(&g)?;
            let dweight = sum(&(&g * &x_hat)?)?;
            // The input's gradient needs the sums over every replica's batch; the
            // parameters' gradients are this replica's share.
            let (dbias_all, dweight_all) = match &replicas {
                None => (dbias.clone(), dweight.clone()),
                Some(replicas) => {
                    let both = replicas.sum(&Tensor::cat(&[&dbias, &dweight], 1)?)?;
                    (both.narrow(1, 0, c)?, both.narrow(1, c, c)?)
                }
            };
            let k = (weight.reshape((1, c, 1, 1))?.to_dtype(acc)? * r.to_dtype(acc)?)?;
            let k = (k / n)?.to_dtype(dtype)?;
            let dx = (g * n)?
                .broadcast_sub(&dbias_all.to_dtype(dtype)?)?
                .sub(&x_hat.broadcast_mul(&dweight_all.to_dtype(dtype)?)?)?
                .broadcast_mul(&k)?;
            let flat = |t: Tensor| t.flatten_all()?.to_dtype(dtype);
            Ok([Some(dx), Some(flat(dweight)?), Some(flat(dbias)?)])
        },
    )?;
    Ok((y, mean.flatten_all()?, var.flatten_all()?, n))
}

/// Running statistics: (1 - m) r + m s, with the unbiased variance (PyTorch's update).
/// `n` is the count of values per channel the batch statistics were taken over.
fn update_running_stats(bn: &BatchNorm, n: f64, mean: &Tensor, var: &Tensor) -> Result<()> {
    let m = bn.momentum();
    let update = |running: &Tensor, batch: &Tensor, scale: f64| -> Result<()> {
        let batch = batch
            .to_dtype(running.dtype())?
            .to_device(running.device())?;
        let new = ((running * (1.0 - m))? + (batch * (m * scale))?)?;
        Var::from_tensor(running)?.set(&new)
    };
    update(bn.running_mean(), mean, 1.0)?;
    update(bn.running_var(), var, unbiased_factor(n))
}

/// n / (n - 1): the biased variance of n values to the unbiased one.
fn unbiased_factor(n: f64) -> f64 {
    if n > 1.0 {
        n / (n - 1.0)
    } else {
        1.0
    }
}

/// The op on (x, weight, bias). Its forward leaves the batch statistics in `stats`, read by
/// the caller for the running statistics and by the backward.
struct BatchNormRelu {
    eps: f64,
    stats: Stats,
}

/// [b, c, hw] views of an NCHW map.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    c: usize,
    hw: usize,
}

/// The planes of channel `ch` in an NCHW map, one per image.
fn planes<T>(data: &[T], d: Dims, ch: usize) -> impl Iterator<Item = &[T]> {
    (0..d.b).map(move |i| &data[(i * d.c + ch) * d.hw..][..d.hw])
}

/// A sum in 16 independent lanes, which the compiler vectorises.
fn lanes_sum<T: WithDType>(xs: impl Iterator<Item = T>) -> f64 {
    let zero = T::from_f64(0.0);
    let mut lanes = [zero; 16];
    for (i, x) in xs.enumerate() {
        lanes[i % 16] += x;
    }
    lanes.iter().map(|v| v.to_f64()).sum()
}

/// Per channel: (mean, biased variance), two passes over the channel.
fn channel_stats<T: WithDType>(x: &[T], d: Dims) -> (Vec<f64>, Vec<f64>) {
    let n = (d.b * d.hw).max(1) as f64;
    (0..d.c)
        .into_par_iter()
        .map(|ch| {
            let sum: f64 = planes(x, d, ch).map(|p| plane_sum(p)).sum();
            let mean = sum / n;
            let m = T::from_f64(mean);
            let sq: f64 = planes(x, d, ch)
                .map(|p| lanes_sum(p.iter().map(|&v| (v - m) * (v - m))))
                .sum();
            (mean, sq / n)
        })
        .unzip()
}

fn plane_sum<T: WithDType>(p: &[T]) -> f64 {
    let zero = T::from_f64(0.0);
    let mut lanes = [zero; 16];
    let mut chunks = p.chunks_exact(16);
    for c in &mut chunks {
        lanes.iter_mut().zip(c).for_each(|(l, &v)| *l += v);
    }
    let tail: f64 = chunks.remainder().iter().map(|v| v.to_f64()).sum();
    lanes.iter().map(|v| v.to_f64()).sum::<f64>() + tail
}

fn forward<T: WithDType>(
    x: &[T],
    weight: &[T],
    bias: &[T],
    d: Dims,
    mean: &[f64],
    var: &[f64],
    eps: f64,
) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let mut y = vec![zero; x.len()];
    y.par_chunks_mut(d.hw.max(1))
        .zip(x.par_chunks(d.hw.max(1)))
        .enumerate()
        .for_each(|(plane, (y, x))| {
            let ch = plane % d.c;
            // y = relu(x * scale + shift), scale = w / sqrt(var + eps), shift = b - mean scale.
            let inv_std = 1.0 / (var[ch] + eps).sqrt();
            let scale = weight[ch].to_f64() * inv_std;
            let shift = T::from_f64(bias[ch].to_f64() - mean[ch] * scale);
            let scale = T::from_f64(scale);
            for (y, &x) in y.iter_mut().zip(x) {
                let v = x * scale + shift;
                *y = if v < zero { zero } else { v };
            }
        });
    y
}

/// (dx, dweight, dbias) from the output `y` (for the ReLU mask) and its gradient `g`.
#[allow(clippy::too_many_arguments)]
fn backward<T: WithDType>(
    x: &[T],
    weight: &[T],
    y: &[T],
    g: &[T],
    d: Dims,
    mean: &[f64],
    var: &[f64],
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let zero = T::from_f64(0.0);
    let n = (d.b * d.hw).max(1) as f64;
    // Per channel: dbias = sum g', dweight = sum g' x_hat, with g' = g masked by the ReLU.
    let (dbias, dweight): (Vec<f64>, Vec<f64>) = (0..d.c)
        .into_par_iter()
        .map(|ch| {
            let (m, r) = (
                T::from_f64(mean[ch]),
                T::from_f64(1.0 / (var[ch] + eps).sqrt()),
            );
            let mut sums = (0.0, 0.0);
            for ((x, y), g) in planes(x, d, ch).zip(planes(y, d, ch)).zip(planes(g, d, ch)) {
                let masked = || {
                    y.iter()
                        .zip(g)
                        .map(move |(&y, &g)| if y > zero { g } else { zero })
                };
                sums.0 += lanes_sum(masked());
                sums.1 += lanes_sum(masked().zip(x).map(|(g, &x)| g * (x - m) * r));
            }
            sums
        })
        .unzip();
    // dx = w r / n (n g' - dbias - x_hat dweight).
    let mut dx = vec![zero; x.len()];
    dx.par_chunks_mut(d.hw.max(1))
        .enumerate()
        .for_each(|(plane, dx)| {
            let ch = plane % d.c;
            let off = plane * d.hw;
            let r = 1.0 / (var[ch] + eps).sqrt();
            let k = T::from_f64(weight[ch].to_f64() * r / n);
            let (nn, db, dw) = (
                T::from_f64(n),
                T::from_f64(dbias[ch]),
                T::from_f64(dweight[ch]),
            );
            let (m, rt) = (T::from_f64(mean[ch]), T::from_f64(r));
            let (x, y, g) = (&x[off..][..d.hw], &y[off..][..d.hw], &g[off..][..d.hw]);
            for (((dx, &x), &y), &g) in dx.iter_mut().zip(x).zip(y).zip(g) {
                let g = if y > zero { g } else { zero };
                *dx = k * (nn * g - db - (x - m) * rt * dw);
            }
        });
    let to_t = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
    (dx, to_t(dweight), to_t(dbias))
}

impl Kernel<3> for BatchNormRelu {
    fn cpu_forward(&self, inputs: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
        let [(s1, l1), (_, l2), (_, l3)] = inputs;
        let (b, c, h, w) = l1.shape().dims4()?;
        if l2.shape().dims() != [c] || l3.shape().dims() != [c] {
            candle_core::bail!("batch norm: {c} channels, parameters {:?}", l2.shape());
        }
        let d = Dims { b, c, hw: h * w };
        fn run<T: WithDType>(
            op: &BatchNormRelu,
            [(s1, l1), (s2, l2), (s3, l3)]: [Input<CpuStorage>; 3],
            d: Dims,
        ) -> Result<Vec<T>> {
            let x = data::<T>(s1, l1)?;
            let (mean, var) = channel_stats(x, d);
            let y = forward(x, data(s2, l2)?, data(s3, l3)?, d, &mean, &var, op.eps);
            *op.stats.lock().expect("poisoned stats lock") = Some((mean, var));
            Ok(y)
        }
        let out = with_float!("batch norm", s1.dtype(), T => T::to_cpu_storage_owned(
            run::<T>(self, inputs, d)?,
        ));
        Ok((out, l1.shape().clone()))
    }

    fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
        let ([x, weight, bias], y, grad) = (g.inputs, g.output, g.grad);
        let (b, c, h, w) = x.dims4()?;
        let d = Dims { b, c, hw: h * w };
        let (mean, var) = self
            .stats
            .lock()
            .expect("poisoned stats lock")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("batch norm: backward before forward".into()))?;
        let grad = grad.contiguous()?;
        fn run<T: WithDType>(
            [x, weight, y, grad]: [&Tensor; 4],
            bias: &Tensor,
            d: Dims,
            (mean, var, eps): (&[f64], &[f64], f64),
        ) -> Result<[Tensor; 3]> {
            let (dx, dw, db) = with_slices::<T, _, 4>([x, weight, y, grad], |[x, w, y, g]| {
                Ok(backward(x, w, y, g, d, mean, var, eps))
            })?;
            Ok([
                Tensor::from_vec(dx, x.shape(), x.device())?,
                Tensor::from_vec(dw, weight.shape(), weight.device())?,
                Tensor::from_vec(db, bias.shape(), bias.device())?,
            ])
        }
        let args = [x, weight, y, &grad];
        let stats = (mean.as_slice(), var.as_slice(), self.eps);
        let [dx, dw, db] =
            with_float!("batch norm", x.dtype(), T => run::<T>(args, bias, d, stats)?);
        Ok([Some(dx), Some(dw), Some(db)])
    }
}
