//! The 3x3 convolution as Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, "Fast
//! Algorithms for Convolutional Neural Networks", CVPR 2016).
//!
//! Each 2x2 block of output pixels (a tile) comes from the 4x4 input patch `d` around it: with
//! the filter `g` transformed to `U = G g G^T` and the patch to `V = B^T d B`, the tile is
//! `Y = A^T (U * V) A`, 16 multiplies per pair of channels where im2col spends 36. Summed over
//! the input channels, the elementwise products are 16 GEMMs, one per position `xi` of the 4x4:
//!
//! `M[xi] [tiles, c_out] = V[xi] [tiles, c_in] x U[xi] [c_in, c_out]`
//!
//! so a VGG layer runs 2.25x fewer multiplies than through im2col. The transforms are adds and
//! subtracts of whole pixels: each image is first transposed to channels-last, so that every
//! operation runs over a pixel's `c` contiguous channels (VGG's maps are too small, 4 to 32
//! pixels wide, for loops along their rows to vectorise), and the result is transposed back.
//! The input gradient is the same computation: the output gradient convolved with the filters
//! rotated by 180 degrees, input and output channels swapped. The rounding differs from a
//! direct sum by a few units in the last place (the transforms' coefficients are 1 and 1/2).

use std::ops::Range;

use candle_core::WithDType;
use rayon::prelude::*;

use super::{scratch, transpose, Geometry};
use crate::gemm::{matmul, Mat};

/// Tiles per task times the larger channel count, at most: with the 16 positions, that is
/// the size of a task's transformed tiles (`v`, `m`), kept within a few MB so that they are
/// still in cache when the GEMMs read them. (2^15 and 2^17 were 1-8 % slower.)
const TILES_TIMES_CHANNELS: usize = 1 << 16;

/// Whether F(2x2, 3x3) is the faster way for `g`'s forward (for the input gradient, ask with
/// `g.transposed()`): at least 32 input channels, the inner dimension of its 16 GEMMs, so that
/// they stay efficient; maps larger than the dense form's 2x2; and a batch that gives every
/// thread its own images.
pub(super) fn applies(g: Geometry) -> bool {
    suits(g) && g.batch >= rayon::current_num_threads()
}

/// Whether F(2x2, 3x3) is the faster way for `g`'s forward, which (unlike the input gradient)
/// also runs fewer images than threads, by bands of rows: then where the map has at least
/// as many pixels as input channels. On smaller maps (VGG16's block 5 at 224x224: 14x14
/// pixels, 512 channels) each band's few tiles cannot pay for reading the 16 transformed
/// filters, 16 MB there: im2col was 30 % faster.
pub(super) fn applies_to_forward(g: Geometry) -> bool {
    applies(g) || (suits(g) && g.hw() >= g.c_in)
}

fn suits(g: Geometry) -> bool {
    g.c_in >= 32 && g.h > 2 && g.w > 2
}

/// `U = G g G^T` of one filter `g` (row-major 3x3), row-major 4x4. `G` has rows (1, 0, 0),
/// (1/2, 1/2, 1/2), (1/2, -1/2, 1/2), (0, 0, 1).
fn transform_filter<T: WithDType>(g: [T; 9]) -> [T; 16] {
    let half = T::from_f64(0.5);
    let apply_g = |a: T, b: T, c: T| [a, (a + b + c) * half, (a - b + c) * half, c];
    let cols: [[T; 4]; 3] = std::array::from_fn(|c| apply_g(g[c], g[3 + c], g[6 + c]));
    let mut u = [T::from_f64(0.0); 16];
    for r in 0..4 {
        u[r * 4..][..4].copy_from_slice(&apply_g(cols[0][r], cols[1][r], cols[2][r]));
    }
    u
}

/// The transformed filters, `U [k, 16, n]` for a convolution from `k` channels to `n`: for the
/// filters `weight [c_out, c_in, 3, 3]`, `k = c_in` and `n = c_out`; with `flip`, those of the
/// input gradient, from c_out channels to c_in, each filter rotated by 180 degrees. Position
/// `xi`'s GEMM operand `U[xi] [k, n]` is then a strided view of it.
pub(super) fn transform_weight<T: WithDType>(
    weight: &[T],
    c_out: usize,
    c_in: usize,
    flip: bool,
) -> Vec<T> {
    let (k, n) = if flip { (c_out, c_in) } else { (c_in, c_out) };
    let mut u = vec![T::from_f64(0.0); k * 16 * n];
    if u.is_empty() {
        return u;
    }
    u.par_chunks_mut(16 * n).enumerate().for_each(|(row, dst)| {
        for col in 0..n {
            let (co, ci) = if flip { (row, col) } else { (col, row) };
            let w = &weight[(co * c_in + ci) * 9..][..9];
            let g = std::array::from_fn(|i| if flip { w[8 - i] } else { w[i] });
            for (xi, value) in transform_filter(g).into_iter().enumerate() {
                dst[xi * n + col] = value;
            }
        }
    });
    u
}

