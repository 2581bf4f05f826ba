//! Cross-entropy for hard labels or soft targets (MixUp/CutMix), with label smoothing,
//! and top-k accuracy.

use candle_core::{DType, Tensor, D};

pub use la_kernels::loss::log_softmax;

use crate::Result;

/// One-hot rows [b, classes] of `labels`.
pub fn one_hot(labels: &[usize], classes: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mut data = vec![0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        if l >= classes {
            return Err(crate::Error::Data(format!(
                "label {l} is out of range for {classes} classes"
            )));
        }
        data[i * classes + l] = 1.0;
    }
    Ok(Tensor::from_vec(data, (labels.len(), classes), device)?)
}

/// Mean cross-entropy of `logits` [b, k] against target distributions `targets` [b, k],
/// smoothed as PyTorch's `label_smoothing`: t' = (1 - eps) t + eps / k
/// ([`la_kernels::loss::cross_entropy`]).
pub fn cross_entropy_soft(
    logits: &Tensor,
    targets: &Tensor,
    label_smoothing: f64,
) -> Result<Tensor> {
    Ok(la_kernels::loss::cross_entropy(
        logits,
        targets,
        label_smoothing,
    )?)
}

/// Mean cross-entropy against hard labels that are already on the logits' device (`on_device`,
/// u32 [b], as the data loader uploads them with the images), checked against their host
/// copy `labels`: unlike [`cross_entropy`], no one-hot matrix is built and uploaded each step
/// (on a GPU an upload from ordinary host memory waits for the work queued before it).
pub fn cross_entropy_labels(
    logits: &Tensor,
    on_device: &Tensor,
    labels: &[usize],
    label_smoothing: f64,
) -> Result<Tensor> {
    let classes = logits.dim(D::Minus1)?;
    if let Some(&l) = labels.iter().find(|&&l| l >= classes) {
        return Err(crate::Error::Data(format!(
            "label {l} is out of range for {classes} classes"
        )));
    }
    Ok(la_kernels::loss::cross_entropy_labels(
        logits,
        on_device,
        label_smoothing,
    )?)
}

/// Mean cross-entropy against hard labels.
pub fn cross_entropy(logits: &Tensor, labels: &[usize], label_smoothing: f64) -> Result<Tensor> {
    let targets = one_hot(labels, logits.dim(D::Minus1)?, logits.device())?;
    cross_entropy_soft(logits, &targets, label_smoothing)
}

/// For each row, the rank of its label among the logits (0 = top-1). Ties count against.
pub fn label_ranks(logits: &Tensor, labels: &[usize]) -> Result<Vec<usize>> {
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows
        .iter()
        .zip(labels)
        .map(|(row, &l)| {
            let target = row[l];
            row.iter()
                .enumerate()
                .filter(|&(j, &v)| j != l && v >= target)
                .count()
        })
        .collect())
}
