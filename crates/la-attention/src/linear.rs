//! Kernelised linear attention: out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps).
//!
//! With phi = elu + 1 this is Katharopoulos et al. 2020 ("Transformers are RNNs"); with
//! phi = relu it is EfficientViT's ReLU linear attention (Cai et al. 2023). Cost O(N d c)
//! time and O(d c) extra memory per image instead of O(N^2).

use std::ops::Range;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::ops::elu_plus_one;
use crate::simd::with_simd;
use crate::softmax::{dot, matmul, view, Real};

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
    pub(crate) fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            FeatureMap::EluPlusOne => elu_plus_one(xs),
            FeatureMap::Relu => xs.relu(),
        }
    }
}

/// Channel-first, as the feature map is stored (no token transposes): q, k: [b, d, n];
/// v: [b, c, n] -> [b, c, n]. Computed in f32 (or f64) whatever the input dtype.
///
/// On the CPU this is one fused op, forward and backward; elsewhere it is
/// [`linear_attention_reference`].
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
    if !fused(q) {
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
    if !fused(qkv) {
        let q = qkv.narrow(1, 0, d)?;
        let k = qkv.narrow(1, d, d)?;
        let v = qkv.narrow(1, 2 * d, rows - 2 * d)?;
        return linear_attention_reference(&q, &k, &v, phi, eps);
    }
    qkv.contiguous()?
        .apply_op1(FusedLinearAttention { phi, eps, d })
}

/// Whether the fused CPU op handles this tensor.
fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// [`linear_attention`] as a composition of Candle ops (any device and dtype): the reference
/// the fused op is tested against.
pub fn linear_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    phi: FeatureMap,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let work = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (q, k, v) = (q.to_dtype(work)?, k.to_dtype(work)?, v.to_dtype(work)?);
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

/// The fused CPU op on (q, k, v). Why: at 224x224 (N = 50,176 tokens) the composition of
/// Candle ops made about 25 passes over [c, N] maps, several of them single-threaded; the
/// module cost more than the convs around it. Here each pass works on column chunks of
/// [d or c, CHUNK] that stay in cache, with the two products on `gemm`.
struct FusedLinearAttention {
    phi: FeatureMap,
    eps: f64,
    /// Query/key channels: qkv's rows are q [0, d), k [d, 2d), v [2d, 2d + c).
    d: usize,
}

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
                        *o = x.min(T::zero());
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
    let s: Vec<T> = phik.par_chunks(n).map(sum).collect();
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

/// A sum in eight independent lanes, which the compiler vectorises.
fn sum<T: Real>(xs: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let mut chunks = xs.chunks_exact(8);
    for chunk in &mut chunks {
        lanes.iter_mut().zip(chunk).for_each(|(l, &x)| *l += x);
    }
    chunks
        .remainder()
        .iter()
        .fold(lanes.iter().copied().sum(), |acc, &x| acc + x)
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

/// The linear attention of each image of `qkv` [b, 2d + c, n].
fn fused_forward<T: Real>(qkv: &[T], dims: LinDims, phi: FeatureMap, eps: T) -> Vec<T> {
    let LinDims { d, c, n } = dims;
    let per_image = (2 * d + c) * n;
    let mut out = vec![T::zero(); qkv.len() / per_image.max(1) * c * n];
    if out.is_empty() || d == 0 {
        return out;
    }
    let mut phiq = vec![T::zero(); d * n];
    let mut den = vec![T::zero(); n];
    for (img, out) in qkv.chunks_exact(per_image).zip(out.chunks_exact_mut(c * n)) {
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
                row.iter_mut()
                    .zip(&den[l0..])
                    .for_each(|(o, &r)| *o = *o * r);
            }
        });
    }
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
    for (i, dimg) in dqkv.chunks_exact_mut(per_image).enumerate() {
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
                        dden[l] = dden[l] - g[l] * m[l];
                    }
                }
                dden.iter_mut()
                    .zip(&den)
                    .for_each(|(x, &den)| *x = *x / den);
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
    }
    dqkv
}

fn cpu_data<'a, T: candle_core::WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&T::cpu_storage_as_slice(storage)?[start..end]),
        None => candle_core::bail!("linear attention: expected a contiguous tensor"),
    }
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

