//! The module's form of linear attention: value and output projections folded into d x c
//! matrices, so that only `M phi(Q) / den` (plus bias and residual) meets the n tokens.

use std::ops::Range;

use candle_core::{CpuStorage, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{add_into, assemble, chunks, cpu_data, FeatureMap, LinDims, CHUNK, GEMM_MIN_D};
use crate::cpu::{with_float, Real};
use crate::gemm::{matmul_scaled as matmul, view};
use crate::kernel::{apply, Grad, Input, Kernel};
use crate::simd::with_simd;

/// The last step of linear attention with the value and output projections folded in:
/// `out[:, j] = M phi(q_j) / (s . phi(q_j) + eps)` for q [b, d, n], M [b, c, d], s [b, d].
///
/// With v = W_v x + b_v and y = W_o mixed + b_o, the output projection of the attention is
/// y = (W_o A^T) phi(Q) / den + b_o, where A = phi(K) v^T = (phi(K) x^T) W_v^T + s b_v^T.
/// [`crate::SpatialAttention`] computes the small matrices A and M = W_o A^T (d x c) with
/// Candle ops and this op does the per-token part: the two c x c projections over all n
/// tokens (the bulk of the module's cost at 224x224) are never computed.
pub fn folded_output(
    q: &Tensor,
    m: &Tensor,
    s: &Tensor,
    phi: FeatureMap,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let (b, d, _) = q.dims3()?;
    let (mb, _, md) = m.dims3()?;
    if (mb, md) != (b, d) || s.dims() != [b, d] {
        candle_core::bail!(
            "linear attention output: expected q [b, d, n], M [b, c, d], s [b, d], got {:?}, {:?}, {:?}",
            q.shape(),
            m.shape(),
            s.shape()
        );
    }
    if !crate::fast_path(&[q, m, s])? {
        return folded_output_generic(q, m, s, phi, eps);
    }
    let inputs = [&q.contiguous()?, &m.contiguous()?, &s.contiguous()?];
    apply("linear-attention-output", inputs, FoldedOutput { phi, eps })
}

/// [`folded_output`] as a composition of Candle ops, on any device and dtype:
/// `M phi(q) / (s . phi(q) + eps)`.
pub fn folded_output_generic(
    q: &Tensor,
    m: &Tensor,
    s: &Tensor,
    phi: FeatureMap,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let phi_q = phi.apply(q)?; // [b, d, n]
    let denominator = (phi_q.broadcast_mul(&s.unsqueeze(2)?)?.sum_keepdim(1)? + eps)?; // [b, 1, n]
    m.matmul(&phi_q)?.broadcast_div(&denominator)
}

struct FoldedOutput {
    phi: FeatureMap,
    eps: f64,
}

/// phi(q) [d, n] and 1 / (s . phi(q) + eps) [n] of one image.
fn folded_features<T: Real>(
    q: &[T],
    s: &[T],
    n: usize,
    phi: FeatureMap,
    eps: T,
) -> (Vec<T>, Vec<T>) {
    let mut phiq = vec![T::zero(); q.len()];
    let all = 0..n;
    phiq.par_chunks_mut(n)
        .zip(q.par_chunks(n))
        .for_each(|(dst, src)| phi.map_chunk(src, n, &all, dst));
    let mut rden = vec![T::zero(); n];
    rden.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(j, rden)| {
            let l0 = j * CHUNK;
            rden.fill(eps);
            for (&s, row) in s.iter().zip(phiq.chunks_exact(n)) {
                rden.iter_mut()
                    .zip(&row[l0..])
                    .for_each(|(x, &p)| *x += s * p);
            }
            rden.iter_mut().for_each(|x| *x = T::one() / *x);
        });
    (phiq, rden)
}

fn folded_forward<T: Real>(
    q: &[T],
    m: &[T],
    s: &[T],
    dims: LinDims,
    phi: FeatureMap,
    eps: T,
) -> Vec<T> {
    let LinDims { d, c, n } = dims;
    let mut out = vec![T::zero(); q.len() / (d * n).max(1) * c * n];
    if out.is_empty() || d == 0 {
        return out;
    }
    for (i, out) in out.chunks_exact_mut(c * n).enumerate() {
        let small = Small {
            m: &m[i * c * d..][..c * d],
            m_rs: d,
            s: &s[i * d..][..d],
            bias: None,
        };
        folded_image(&q[i * d * n..][..d * n], small, None, dims, phi, eps, out);
    }
    out
}

