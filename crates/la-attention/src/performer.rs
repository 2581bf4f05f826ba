//! Performer's FAVOR+ (Choromanski et al. 2021): softmax(q . k / sqrt(d)) estimated as
//! phi(q) . phi(k) with positive random features phi(x) = exp(w x - |x|^2 / 2) / sqrt(m)
//! of x scaled by d^(-1/4), the m rows w orthogonal Gaussian; then linear attention.
//!
//! The features are drawn from a seed when the module is built and stay fixed (they are not
//! parameters) until [`crate::SpatialAttention::redraw_features`] is asked to redraw them.

use candle_core::{DType, Device, Tensor, D};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// Added to the normaliser; the features are positive, so it only guards underflow.
pub const EPS: f64 = 1e-6;

/// `m` orthogonal random features of dimension `d` [m, d], drawn from `seed`: blocks of `d`
/// rows made orthonormal (Gram-Schmidt on Gaussian rows), each row then scaled to the norm of
/// an independent Gaussian vector so that every row is marginally N(0, I) (FAVOR+'s
/// orthogonal features with their "regular" scaling).
pub fn random_features(m: usize, d: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(seed);
    let mut gaussian = || -> f64 { StandardNormal.sample(&mut rng) };
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(m);
    while rows.len() < m {
        let mut block: Vec<Vec<f64>> = Vec::with_capacity(d);
        while block.len() < d.min(m - rows.len()) {
            let mut v: Vec<f64> = (0..d).map(|_| gaussian()).collect();
            for u in &block {
                let dot: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(a, b)| *a -= dot * b);
            }
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm > 1e-6 {
                v.iter_mut().for_each(|a| *a /= norm);
                block.push(v);
            }
        }
        for mut v in block {
            let scale = (0..d).map(|_| gaussian().powi(2)).sum::<f64>().sqrt();
            v.iter_mut().for_each(|a| *a *= scale);
            rows.push(v);
        }
    }
    rows.concat()
}

/// [`random_features`] as a tensor.
pub fn features_tensor(
    m: usize,
    d: usize,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    Tensor::from_vec(random_features(m, d, seed), (m, d), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// phi of channel-first `x` [b, d, n] with features `w` [m, d] -> [b, m, n]. The largest
/// exponent is subtracted first, per position for queries and over the whole map for keys:
/// both factors cancel in the attention's ratio, and nothing overflows.
pub fn positive_features(x: &Tensor, w: &Tensor, query: bool) -> candle_core::Result<Tensor> {
    let (b, d, _) = x.dims3()?;
    let m = w.dim(0)?;
    let x = (x * (d as f64).powf(-0.25))?;
    let projected = w.broadcast_left(b)?.matmul(&x)?; // [b, m, n]
    let half_norm = (x.sqr()?.sum_keepdim(1)? * 0.5)?; // [b, 1, n]
    let exponent = projected.broadcast_sub(&half_norm)?;
    let stabiliser = if query {
        exponent.max_keepdim(1)?
    } else {
        exponent.max_keepdim(2)?.max_keepdim(1)?
    };
    exponent.broadcast_sub(&stabiliser)?.exp()? * (m as f64).powf(-0.5)
}

/// FAVOR+ on channel-first q, k [b, d, n] and v [b, c, n] -> [b, c, n], in f32 (or f64).
pub fn performer_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    w: &Tensor,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let [q, k, v] = la_kernels::activation::in_working_precision([q, k, v])?;
    let w = w.to_dtype(q.dtype())?;
    let phi_q = positive_features(&q, &w, true)?;
    let phi_k = positive_features(&k, &w, false)?;
    let context = phi_k.matmul(&v.t()?)?; // [b, m, c]
    let numerator = context.t()?.matmul(&phi_q)?; // [b, c, n]
    let key_sum = phi_k.sum_keepdim(D::Minus1)?; // [b, m, 1]
    let denominator = (phi_q.broadcast_mul(&key_sum)?.sum_keepdim(1)? + EPS)?; // [b, 1, n]
    numerator.broadcast_div(&denominator)?.to_dtype(dtype)
}
