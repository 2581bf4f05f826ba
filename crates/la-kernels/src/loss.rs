//! The training loss: the mean cross-entropy of logits against target distributions (hard
//! labels as one-hot rows, or MixUp/CutMix's soft targets), smoothed as PyTorch's
//! `label_smoothing`: t' = (1 - s) t + s / k.
//!
//! Why here: as Candle ops the loss and its gradient are about fifteen small kernels a step
//! on a GPU, each a launch and a pass over the logits; the CUDA form (`cuda/cross_entropy.cu`)
//! is three launches, with the row reductions in f64. On the CPU the logits are small (a
//! batch of rows of at most 1000 classes), so the generic form is also the CPU's.

use candle_core::{Result, Tensor, D};

/// log softmax over the last axis from differentiable ops (the max only shifts the range).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// Mean cross-entropy of `logits` [b, k] against target distributions `targets` [b, k] with
/// label smoothing; the targets get no gradient. The CUDA kernels for f32/f64 CUDA tensors,
/// otherwise [`cross_entropy_generic`].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    let targets = targets.to_dtype(logits.dtype())?;
    #[cfg(feature = "cuda")]
    if logits.rank() == 2
        && targets.dims() == logits.dims()
        && crate::cuda_path(&[logits, &targets])?
    {
        return crate::cuda::cross_entropy(logits, &targets, false, label_smoothing);
    }
    cross_entropy_generic(logits, &targets, label_smoothing)
}

/// [`cross_entropy`] against hard labels: `labels` is u32 [b] on the logits' device (as the
/// data loader uploads them with the images), each below k. The CPU form says which label is
/// out of range; the CUDA kernels cannot without a wait for the device, so a caller on a GPU
/// checks its host copy first (la-train's `cross_entropy_labels` does). On CUDA the kernels read the
/// labels themselves, so no one-hot matrix is built on the host and uploaded each step (an
/// upload from ordinary host memory waits for the GPU); elsewhere the one-hot rows and
/// [`cross_entropy_generic`].
pub fn cross_entropy_labels(
    logits: &Tensor,
    labels: &Tensor,
    label_smoothing: f64,
) -> Result<Tensor> {
    let (rows, k) = logits.dims2()?;
    if labels.dims() != [rows] || labels.dtype() != candle_core::DType::U32 {
        candle_core::bail!(
            "cross-entropy: labels {:?} {:?} for logits {:?} (want u32 [{rows}])",
            labels.dims(),
            labels.dtype(),
            logits.dims()
        )
    }
    #[cfg(feature = "cuda")]
    if crate::cuda_path(&[logits])? && labels.device().same_device(logits.device()) {
        return crate::cuda::cross_entropy(logits, labels, true, label_smoothing);
    }
    let labels = labels.to_vec1::<u32>()?;
    let mut one_hot = vec![0f32; rows * k];
    for (row, &label) in labels.iter().enumerate() {
        let label = label as usize;
        if label >= k {
            candle_core::bail!("label {label} is out of range for {k} classes")
        }
        one_hot[row * k + label] = 1.0;
    }
    let targets = Tensor::from_vec(one_hot, (rows, k), logits.device())?;
    cross_entropy_generic(logits, &targets, label_smoothing)
}

/// [`cross_entropy`] from Candle ops, on any device and dtype.
pub fn cross_entropy_generic(
    logits: &Tensor,
    targets: &Tensor,
    label_smoothing: f64,
) -> Result<Tensor> {
    let k = logits.dim(D::Minus1)? as f64;
    let targets = targets.to_dtype(logits.dtype())?.detach();
    let targets = if label_smoothing > 0.0 {
        ((targets * (1.0 - label_smoothing))? + label_smoothing / k)?
    } else {
        targets
    };
    let per_row = (log_softmax(logits)? * targets)?.sum(D::Minus1)?.neg()?;
    per_row.mean_all()
}