impl CustomOp1 for FusedLinearAttention {
    fn name(&self) -> &'static str {
        "fused-linear-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, dims) = self.dims(layout.shape())?;
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(fused_forward(
                cpu_data(storage, layout)?,
                dims,
                self.phi,
                self.eps as f32,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(fused_forward(
                cpu_data(storage, layout)?,
                dims,
                self.phi,
                self.eps,
            )),
            _ => candle_core::bail!("linear attention: unsupported dtype {:?}", storage.dtype()),
        };
        Ok((out, Shape::from((b, dims.c, dims.n))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        mixed: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, dims) = self.dims(qkv.shape())?;
        let grad = grad.contiguous()?;
        fn run<T: Real + candle_core::WithDType>(
            op: &FusedLinearAttention,
            [qkv, mixed, grad]: [&Tensor; 3],
            dims: LinDims,
            eps: T,
        ) -> candle_core::Result<Tensor> {
            let guards = [qkv, mixed, grad].map(|t| t.storage_and_layout());
            let mut data = Vec::with_capacity(3);
            for (storage, layout) in &guards {
                match &**storage {
                    Storage::Cpu(s) => data.push(cpu_data::<T>(s, layout)?),
                    _ => candle_core::bail!("linear attention: expected CPU tensors"),
                }
            }
            let dqkv = fused_backward(data[0], data[1], data[2], dims, op.phi, eps);
            Tensor::from_vec(dqkv, qkv.shape(), qkv.device())
        }
        let args = [qkv, mixed, &grad];
        let dqkv = match qkv.dtype() {
            DType::F32 => run::<f32>(self, args, dims, self.eps as f32)?,
            DType::F64 => run::<f64>(self, args, dims, self.eps)?,
            dt => candle_core::bail!("linear attention: no backward for {dt:?}"),
        };
        Ok(Some(dqkv))
    }
}

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
    q.contiguous()?.apply_op3(
        &m.contiguous()?,
        &s.contiguous()?,
        FoldedOutput { phi, eps },
    )
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
            .for_each(|(o, &r)| *o = *o * r);
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
    // from cache for every row: 4-7x faster at d >= 16), then the rest of each row.
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
                        dden[l] = dden[l] - g[l] * o[l] * r[l];
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

impl CustomOp3 for FoldedOutput {
    fn name(&self) -> &'static str {
        "linear-attention-output"
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
        let (b, d, n) = l1.shape().dims3()?;
        let c = l2.shape().dims3()?.1;
        let dims = LinDims { d, c, n };
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(folded_forward(
                    cpu_data(s1, l1)?,
                    cpu_data(s2, l2)?,
                    cpu_data(s3, l3)?,
                    dims,
                    self.phi,
                    self.eps as f32,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(folded_forward(
                    cpu_data(s1, l1)?,
                    cpu_data(s2, l2)?,
                    cpu_data(s3, l3)?,
                    dims,
                    self.phi,
                    self.eps,
                ))
            }
            _ => candle_core::bail!("linear attention output: expected f32 or f64 of one dtype"),
        };
        Ok((out, Shape::from((b, c, n))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        m: &Tensor,
        s: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, d, n) = q.dims3()?;
        let dims = LinDims { d, c: m.dim(1)?, n };
        let grad = grad.contiguous()?;
        fn run<T: Real + candle_core::WithDType>(
            op: &FoldedOutput,
            [q, m, s, out, grad]: [&Tensor; 5],
            dims: LinDims,
            eps: T,
        ) -> candle_core::Result<[Tensor; 3]> {
            let guards = [q, m, s, out, grad].map(|t| t.storage_and_layout());
            let mut data = Vec::with_capacity(5);
            for (storage, layout) in &guards {
                match &**storage {
                    Storage::Cpu(st) => data.push(cpu_data::<T>(st, layout)?),
                    _ => candle_core::bail!("linear attention output: expected CPU tensors"),
                }
            }
            let (dq, dm, ds) = folded_backward(
                data[0], data[1], data[2], data[3], data[4], dims, op.phi, eps,
            );
            Ok([
                Tensor::from_vec(dq, q.shape(), q.device())?,
                Tensor::from_vec(dm, m.shape(), m.device())?,
                Tensor::from_vec(ds, s.shape(), s.device())?,
            ])
        }
        let args = [q, m, s, out, &grad];
        let [dq, dm, ds] = match q.dtype() {
            DType::F32 => run::<f32>(self, args, dims, self.eps as f32)?,
            DType::F64 => run::<f64>(self, args, dims, self.eps)?,
            dt => candle_core::bail!("linear attention output: no backward for {dt:?}"),
        };
        Ok((Some(dq), Some(dm), Some(ds)))
    }
}

/// `phi_k x^T` [b, d, c] for phi_k [b, d, n] and x [b, c, n]: the context of linear attention
/// before the value projection. As d x c dot products over the tokens, each row of x read
/// once; Candle's matmul (gemm) at this shape (d = c/8 rows, n = 50,176 deep) was 5x slower.
pub fn token_context(phi_k: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, _, n) = phi_k.dims3()?;
    let (xb, _, xn) = x.dims3()?;
    if (xb, xn) != (b, n) {
        candle_core::bail!(
            "token context: expected [b, d, n] and [b, c, n], got {:?} and {:?}",
            phi_k.shape(),
            x.shape()
        );
    }
    if !fused(phi_k) || x.dtype() != phi_k.dtype() {
        return phi_k.matmul(&x.t()?);
    }
    phi_k
        .contiguous()?
        .apply_op2(&x.contiguous()?, TokenContext)
}

