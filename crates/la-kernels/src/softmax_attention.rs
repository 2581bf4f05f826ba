//! Exact softmax attention, `softmax(Q K^T * scale) V`, in O(N) memory.
//!
//! The article's module materialises the [N, N] score matrix: 9.4 GiB per image for the first
//! VGG16 block at 224x224. Here the scores are computed tile by tile with a running max and a
//! running sum (the "online softmax" of flash attention), so only a [TILE_Q, TILE_K] tile lives
//! at a time. The backward pass recomputes the scores tile by tile from Q, K and the per-query
//! log-sum-exp saved by the forward pass. Candle has no such op, hence the custom op.
//!
//! The fused op runs on the CPU, and on CUDA as this crate's kernels (`cuda/attention.cu`: one
//! launch forward, three backward, the same tiles in shared memory). On other devices
//! [`softmax_attention`] runs [`softmax_attention_chunked`]: the same algorithm by chunks of
//! queries in Candle ops, also exact and O(chunk x N) in memory.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::cpu::{data as slice, dot, sum_lanes, with_float, Real};
use crate::gemm::{matmul_scaled as matmul, view};
use crate::kernel::{apply, Grad, Input, Kernel};
use crate::simd::with_simd;

mod chunked;

pub use chunked::{chunk_rows, softmax_attention_chunked, softmax_attention_chunked_by};

const TILE_Q: usize = 64;
const TILE_K: usize = 256;

/// `softmax(q k^T * scale) v` for q, k: [b, n, d] and v: [b, n, c]; returns [b, n, c].
///
/// On the CPU this is the fused tiled op (O(n) memory, forward and backward), on CUDA its
/// kernels (d up to 64); elsewhere it is [`softmax_attention_chunked`], Candle ops chunk by
/// chunk (O(chunk x n) memory).
pub fn softmax_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    check_shapes(q, k, v)?;
    #[cfg(feature = "cuda")]
    if crate::cuda_path(&[q, k, v])? {
        let (b, n, d) = q.dims3()?;
        if crate::cuda::softmax_attention_fits(b, n, d) {
            return crate::cuda::softmax_attention(q, k, v, scale);
        }
    }
    if !crate::fast_path(&[q, k, v])? {
        return softmax_attention_chunked(q, k, v, scale);
    }
    let op = TiledSoftmaxAttention {
        scale,
        log_sum_exp: Arc::new(Mutex::new(None)),
    };
    let inputs = [&q.contiguous()?, &k.contiguous()?, &v.contiguous()?];
    apply("tiled-softmax-attention", inputs, op)
}

/// The same function from plain Candle ops: materialises the [b, n, n] attention matrix.
/// The yardstick both forms are tested against.
pub fn softmax_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    crate::activation::softmax(&scores, candle_core::D::Minus1)?.matmul(v)
}

fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<()> {
    let (b, n, d) = q.dims3()?;
    let (bk, nk, dk) = k.dims3()?;
    let (bv, nv, _) = v.dims3()?;
    if (bk, nk, dk) != (b, n, d)
        || (bv, nv) != (b, n)
        || k.dtype() != q.dtype()
        || v.dtype() != q.dtype()
    {
        candle_core::bail!(
            "softmax attention: q {:?} {:?}, k {:?} {:?}, v {:?} {:?} do not fit (want q, k [b, n, d], v [b, n, c], one dtype)",
            q.dims(),
            q.dtype(),
            k.dims(),
            k.dtype(),
            v.dims(),
            v.dtype()
        )
    }
    Ok(())
}

/// The fused op. `log_sum_exp` carries each query's log-sum-exp from the forward pass to the
/// backward pass (O(b n) floats) so the backward does not need a third pass over the keys.
struct TiledSoftmaxAttention {
    scale: f64,
    log_sum_exp: Arc<Mutex<Option<Vec<f64>>>>,
}

/// Sizes of one call: batch, tokens, query/key channels, value channels.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    n: usize,
    d: usize,
    c: usize,
}