/// One image's small operands of the folded output: M [c, d] with row stride `m_rs`, s [d],
/// and the output bias (`bias[ch * m_rs]`), when there is one.
#[derive(Clone, Copy)]
struct Small<'a, T> {
    m: &'a [T],
    m_rs: usize,
    s: &'a [T],
    bias: Option<&'a [T]>,
}

/// `out = (M phi(q)) / den`, plus `bias + x` when given, for one image.
fn folded_image<T: Real>(
    q: &[T],
    small: Small<T>,
    x: Option<&[T]>,
    dims: LinDims,
    phi: FeatureMap,
    eps: T,
    out: &mut [T],
) {
    let LinDims { d, c, n } = dims;
    let Small { m, m_rs, s, bias } = small;
    let (phiq, rden) = folded_features(q, s, n, phi, eps);
    // Row `ch`'s columns `cols`, already holding (M phi(Q))[ch, cols]: over the denominator,
    // then the bias and residual.
    let finish = |ch: usize, cols: Range<usize>, row: &mut [T]| {
        row.iter_mut()
            .zip(&rden[cols.clone()])
            .for_each(|(o, &r)| *o *= r);
        if let (Some(bias), Some(x)) = (bias, x) {
            let b = bias[ch * m_rs];
            row.iter_mut()
                .zip(&x[ch * n..][cols])
                .for_each(|(o, &x)| *o = *o + b + x);
        }
    };
    let rows = c.div_ceil(rayon::current_num_threads() * 2).max(1);
    if d < GEMM_MIN_D {
        // Few features (block 1 at 224x224: d = 8): d axpys per row, written in place;
        // gemm packs and re-packs more than it computes at that depth. Column chunks
        // outermost, so that phi(Q)'s chunk stays in L1 for all the rows of a block.
        out.par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(t, block)| {
                with_simd(|| {
                    for l0 in (0..n).step_by(CHUNK) {
                        let len = CHUNK.min(n - l0);
                        for (i, row) in block.chunks_exact_mut(n).enumerate() {
                            let ch = t * rows + i;
                            let row = &mut row[l0..][..len];
                            row.fill(T::zero());
                            let weights = &m[ch * m_rs..][..d];
                            for (&w, phi_row) in weights.iter().zip(phiq.chunks_exact(n)) {
                                row.iter_mut()
                                    .zip(&phi_row[l0..])
                                    .for_each(|(o, &p)| *o += w * p);
                            }
                            finish(ch, l0..l0 + len, row);
                        }
                    }
                })
            });
        return;
    }
    // By blocks of rows: one GEMM each (phi(Q) is packed once per block rather than re-read
    // from cache for every row), then the rest of each row.
    out.par_chunks_mut(rows * n)
        .enumerate()
        .for_each(|(t, block)| {
            let r = block.len() / n;
            let m_rows = &m[t * rows * m_rs..][..(r - 1) * m_rs + d];
            matmul(
                r,
                n,
                d,
                block,
                false,
                T::one(),
                view(m_rows, m_rs, 1),
                view(&phiq, n, 1),
            );
            with_simd(|| {
                for (i, row) in block.chunks_exact_mut(n).enumerate() {
                    finish(t * rows + i, 0..n, row);
                }
            });
        });
}