struct TokenContext;

fn token_context_forward<T: Real>(phi_k: &[T], x: &[T], d: usize, c: usize, n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(phi_k.len() / n.max(1) * c);
    if n == 0 {
        out.resize(phi_k.len() / n.max(1) * c, T::zero());
        return out;
    }
    for (k, x) in phi_k.chunks_exact(d * n).zip(x.chunks_exact(c * n)) {
        if d < GEMM_MIN_D {
            // Few features: d dot products per row of x, accumulated over column chunks
            // outermost so that phi_k's chunk stays in L1 for all the rows of a block.
            let mut a_t = vec![T::zero(); c * d];
            let rows = c.div_ceil(rayon::current_num_threads() * 2).max(1);
            a_t.par_chunks_mut(rows * d)
                .enumerate()
                .for_each(|(t, block)| {
                    with_simd(|| {
                        for l0 in (0..n).step_by(CHUNK) {
                            let len = CHUNK.min(n - l0);
                            for (i, dots) in block.chunks_exact_mut(d).enumerate() {
                                let x_row = &x[(t * rows + i) * n + l0..][..len];
                                for (o, k_row) in dots.iter_mut().zip(k.chunks_exact(n)) {
                                    *o += dot(&k_row[l0..][..len], x_row);
                                }
                            }
                        }
                    })
                });
            for r in 0..d {
                out.extend((0..c).map(|ch| a_t[ch * d + r]));
            }
            continue;
        }
        // A^T [c, d] = x [c, n] phi_k^T [n, d], by blocks of rows of x, one GEMM each.
        let mut a_t = vec![T::zero(); c * d];
        let rows = c.div_ceil(rayon::current_num_threads() * 2).max(1);
        a_t.par_chunks_mut(rows * d)
            .enumerate()
            .for_each(|(t, block)| {
                let r = block.len() / d;
                let x_rows = &x[t * rows * n..][..r * n];
                matmul(
                    r,
                    d,
                    n,
                    block,
                    false,
                    T::one(),
                    view(x_rows, n, 1),
                    view(k, 1, n),
                );
            });
        for r in 0..d {
            out.extend((0..c).map(|ch| a_t[ch * d + r]));
        }
    }
    out
}

/// (d phi_k, dx) from the gradient `grad` [b, d, c].
fn token_context_backward<T: Real>(
    phi_k: &[T],
    x: &[T],
    grad: &[T],
    d: usize,
    c: usize,
    n: usize,
) -> (Vec<T>, Vec<T>) {
    let (mut dk, mut dx) = (vec![T::zero(); phi_k.len()], vec![T::zero(); x.len()]);
    if n == 0 || d == 0 || c == 0 {
        return (dk, dx);
    }
    for i in 0..phi_k.len() / (d * n) {
        let (k, xs, g) = (
            &phi_k[i * d * n..][..d * n],
            &x[i * c * n..][..c * n],
            &grad[i * d * c..][..d * c],
        );
        // dx[ch] = sum_r G[r, ch] phi_k[r]: d axpys per row.
        dx[i * c * n..][..c * n]
            .par_chunks_mut(n)
            .enumerate()
            .for_each(|(ch, row)| {
                for (r, k_row) in k.chunks_exact(n).enumerate() {
                    let w = g[r * c + ch];
                    row.iter_mut().zip(k_row).for_each(|(o, &v)| *o += w * v);
                }
            });
        // d phi_k[:, cols] = G x[:, cols], by column chunks.
        let tiles: Vec<_> = chunks(n)
            .into_par_iter()
            .map(|cols| {
                let len = cols.len();
                let mut tile = vec![T::zero(); d * len];
                matmul(
                    d,
                    len,
                    c,
                    &mut tile,
                    false,
                    T::one(),
                    view(g, c, 1),
                    view(&xs[cols.start..], n, 1),
                );
                (cols, tile)
            })
            .collect();
        assemble(tiles, n, &mut dk[i * d * n..][..d * n]);
    }
    (dk, dx)
}