impl Kernel<3> for TiledSoftmaxAttention {
    fn cpu_forward(&self, inputs: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
        let [(s1, l1), (s2, l2), (s3, l3)] = inputs;
        let (b, n, d) = l1.shape().dims3()?;
        let c = l3.shape().dims3()?.2;
        let dims = Dims { b, n, d, c };
        let (storage, lse): (CpuStorage, Vec<f64>) = with_float!("tiled softmax attention", s1.dtype(), T => {
            let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
            let (out, lse) = forward::<T>(q, k, v, dims, self.scale as T);
            (T::to_cpu_storage_owned(out), lse.into_iter().map(<T as candle_core::WithDType>::to_f64).collect())
        });
        *self.log_sum_exp.lock().expect("poisoned lse lock") = Some(lse);
        Ok((storage, Shape::from((b, n, c))))
    }

    fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
        let ([q, k, v], out, grad_out) = (g.inputs, g.output, g.grad);
        let (b, n, d) = q.dims3()?;
        let c = v.dim(2)?;
        let dims = Dims { b, n, d, c };
        let lse = self
            .log_sum_exp
            .lock()
            .expect("poisoned lse lock")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("backward before forward".into()))?;
        let grad_out = grad_out.to_dtype(q.dtype())?.contiguous()?;
        // The inputs are read in place (the forward made them contiguous), not copied out.
        fn run<T: Real + candle_core::WithDType>(
            [q, k, v, out, grad_out]: [&Tensor; 5],
            lse: &[T],
            dims: Dims,
            scale: T,
        ) -> candle_core::Result<[Tensor; 3]> {
            let Dims { b, n, d, c } = dims;
            let (dq, dk, dv) =
                crate::cpu::with_slices([q, k, v, out, grad_out], |[q, k, v, o, g]| {
                    Ok(backward::<T>(q, k, v, o, g, lse, dims, scale))
                })?;
            Ok([
                Tensor::from_vec(dq, (b, n, d), q.device())?,
                Tensor::from_vec(dk, (b, n, d), q.device())?,
                Tensor::from_vec(dv, (b, n, c), q.device())?,
            ])
        }
        let out = out.contiguous()?;
        let args = [q, k, v, &out, &grad_out];
        let [dq, dk, dv] = with_float!("tiled softmax attention", q.dtype(), T => {
            let lse: Vec<T> = lse.iter().map(|&x| x as T).collect();
            run::<T>(args, &lse, dims, self.scale as T)?
        });
        Ok([Some(dq), Some(dk), Some(dv)])
    }
}

/// The maximum of a slice, in 16 independent lanes so that the compiler vectorises it (a
/// fold with `max` is one dependent operation per element). NaNs are ignored, as by `max`.
#[inline]
fn max_lanes<T: Real>(xs: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); 16];
    let mut chunks = xs.chunks_exact(16);
    for chunk in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l = if x > *l { x } else { *l };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(T::neg_infinity(), Float::max);
    lanes.iter().copied().fold(tail, Float::max)
}

/// Forward pass: returns the output [b, n, c] and each query's log-sum-exp [b, n].
fn forward<T: Real>(q: &[T], k: &[T], v: &[T], dims: Dims, scale: T) -> (Vec<T>, Vec<T>) {
    let Dims { b, n, d, c } = dims;
    let mut out = vec![T::zero(); b * n * c];
    let mut lse = vec![T::zero(); b * n];
    out.par_chunks_mut(n * c)
        .zip(lse.par_chunks_mut(n))
        .enumerate()
        .for_each(|(bi, (out_b, lse_b))| {
            let (q_b, k_b, v_b) = (
                &q[bi * n * d..(bi + 1) * n * d],
                &k[bi * n * d..(bi + 1) * n * d],
                &v[bi * n * c..(bi + 1) * n * c],
            );
            out_b
                .par_chunks_mut(TILE_Q * c)
                .zip(lse_b.par_chunks_mut(TILE_Q))
                .enumerate()
                .for_each(|(ti, (acc, lse_t))| {
                    let i0 = ti * TILE_Q;
                    let tq = lse_t.len();
                    let q_tile = view(&q_b[i0 * d..(i0 + tq) * d], d, 1);
                    let mut running_max = vec![T::neg_infinity(); tq];
                    let mut running_sum = vec![T::zero(); tq];
                    let mut scores = vec![T::zero(); tq * TILE_K];
                    for j0 in (0..n).step_by(TILE_K) {
                        let tk = TILE_K.min(n - j0);
                        let scores = &mut scores[..tq * tk];
                        // S = scale * Q K^T, with K's rows read as columns.
                        matmul(
                            tq,
                            tk,
                            d,
                            scores,
                            false,
                            scale,
                            q_tile,
                            view(&k_b[j0 * d..(j0 + tk) * d], 1, d),
                        );
                        for i in 0..tq {
                            let row = &mut scores[i * tk..(i + 1) * tk];
                            let tile_max = with_simd(|| max_lanes(row));
                            let new_max = Float::max(running_max[i], tile_max);
                            let correction = (running_max[i] - new_max).exp();
                            if correction != T::one() {
                                acc[i * c..(i + 1) * c]
                                    .iter_mut()
                                    .for_each(|a| *a *= correction);
                            }
                            T::exp_shifted(row, new_max);
                            running_sum[i] =
                                running_sum[i] * correction + with_simd(|| sum_lanes(row));
                            running_max[i] = new_max;
                        }
                        // acc += P V
                        matmul(
                            tq,
                            c,
                            tk,
                            acc,
                            true,
                            T::one(),
                            view(scores, tk, 1),
                            view(&v_b[j0 * c..(j0 + tk) * c], c, 1),
                        );
                    }
                    for i in 0..tq {
                        let inv = T::one() / running_sum[i];
                        acc[i * c..(i + 1) * c].iter_mut().for_each(|a| *a *= inv);
                        lse_t[i] = running_max[i] + running_sum[i].ln();
                    }
                });
        });
    (out, lse)
}

