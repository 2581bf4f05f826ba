//! Kernelised linear attention: out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps).
//!
//! With phi = elu + 1 this is Katharopoulos et al. 2020 ("Transformers are RNNs"); with
//! phi = relu it is EfficientViT's ReLU linear attention (Cai et al. 2023). Cost O(N d c)
//! time and O(d c) extra memory per image instead of O(N^2).
//!
//! On the CPU the work runs in fused ops: [`linear_attention`] on q, k, v (`packed`), and the
//! module's folded form, [`token_context`] then [`folded_output_residual`] (`context`,
//! `folded`), where the value and output projections never meet the tokens. For inference,
//! [`project_context`] replaces the query/key projections and [`token_context`] with one pass
//! over the map (`project`).

use std::ops::Range;

use candle_core::Tensor;
use num_traits::Float;
use rayon::prelude::*;

use crate::activation::elu_plus_one;
use crate::cpu::data as cpu_data;
use crate::cpu::Real;

mod context;
mod folded;
mod packed;
mod project;

pub use context::token_context;
pub use folded::{folded_output, folded_output_residual};
pub use project::project_context;

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
    /// phi applied elementwise with Candle ops (differentiable, any device).
    pub fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            FeatureMap::EluPlusOne => elu_plus_one(xs),
            FeatureMap::Relu => xs.relu(),
        }
    }
}

/// Channel-first, as the feature map is stored (no token transposes): q, k: [b, d, n];
/// v: [b, c, n] -> [b, c, n]. Computed in f32 (or f64) whatever the input dtype.
///
/// On the CPU this is one fused op, forward and backward; elsewhere (and in the generic
/// form) it is [`linear_attention_reference`].
pub fn linear_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    phi: FeatureMap,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let (b, d, n) = q.dims3()?;
    let (kb, kd, kn) = k.dims3()?;
    let (vb, _, vn) = v.dims3()?;
    if (kb, kd, kn) != (b, d, n) || (vb, vn) != (b, n) {
        candle_core::bail!(
            "linear attention: expected q, k [b, d, n] and v [b, c, n], got {:?}, {:?}, {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    if !crate::fast_path(&[q, k, v])? {
        return linear_attention_reference(q, k, v, phi, eps);
    }
    linear_attention_packed(&Tensor::cat(&[q, k, v], 1)?, d, phi, eps)
}

/// [`linear_attention`] on q, k and v stacked along the channels, `qkv` [b, 2d + c, n]:
/// the output of one projection to all three, with no copies to split it.
pub fn linear_attention_packed(
    qkv: &Tensor,
    d: usize,
    phi: FeatureMap,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let (_, rows, _) = qkv.dims3()?;
    if rows < 2 * d {
        candle_core::bail!(
            "linear attention: {rows} stacked channels, fewer than 2 x d = {}",
            2 * d
        );
    }
    if !crate::fast_path(&[qkv])? {
        let q = qkv.narrow(1, 0, d)?;
        let k = qkv.narrow(1, d, d)?;
        let v = qkv.narrow(1, 2 * d, rows - 2 * d)?;
        return linear_attention_reference(&q, &k, &v, phi, eps);
    }
    crate::kernel::apply(
        "fused-linear-attention",
        [&qkv.contiguous()?],
        packed::FusedLinearAttention { phi, eps, d },
    )
}

/// [`linear_attention`] as a composition of Candle ops (any device and dtype): its generic
/// form, and the reference the fused op is tested against.
pub fn linear_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    phi: FeatureMap,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let [q, k, v] = crate::activation::in_working_precision([q, k, v])?;
    let (q, k) = (phi.apply(&q)?, phi.apply(&k)?);
    let context = k.matmul(&v.t()?)?; // [b, d, c] = sum_j phi(k_j) v_j^T
    let numerator = context.t()?.matmul(&q)?; // [b, c, n]
    let key_sum = k.sum_keepdim(2)?; // [b, d, 1]
    let denominator = (q.broadcast_mul(&key_sum)?.sum_keepdim(1)? + eps)?; // [b, 1, n]
    numerator.broadcast_div(&denominator)?.to_dtype(dtype)
}

/// From this many query/key features up, the module's products over the tokens run on
/// gemm; below, as dot products and axpys (gemm's packing dominates at d = 8).
const GEMM_MIN_D: usize = 16;

/// Tokens per task of the fused op.
const CHUNK: usize = 512;

#[derive(Clone, Copy)]
struct LinDims {
    d: usize,
    c: usize,
    n: usize,
}

impl FeatureMap {
    /// phi of columns `cols` of the [d, n] rows `x`, into `out` [d, cols.len()].
    fn map_chunk<T: Real>(self, x: &[T], n: usize, cols: &Range<usize>, out: &mut [T]) {
        let len = cols.len();
        for (src, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(len)) {
            let src = &src[cols.clone()];
            match self {
                FeatureMap::Relu => {
                    for (o, &x) in dst.iter_mut().zip(src) {
                        *o = if x > T::zero() { x } else { T::zero() };
                    }
                }
                FeatureMap::EluPlusOne => {
                    for (o, &x) in dst.iter_mut().zip(src) {
                        *o = Float::min(x, T::zero());
                    }
                    T::exp_shifted(dst, T::zero());
                    for (o, &x) in dst.iter_mut().zip(src) {
                        if x > T::zero() {
                            *o = x + T::one();
                        }
                    }
                }
            }
        }
    }

    /// d phi / dx at x, given phi(x).
    fn slope<T: Real>(self, x: T, phi_x: T) -> T {
        match (self, x > T::zero()) {
            (_, true) => T::one(),
            (FeatureMap::Relu, false) => T::zero(),
            (FeatureMap::EluPlusOne, false) => phi_x,
        }
    }
}

fn chunks(n: usize) -> Vec<Range<usize>> {
    (0..n)
        .step_by(CHUNK)
        .map(|s| s..(s + CHUNK).min(n))
        .collect()
}

fn add_into<T: Real>(acc: &mut [T], other: &[T]) {
    acc.iter_mut().zip(other).for_each(|(a, &b)| *a += b);
}

/// Writes column tiles [rows, cols.len()] into their columns of a [rows, n] matrix.
fn assemble<T: Real>(tiles: Vec<(Range<usize>, Vec<T>)>, n: usize, out: &mut [T]) {
    out.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        for (cols, tile) in &tiles {
            let len = cols.len();
            row[cols.clone()].copy_from_slice(&tile[r * len..][..len]);
        }
    });
}
