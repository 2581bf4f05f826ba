//! Softmax attention from Candle ops, exact and in O(chunk x N) memory on any device: the
//! generic form of the tiled CPU kernel, and what CUDA builds run.
//!
//! The queries are taken in chunks; each chunk sees all the keys at once, so its softmax is
//! exact without the online rescaling of the CPU kernel. The forward keeps only the output
//! and each query's log-sum-exp; the backward recomputes each chunk's probabilities from Q,
//! K and the log-sum-exp (flash attention 2's backward, chunk by chunk). With Candle's
//! autograd over the same ops, every chunk's [chunk, N] scores would be kept for the
//! backward, O(N^2) again; hence [`crate::precomputed`].

use candle_core::{Result, Tensor, D};

/// The [b, chunk, n] work tensors of one chunk stay within about this many bytes (the
/// backward holds about five of them at once).
const CHUNK_BUDGET_BYTES: usize = 256 << 20;
const LIVE_SCORE_TENSORS: usize = 5;

/// Queries per chunk for a batch of `b` images of `n` tokens with `elem_bytes` per float.
pub fn chunk_rows(b: usize, n: usize, elem_bytes: usize) -> usize {
    let per_row = (b * n * elem_bytes * LIVE_SCORE_TENSORS).max(1);
    (CHUNK_BUDGET_BYTES / per_row).clamp(1, n.max(1))
}

fn chunks(n: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(rows.max(1))
        .map(move |s| (s, rows.min(n - s)))
}

/// `softmax(q k^T * scale) v` for q, k: [b, n, d] and v: [b, n, c], by chunks of
/// [`chunk_rows`] queries.
pub fn softmax_attention_chunked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, n, _) = q.dims3()?;
    softmax_attention_chunked_by(q, k, v, scale, chunk_rows(b, n, q.dtype().size_in_bytes()))
}

/// [`softmax_attention_chunked`] by chunks of `rows` queries.
pub fn softmax_attention_chunked_by(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> Result<Tensor> {
    let n = q.dim(1)?;
    let (qd, kd, vd) = (
        q.detach(),
        k.detach().contiguous()?,
        v.detach().contiguous()?,
    );
    let k_t = kd.t()?;
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for (start, len) in chunks(n, rows) {
        let qc = qd.narrow(1, start, len)?.contiguous()?;
        let scores = (qc.matmul(&k_t)? * scale)?; // [b, len, n]
        let max = scores.max_keepdim(D::Minus1)?;
        let p = scores.broadcast_sub(&max)?.exp()?;
        let sum = p.sum_keepdim(D::Minus1)?;
        outs.push(p.matmul(&vd)?.broadcast_div(&sum)?);
        lses.push((max + sum.log()?)?);
    }
    let out = Tensor::cat(&outs, 1)?;
    let lse = Tensor::cat(&lses, 1)?; // [b, n, 1]
    crate::precomputed::ternary(
        "softmax-attention-chunked",
        [q, k, v],
        out,
        move |[q, k, v], out, grad| {
            let (q, k, v) = (
                q.detach(),
                k.detach().contiguous()?,
                v.detach().contiguous()?,
            );
            let grad = grad.contiguous()?;
            // D_i = dO_i . O_i, the softmax backward's row term.
            let row_term = (&grad * out)?.sum_keepdim(D::Minus1)?; // [b, n, 1]
            let (k_t, v_t) = (k.t()?, v.t()?);
            let mut dq = Vec::new();
            let mut dk = k.zeros_like()?;
            let mut dv = v.zeros_like()?;
            for (start, len) in chunks(n, rows) {
                let qc = q.narrow(1, start, len)?.contiguous()?;
                let gc = grad.narrow(1, start, len)?;
                let p = (qc.matmul(&k_t)? * scale)?
                    .broadcast_sub(&lse.narrow(1, start, len)?)?
                    .exp()?; // [b, len, n]
                dv = (dv + p.t()?.matmul(&gc)?)?;
                let dp = gc.matmul(&v_t)?;
                let ds = ((p * dp.broadcast_sub(&row_term.narrow(1, start, len)?)?)? * scale)?;
                dq.push(ds.matmul(&k)?);
                dk = (dk + ds.t()?.matmul(&qc)?)?;
            }
            Ok([Some(Tensor::cat(&dq, 1)?), Some(dk), Some(dv)])
        },
    )
}
