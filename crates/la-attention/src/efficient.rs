//! "Efficient Attention" (Shen et al. 2021): keys softmax-normalised over positions, queries
//! over channels, out = softmax_c(Q) (softmax_n(K)^T V). Cost O(N d c) time, O(d c) extra memory.

use candle_core::{DType, Tensor};

use crate::ops::softmax;

/// q, k: [b, n, d]; v: [b, n, c] -> [b, n, c].
pub fn efficient_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let work = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (q, k, v) = (q.to_dtype(work)?, k.to_dtype(work)?, v.to_dtype(work)?);
    let q = softmax(&q, 2)?; // over channels, per position
    let k = softmax(&k, 1)?; // over positions, per channel
    let context = k.t()?.matmul(&v)?; // [b, d, c]
    q.matmul(&context)?.to_dtype(dtype)
}