/// `out [batch, c_out, h, w] = conv(x [batch, c_in, h, w])` with the filters `u` [c_in, 16,
/// c_out] from [`transform_weight`], plus `bias` if given, through a ReLU if `relu`: whole
/// images per thread, or with fewer images than threads, bands of each image's rows.
pub(super) fn conv<T: WithDType>(
    g: Geometry,
    x: &[T],
    u: &[T],
    bias: Option<&[T]>,
    relu: bool,
) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); g.batch * g.c_out * g.hw()];
    if out.is_empty() {
        return out;
    }
    if g.batch < rayon::current_num_threads() {
        conv_by_bands(g, x, u, (bias, relu), &mut out);
    } else {
        conv_by_images(g, x, u, (bias, relu), &mut out);
    }
    out
}

/// [`conv`] with tasks of whole images (several while their tiles fit in the cache).
fn conv_by_images<T: WithDType>(
    g: Geometry,
    x: &[T],
    u: &[T],
    (bias, relu): (Option<&[T]>, bool),
    out: &mut [T],
) {
    let (th, tw) = (g.h.div_ceil(2), g.w.div_ceil(2));
    let (images, band) = blocks(g);
    let sizes = Scratch::<T>::sizes(g, images, band);
    out.par_chunks_mut(images * g.c_out * g.hw())
        .zip(x.par_chunks(images * g.c_in * g.hw()))
        .for_each(|(out, x)| {
            scratch::with(sizes.iter().sum(), |buffer: &mut [T]| {
                let s = Scratch::split(buffer, sizes);
                let images = x.len() / (g.c_in * g.hw());
                for rows in (0..th).step_by(band).map(|t0| t0..(t0 + band).min(th)) {
                    let tiles = images * rows.len() * tw;
                    let v = &mut s.v[..16 * tiles * g.c_in];
                    let m = &mut s.m[..16 * tiles * g.c_out];
                    for (i, x) in x.chunks_exact(g.c_in * g.hw()).enumerate() {
                        let first_tile = i * rows.len() * tw;
                        let at = |xi: usize| (xi * tiles + first_tile) * g.c_in;
                        transform_input(g, x, rows.clone(), (s.pixels, s.cols), v, at);
                    }
                    multiply(g, tiles, v, u, m);
                    for (i, out) in out.chunks_exact_mut(g.c_out * g.hw()).enumerate() {
                        let first_tile = i * rows.len() * tw;
                        let at = |xi: usize| (xi * tiles + first_tile) * g.c_out;
                        let pixels = &mut *s.pixels;
                        transform_output(g, m, at, rows.clone(), (bias, relu), pixels, out);
                    }
                }
            })
        });
}

