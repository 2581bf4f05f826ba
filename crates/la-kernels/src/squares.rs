//! The sum of squares of each of several tensors, in f64: a training step's gradient norm
//! and its check for non-finite values (la-train's trainer).
//!
//! Why one op for all of them: per tensor, Candle's ops are three kernel launches and a read
//! back to the host each, and a GPU then waits for the host once per parameter every step.
//! On CUDA this is two launches and one read for every tensor together (`cuda/squares.cu`);
//! elsewhere the per-tensor Candle ops, which on the CPU cost no waiting.

use candle_core::{DType, Result, Tensor};

/// `sum(t^2)` of each tensor, in f64 (NaN and infinities propagate).
pub fn sums_of_squares(tensors: &[&Tensor]) -> Result<Vec<f64>> {
    #[cfg(feature = "cuda")]
    if crate::form::cuda_contiguous(tensors)? {
        return crate::cuda::sums_of_squares(tensors);
    }
    tensors
        .iter()
        .map(|t| t.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>())
        .collect()
}