/// P_ij = exp(S_ij - lse_i) and dS_ij = P_ij (dP_ij - delta_i) * scale for one tile, given
/// S in `p` and dP in `ds` ([tq, tk] each): `p` becomes P and `ds` becomes dS.
fn softmax_grad_tile<T: Real>(
    p: &mut [T],
    ds: &mut [T],
    tk: usize,
    lse: &[T],
    delta: &[T],
    scale: T,
) {
    for (i, (p_row, ds_row)) in p
        .chunks_exact_mut(tk)
        .zip(ds.chunks_exact_mut(tk))
        .enumerate()
    {
        T::exp_shifted(p_row, lse[i]);
        with_simd(|| {
            for (g, &pv) in ds_row.iter_mut().zip(p_row.iter()) {
                *g = pv * (*g - delta[i]) * scale;
            }
        });
    }
}

/// One image's inputs to the backward pass, row-major: q, k [n, d], v, dO [n, c], and
/// per query the log-sum-exp and delta.
struct Image<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    grad_out: &'a [T],
    lse: &'a [T],
    delta: &'a [T],
    dims: (usize, usize),
    scale: T,
}

impl<T: Real> Image<'_, T> {
    fn key_rows(&self, j0: usize, tk: usize) -> &[T] {
        let d = self.dims.0;
        &self.k[j0 * d..(j0 + tk) * d]
    }

    /// P and dS of query rows `i0..i0 + tq` against key rows `j0..j0 + tk`.
    fn tile_grads(
        &self,
        (i0, tq): (usize, usize),
        (j0, tk): (usize, usize),
        p: &mut [T],
        ds: &mut [T],
    ) {
        let (d, c) = self.dims;
        tile_grads(
            &self.q[i0 * d..(i0 + tq) * d],
            self.key_rows(j0, tk),
            &self.v[j0 * c..(j0 + tk) * c],
            &self.grad_out[i0 * c..(i0 + tq) * c],
            &self.lse[i0..i0 + tq],
            &self.delta[i0..i0 + tq],
            self.dims,
            self.scale,
            p,
            ds,
        );
    }

    /// Adds the tile's part of dK and dV (of its key rows) from P and dS.
    fn add_key_grads(
        &self,
        (i0, tq): (usize, usize),
        p: &[T],
        ds: &[T],
        dk: &mut [T],
        dv: &mut [T],
    ) {
        let (d, c) = self.dims;
        let q_rows = &self.q[i0 * d..(i0 + tq) * d];
        let go_rows = &self.grad_out[i0 * c..(i0 + tq) * c];
        add_key_grads(p, ds, q_rows, go_rows, self.dims, dk, dv);
    }
}

