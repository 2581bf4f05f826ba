//! Exact softmax attention, `softmax(Q K^T * scale) V`, in O(N) memory.
//!
//! The seed's module materialises the [N, N] score matrix: 9.4 GiB per image for the first
//! VGG16 block at 224x224. Here the scores are computed tile by tile with a running max and a
//! running sum (the "online softmax" of flash attention), so only a [TILE_Q, TILE_K] tile lives
//! at a time. The backward pass recomputes the scores tile by tile from Q, K and the per-query
//! log-sum-exp saved by the forward pass. Candle has no such op, hence the custom op.
//!
//! The fused op runs on the CPU. On other devices [`softmax_attention`] falls back to
//! [`softmax_attention_reference`] (plain Candle ops, O(N^2) memory).

use std::sync::{Arc, Mutex};

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

const TILE_Q: usize = 32;
const TILE_K: usize = 128;

/// `softmax(q k^T * scale) v` for q, k: [b, n, d] and v: [b, n, c]; returns [b, n, c].
///
/// On the CPU this is the fused tiled op (O(n) memory, forward and backward); elsewhere it
/// is the reference composition of Candle ops.
pub fn softmax_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let supported = matches!(q.dtype(), DType::F32 | DType::F64);
    if !q.device().is_cpu() || !supported {
        return softmax_attention_reference(q, k, v, scale);
    }
    check_shapes(q, k, v)?;
    let op = TiledSoftmaxAttention {
        scale,
        log_sum_exp: Arc::new(Mutex::new(None)),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same function from plain Candle ops: materialises the [b, n, n] attention matrix.
/// Used on devices without the fused op, and as the yardstick the fused op is tested against.
pub fn softmax_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    crate::ops::softmax(&scores, candle_core::D::Minus1)?.matmul(v)
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

fn slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("tiled softmax attention needs contiguous inputs"),
    }
}

impl CustomOp3 for TiledSoftmaxAttention {
    fn name(&self) -> &'static str {
        "tiled-softmax-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, n, d) = l1.shape().dims3()?;
        let c = l3.shape().dims3()?.2;
        let dims = Dims { b, n, d, c };
        let (storage, lse) = match s1.dtype() {
            DType::F32 => {
                let (out, lse) = forward::<f32>(
                    slice(s1, l1)?,
                    slice(s2, l2)?,
                    slice(s3, l3)?,
                    dims,
                    self.scale as f32,
                );
                (
                    CpuStorage::F32(out),
                    lse.into_iter().map(f64::from).collect(),
                )
            }
            DType::F64 => {
                let (out, lse) = forward::<f64>(
                    slice(s1, l1)?,
                    slice(s2, l2)?,
                    slice(s3, l3)?,
                    dims,
                    self.scale,
                );
                (CpuStorage::F64(out), lse)
            }
            dt => candle_core::bail!("tiled softmax attention: unsupported dtype {dt:?}"),
        };
        *self.log_sum_exp.lock().expect("poisoned lse lock") = Some(lse);
        Ok((storage, Shape::from((b, n, c))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, d) = q.dims3()?;
        let c = v.dim(2)?;
        let dims = Dims { b, n, d, c };
        let lse = self
            .log_sum_exp
            .lock()
            .expect("poisoned lse lock")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("backward before forward".into()))?;
        let grad_out = grad_out.to_dtype(q.dtype())?;
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => {
                let lse: Vec<f32> = lse.iter().map(|&x| x as f32).collect();
                let (dq, dk, dv) = backward::<f32>(
                    &flat(q)?,
                    &flat(k)?,
                    &flat(v)?,
                    &flat(out)?,
                    &flat(&grad_out)?,
                    &lse,
                    dims,
                    self.scale as f32,
                );
                (
                    Tensor::from_vec(dq, (b, n, d), q.device())?,
                    Tensor::from_vec(dk, (b, n, d), q.device())?,
                    Tensor::from_vec(dv, (b, n, c), q.device())?,
                )
            }
            DType::F64 => {
                let (dq, dk, dv) = backward::<f64>(
                    &flat(q)?,
                    &flat(k)?,
                    &flat(v)?,
                    &flat(out)?,
                    &flat(&grad_out)?,
                    &lse,
                    dims,
                    self.scale,
                );
                (
                    Tensor::from_vec(dq, (b, n, d), q.device())?,
                    Tensor::from_vec(dk, (b, n, d), q.device())?,
                    Tensor::from_vec(dv, (b, n, c), q.device())?,
                )
            }
            dt => candle_core::bail!("tiled softmax attention: unsupported dtype {dt:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

fn flat<T: candle_core::WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// The float operations the kernels need, for f32 and f64.
trait Real: Float + Send + Sync + Default + std::ops::AddAssign + std::iter::Sum + 'static {
    /// `x = exp(x - shift)` over a slice.
    fn exp_shifted(xs: &mut [Self], shift: Self);
}

impl Real for f32 {
    /// A branch-free exp (Cephes' expf: range reduction to [-ln2/2, ln2/2], degree-6
    /// polynomial, exponent bits), about 1 ulp, that the compiler vectorises; `f32::exp` is
    /// a libm call per element and dominated the kernel's time.
    fn exp_shifted(xs: &mut [f32], shift: f32) {
        for x in xs.iter_mut() {
            let v = (*x - shift).clamp(-87.3, 88.3);
            let t = v * std::f32::consts::LOG2_E + 0.5;
            let n = t as i32;
            let n = if (n as f32) > t { n - 1 } else { n }; // floor, branch-free after select
            let nf = n as f32;
            let r = v - nf * 0.693_359_4 + nf * 2.121_944_4e-4;
            let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r
                + 4.166_579_6e-2)
                * r
                + 1.666_666_5e-1)
                * r
                + 0.5;
            let y = p * r * r + r + 1.0;
            *x = y * f32::from_bits(((n + 127) as u32) << 23);
        }
    }
}

