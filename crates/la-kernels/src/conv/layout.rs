//! Copies between the conv's data layouts: NCHW images, im2col columns, GEMM tiles and their
//! transposes, each written for the cache (blocked transposes, fixed-size short copies).

use std::ops::Range;

use candle_core::WithDType;
use rayon::prelude::*;

use super::Geometry;

/// The transpose [cols, rows] of the sum of row-major [rows, cols] matrices, in one pass of
/// 32 x 32 blocks, in parallel: a plain column-order write of a 4608 x 512 gradient is
/// mostly cache misses, and summing the threads' parts serially is another pass.
pub(super) fn transpose_sum<T: WithDType>(parts: &[Vec<T>], rows: usize, cols: usize) -> Vec<T> {
    const BLOCK: usize = 32;
    let zero = T::from_f64(0.0);
    let mut t = vec![zero; rows * cols];
    if t.is_empty() {
        return t;
    }
    // Each task owns a band of BLOCK output rows (= BLOCK input columns).
    t.par_chunks_mut(BLOCK * rows)
        .enumerate()
        .for_each(|(band, out)| {
            let c0 = band * BLOCK;
            let c_end = (c0 + BLOCK).min(cols);
            for r0 in (0..rows).step_by(BLOCK) {
                let r_end = (r0 + BLOCK).min(rows);
                for c in c0..c_end {
                    let out_row = &mut out[(c - c0) * rows..][r0..r_end];
                    for part in parts {
                        for (o, r) in out_row.iter_mut().zip(r0..r_end) {
                            *o += part[r * cols + c];
                        }
                    }
                }
            }
        });
    t
}

/// `dst.copy_from_slice(src)` for the short rows of VGG's small maps (4 to 32 pixels) and
/// transpose blocks: whole 16-element pieces are fixed-size copies the compiler inlines,
/// where `copy_from_slice` calls `memmove` (6 % of a training step, most of it call overhead).
fn copy_short<T: Copy>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "copy_short: lengths differ");
    let mut dst_pieces = dst.chunks_exact_mut(16);
    let mut src_pieces = src.chunks_exact(16);
    for (d, s) in (&mut dst_pieces).zip(&mut src_pieces) {
        let d: &mut [T; 16] = d.try_into().expect("16 elements");
        *d = *<&[T; 16]>::try_from(s).expect("16 elements");
    }
    for (d, s) in dst_pieces
        .into_remainder()
        .iter_mut()
        .zip(src_pieces.remainder())
    {
        *d = *s;
    }
}

/// `dst[j * dst_stride + i] = src[i * src_stride + j]` for `i < rows`, `j < cols`, in
/// 16 x 16 blocks so that both sides stay within a few cache lines.
pub(super) fn transpose<T: WithDType>(
    src: &[T],
    src_stride: usize,
    dst: &mut [T],
    dst_stride: usize,
    (rows, cols): (usize, usize),
) {
    const BLOCK: usize = 16;
    let zero = T::from_f64(0.0);
    for i0 in (0..rows).step_by(BLOCK) {
        let is = BLOCK.min(rows - i0);
        for j0 in (0..cols).step_by(BLOCK) {
            let js = BLOCK.min(cols - j0);
            let mut block = [[zero; BLOCK]; BLOCK];
            for (i, row) in block.iter_mut().enumerate().take(is) {
                copy_short(&mut row[..js], &src[(i0 + i) * src_stride + j0..][..js]);
            }
            for j in 0..js {
                let dst = &mut dst[(j0 + j) * dst_stride + i0..][..is];
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = block[i][j];
                }
            }
        }
    }
}