/// [`conv`] for a batch smaller than the thread count: the bands of tile rows of each image
/// run in parallel, each into a buffer of its own output rows, which are then copied into
/// place (a band's rows are not contiguous in `out`, one run of them per channel plane).
/// Whole images per task would leave all threads but one idle.
fn conv_by_bands<T: WithDType>(
    g: Geometry,
    x: &[T],
    u: &[T],
    (bias, relu): (Option<&[T]>, bool),
    out: &mut [T],
) {
    let zero = T::from_f64(0.0);
    let (th, tw) = (g.h.div_ceil(2), g.w.div_ceil(2));
    // Bands small enough for the cache, as many as a multiple of the threads and of even
    // sizes, so that no thread is left with the last one alone.
    let (_, cache_band) = blocks(Geometry { batch: 1, ..g });
    let threads = rayon::current_num_threads();
    let count = th.div_ceil(cache_band.max(1)).next_multiple_of(threads);
    let band = th.div_ceil(count).max(1);
    let sizes = Scratch::<T>::sizes(g, 1, band);
    let bands: Vec<Range<usize>> = (0..th)
        .step_by(band)
        .map(|t0| t0..(t0 + band).min(th))
        .collect();
    for (x, out) in x
        .chunks_exact(g.c_in * g.hw())
        .zip(out.chunks_exact_mut(g.c_out * g.hw()))
    {
        let results: Vec<Vec<T>> = bands
            .par_iter()
            .map(|rows| {
                // The band's output rows as a map of their own: [c_out, band_h, w].
                let band_g = Geometry {
                    batch: 1,
                    h: (2 * rows.len()).min(g.h - 2 * rows.start),
                    ..g
                };
                let mut band_out = vec![zero; g.c_out * band_g.hw()];
                scratch::with(sizes.iter().sum(), |buffer: &mut [T]| {
                    let s = Scratch::split(buffer, sizes);
                    let tiles = rows.len() * tw;
                    let v = &mut s.v[..16 * tiles * g.c_in];
                    let m = &mut s.m[..16 * tiles * g.c_out];
                    let at = |xi: usize| xi * tiles * g.c_in;
                    transform_input(g, x, rows.clone(), (s.pixels, s.cols), v, at);
                    multiply(g, tiles, v, u, m);
                    let at = |xi: usize| xi * tiles * g.c_out;
                    let band_rows = 0..rows.len();
                    let pixels = &mut *s.pixels;
                    transform_output(
                        band_g,
                        m,
                        at,
                        band_rows,
                        (bias, relu),
                        pixels,
                        &mut band_out,
                    );
                });
                band_out
            })
            .collect();
        out.par_chunks_mut(g.hw())
            .enumerate()
            .for_each(|(c, plane)| {
                for (rows, band_out) in bands.iter().zip(&results) {
                    let n = band_out.len() / g.c_out;
                    plane[2 * rows.start * g.w..][..n].copy_from_slice(&band_out[c * n..][..n]);
                }
            });
    }
}

/// The 16 GEMMs `M[xi] [tiles, c_out] = V[xi] [tiles, c_in] x U[xi] [c_in, c_out]`, on this
/// thread.
fn multiply<T: WithDType>(g: Geometry, tiles: usize, v: &[T], u: &[T], m: &mut [T]) {
    for (xi, (m, v)) in m
        .chunks_exact_mut(tiles * g.c_out)
        .zip(v.chunks_exact(tiles * g.c_in))
        .enumerate()
    {
        let v = Mat::row_major(v, tiles, g.c_in);
        let u = Mat {
            data: &u[xi * g.c_out..],
            rows: g.c_in,
            cols: g.c_out,
            rs: 16 * g.c_out,
            cs: 1,
        };
        matmul(m, false, v, u, gemm::Parallelism::None);
    }
}

/// How the work is cut: `(images, band)`, whole images per task while their tiles fit,
/// else one image per task in bands of tile rows.
fn blocks(g: Geometry) -> (usize, usize) {
    let (th, tw) = (g.h.div_ceil(2), g.w.div_ceil(2));
    let max_tiles = (TILES_TIMES_CHANNELS / g.c_in.max(g.c_out)).max(tw);
    if th * tw <= max_tiles {
        let threads = rayon::current_num_threads();
        let images = (max_tiles / (th * tw)).min(g.batch.div_ceil(threads));
        (images.max(1), th)
    } else {
        (1, max_tiles / tw)
    }
}