/// One (query tile, key tile) pair of the backward: P = exp(scale Q K^T - lse) into `p` and
/// dS = P (dO V^T - delta) scale into `ds`, both [tq, tk] (tq = `lse.len()`).
#[allow(clippy::too_many_arguments)]
fn tile_grads<T: Real>(
    q_rows: &[T],
    k_rows: &[T],
    v_rows: &[T],
    go_rows: &[T],
    lse: &[T],
    delta: &[T],
    (d, c): (usize, usize),
    scale: T,
    p: &mut [T],
    ds: &mut [T],
) {
    let (tq, tk) = (lse.len(), k_rows.len() / d.max(1));
    matmul(
        tq,
        tk,
        d,
        p,
        false,
        scale,
        view(q_rows, d, 1),
        view(k_rows, 1, d),
    );
    matmul(
        tq,
        tk,
        c,
        ds,
        false,
        T::one(),
        view(go_rows, c, 1),
        view(v_rows, 1, c),
    );
    softmax_grad_tile(p, ds, tk, lse, delta, scale);
}

/// dV += P^T dO and dK += dS^T Q for one tile pair: the key tile's gradients, the tiles
/// read transposed.
fn add_key_grads<T: Real>(
    p: &[T],
    ds: &[T],
    q_rows: &[T],
    go_rows: &[T],
    (d, c): (usize, usize),
    dk_t: &mut [T],
    dv_t: &mut [T],
) {
    let (tq, tk) = (q_rows.len() / d.max(1), dk_t.len() / d.max(1));
    matmul(
        tk,
        c,
        tq,
        dv_t,
        true,
        T::one(),
        view(p, 1, tk),
        view(go_rows, c, 1),
    );
    matmul(
        tk,
        d,
        tq,
        dk_t,
        true,
        T::one(),
        view(ds, 1, tk),
        view(q_rows, d, 1),
    );
}

/// dQ += dS K for one tile pair: the query tile's gradient.
fn add_query_grad<T: Real>(ds: &[T], k_rows: &[T], d: usize, dq_t: &mut [T]) {
    let (tq, tk) = (dq_t.len() / d.max(1), k_rows.len() / d.max(1));
    matmul(
        tq,
        d,
        tk,
        dq_t,
        true,
        T::one(),
        view(ds, tk, 1),
        view(k_rows, d, 1),
    );
}