impl candle_core::CustomOp2 for TokenContext {
    fn name(&self) -> &'static str {
        "token-context"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, d, n) = l1.shape().dims3()?;
        let c = l2.shape().dims3()?.1;
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(token_context_forward(
                cpu_data(s1, l1)?,
                cpu_data(s2, l2)?,
                d,
                c,
                n,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(token_context_forward(
                cpu_data(s1, l1)?,
                cpu_data(s2, l2)?,
                d,
                c,
                n,
            )),
            _ => candle_core::bail!("token context: expected f32 or f64 of one dtype"),
        };
        Ok((out, Shape::from((b, d, c))))
    }

    fn bwd(
        &self,
        phi_k: &Tensor,
        x: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, d, n) = phi_k.dims3()?;
        let c = x.dim(1)?;
        let grad = grad.contiguous()?;
        fn run<T: Real + candle_core::WithDType>(
            [k, x, grad]: [&Tensor; 3],
            (d, c, n): (usize, usize, usize),
        ) -> candle_core::Result<[Tensor; 2]> {
            let guards = [k, x, grad].map(|t| t.storage_and_layout());
            let mut data = Vec::with_capacity(3);
            for (storage, layout) in &guards {
                match &**storage {
                    Storage::Cpu(st) => data.push(cpu_data::<T>(st, layout)?),
                    _ => candle_core::bail!("token context: expected CPU tensors"),
                }
            }
            let (dk, dx) = token_context_backward(data[0], data[1], data[2], d, c, n);
            Ok([
                Tensor::from_vec(dk, k.shape(), k.device())?,
                Tensor::from_vec(dx, x.shape(), x.device())?,
            ])
        }
        let args = [phi_k, x, &grad];
        let [dk, dx] = match phi_k.dtype() {
            DType::F32 => run::<f32>(args, (d, c, n))?,
            DType::F64 => run::<f64>(args, (d, c, n))?,
            dt => candle_core::bail!("token context: no backward for {dt:?}"),
        };
        Ok((Some(dk), Some(dx)))
    }
}

/// `x + folded_output(q, m, s) + bias` (bias [c] per channel): the output projection's bias
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
    if bias.dims() != [c] || x.dims3()? != (b, c, q.dim(2)?) || !fused(q) {
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
    q.contiguous()?
        .apply_op3(&packed, &x.contiguous()?, FoldedResidual { phi, eps })
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

impl CustomOp3 for FoldedResidual {
    fn name(&self) -> &'static str {
        "linear-attention-output-residual"
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
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(run(
                cpu_data(s1, l1)?,
                cpu_data(s2, l2)?,
                cpu_data(s3, l3)?,
                dims,
                self.phi,
                self.eps as f32,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(run(
                cpu_data(s1, l1)?,
                cpu_data(s2, l2)?,
                cpu_data(s3, l3)?,
                dims,
                self.phi,
                self.eps,
            )),
            _ => candle_core::bail!("linear attention output: expected f32 or f64 of one dtype"),
        };
        Ok((out, l3.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        p: &Tensor,
        x: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Self::dims(q.shape(), x.shape())?;
        let grad = grad.contiguous()?;
        fn run<T: Real + candle_core::WithDType>(
            op: &FoldedResidual,
            [q, p, x, out, grad]: [&Tensor; 5],
            dims: LinDims,
            eps: T,
        ) -> candle_core::Result<[Tensor; 2]> {
            let LinDims { d, c, n } = dims;
            let guards = [q, p, x, out, grad].map(|t| t.storage_and_layout());
            let mut data = Vec::with_capacity(5);
            for (storage, layout) in &guards {
                match &**storage {
                    Storage::Cpu(st) => data.push(cpu_data::<T>(st, layout)?),
                    _ => candle_core::bail!("linear attention output: expected CPU tensors"),
                }
            }
            let (qs, ps, xs, outs, gs) = (data[0], data[1], data[2], data[3], data[4]);
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
            let (dq, dm, ds) = folded_backward(qs, &m, &s, &mixed, gs, dims, op.phi, eps);
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
            Ok([
                Tensor::from_vec(dq, q.shape(), q.device())?,
                Tensor::from_vec(dp, p.shape(), p.device())?,
            ])
        }
        let args = [q, p, x, out, &grad];
        let [dq, dp] = match q.dtype() {
            DType::F32 => run::<f32>(self, args, dims, self.eps as f32)?,
            DType::F64 => run::<f64>(self, args, dims, self.eps)?,
            dt => candle_core::bail!("linear attention output: no backward for {dt:?}"),
        };
        Ok((Some(dq), Some(dp), Some(grad)))
    }
}