/// The weight gradient `dW [c_out, c_in, 3, 3]` of the conv with input `x` [batch, c_in, h, w]
/// and output gradient `dout` [batch, c_out, h, w] (past the ReLU's mask), as Winograd's
/// F(3x3, 2x2): each 2x2 tile `y` of `dout` and the 4x4 input patch `d` around it add
/// `A'^T ((G' y G'^T) * (B^T d B)) A'` to dW, with `B^T` the forward's, `G'` rows (1, 0),
/// (1, 1), (1, -1), (0, -1), and `A'^T` rows (1, 1/2, 1/2, 0), (0, 1/2, -1/2, 0),
/// (0, 1/2, 1/2, 1). The sums over tiles run before the inverse transform, as 16 GEMMs
/// `S[xi] [c_out, c_in] += Y[xi]^T [c_out, tiles] x V[xi] [tiles, c_in]`: 2.25x fewer multiplies
/// than `cols x dout^T`, and no im2col.
pub(super) fn weight_grad<T: WithDType>(g: Geometry, x: &[T], dout: &[T]) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let (pairs, hw) = (g.c_out * g.c_in, g.hw());
    if pairs == 0 || x.is_empty() {
        return vec![zero; 9 * pairs];
    }
    let (th, tw) = (g.h.div_ceil(2), g.w.div_ceil(2));
    let (images, band) = blocks(g);
    let sizes = Scratch::<T>::sizes(g, images, band);
    // One partial sum per thread's share of the tasks, added in a fixed order, so that a run
    // gives the same gradient every time (rayon's `fold` cuts the work where it likes).
    let tasks = g.batch.div_ceil(images);
    let per_thread = tasks.div_ceil(rayon::current_num_threads()) * images;
    let parts: Vec<Vec<T>> = x
        .par_chunks(per_thread * g.c_in * hw)
        .zip(dout.par_chunks(per_thread * g.c_out * hw))
        .map(|(x, dout)| {
            let mut sums = vec![zero; 16 * pairs];
            scratch::with(sizes.iter().sum(), |buffer: &mut [T]| {
                // `m` holds the output gradient's transforms, [16, tiles, c_out].
                let s = Scratch::split(buffer, sizes);
                for (x, dout) in x
                    .chunks(images * g.c_in * hw)
                    .zip(dout.chunks(images * g.c_out * hw))
                {
                    let images = x.len() / (g.c_in * hw);
                    for rows in (0..th).step_by(band).map(|t0| t0..(t0 + band).min(th)) {
                        let tiles = images * rows.len() * tw;
                        let v = &mut s.v[..16 * tiles * g.c_in];
                        let y = &mut s.m[..16 * tiles * g.c_out];
                        for (i, (x, dout)) in x
                            .chunks_exact(g.c_in * hw)
                            .zip(dout.chunks_exact(g.c_out * hw))
                            .enumerate()
                        {
                            let first_tile = i * rows.len() * tw;
                            let at = |xi: usize| (xi * tiles + first_tile) * g.c_in;
                            transform_input(g, x, rows.clone(), (s.pixels, s.cols), v, at);
                            let at = |xi: usize| (xi * tiles + first_tile) * g.c_out;
                            transform_grad(g, dout, rows.clone(), s.pixels, y, at);
                        }
                        for (sum, (y, v)) in sums.chunks_exact_mut(pairs).zip(
                            y.chunks_exact(tiles * g.c_out)
                                .zip(v.chunks_exact(tiles * g.c_in)),
                        ) {
                            let y_t = Mat::row_major(y, tiles, g.c_out).t();
                            let v = Mat::row_major(v, tiles, g.c_in);
                            matmul(sum, true, y_t, v, gemm::Parallelism::None);
                        }
                    }
                }
            });
            sums
        })
        .collect();
    // dW[co, ci] = A'^T S A' for each pair, S gathered from the 16 planes.
    let half = T::from_f64(0.5);
    let inverse = |a: T, b: T, c: T, d: T| [a + (b + c) * half, (b - c) * half, (b + c) * half + d];
    let mut grad = vec![zero; 9 * pairs];
    grad.par_chunks_mut(9 * g.c_in)
        .enumerate()
        .for_each(|(co, dw)| {
            for (ci, dw) in dw.chunks_exact_mut(9).enumerate() {
                let s = |xi: usize| {
                    let at = xi * pairs + co * g.c_in + ci;
                    parts.iter().fold(zero, |a, p| a + p[at])
                };
                let rows: [[T; 3]; 4] =
                    std::array::from_fn(|b| inverse(s(b), s(4 + b), s(8 + b), s(12 + b)));
                for u in 0..3 {
                    dw[u * 3..][..3]
                        .copy_from_slice(&inverse(rows[0][u], rows[1][u], rows[2][u], rows[3][u]));
                }
            }
        });
    grad
}