/// Backward pass (flash-attention 2): with P = exp(S - lse) recomputed per tile,
/// dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K * scale,
/// dK = dS^T Q * scale. Query tiles and key tiles are walked in two separate parallel
/// passes so that no two threads write the same gradient row.
#[allow(clippy::too_many_arguments)]
fn backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    grad_out: &[T],
    lse: &[T],
    dims: Dims,
    scale: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims { b, n, d, c } = dims;
    // delta_i = sum_c dO_ic O_ic, the row term of the softmax Jacobian.
    let delta: Vec<T> = grad_out
        .par_chunks(c)
        .zip(out.par_chunks(c))
        .map(|(g, o)| dot(g, o))
        .collect();
    let mut dq = vec![T::zero(); b * n * d];
    let mut dk = vec![T::zero(); b * n * d];
    let mut dv = vec![T::zero(); b * n * c];
    let slices = |bi: usize| Image {
        q: &q[bi * n * d..(bi + 1) * n * d],
        k: &k[bi * n * d..(bi + 1) * n * d],
        v: &v[bi * n * c..(bi + 1) * n * c],
        grad_out: &grad_out[bi * n * c..(bi + 1) * n * c],
        lse: &lse[bi * n..(bi + 1) * n],
        delta: &delta[bi * n..(bi + 1) * n],
        dims: (d, c),
        scale,
    };

    if b >= rayon::current_num_threads() {
        // One task per image, one pass: each (query tile, key tile) pair computes its scores,
        // P, dP and dS once and feeds all three gradients, which the task owns. The two-pass
        // scheme below recomputes P and dP = dO V^T (the largest product) in each pass; it
        // is only needed to split a single image between threads.
        dq.par_chunks_mut(n * d)
            .zip(dk.par_chunks_mut(n * d))
            .zip(dv.par_chunks_mut(n * c))
            .enumerate()
            .for_each(|(bi, ((dq_b, dk_b), dv_b))| {
                let image = slices(bi);
                // 64-128 KB each: on the heap rather than a rayon worker's stack.
                #[allow(clippy::useless_vec)]
                let (mut p, mut ds) = (
                    vec![T::zero(); TILE_Q * TILE_K],
                    vec![T::zero(); TILE_Q * TILE_K],
                );
                for j0 in (0..n).step_by(TILE_K) {
                    let tk = TILE_K.min(n - j0);
                    let dk_t = &mut dk_b[j0 * d..(j0 + tk) * d];
                    let dv_t = &mut dv_b[j0 * c..(j0 + tk) * c];
                    for i0 in (0..n).step_by(TILE_Q) {
                        let tq = TILE_Q.min(n - i0);
                        let (p, ds) = (&mut p[..tq * tk], &mut ds[..tq * tk]);
                        let dq_t = &mut dq_b[i0 * d..(i0 + tq) * d];
                        image.tile_grads((i0, tq), (j0, tk), p, ds);
                        let (p, ds) = (&*p, &*ds);
                        image.add_key_grads((i0, tq), p, ds, dk_t, dv_t);
                        add_query_grad(ds, image.key_rows(j0, tk), d, dq_t);
                    }
                }
            });
        return (dq, dk, dv);
    }

    // Pass 1: dQ, one query tile per task.
    dq.par_chunks_mut(n * d).enumerate().for_each(|(bi, dq_b)| {
        let image = slices(bi);
        dq_b.par_chunks_mut(TILE_Q * d)
            .enumerate()
            .for_each(|(ti, dq_t)| {
                let i0 = ti * TILE_Q;
                let tq = dq_t.len() / d;
                let mut p = vec![T::zero(); tq * TILE_K];
                let mut ds = vec![T::zero(); tq * TILE_K];
                for j0 in (0..n).step_by(TILE_K) {
                    let tk = TILE_K.min(n - j0);
                    let (p, ds) = (&mut p[..tq * tk], &mut ds[..tq * tk]);
                    image.tile_grads((i0, tq), (j0, tk), p, ds);
                    add_query_grad(ds, image.key_rows(j0, tk), d, dq_t);
                }
            });
    });

    // Pass 2: dK and dV, one key tile per task.
    dk.par_chunks_mut(n * d)
        .zip(dv.par_chunks_mut(n * c))
        .enumerate()
        .for_each(|(bi, (dk_b, dv_b))| {
            let image = slices(bi);
            dk_b.par_chunks_mut(TILE_K * d)
                .zip(dv_b.par_chunks_mut(TILE_K * c))
                .enumerate()
                .for_each(|(tj, (dk_t, dv_t))| {
                    let j0 = tj * TILE_K;
                    let tk = dk_t.len() / d;
                    let mut p = vec![T::zero(); TILE_Q * tk];
                    let mut ds = vec![T::zero(); TILE_Q * tk];
                    for i0 in (0..n).step_by(TILE_Q) {
                        let tq = TILE_Q.min(n - i0);
                        let (p, ds) = (&mut p[..tq * tk], &mut ds[..tq * tk]);
                        image.tile_grads((i0, tq), (j0, tk), p, ds);
                        image.add_key_grads((i0, tq), p, ds, dk_t, dv_t);
                    }
                });
        });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use crate::cpu::Real;

    #[test]
    fn vectorised_exp_is_within_a_few_ulp_of_libm() {
        // Every 1/1000 over the clamped range, plus a shift, against f64's exp.
        let xs: Vec<f32> = (-87_000..88_000).map(|i| i as f32 / 1000.0).collect();
        let mut ys = xs.iter().map(|x| x + 3.0).collect::<Vec<f32>>();
        f32::exp_shifted(&mut ys, 3.0);
        for (&x, &y) in xs.iter().zip(&ys) {
            // The argument the kernel sees, after the shift's f32 rounding.
            let v = (x + 3.0) - 3.0;
            let exact = (v as f64).exp();
            let rel = (y as f64 - exact).abs() / exact;
            assert!(
                rel < 4e-7,
                "exp({v}) = {y}, exact {exact}, relative error {rel:e}"
            );
        }
        // Far below the range: a tiny positive number, never NaN or negative.
        let mut low = [-1e4f32, f32::NEG_INFINITY];
        f32::exp_shifted(&mut low, 0.0);
        assert!(low.iter().all(|&v| (0.0..1e-37).contains(&v)), "{low:?}");
    }
}
