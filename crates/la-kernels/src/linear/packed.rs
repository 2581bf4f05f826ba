//! [`super::linear_attention_packed`]'s fused op: q, k and v stacked in one tensor.

use candle_core::{CpuStorage, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{add_into, assemble, chunks, cpu_data, FeatureMap, LinDims, CHUNK};
use crate::cpu::{dot, sum_lanes, with_float, Real};
use crate::gemm::{matmul_scaled as matmul, view};
use crate::kernel::{Grad, Input, Kernel};
use crate::simd::with_simd;

/// The fused CPU op on (q, k, v). Why: at 224x224 (N = 50,176 tokens) the composition of
/// Candle ops made about 25 passes over [c, N] maps, several of them single-threaded; the
/// module cost more than the convs around it. Here each pass works on column chunks of
/// [d or c, CHUNK] that stay in cache, with the two products on `gemm`.
pub(super) struct FusedLinearAttention {
    pub(super) phi: FeatureMap,
    pub(super) eps: f64,
    /// Query/key channels: qkv's rows are q [0, d), k [d, 2d), v [2d, 2d + c).
    pub(super) d: usize,
}

/// The context A = phi(K) V^T [d, c] and key sum s = phi(K) 1 [d] of one image, as d x c
/// dot products over the n tokens: each row of V is read once, against phi(K) kept in cache.
/// (A GEMM with d = c/8 rows was slower: gemm's packing dominated at that shape.)
fn context<T: Real>(k: &[T], v: &[T], dims: LinDims, phi: FeatureMap) -> (Vec<T>, Vec<T>) {
    let LinDims { d, c, n } = dims;
    let mut phik = vec![T::zero(); d * n];
    let all = 0..n;
    phik.par_chunks_mut(n)
        .zip(k.par_chunks(n))
        .for_each(|(dst, src)| phi.map_chunk(src, n, &all, dst));
    let s: Vec<T> = phik.par_chunks(n).map(sum_lanes).collect();
    // A^T [c, d], row by row of V.
    let a_t: Vec<T> = v
        .par_chunks(n)
        .flat_map_iter(|v_row| {
            let dots: Vec<T> = with_simd(|| {
                phik.chunks_exact(n)
                    .map(|k_row| dot(k_row, v_row))
                    .collect()
            });
            dots
        })
        .collect();
    let mut a = vec![T::zero(); d * c];
    for (ch, row) in a_t.chunks_exact(d.max(1)).enumerate() {
        for (r, &x) in row.iter().enumerate() {
            a[r * c + ch] = x;
        }
    }
    (a, s)
}

/// The linear attention of each image of `qkv` [b, 2d + c, n].
fn fused_forward<T: Real>(qkv: &[T], dims: LinDims, phi: FeatureMap, eps: T) -> Vec<T> {
    let LinDims { d, c, n } = dims;
    let per_image = (2 * d + c) * n;
    let mut out = vec![T::zero(); qkv.len() / per_image.max(1) * c * n];
    if out.is_empty() || d == 0 {
        return out;
    }
    // Images in parallel as well as the work inside each: on small maps (VGG16's blocks 4 and
    // 5 at 32x32 have 16 and 4 positions) one image at a time spent its time in rayon's
    // dispatch, 20 ms for a batch of 64 where the arithmetic takes under 1.
    let image = |(img, out): (&[T], &mut [T])| {
        let mut phiq = vec![T::zero(); d * n];
        let mut den = vec![T::zero(); n];
        let (q, rest) = img.split_at(d * n);
        let (k, v) = rest.split_at(d * n);
        let (a, s) = context(k, v, dims, phi);
        let all = 0..n;
        phiq.par_chunks_mut(n)
            .zip(q.par_chunks(n))
            .for_each(|(dst, src)| phi.map_chunk(src, n, &all, dst));
        // den = eps + s^T phi(Q), then its reciprocal.
        den.par_chunks_mut(CHUNK).enumerate().for_each(|(j, den)| {
            let l0 = j * CHUNK;
            den.fill(eps);
            for (&s, row) in s.iter().zip(phiq.chunks_exact(n)) {
                den.iter_mut()
                    .zip(&row[l0..])
                    .for_each(|(x, &p)| *x += s * p);
            }
            den.iter_mut().for_each(|x| *x = T::one() / *x);
        });
        // out[ch] = (sum_r A[r, ch] phi(Q)[r]) / den: d axpys per row, written in place.
        out.par_chunks_mut(n).enumerate().for_each(|(ch, row)| {
            for (l0, row) in (0..n).step_by(CHUNK).zip(row.chunks_mut(CHUNK)) {
                row.fill(T::zero());
                for (r, phi_row) in phiq.chunks_exact(n).enumerate() {
                    let w = a[r * c + ch];
                    row.iter_mut()
                        .zip(&phi_row[l0..])
                        .for_each(|(o, &p)| *o += w * p);
                }
                row.iter_mut().zip(&den[l0..]).for_each(|(o, &r)| *o *= r);
            }
        });
    };
    qkv.par_chunks_exact(per_image)
        .zip(out.par_chunks_exact_mut(c * n))
        .for_each(image);
    out
}

/// (dq, dk, dv) from the output `mixed` and its gradient `grad`.
#[allow(clippy::too_many_arguments)]
fn fused_backward<T: Real>(
    qkv: &[T],
    mixed: &[T],
    grad: &[T],
    dims: LinDims,
    phi: FeatureMap,
    eps: T,
) -> Vec<T> {
    let LinDims { d, c, n } = dims;
    let per_image = (2 * d + c) * n;
    let mut dqkv = vec![T::zero(); qkv.len()];
    if qkv.is_empty() || d == 0 || c == 0 {
        return dqkv;
    }
    // Images in parallel, as in the forward pass.
    dqkv.par_chunks_exact_mut(per_image)
        .enumerate()
        .for_each(|(i, dimg)| {
            let img = &qkv[i * per_image..][..per_image];
            let (q, rest) = img.split_at(d * n);
            let (k, v) = rest.split_at(d * n);
            let (dq, rest) = dimg.split_at_mut(d * n);
            let (dk, dv) = rest.split_at_mut(d * n);
            let vc = i * c * n..(i + 1) * c * n;
            let (mixed, grad) = (&mixed[vc.clone()], &grad[vc]);
            let (a, s) = context(k, v, dims, phi);
            // Through the numerator and denominator: dq per chunk, dA and ds summed.
            let per_chunk: Vec<_> = chunks(n)
                .into_par_iter()
                .map(|cols| {
                    let len = cols.len();
                    let mut phiq = vec![T::zero(); d * len];
                    phi.map_chunk(q, n, &cols, &mut phiq);
                    let mut den = vec![eps; len];
                    for (&s, row) in s.iter().zip(phiq.chunks_exact(len)) {
                        den.iter_mut().zip(row).for_each(|(den, &p)| *den += s * p);
                    }
                    // d numerator = grad / den; d den = -sum_c grad * mixed / den.
                    let mut dnum = vec![T::zero(); c * len];
                    let mut dden = vec![T::zero(); len];
                    for ch in 0..c {
                        let g = &grad[ch * n..][cols.clone()];
                        let m = &mixed[ch * n..][cols.clone()];
                        let dn = &mut dnum[ch * len..][..len];
                        for l in 0..len {
                            dn[l] = g[l] / den[l];
                            dden[l] -= g[l] * m[l];
                        }
                    }
                    dden.iter_mut().zip(&den).for_each(|(x, &den)| *x /= den);
                    // dA = phi(Q) dnum^T, ds = phi(Q) dden.
                    let mut da = vec![T::zero(); d * c];
                    matmul(
                        d,
                        c,
                        len,
                        &mut da,
                        false,
                        T::one(),
                        view(&phiq, len, 1),
                        view(&dnum, 1, len),
                    );
                    let ds: Vec<T> = phiq
                        .chunks_exact(len)
                        .map(|row| row.iter().zip(&dden).map(|(&p, &g)| p * g).sum::<T>())
                        .collect();
                    // d phi(Q) = A dnum + s dden^T, then through phi.
                    let mut dphiq = vec![T::zero(); d * len];
                    matmul(
                        d,
                        len,
                        c,
                        &mut dphiq,
                        false,
                        T::one(),
                        view(&a, c, 1),
                        view(&dnum, len, 1),
                    );
                    for (r, row) in dphiq.chunks_exact_mut(len).enumerate() {
                        let src = &q[r * n..][cols.clone()];
                        let phis = &phiq[r * len..][..len];
                        for l in 0..len {
                            row[l] = (row[l] + s[r] * dden[l]) * phi.slope(src[l], phis[l]);
                        }
                    }
                    (cols, dphiq, da, ds)
                })
                .collect();
            let (mut da, mut ds) = (vec![T::zero(); d * c], vec![T::zero(); d]);
            let mut dq_tiles = Vec::with_capacity(per_chunk.len());
            for (cols, tile, da_part, ds_part) in per_chunk {
                add_into(&mut da, &da_part);
                add_into(&mut ds, &ds_part);
                dq_tiles.push((cols, tile));
            }
            assemble(dq_tiles, n, dq);
            // Through the context and key sum: dk and dv per chunk.
            let (dk_tiles, dv_tiles): (Vec<_>, Vec<_>) = chunks(n)
                .into_par_iter()
                .map(|cols| {
                    let len = cols.len();
                    let mut phik = vec![T::zero(); d * len];
                    phi.map_chunk(k, n, &cols, &mut phik);
                    // d phi(K) = dA V[:, cols] + ds 1^T, then through phi.
                    let mut dphik = vec![T::zero(); d * len];
                    matmul(
                        d,
                        len,
                        c,
                        &mut dphik,
                        false,
                        T::one(),
                        view(&da, c, 1),
                        view(&v[cols.start..], n, 1),
                    );
                    // dV[:, cols] = dA^T phi(K)[:, cols].
                    let mut dvt = vec![T::zero(); c * len];
                    matmul(
                        c,
                        len,
                        d,
                        &mut dvt,
                        false,
                        T::one(),
                        view(&da, 1, c),
                        view(&phik, len, 1),
                    );
                    for (r, row) in dphik.chunks_exact_mut(len).enumerate() {
                        let src = &k[r * n..][cols.clone()];
                        let phis = &phik[r * len..][..len];
                        for l in 0..len {
                            row[l] = (row[l] + ds[r]) * phi.slope(src[l], phis[l]);
                        }
                    }
                    ((cols.clone(), dphik), (cols, dvt))
                })
                .unzip();
            assemble(dk_tiles, n, dk);
            assemble(dv_tiles, n, dv);
        });
    dqkv
}

impl FusedLinearAttention {
    fn dims(&self, qkv: &Shape) -> candle_core::Result<(usize, LinDims)> {
        let (b, rows, n) = qkv.dims3()?;
        Ok((
            b,
            LinDims {
                d: self.d,
                c: rows - 2 * self.d,
                n,
            },
        ))
    }
}

impl Kernel<1> for FusedLinearAttention {
    fn cpu_forward(&self, inputs: [Input<CpuStorage>; 1]) -> Result<(CpuStorage, Shape)> {
        let [(storage, layout)] = inputs;
        let (b, dims) = self.dims(layout.shape())?;
        let out = with_float!("linear attention", storage.dtype(), T => T::to_cpu_storage_owned(
            fused_forward::<T>(cpu_data(storage, layout)?, dims, self.phi, self.eps as T),
        ));
        Ok((out, Shape::from((b, dims.c, dims.n))))
    }

    fn backward(&self, g: Grad<1>) -> Result<[Option<Tensor>; 1]> {
        let (qkv, mixed) = (g.inputs[0], g.output);
        let (_, dims) = self.dims(qkv.shape())?;
        let grad = g.grad.contiguous()?;
        fn run<T: Real + candle_core::WithDType>(
            op: &FusedLinearAttention,
            [qkv, mixed, grad]: [&Tensor; 3],
            dims: LinDims,
            eps: T,
        ) -> Result<Tensor> {
            let dqkv =
                crate::cpu::with_slices::<T, _, 3>([qkv, mixed, grad], |[qkv, mixed, grad]| {
                    Ok(fused_backward(qkv, mixed, grad, dims, op.phi, eps))
                })?;
            Tensor::from_vec(dqkv, qkv.shape(), qkv.device())
        }
        let args = [qkv, mixed, &grad];
        let dqkv = with_float!("linear attention", qkv.dtype(), T => {
            run::<T>(self, args, dims, self.eps as T)?
        });
        Ok([Some(dqkv)])
    }
}