/// `G' y G'^T` for the 2x2 tiles in tile rows `rows` of one image's output gradient `dout`
/// [c_out, h, w], laid out as [`transform_input`]'s `v` (with c_out channels). `G'` maps a
/// pair (y0, y1) to (y0, y0 + y1, y0 - y1, -y1); pixels outside an odd-sized map count as 0.
fn transform_grad<T: WithDType>(
    g: Geometry,
    dout: &[T],
    rows: Range<usize>,
    pixels: &mut [T],
    y: &mut [T],
    at: impl Fn(usize) -> usize,
) {
    let zero = T::from_f64(0.0);
    let (c, tw) = (g.c_out, g.w.div_ceil(2));
    // The band's pixels channels-last, zero past the map: pixels[(py * pw + px) * c..].
    let pw = 2 * tw;
    let pixels = &mut pixels[..2 * rows.len() * pw * c];
    if g.h % 2 == 1 || g.w % 2 == 1 {
        pixels.fill(zero);
    }
    for yy in 2 * rows.start..(2 * rows.end).min(g.h) {
        let dst = &mut pixels[(yy - 2 * rows.start) * pw * c..];
        transpose(&dout[yy * g.w..], g.hw(), dst, c, (c, g.w));
    }
    // Per tile, the row stage h[a, j] (a in 0..4, j in 0..2) at h[(2 a + j) c..], then the
    // column stage into the 16 positions.
    let mut h = vec![zero; 8 * c];
    for r in 0..rows.len() {
        for t in 0..tw {
            let tile = r * tw + t;
            let p = |i: usize, j: usize| &pixels[((2 * r + i) * pw + 2 * t + j) * c..][..c];
            for j in 0..2 {
                let (y0, y1) = (p(0, j), p(1, j));
                h[j * c..][..c].copy_from_slice(y0);
                combine(&mut h[(2 + j) * c..][..c], y0, y1, true);
                combine(&mut h[(4 + j) * c..][..c], y0, y1, false);
                negate(&mut h[(6 + j) * c..][..c], y1);
            }
            for a in 0..4 {
                let (h0, h1) = (&h[2 * a * c..][..c], &h[(2 * a + 1) * c..][..c]);
                let dst = |b: usize| at(a * 4 + b) + tile * c;
                y[dst(0)..][..c].copy_from_slice(h0);
                combine(&mut y[dst(1)..][..c], h0, h1, true);
                combine(&mut y[dst(2)..][..c], h0, h1, false);
                negate(&mut y[dst(3)..][..c], h1);
            }
        }
    }
}

/// `dst = -src`, elementwise.
fn negate<T: WithDType>(dst: &mut [T], src: &[T]) {
    let zero = T::from_f64(0.0);
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = zero - s);
}

/// A task's buffers: the transformed input `v` [16, tiles, c_in] and products `m`
/// [16, tiles, c_out]; one image band's pixels channels-last (padded input, or output), and
/// its column-transformed rows.
struct Scratch<'a, T> {
    v: &'a mut [T],
    m: &'a mut [T],
    pixels: &'a mut [T],
    cols: &'a mut [T],
}

impl<'a, T> Scratch<'a, T> {
    /// The sizes of `v`, `m`, `pixels` and `cols`.
    fn sizes(g: Geometry, images: usize, band: usize) -> [usize; 4] {
        let tw = g.w.div_ceil(2);
        let (c_max, tiles) = (g.c_in.max(g.c_out), images * band * tw);
        [
            16 * tiles * g.c_in,
            16 * tiles * g.c_out,
            (2 * band + 2) * (2 * tw + 2) * c_max,
            (2 * band + 2) * tw * 4 * g.c_in,
        ]
    }

    fn split(buffer: &'a mut [T], [v, m, pixels, _]: [usize; 4]) -> Self {
        let (v, rest) = buffer.split_at_mut(v);
        let (m, rest) = rest.split_at_mut(m);
        let (pixels, cols) = rest.split_at_mut(pixels);
        Self { v, m, pixels, cols }
    }
}

/// `dst = a + b` or `a - b`, elementwise.
fn combine<T: WithDType>(dst: &mut [T], a: &[T], b: &[T], add: bool) {
    let pairs = dst.iter_mut().zip(a.iter().zip(b));
    if add {
        pairs.for_each(|(d, (&a, &b))| *d = a + b);
    } else {
        pairs.for_each(|(d, (&a, &b))| *d = a - b);
    }
}

