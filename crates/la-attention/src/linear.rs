//! Kernelised linear attention: out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps).
//!
//! With phi = elu + 1 this is Katharopoulos et al. 2020 ("Transformers are RNNs"); with
//! phi = relu it is EfficientViT's ReLU linear attention (Cai et al. 2023). Cost O(N d c)
//! time and O(d c) extra memory per image instead of O(N^2).

use candle_core::{DType, Tensor};

use crate::ops::elu_plus_one;

/// Katharopoulos et al.'s epsilon in the denominator.
pub const ELU_EPS: f64 = 1e-6;
/// EfficientViT's epsilon (`LiteMLA`, eps = 1e-15): only representable because the
/// kernel runs in f32 even for f16/bf16 inputs.
pub const RELU_EPS: f64 = 1e-15;

/// The two feature maps.
#[derive(Clone, Copy, Debug)]
pub enum FeatureMap {
    EluPlusOne,
    Relu,
}

impl FeatureMap {
    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            FeatureMap::EluPlusOne => elu_plus_one(xs),
            FeatureMap::Relu => xs.relu(),
        }
    }
}

/// Channel-first, as the feature map is stored (no token transposes): q, k: [b, d, n];
/// v: [b, c, n] -> [b, c, n]. Computed in f32 (or f64) whatever the input dtype.
pub fn linear_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    phi: FeatureMap,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let work = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (q, k, v) = (q.to_dtype(work)?, k.to_dtype(work)?, v.to_dtype(work)?);
    let (q, k) = (phi.apply(&q)?, phi.apply(&k)?);
    let context = k.matmul(&v.t()?)?; // [b, d, c] = sum_j phi(k_j) v_j^T
    let numerator = context.t()?.matmul(&q)?; // [b, c, n]
    let key_sum = k.sum_keepdim(2)?; // [b, d, 1]
    let denominator = (q.broadcast_mul(&key_sum)?.sum_keepdim(1)? + eps)?; // [b, 1, n]
    numerator.broadcast_div(&denominator)?.to_dtype(dtype)
}
