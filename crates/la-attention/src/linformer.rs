//! Linformer (Wang et al. 2020): keys and values projected along the token axis, by learned
//! E and F [k, n], to k positions; then softmax attention of the n queries over those k.
//! The projections are defined for one map size, the one the module is built for.

use candle_core::Tensor;

/// The paths of E and F below the module.
pub const TOKEN_PROJECTIONS: [&str; 2] = ["key_tokens", "value_tokens"];

/// softmax(Q^T (K E^T) * scale) applied to V F^T, channel-first: q, k [b, d, n], v [b, c, n],
/// e, f [k, n] -> [b, c, n].
pub fn linformer_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    e: &Tensor,
    f: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let [q, k, v] = la_kernels::activation::in_working_precision([q, k, v])?;
    let (e, f) = (e.to_dtype(q.dtype())?, f.to_dtype(q.dtype())?);
    let keys = k.broadcast_matmul(&e.t()?)?; // [b, d, k]
    let values = v.broadcast_matmul(&f.t()?)?; // [b, c, k]
    let scores = (q.t()?.matmul(&keys)? * scale)?; // [b, n, k]
    let weights = la_kernels::activation::softmax(&scores, 2)?;
    values.matmul(&weights.t()?)?.to_dtype(dtype) // [b, c, n]
}
