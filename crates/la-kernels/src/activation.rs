//! Activations from differentiable Candle ops (one form on every device).

use candle_core::{DType, Result, Tensor};

/// Softmax along `dim` from plain ops, so gradients flow through it
/// (`candle_nn::ops::softmax_last_dim` is a custom op without a backward pass).
pub fn softmax<Dim: candle_core::shape::Dim + Copy>(
    xs: &Tensor,
    dim: Dim,
) -> candle_core::Result<Tensor> {
    // The max only shifts for numerical range; it carries no gradient.
    let max = xs.max_keepdim(dim)?.detach();
    let exp = xs.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(dim)?)
}

/// elu(x) + 1, the feature map of Katharopoulos et al.: x + 1 for x > 0, exp(x) otherwise.
/// Written as relu(x) + exp(min(x, 0)) so that both branches have simple gradients.
pub fn elu_plus_one(xs: &Tensor) -> candle_core::Result<Tensor> {
    xs.relu()? + xs.minimum(0.0)?.exp()?
}

/// The tensors in the precision the attention mixing is computed in: f64 stays f64, anything
/// else (f16, bf16) is widened to f32, since the normalisers' sums lose too much in half
/// precision.
pub fn in_working_precision<const N: usize>(tensors: [&Tensor; N]) -> Result<[Tensor; N]> {
    let work = if tensors.first().map(|t| t.dtype()) == Some(DType::F64) {
        DType::F64
    } else {
        DType::F32
    };
    let mut out = Vec::with_capacity(N);
    for t in tensors {
        out.push(t.to_dtype(work)?);
    }
    Ok(out.try_into().expect("N tensors in, N out"))
}
