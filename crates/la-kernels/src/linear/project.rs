//! Inference's pass over the map for the folded linear attention: the query projection, and
//! the key side reduced to its context, in one read of the map.
//!
//! The module's folded form needs `q = W_q x + b_q`, `A = phi(K) x^T` and `s = sum phi(K)` with
//! `K = W_k x + b_k`. As separate ops, the map x (12.8 MB at block 1 of 224x224) is read twice,
//! once by the projection and once by the context, and K is written out and read back. Here
//! each chunk of tokens is projected and folded into `A` and `s` while it is still in cache.
//! Without a backward: it serves maps that track no gradient.

use std::ops::Range;

use candle_core::{Tensor, WithDType};
use rayon::prelude::*;

use super::{assemble, FeatureMap, GEMM_MIN_D};
use crate::cpu::{dot, sum_lanes, with_float, Real};
use crate::gemm::{matmul_scaled as matmul, view};
use crate::simd::with_simd;

/// At most this many floats of the map per chunk (a chunk's c rows by its tokens), so that
/// the chunk stays in L2 between the two products that read it.
const CHUNK_FLOATS: usize = 1 << 17;

/// [`project_context`] as a composition of Candle ops, on any device and dtype.
pub fn project_context_generic(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    phi: FeatureMap,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let b = x.dim(0)?;
    let d = w.dim(0)? / 2;
    let qk = w
        .broadcast_left(b)?
        .matmul(x)?
        .broadcast_add(&bias.reshape((1, (), 1))?)?; // [b, 2d, n]
    let phi_k = phi.apply(&qk.narrow(1, d, d)?)?;
    let context = phi_k.matmul(&x.t()?)?;
    let key_sum = phi_k.sum(2)?;
    Ok((qk.narrow(1, 0, d)?.contiguous()?, context, key_sum))
}

/// `(q [b, d, n], A [b, d, c], s [b, d])` for the map `x` [b, c, n] and the stacked query and
/// key projections `w` [2d, c], `bias` [2d] (queries first). The CPU kernel for f32/f64 on the CPU,
/// otherwise [`project_context_generic`].
pub fn project_context(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    phi: FeatureMap,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, c, n) = x.dims3()?;
    let (two_d, wc) = w.dims2()?;
    if wc != c || two_d % 2 != 0 || bias.dims() != [two_d] {
        candle_core::bail!(
            "project_context: expected x [b, c, n], w [2d, c], bias [2d], got {:?}, {:?}, {:?}",
            x.shape(),
            w.shape(),
            bias.shape()
        );
    }
    let d = two_d / 2;
    if !crate::fast_path(&[x, w, bias])? {
        return project_context_generic(x, w, bias, phi);
    }
    if b * c * n * d == 0 {
        // Nothing to project (an empty map, no channels or no features): A and s sum nothing.
        let zeros = |shape: &[usize]| Tensor::zeros(shape, x.dtype(), x.device());
        return Ok((zeros(&[b, d, n])?, zeros(&[b, d, c])?, zeros(&[b, d])?));
    }
    let (x, w, bias) = (x.contiguous()?, w.contiguous()?, bias.contiguous()?);
    fn run<T: Real + WithDType>(
        [x, w, bias]: [&Tensor; 3],
        (b, d, c, n): (usize, usize, usize, usize),
        phi: FeatureMap,
    ) -> candle_core::Result<[Tensor; 3]> {
        let (q, a, s) = crate::cpu::with_slices::<T, _, 3>([x, w, bias], |[x, w, bias]| {
            let (mut q, mut a, mut s) = (vec![], vec![], vec![]);
            for image in x.chunks_exact(c * n) {
                let (qi, ai, si) = image_pass(image, w, bias, (d, c, n), phi);
                q.extend(qi);
                a.extend(ai);
                s.extend(si);
            }
            Ok((q, a, s))
        })?;
        let dev = x.device();
        Ok([
            Tensor::from_vec(q, (b, d, n), dev)?,
            Tensor::from_vec(a, (b, d, c), dev)?,
            Tensor::from_vec(s, (b, d), dev)?,
        ])
    }
    let args = [&x, &w, &bias];
    let [q, a, s] =
        with_float!("project_context", x.dtype(), T => run::<T>(args, (b, d, c, n), phi)?);
    Ok((q, a, s))
}

