//! The 3x3 convolution on maps of at most 2x2 pixels, as one dense product over the batch.
//!
//! On such a map every input pixel lies inside every output pixel's 3x3 window, so the conv
//! is a dense linear map from an image's `c_in * hw` values to its `c_out * hw` outputs, with
//! matrix `Wd[(co, p), (ci, q)] = W[co, ci, tap(p, q)]`. Run as that product it skips the
//! padding's zeros that im2col would multiply (5 of the 9 taps of each output pixel at 2x2:
//! 2.25x fewer multiplies for VGG16's block 5 on 32x32 images), it needs no im2col or col2im
//! since the NCHW images already are its rows, and the weight gradient is one product over
//! the whole batch instead of one partial sum per thread added up afterwards.

use candle_core::WithDType;
use rayon::prelude::*;

use super::{bias_grad, transpose, Backward, Geometry, Grads};
use crate::gemm::{matmul, Mat};

/// Whether `g`'s maps are small enough for the dense form.
pub(super) fn applies(g: Geometry) -> bool {
    g.h <= 2 && g.w <= 2
}

/// `taps[p * hw + q]`: the tap of W (`ky * 3 + kx`) linking output pixel `p` to input pixel
/// `q`, both row-major in the map.
fn taps(g: Geometry) -> Vec<usize> {
    let hw = g.hw();
    (0..hw * hw)
        .map(|i| {
            let (p, q) = (i / hw, i % hw);
            let (py, px, qy, qx) = (p / g.w, p % g.w, q / g.w, q % g.w);
            (qy + 1 - py) * 3 + (qx + 1 - px)
        })
        .collect()
}

/// `Wd [c_out hw, c_in hw]` from `W [c_out, c_in, 3, 3]`.
fn dense_weight<T: WithDType>(g: Geometry, weight: &[T]) -> Vec<T> {
    let (hw, row_len) = (g.hw(), g.c_in * g.hw());
    let taps = taps(g);
    let mut dense = vec![T::from_f64(0.0); g.c_out * hw * row_len];
    dense
        .par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(r, row)| {
            let (co, p) = (r / hw, r % hw);
            let taps = &taps[p * hw..][..hw];
            for (dst, w) in row
                .chunks_exact_mut(hw)
                .zip(weight[co * g.c_in * 9..].chunks_exact(9))
            {
                dst.iter_mut().zip(taps).for_each(|(d, &t)| *d = w[t]);
            }
        });
    dense
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `out [batch, c_out hw] = x [batch, c_in hw] x Wd^T`, plus the bias (and through a ReLU),
/// run as `out^T = Wd x^T` with both transposes copied: gemm is 3-5x faster with all three
/// matrices row-major than with `Wd^T` as a view, and the copies are small (batch x 2048).
pub(super) fn forward<T: WithDType>(
    g: Geometry,
    relu: bool,
    x: &[T],
    weight: &[T],
    bias: &[T],
) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let (hw, n_in, n_out) = (g.hw(), g.c_in * g.hw(), g.c_out * g.hw());
    let mut out = vec![zero; g.batch * n_out];
    if out.is_empty() {
        return out;
    }
    let dense = dense_weight(g, weight);
    let mut x_t = vec![zero; x.len()];
    transpose(x, n_in, &mut x_t, g.batch, (g.batch, n_in));
    let mut out_t = vec![zero; n_out * g.batch];
    matmul(
        &mut out_t,
        false,
        Mat::row_major(&dense, n_out, n_in),
        Mat::row_major(&x_t, n_in, g.batch),
        parallelism(),
    );
    out.par_chunks_mut(n_out)
        .enumerate()
        .for_each(|(i, image)| {
            for (c, (plane, &b)) in image.chunks_exact_mut(hw).zip(bias).enumerate() {
                for (p, o) in plane.iter_mut().enumerate() {
                    let v = out_t[(c * hw + p) * g.batch + i] + b;
                    // `<` rather than `max`, so that a NaN propagates as in PyTorch.
                    *o = if relu && v < zero { zero } else { v };
                }
            }
        });
    out
}

/// The gradients, as [`super::backward`].
pub(super) fn backward<T: WithDType>(g: Geometry, b: Backward<T>) -> Grads<T> {
    let zero = T::from_f64(0.0);
    let (hw, n_in, n_out) = (g.hw(), g.c_in * g.hw(), g.c_out * g.hw());
    let (x, weight) = (b.x, b.weight);
    let mut grad_in = vec![zero; g.batch * n_in];
    let mut grad_weight = vec![zero; g.c_out * g.c_in * 9];
    if grad_in.is_empty() || b.grad_out.is_empty() {
        return (grad_in, grad_weight, vec![zero; g.c_out]);
    }
    let dout = b.masked_grad();
    let grad_bias = bias_grad(g, &dout);
    let dout_mat = Mat::row_major(&dout, g.batch, n_out);
    if b.need_input {
        // dx [batch, c_in hw] = dout [batch, c_out hw] x Wd
        let dense = dense_weight(g, weight);
        let dense = Mat::row_major(&dense, n_out, n_in);
        matmul(&mut grad_in, false, dout_mat, dense, parallelism());
    }
    // dWd [c_out hw, c_in hw] = dout^T x x; each tap's gradient sums the (p, q) pairs it links.
    let mut grad_dense = vec![zero; n_out * n_in];
    let x_mat = Mat::row_major(x, g.batch, n_in);
    matmul(&mut grad_dense, false, dout_mat.t(), x_mat, parallelism());
    let taps = taps(g);
    grad_weight
        .par_chunks_mut(g.c_in * 9)
        .zip(grad_dense.par_chunks(hw * n_in))
        .for_each(|(dw, rows)| {
            for (row, taps) in rows.chunks_exact(n_in).zip(taps.chunks_exact(hw)) {
                for (dw, src) in dw.chunks_exact_mut(9).zip(row.chunks_exact(hw)) {
                    src.iter().zip(taps).for_each(|(&s, &t)| dw[t] += s);
                }
            }
        });
    (grad_in, grad_weight, grad_bias)
}