/// `V = B^T d B` for the tiles in tile rows `rows` of one image `x` [c_in, h, w]; tile
/// (r, t)'s values for position `xi` go to `v[at(xi) + (r * tw + t) * c_in..][..c_in]`. `B^T`
/// combines the patch's rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3), `B` its columns alike.
fn transform_input<T: WithDType>(
    g: Geometry,
    x: &[T],
    rows: Range<usize>,
    (pixels, cols): (&mut [T], &mut [T]),
    v: &mut [T],
    at: impl Fn(usize) -> usize,
) {
    let zero = T::from_f64(0.0);
    let (c, tw) = (g.c_in, g.w.div_ceil(2));
    // The band's input rows 2 r0 - 1 ..= 2 r1, channels-last, with a zero border:
    // pixels[(pr * pw + pc) * c..] is image pixel (2 r0 - 1 + pr, pc - 1).
    let (ph, pw) = (2 * rows.len() + 2, 2 * tw + 2);
    let pixels = &mut pixels[..ph * pw * c];
    for (pr, row) in pixels.chunks_exact_mut(pw * c).enumerate() {
        let Some(y) = (2 * rows.start + pr).checked_sub(1).filter(|&y| y < g.h) else {
            row.fill(zero);
            continue;
        };
        // Only the border is zeroed: the image's pixels are all written.
        row[..c].fill(zero);
        row[(g.w + 1) * c..].fill(zero);
        transpose(&x[y * g.w..], g.hw(), &mut row[c..], c, (c, g.w));
    }
    // Column stage: cols[((pr * tw + t) * 4 + b) * c..] from the row's pixels 2t .. 2t + 3.
    for pr in 0..ph {
        for t in 0..tw {
            let p = |l: usize| &pixels[(pr * pw + 2 * t + l) * c..][..c];
            let dst = &mut cols[(pr * tw + t) * 4 * c..][..4 * c];
            let (q0, rest) = dst.split_at_mut(c);
            let (q1, rest) = rest.split_at_mut(c);
            let (q2, q3) = rest.split_at_mut(c);
            combine(q0, p(0), p(2), false);
            combine(q1, p(1), p(2), true);
            combine(q2, p(2), p(1), false);
            combine(q3, p(1), p(3), false);
        }
    }
    // Row stage: tile row r combines padded rows 2r .. 2r + 3.
    for r in 0..rows.len() {
        for t in 0..tw {
            let tile = r * tw + t;
            for b in 0..4 {
                let q = |k: usize| &cols[(((2 * r + k) * tw + t) * 4 + b) * c..][..c];
                let mut put = |xi: usize, p: &[T], q: &[T], add: bool| {
                    combine(&mut v[at(xi) + tile * c..][..c], p, q, add);
                };
                put(b, q(0), q(2), false);
                put(4 + b, q(1), q(2), true);
                put(8 + b, q(2), q(1), false);
                put(12 + b, q(1), q(3), false);
            }
        }
    }
}

/// `Y = A^T M A` for the tiles in tile rows `rows` of one image, from `m` laid out as
/// [`transform_input`]'s `v` (with c_out channels), into `out` [c_out, h, w], plus `bias` and
/// through a ReLU if asked. `A^T` combines rows (m0 + m1 + m2, m1 - m2 - m3), `A` columns alike;
/// a tile's second row or column is dropped where it falls outside an odd-sized map.
fn transform_output<T: WithDType>(
    g: Geometry,
    m: &[T],
    at: impl Fn(usize) -> usize,
    rows: Range<usize>,
    (bias, relu): (Option<&[T]>, bool),
    pixels: &mut [T],
    out: &mut [T],
) {
    let zero = T::from_f64(0.0);
    let (c, tw) = (g.c_out, g.w.div_ceil(2));
    // The band's output pixels, channels-last: pixels[(y * pw + x) * c..], y from 2 r0.
    let pw = 2 * tw;
    let mut s = vec![zero; 4 * c];
    for r in 0..rows.len() {
        for t in 0..tw {
            let tile = r * tw + t;
            let mm = |xi: usize| &m[at(xi) + tile * c..][..c];
            for i in 0..2 {
                // Row stage for output row i: s[b] = m0b + m1b + m2b or m1b - m2b - m3b.
                for (b, s) in s.chunks_exact_mut(c).enumerate() {
                    let (m0, m1, m2, m3) = (mm(b), mm(4 + b), mm(8 + b), mm(12 + b));
                    for (k, s) in s.iter_mut().enumerate() {
                        *s = if i == 0 {
                            m0[k] + m1[k] + m2[k]
                        } else {
                            m1[k] - m2[k] - m3[k]
                        };
                    }
                }
                let (s0, s1, s2, s3) = (&s[..c], &s[c..2 * c], &s[2 * c..3 * c], &s[3 * c..]);
                for j in 0..2 {
                    let dst = &mut pixels[((2 * r + i) * pw + 2 * t + j) * c..][..c];
                    for (k, d) in dst.iter_mut().enumerate() {
                        let v = if j == 0 {
                            s0[k] + s1[k] + s2[k]
                        } else {
                            s1[k] - s2[k] - s3[k]
                        };
                        let v = v + bias.map_or(zero, |b| b[k]);
                        // `<` rather than `max`, so that a NaN propagates as in PyTorch.
                        *d = if relu && v < zero { zero } else { v };
                    }
                }
            }
        }
    }
    for y in 2 * rows.start..(2 * rows.end).min(g.h) {
        let src = &pixels[(y - 2 * rows.start) * pw * c..];
        transpose(src, c, &mut out[y * g.w..], g.hw(), (g.w, c));
    }
}
