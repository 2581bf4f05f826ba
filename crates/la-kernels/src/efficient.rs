//! "Efficient Attention" (Shen et al. 2021): keys softmax-normalised over positions, queries
//! over channels, out = softmax_c(Q) (softmax_n(K)^T V). Cost O(N d c) time, O(d c) extra memory.

use candle_core::Tensor;

use crate::activation::softmax;

/// Channel-first: q, k: [b, d, n]; v: [b, c, n] -> [b, c, n].
pub fn efficient_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let [q, k, v] = crate::activation::in_working_precision([q, k, v])?;
    let q = softmax(&q, 1)?; // over channels, per position
    let k = softmax(&k, 2)?; // over positions, per channel
    let context = k.matmul(&v.t()?)?; // [b, d, c]
    context.t()?.matmul(&q)?.to_dtype(dtype)
}
