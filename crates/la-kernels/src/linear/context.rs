//! `phi_k x^T`, linear attention's context before the value projection, with its backward.

use candle_core::{CpuStorage, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{assemble, chunks, cpu_data, CHUNK, GEMM_MIN_D};
use crate::cpu::{dot, with_float, Real};
use crate::gemm::{matmul_scaled as matmul, view};
use crate::kernel::{apply, Grad, Input, Kernel};
use crate::simd::with_simd;

/// `phi_k x^T` [b, d, c] for phi_k [b, d, n] and x [b, c, n]: the context of linear attention
/// before the value projection. As d x c dot products over the tokens, each row of x read
/// once; Candle's matmul (gemm) at block 1's shape (d = 8 rows, n = 50,176 deep) took 5.3 ms
/// against 1.4 ms here (`examples/op_speed.rs`).
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
    if !crate::fast_path(&[phi_k, x])? {
        return token_context_generic(phi_k, x);
    }
    apply(
        "token-context",
        [&phi_k.contiguous()?, &x.contiguous()?],
        TokenContext,
    )
}

/// [`token_context`] as Candle's matmul, on any device and dtype.
pub fn token_context_generic(phi_k: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    phi_k.matmul(&x.t()?)
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

impl Kernel<2> for TokenContext {
    fn cpu_forward(&self, inputs: [Input<CpuStorage>; 2]) -> Result<(CpuStorage, Shape)> {
        let [(s1, l1), (s2, l2)] = inputs;
        let (b, d, n) = l1.shape().dims3()?;
        let c = l2.shape().dims3()?.1;
        let out = with_float!("token context", s1.dtype(), T => T::to_cpu_storage_owned(
            token_context_forward::<T>(cpu_data(s1, l1)?, cpu_data(s2, l2)?, d, c, n),
        ));
        Ok((out, Shape::from((b, d, c))))
    }

    fn backward(&self, g: Grad<2>) -> Result<[Option<Tensor>; 2]> {
        let [phi_k, x] = g.inputs;
        let (_, d, n) = phi_k.dims3()?;
        let c = x.dim(1)?;
        let grad = g.grad.contiguous()?;
        fn run<T: Real + candle_core::WithDType>(
            [k, x, grad]: [&Tensor; 3],
            (d, c, n): (usize, usize, usize),
        ) -> Result<[Tensor; 2]> {
            let (dk, dx) = crate::cpu::with_slices::<T, _, 3>([k, x, grad], |[k, x, g]| {
                Ok(token_context_backward(k, x, g, d, c, n))
            })?;
            Ok([
                Tensor::from_vec(dk, k.shape(), k.device())?,
                Tensor::from_vec(dx, x.shape(), x.device())?,
            ])
        }
        let args = [phi_k, x, &grad];
        let [dk, dx] = with_float!("token context", phi_k.dtype(), T => run::<T>(args, (d, c, n))?);
        Ok([Some(dk), Some(dx)])
    }
}