impl Real for f64 {
    fn exp_shifted(xs: &mut [f64], shift: f64) {
        xs.iter_mut().for_each(|x| *x = (*x - shift).exp());
    }
}

/// Dot product with eight independent accumulators so that the compiler vectorises it
/// (a single float accumulator forces a sequential sum).
#[inline]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks_a = a.chunks_exact(8);
    let chunks_b = b.chunks_exact(8);
    let (ra, rb) = (chunks_a.remainder(), chunks_b.remainder());
    for (x, y) in chunks_a.zip(chunks_b) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = acc.iter().copied().sum::<T>();
    for (x, y) in ra.iter().zip(rb) {
        sum += *x * *y;
    }
    sum
}

#[inline]
fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * *xi;
    }
}

/// Scores of queries `q_tile` ([tq, d]) against keys `kt` (the key tile transposed, [d, tk])
/// into `scores` ([tq, tk]), times `scale`.
fn tile_scores<T: Real>(q_tile: &[T], kt: &[T], d: usize, tk: usize, scale: T, scores: &mut [T]) {
    for (qi, row) in q_tile.chunks_exact(d).zip(scores.chunks_exact_mut(tk)) {
        row.fill(T::zero());
        for (dd, &qv) in qi.iter().enumerate() {
            axpy(qv * scale, &kt[dd * tk..(dd + 1) * tk], row);
        }
    }
}