/// (dq, dM, ds) from the output and its gradient `grad`, both [b, c, n].
#[allow(clippy::too_many_arguments)]
fn folded_backward<T: Real>(
    q: &[T],
    m: &[T],
    s: &[T],
    out: &[T],
    grad: &[T],
    dims: LinDims,
    phi: FeatureMap,
    eps: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let LinDims { d, c, n } = dims;
    let (mut dq, mut dm, mut ds) = (
        vec![T::zero(); q.len()],
        vec![T::zero(); m.len()],
        vec![T::zero(); s.len()],
    );
    if q.is_empty() || d == 0 || c == 0 {
        return (dq, dm, ds);
    }
    for i in 0..q.len() / (d * n) {
        let (q, m_i, s_i) = (
            &q[i * d * n..][..d * n],
            &m[i * c * d..][..c * d],
            &s[i * d..][..d],
        );
        let (out, grad) = (&out[i * c * n..][..c * n], &grad[i * c * n..][..c * n]);
        let (phiq, rden) = folded_features(q, s_i, n, phi, eps);
        let per_chunk: Vec<_> = chunks(n)
            .into_par_iter()
            .map(|cols| {
                let len = cols.len();
                // gd = grad / den, dden = -sum_c grad * out / den.
                let mut gd = vec![T::zero(); c * len];
                let mut dden = vec![T::zero(); len];
                for ch in 0..c {
                    let g = &grad[ch * n..][cols.clone()];
                    let o = &out[ch * n..][cols.clone()];
                    let r = &rden[cols.clone()];
                    let row = &mut gd[ch * len..][..len];
                    for l in 0..len {
                        row[l] = g[l] * r[l];
                        dden[l] -= g[l] * o[l] * r[l];
                    }
                }
                let phiq_chunk = |r: usize| &phiq[r * n..][cols.clone()];
                // dM = gd phi(Q)^T; ds = phi(Q) dden.
                let mut dm_part = vec![T::zero(); c * d];
                let mut phiq_tile = vec![T::zero(); d * len];
                for r in 0..d {
                    phiq_tile[r * len..][..len].copy_from_slice(phiq_chunk(r));
                }
                matmul(
                    c,
                    d,
                    len,
                    &mut dm_part,
                    false,
                    T::one(),
                    view(&gd, len, 1),
                    view(&phiq_tile, 1, len),
                );
                let ds_part: Vec<T> = (0..d)
                    .map(|r| {
                        phiq_chunk(r)
                            .iter()
                            .zip(&dden)
                            .map(|(&p, &g)| p * g)
                            .sum::<T>()
                    })
                    .collect();
                // d phi(Q) = M^T gd + s dden^T, then through phi.
                let mut dphiq = vec![T::zero(); d * len];
                matmul(
                    d,
                    len,
                    c,
                    &mut dphiq,
                    false,
                    T::one(),
                    view(m_i, 1, d),
                    view(&gd, len, 1),
                );
                for (r, row) in dphiq.chunks_exact_mut(len).enumerate() {
                    let src = &q[r * n..][cols.clone()];
                    let phis = phiq_chunk(r);
                    for l in 0..len {
                        row[l] = (row[l] + s_i[r] * dden[l]) * phi.slope(src[l], phis[l]);
                    }
                }
                (cols, dphiq, dm_part, ds_part)
            })
            .collect();
        let mut dq_tiles = Vec::with_capacity(per_chunk.len());
        for (cols, tile, dm_part, ds_part) in per_chunk {
            add_into(&mut dm[i * c * d..][..c * d], &dm_part);
            add_into(&mut ds[i * d..][..d], &ds_part);
            dq_tiles.push((cols, tile));
        }
        assemble(dq_tiles, n, &mut dq[i * d * n..][..d * n]);
    }
    (dq, dm, ds)
}

impl Kernel<3> for FoldedOutput {
    fn cpu_forward(&self, inputs: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
        let [(s1, l1), (s2, l2), (s3, l3)] = inputs;
        let (b, d, n) = l1.shape().dims3()?;
        let c = l2.shape().dims3()?.1;
        let dims = LinDims { d, c, n };
        let out = with_float!("linear attention output", s1.dtype(), T => {
            let (q, m, s) = (cpu_data(s1, l1)?, cpu_data(s2, l2)?, cpu_data(s3, l3)?);
            T::to_cpu_storage_owned(folded_forward::<T>(q, m, s, dims, self.phi, self.eps as T))
        });
        Ok((out, Shape::from((b, c, n))))
    }

    fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
        let ([q, m, s], out, grad) = (g.inputs, g.output, g.grad);
        let (_, d, n) = q.dims3()?;
        let dims = LinDims { d, c: m.dim(1)?, n };
        let grad = grad.contiguous()?;
        fn run<T: Real + candle_core::WithDType>(
            op: &FoldedOutput,
            [q, m, s, out, grad]: [&Tensor; 5],
            dims: LinDims,
            eps: T,
        ) -> candle_core::Result<[Tensor; 3]> {
            let (dq, dm, ds) =
                crate::cpu::with_slices::<T, _, 5>([q, m, s, out, grad], |[q, m, s, o, g]| {
                    Ok(folded_backward(q, m, s, o, g, dims, op.phi, eps))
                })?;
            Ok([
                Tensor::from_vec(dq, q.shape(), q.device())?,
                Tensor::from_vec(dm, m.shape(), m.device())?,
                Tensor::from_vec(ds, s.shape(), s.device())?,
            ])
        }
        let args = [q, m, s, out, &grad];
        let [dq, dm, ds] = with_float!("linear attention output", q.dtype(), T => {
            run::<T>(self, args, dims, self.eps as T)?
        });
        Ok([Some(dq), Some(dm), Some(ds)])
    }
}

/// `x + folded_output(q, m, s) + bias` (bias of length c, per channel): the output projection's bias
/// and the module's residual are added while the output is written, instead of in two more
/// passes over the [c, n] map.
pub fn folded_output_residual(
    q: &Tensor,
    m: &Tensor,
    s: &Tensor,
    bias: &Tensor,
    x: &Tensor,
    phi: FeatureMap,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let (b, c, d) = m.dims3()?;
    if bias.dims() != [c]
        || x.dims3()? != (b, c, q.dim(2)?)
        || !crate::fast_path(&[q, m, s, bias, x])?
    {
        let out = folded_output(q, m, s, phi, eps)?;
        return x + out.broadcast_add(&bias.reshape((1, c, 1))?)?;
    }
    // The small operands packed as P [b, c + 1, d + 1]: [M | bias] over [s | 0].
    let top = Tensor::cat(&[m, &bias.reshape((1, c, 1))?.broadcast_as((b, c, 1))?], 2)?;
    let bottom = Tensor::cat(
        &[
            &s.unsqueeze(1)?,
            &s.zeros_like()?.narrow(1, 0, 1)?.unsqueeze(1)?,
        ],
        2,
    )?;
    let packed = Tensor::cat(&[&top, &bottom], 1)?.contiguous()?;
    if q.dims3()?.1 != d {
        candle_core::bail!(
            "linear attention output: q {:?} and M {:?} differ in d",
            q.shape(),
            m.shape()
        );
    }
    let inputs = [&q.contiguous()?, &packed, &x.contiguous()?];
    apply(
        "linear-attention-output-residual",
        inputs,
        FoldedResidual { phi, eps },
    )
}

/// The op on (q, P, x) of [`folded_output_residual`].
struct FoldedResidual {
    phi: FeatureMap,
    eps: f64,
}

impl FoldedResidual {
    fn dims(q: &Shape, x: &Shape) -> candle_core::Result<LinDims> {
        let (_, d, n) = q.dims3()?;
        Ok(LinDims {
            d,
            c: x.dims3()?.1,
            n,
        })
    }
}

/// The small operands of image `i` inside P [b, c + 1, d + 1].
fn unpack<T>(p: &[T], i: usize, dims: LinDims) -> Small<'_, T> {
    let LinDims { d, c, .. } = dims;
    let img = &p[i * (c + 1) * (d + 1)..][..(c + 1) * (d + 1)];
    Small {
        m: img,
        m_rs: d + 1,
        s: &img[c * (d + 1)..][..d],
        bias: Some(&img[d..]),
    }
}