/// Runs `f(index, chunk)` on each `size`-long chunk of `v`, in parallel if `par`.
fn for_chunks<T: Send>(v: &mut [T], size: usize, par: bool, f: impl Fn(usize, &mut [T]) + Sync) {
    if par {
        v.par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        v.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// im2col of output rows `rows` of a task's images `x` [images, c_in, h, w] into
/// `cols` [9 c_in, images * rows * w]: row (ci, ky, kx), column (image, y, x) holds
/// x[image, ci, y + ky - 1, x + kx - 1], zero outside the image (the padding). Its rows are
/// filled in parallel if `par`.
pub(super) fn im2col<T: WithDType>(
    g: Geometry,
    x: &[T],
    rows: Range<usize>,
    cols: &mut [T],
    par: bool,
) {
    let zero = T::from_f64(0.0);
    let (h, w, hw) = (g.h, g.w, g.hw());
    let images = x.len() / (g.c_in * hw);
    let seg = rows.len() * w;
    let n = images * seg;
    for_chunks(cols, n, par, |r, dst_row| {
        let (ci, ky, kx) = (r / 9, r / 3 % 3, r % 3);
        for (i, dst_img) in dst_row.chunks_exact_mut(seg).enumerate() {
            let plane = &x[(i * g.c_in + ci) * hw..][..hw];
            for (y, dst) in rows.clone().zip(dst_img.chunks_exact_mut(w)) {
                // Source row y + ky - 1, kept unsigned.
                if y + ky == 0 || y + ky > h {
                    dst.fill(zero);
                    continue;
                }
                let src = &plane[(y + ky - 1) * w..][..w];
                match kx {
                    0 => {
                        dst[0] = zero;
                        copy_short(&mut dst[1..], &src[..w - 1]);
                    }
                    1 => copy_short(dst, src),
                    _ => {
                        copy_short(&mut dst[..w - 1], &src[1..]);
                        dst[w - 1] = zero;
                    }
                }
            }
        }
    });
}

/// The adjoint of [`im2col`]: adds each column gradient back onto the input pixel it was
/// copied from; the padding's zeros had no source, so their gradients are dropped. Each
/// (image, channel) plane of `grad_in` gathers its 9 rows of `cols`, in parallel if `par`.
pub(super) fn col2im<T: WithDType>(
    g: Geometry,
    cols: &[T],
    rows: Range<usize>,
    grad_in: &mut [T],
    par: bool,
) {
    let (h, w, hw) = (g.h, g.w, g.hw());
    let images = grad_in.len() / (g.c_in * hw);
    let seg = rows.len() * w;
    let n = images * seg;
    for_chunks(grad_in, hw, par, |plane_index, plane| {
        let (i, ci) = (plane_index / g.c_in, plane_index % g.c_in);
        for tap in 0..9 {
            let (ky, kx) = (tap / 3, tap % 3);
            let src_img = &cols[(ci * 9 + tap) * n + i * seg..][..seg];
            for (y, src) in rows.clone().zip(src_img.chunks_exact(w)) {
                if y + ky == 0 || y + ky > h {
                    continue;
                }
                let dst = &mut plane[(y + ky - 1) * w..][..w];
                let (dst, src) = match kx {
                    0 => (&mut dst[..w - 1], &src[1..]),
                    1 => (dst, src),
                    _ => (&mut dst[1..], &src[..w - 1]),
                };
                dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
            }
        }
    });
}

/// Where each (channel, image) piece of a tile [c_out, images * rows * w] lives: its channel,
/// its offset in the tile and in the NCHW images [images, c_out, h, w]; each piece is
/// `rows.len() * w` contiguous pixels in both.
fn tile_pieces(
    g: Geometry,
    images: usize,
    rows: Range<usize>,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let seg = rows.len() * g.w;
    (0..g.c_out).flat_map(move |c| {
        (0..images).map(move |i| {
            (
                c,
                (c * images + i) * seg,
                (i * g.c_out + c) * g.hw() + rows.start * g.w,
            )
        })
    })
}

/// Writes a GEMM's tile, plus the bias (and through a ReLU if `relu`), into its place in the
/// NCHW output.
pub(super) fn tile_to_images<T: WithDType>(
    g: Geometry,
    rows: Range<usize>,
    tile: &[T],
    bias: &[T],
    relu: bool,
    out: &mut [T],
) {
    let seg = rows.len() * g.w;
    let images = out.len() / (g.c_out * g.hw());
    let zero = T::from_f64(0.0);
    for (c, t, o) in tile_pieces(g, images, rows) {
        let b = bias[c];
        let pairs = out[o..][..seg].iter_mut().zip(&tile[t..][..seg]);
        if relu {
            // `if` rather than `max`, so that a NaN propagates as in PyTorch.
            pairs.for_each(|(o, &t)| *o = if t + b < zero { zero } else { t + b });
        } else {
            pairs.for_each(|(o, &t)| *o = t + b);
        }
    }
}

/// Gathers a tile's output gradient from the NCHW `grad` into pixel-major `tile`
/// [images * rows * w, c_out] (the transpose of [`tile_to_images`]'s layout), zeroing it where
/// the ReLU output `relu_out` is zero. Each piece is transposed in 16 x 16 blocks, so that
/// both the reads and the writes stay within a few cache lines. Images run in parallel if
/// `par`.
pub(super) fn pixels_of_grad<T: WithDType>(
    g: Geometry,
    rows: Range<usize>,
    grad: &[T],
    relu_out: Option<&[T]>,
    tile: &mut [T],
    par: bool,
) {
    const BLOCK: usize = 16;
    let seg = rows.len() * g.w;
    let zero = T::from_f64(0.0);
    for_chunks(tile, seg * g.c_out, par, |i, tile| {
        let image_start = i * g.c_out * g.hw() + rows.start * g.w;
        let Some(relu_out) = relu_out else {
            transpose(&grad[image_start..], g.hw(), tile, g.c_out, (g.c_out, seg));
            return;
        };
        // As `transpose`, with the mask applied as the blocks are read.
        for c0 in (0..g.c_out).step_by(BLOCK) {
            let cs = BLOCK.min(g.c_out - c0);
            for p0 in (0..seg).step_by(BLOCK) {
                let ps = BLOCK.min(seg - p0);
                let mut block = [[zero; BLOCK]; BLOCK];
                for (c, row) in block.iter_mut().enumerate().take(cs) {
                    let at = image_start + (c0 + c) * g.hw() + p0;
                    let (src, out) = (&grad[at..][..ps], &relu_out[at..][..ps]);
                    for ((d, &s), &y) in row.iter_mut().zip(src).zip(out) {
                        *d = if y > zero { s } else { zero };
                    }
                }
                for p in 0..ps {
                    let dst = &mut tile[(p0 + p) * g.c_out + c0..][..cs];
                    for (c, d) in dst.iter_mut().enumerate() {
                        *d = block[c][p];
                    }
                }
            }
        }
    });
}
