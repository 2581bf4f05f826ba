//! Activations from differentiable Candle ops (one form on every device).

use candle_core::Tensor;

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