/// One image's `(q [d, n], A [d, c], s [d])`, chunks of tokens in parallel.
fn image_pass<T: Real>(
    x: &[T],
    w: &[T],
    bias: &[T],
    (d, c, n): (usize, usize, usize),
    phi: FeatureMap,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let zero = T::zero();
    let threads = rayon::current_num_threads();
    let len = (CHUNK_FLOATS / c.max(1)).min(n.div_ceil(threads)).max(1);
    let chunks: Vec<Range<usize>> = (0..n).step_by(len).map(|s| s..(s + len).min(n)).collect();
    // A is summed transposed, A^T [c, d], as in `token_context`: row ch of x meets every
    // row of phi(K) while it is in cache.
    struct Part<T> {
        q_tiles: Vec<(Range<usize>, Vec<T>)>,
        a_t: Vec<T>,
        s: Vec<T>,
    }
    let new_part = || Part {
        q_tiles: Vec::new(),
        a_t: vec![zero; c * d],
        s: vec![zero; d],
    };
    // One part per chunk, added in order: the same sums on every run.
    let parts: Vec<Part<T>> = chunks
        .into_par_iter()
        .map(|cols| {
            let mut part = new_part();
            let len = cols.len();
            let x_chunk = &x[cols.start..];
            // [q; k] chunk = W x[:, cols] + bias.
            let mut qk = vec![zero; 2 * d * len];
            let (w, x_rows) = (view(w, c, 1), view(x_chunk, n, 1));
            matmul(2 * d, len, c, &mut qk, false, T::one(), w, x_rows);
            for (row, &b) in qk.chunks_exact_mut(len).zip(bias) {
                row.iter_mut().for_each(|v| *v += b);
            }
            let k = qk.split_off(d * len);
            // `split_off` leaves the query half with the whole capacity until `assemble`.
            qk.shrink_to_fit();
            let mut phi_k = vec![zero; d * len];
            phi.map_chunk(&k, len, &(0..len), &mut phi_k);
            for (s, row) in part.s.iter_mut().zip(phi_k.chunks_exact(len)) {
                *s += sum_lanes(row);
            }
            // A^T += x[:, cols] phi(K)[:, cols]^T: with few features (block 1 at 224x224:
            // d = 8) as d dot products per row of x, where gemm would pack more than it
            // computes.
            if d < GEMM_MIN_D {
                with_simd(|| {
                    for (ch, dots) in part.a_t.chunks_exact_mut(d).enumerate() {
                        let x_row = &x_chunk[ch * n..][..len];
                        for (o, k_row) in dots.iter_mut().zip(phi_k.chunks_exact(len)) {
                            *o += dot(k_row, x_row);
                        }
                    }
                });
            } else {
                let (x_rows, phi_k_t) = (view(x_chunk, n, 1), view(&phi_k, 1, len));
                matmul(c, d, len, &mut part.a_t, true, T::one(), x_rows, phi_k_t);
            }
            part.q_tiles.push((cols, qk));
            part
        })
        .collect();
    let part = parts.into_iter().fold(new_part(), |mut p, o| {
        p.q_tiles.extend(o.q_tiles);
        p.a_t.iter_mut().zip(&o.a_t).for_each(|(a, &b)| *a += b);
        p.s.iter_mut().zip(&o.s).for_each(|(a, &b)| *a += b);
        p
    });
    let mut q = vec![zero; d * n];
    assemble(part.q_tiles, n, &mut q);
    let a = (0..d * c).map(|i| part.a_t[(i % c) * d + i / c]).collect();
    (q, a, part.s)
}