/// Copies keys `k[j0..j0+tk]` ([tk, d]) transposed into `kt` ([d, tk]).
fn transpose_keys<T: Real>(k: &[T], j0: usize, tk: usize, d: usize, kt: &mut [T]) {
    for j in 0..tk {
        for dd in 0..d {
            kt[dd * tk + j] = k[(j0 + j) * d + dd];
        }
    }
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
                    let q_tile = &q_b[i0 * d..(i0 + tq) * d];
                    let mut running_max = vec![T::neg_infinity(); tq];
                    let mut running_sum = vec![T::zero(); tq];
                    let mut scores = vec![T::zero(); tq * TILE_K];
                    let mut kt = vec![T::zero(); d * TILE_K];
                    for j0 in (0..n).step_by(TILE_K) {
                        let tk = TILE_K.min(n - j0);
                        transpose_keys(k_b, j0, tk, d, &mut kt);
                        let scores = &mut scores[..tq * tk];
                        tile_scores(q_tile, &kt[..d * tk], d, tk, scale, scores);
                        for i in 0..tq {
                            let row = &mut scores[i * tk..(i + 1) * tk];
                            let tile_max = row.iter().copied().fold(T::neg_infinity(), T::max);
                            let new_max = running_max[i].max(tile_max);
                            let correction = (running_max[i] - new_max).exp();
                            let acc_i = &mut acc[i * c..(i + 1) * c];
                            if correction != T::one() {
                                acc_i.iter_mut().for_each(|a| *a = *a * correction);
                            }
                            T::exp_shifted(row, new_max);
                            let mut tile_sum = T::zero();
                            for (j, &p) in row.iter().enumerate() {
                                tile_sum += p;
                                axpy(p, &v_b[(j0 + j) * c..(j0 + j + 1) * c], acc_i);
                            }
                            running_sum[i] = running_sum[i] * correction + tile_sum;
                            running_max[i] = new_max;
                        }
                    }
                    for i in 0..tq {
                        let inv = T::one() / running_sum[i];
                        acc[i * c..(i + 1) * c]
                            .iter_mut()
                            .for_each(|a| *a = *a * inv);
                        lse_t[i] = running_max[i] + running_sum[i].ln();
                    }
                });
        });
    (out, lse)
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

    // Pass 1: dQ, one query tile per task.
    dq.par_chunks_mut(n * d).enumerate().for_each(|(bi, dq_b)| {
        let (q_b, k_b, v_b) = (
            &q[bi * n * d..(bi + 1) * n * d],
            &k[bi * n * d..(bi + 1) * n * d],
            &v[bi * n * c..(bi + 1) * n * c],
        );
        let (go_b, lse_b, delta_b) = (
            &grad_out[bi * n * c..(bi + 1) * n * c],
            &lse[bi * n..(bi + 1) * n],
            &delta[bi * n..(bi + 1) * n],
        );
        dq_b.par_chunks_mut(TILE_Q * d)
            .enumerate()
            .for_each(|(ti, dq_t)| {
                let i0 = ti * TILE_Q;
                let tq = dq_t.len() / d;
                let q_tile = &q_b[i0 * d..(i0 + tq) * d];
                let mut scores = vec![T::zero(); tq * TILE_K];
                let mut kt = vec![T::zero(); d * TILE_K];
                for j0 in (0..n).step_by(TILE_K) {
                    let tk = TILE_K.min(n - j0);
                    transpose_keys(k_b, j0, tk, d, &mut kt);
                    let scores = &mut scores[..tq * tk];
                    tile_scores(q_tile, &kt[..d * tk], d, tk, scale, scores);
                    for i in 0..tq {
                        let gi = &go_b[(i0 + i) * c..(i0 + i + 1) * c];
                        let row = &mut scores[i * tk..(i + 1) * tk];
                        T::exp_shifted(row, lse_b[i0 + i]); // row = P_i
                        for (j, p) in row.iter_mut().enumerate() {
                            let dp = dot(gi, &v_b[(j0 + j) * c..(j0 + j + 1) * c]);
                            *p = *p * (dp - delta_b[i0 + i]) * scale; // dS_ij * scale
                        }
                        for dd in 0..d {
                            dq_t[i * d + dd] += dot(row, &kt[dd * tk..(dd + 1) * tk]);
                        }
                    }
                }
            });
    });

    // Pass 2: dK and dV, one key tile per task.
    dk.par_chunks_mut(n * d)
        .zip(dv.par_chunks_mut(n * c))
        .enumerate()
        .for_each(|(bi, (dk_b, dv_b))| {
            let (q_b, k_b, v_b) = (
                &q[bi * n * d..(bi + 1) * n * d],
                &k[bi * n * d..(bi + 1) * n * d],
                &v[bi * n * c..(bi + 1) * n * c],
            );
            let (go_b, lse_b, delta_b) = (
                &grad_out[bi * n * c..(bi + 1) * n * c],
                &lse[bi * n..(bi + 1) * n],
                &delta[bi * n..(bi + 1) * n],
            );
            dk_b.par_chunks_mut(TILE_K * d)
                .zip(dv_b.par_chunks_mut(TILE_K * c))
                .enumerate()
                .for_each(|(tj, (dk_t, dv_t))| {
                    let j0 = tj * TILE_K;
                    let tk = dk_t.len() / d;
                    let mut kt = vec![T::zero(); d * tk];
                    transpose_keys(k_b, j0, tk, d, &mut kt);
                    let mut scores = vec![T::zero(); TILE_Q * tk];
                    // dK of the tile, transposed ([d, tk]) so that each query adds along keys.
                    let mut dkt = vec![T::zero(); d * tk];
                    let mut ds = vec![T::zero(); tk];
                    for i0 in (0..n).step_by(TILE_Q) {
                        let tq = TILE_Q.min(n - i0);
                        let scores = &mut scores[..tq * tk];
                        tile_scores(&q_b[i0 * d..(i0 + tq) * d], &kt, d, tk, scale, scores);
                        for i in 0..tq {
                            let gi = &go_b[(i0 + i) * c..(i0 + i + 1) * c];
                            let qi = &q_b[(i0 + i) * d..(i0 + i + 1) * d];
                            let row = &mut scores[i * tk..(i + 1) * tk];
                            T::exp_shifted(row, lse_b[i0 + i]); // row = P_i
                            for (j, &p) in row.iter().enumerate() {
                                axpy(p, gi, &mut dv_t[j * c..(j + 1) * c]);
                                let dp = dot(gi, &v_b[(j0 + j) * c..(j0 + j + 1) * c]);
                                ds[j] = p * (dp - delta_b[i0 + i]) * scale;
                            }
                            for (dd, &qv) in qi.iter().enumerate() {
                                axpy(qv, &ds, &mut dkt[dd * tk..(dd + 1) * tk]);
                            }
                        }
                    }
                    for j in 0..tk {
                        for dd in 0..d {
                            dk_t[j * d + dd] = dkt[dd * tk + j];
                        }
                    }
                });
        });
    (dq, dk, dv)
}