impl Kernel<3> for FoldedResidual {
    fn cpu_forward(&self, inputs: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
        let [(s1, l1), (s2, l2), (s3, l3)] = inputs;
        let dims = Self::dims(l1.shape(), l3.shape())?;
        fn run<T: Real + candle_core::WithDType>(
            q: &[T],
            p: &[T],
            x: &[T],
            dims: LinDims,
            phi: FeatureMap,
            eps: T,
        ) -> Vec<T> {
            let LinDims { d, c, n } = dims;
            let mut out = vec![T::zero(); x.len()];
            if d == 0 {
                out.copy_from_slice(x);
                return out;
            }
            for (i, out) in out.chunks_exact_mut(c * n).enumerate() {
                let x = &x[i * c * n..][..c * n];
                folded_image(
                    &q[i * d * n..][..d * n],
                    unpack(p, i, dims),
                    Some(x),
                    dims,
                    phi,
                    eps,
                    out,
                );
            }
            out
        }
        let out = with_float!("linear attention output", s1.dtype(), T => {
            let (q, p, x) = (cpu_data(s1, l1)?, cpu_data(s2, l2)?, cpu_data(s3, l3)?);
            T::to_cpu_storage_owned(run::<T>(q, p, x, dims, self.phi, self.eps as T))
        });
        Ok((out, l3.shape().clone()))
    }

    fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
        let ([q, p, x], out, grad) = (g.inputs, g.output, g.grad);
        let dims = Self::dims(q.shape(), x.shape())?;
        let grad = grad.contiguous()?;
        fn run<T: Real + candle_core::WithDType>(
            op: &FoldedResidual,
            [q, p, x, out, grad]: [&Tensor; 5],
            dims: LinDims,
            eps: T,
        ) -> candle_core::Result<[Tensor; 2]> {
            let (dq, dp) =
                crate::cpu::with_slices::<T, _, 5>([q, p, x, out, grad], |[q, p, x, o, g]| {
                    Ok(residual_backward(q, p, x, o, g, dims, op.phi, eps))
                })?;
            Ok([
                Tensor::from_vec(dq, q.shape(), q.device())?,
                Tensor::from_vec(dp, p.shape(), p.device())?,
            ])
        }
        let args = [q, p, x, out, &grad];
        let [dq, dp] = with_float!("linear attention output", q.dtype(), T => {
            run::<T>(self, args, dims, self.eps as T)?
        });
        Ok([Some(dq), Some(dp), Some(grad)])
    }
}

/// [`FoldedResidual`]'s backward: (dq, dP) from q, P, x, the output and its gradient.
#[allow(clippy::too_many_arguments)]
fn residual_backward<T: Real>(
    qs: &[T],
    ps: &[T],
    xs: &[T],
    outs: &[T],
    gs: &[T],
    dims: LinDims,
    phi: FeatureMap,
    eps: T,
) -> (Vec<T>, Vec<T>) {
    let LinDims { d, c, n } = dims;
    let b = qs.len() / (d * n).max(1);
    // Back to the parts: M, s, and the attention term (out - x - bias).
    let (mut m, mut s) = (Vec::with_capacity(b * c * d), Vec::with_capacity(b * d));
    let mut mixed = Vec::with_capacity(outs.len());
    for i in 0..b {
        let small = unpack(ps, i, dims);
        for ch in 0..c {
            m.extend_from_slice(&small.m[ch * (d + 1)..][..d]);
        }
        s.extend_from_slice(small.s);
        let bias = small.bias.expect("packed bias");
        for ch in 0..c {
            let (o, x) = (&outs[(i * c + ch) * n..][..n], &xs[(i * c + ch) * n..][..n]);
            let b = bias[ch * (d + 1)];
            mixed.extend(o.iter().zip(x).map(|(&o, &x)| o - x - b));
        }
    }
    let (dq, dm, ds) = folded_backward(qs, &m, &s, &mixed, gs, dims, phi, eps);
    // dP: [dM | dbias] over [ds | 0], dbias the row sums of the gradient.
    let mut dp = vec![T::zero(); ps.len()];
    for i in 0..b {
        let img = &mut dp[i * (c + 1) * (d + 1)..][..(c + 1) * (d + 1)];
        for ch in 0..c {
            img[ch * (d + 1)..][..d].copy_from_slice(&dm[(i * c + ch) * d..][..d]);
            img[ch * (d + 1) + d] = gs[(i * c + ch) * n..][..n].iter().copied().sum();
        }
        img[c * (d + 1)..][..d].copy_from_slice(&ds[i * d..][..d]);
    }
    (dq, dp)
}
