//! A 3x3 convolution (stride 1, padding 1: the only conv VGG has) whose forward and backward
//! run as GEMMs on the CPU, through whichever of three forms is fastest for the layer:
//!
//! - `winograd.rs`: F(2x2, 3x3) for the forward and the input gradient, F(3x3, 2x2) for the
//!   weight gradient: 2.25x fewer multiplies, when the pass's input has at least 32 channels
//!   (c_in for the forward, c_out for the input gradient; the weight gradient runs this way
//!   when the other two do) and the batch has at least one image per thread (the forward
//!   also with fewer images, each cut into bands of rows that run in parallel);
//! - `small.rs`: one dense product, for maps of at most 2x2 (skips the padding);
//! - im2col/col2im + GEMM otherwise (the first conv, the backward of a batch smaller than
//!   the thread count, the input gradient into fewer than 32 channels, and block 4's weight
//!   gradient at 32x32, which runs as one whole-batch task), described below; its copies
//!   between layouts (im2col, col2im, tiles, blocked transposes) are in `layout.rs`.
//!
//! Why: on the CPU, Candle 0.11's conv2d forward is already im2col + GEMM, but its backward
//! computes the input gradient with a naive `conv_transpose2d` loop (about 40 % of a VGG16
//! training step) and the weight gradient through a slow path (about 24 %), while its matmul
//! (the `gemm` crate, with its AVX-512 kernels) runs at 210-240 GFLOP/s per thread at VGG's
//! shapes. In the im2col form all three products are GEMMs:
//!
//! - forward:     `out   [c_out, n]      = W    [c_out, 9 c_in] x cols   [9 c_in, n]`
//! - weight grad: `dW^T  [9 c_in, c_out] += cols [9 c_in, n]     x dout^T [n, c_out]`
//! - input grad:  `dcols [9 c_in, n]     = W^T  [9 c_in, c_out] x dout   [c_out, n]`, col2im
//!
//! where `cols` is the im2col of the input (row `(ci, ky, kx)`, column = output pixel) and `n`
//! counts the pixels of a tile of the batch (several small images, or rows of a large one), so
//! that the GEMMs stay large for 4x4 feature maps and the buffers stay small for 224x224 ones.
//! Partial sums over tasks are added in a fixed order, so a run is reproducible.
//!
//! The bias is part of the op rather than a `broadcast_add` after it: Candle differentiates
//! that correctly but slowly, summing the gradient over dims (0, 2, 3), a reduction not over
//! trailing dims that its CPU backend runs element by element (about 40 ms for a
//! [64, 64, 32, 32] gradient, as long as this conv's whole backward). Here the bias is added
//! while the output is written, and its gradient summed from the output gradient already in
//! hand. CUDA tensors run cuDNN's three passes (`crate::cuda`), other devices and dtypes
//! [`conv3x3_generic`], Candle's `conv2d` + `broadcast_add`. The backward is not itself differentiable (no second derivatives).

use std::borrow::Cow;
use std::ops::Range;

use candle_core::{bail, CpuStorage, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu::{data, with_float, with_slices};
use crate::gemm::{matmul, Mat};
use crate::kernel::{apply, Grad, Input, Kernel};

mod layout;
mod scratch;
mod small;
mod winograd;

use layout::{col2im, im2col, pixels_of_grad, tile_to_images, transpose, transpose_sum};

/// About this many output pixels per GEMM: big enough to keep gemm efficient, small enough
/// that a tile's im2col (`9 c_in` rows of it) stays within a few MB.
const TILE_PIXELS: usize = 1024;

/// `conv(x)` with a 3x3 kernel, stride 1 and padding 1 (weights `[c_out, c_in, 3, 3]`, an
/// optional bias `[c_out]`), followed by a ReLU when `relu`: the ReLU is applied as the output
/// is written, and its gradient mask as the output gradient is read, instead of Candle's four
/// passes (compare, convert, multiply, plus the forward map) over the whole activation.
/// The CPU kernel for f32/f64 on the CPU, cuDNN's for f32/f64 on CUDA, otherwise
/// [`conv3x3_generic`].
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    let (_, c_in, _, _) = x.dims4()?;
    let (_, w_in, kh, kw) = weight.dims4()?;
    if (w_in, kh, kw) != (c_in, 3, 3) {
        bail!(
            "conv3x3: weight {:?} does not fit input {:?} (want [c_out, {c_in}, 3, 3])",
            weight.dims(),
            x.dims()
        )
    }
    let mut tensors = vec![x, weight];
    tensors.extend(bias);
    let (cuda, fast) = (crate::cuda_path(&tensors)?, crate::fast_path(&tensors)?);
    if !cuda && !fast {
        return conv3x3_generic(x, weight, bias, relu);
    }
    let bias = match bias {
        Some(b) => b.clone(),
        // Untracked, so its gradient is skipped.
        None => Tensor::zeros(weight.dim(0)?, x.dtype(), x.device())?,
    };
    #[cfg(feature = "cuda")]
    if cuda {
        return crate::cuda::conv3x3(x, weight, &bias, relu);
    }
    // The op reads plain slices; `contiguous` is a no-op (and differentiable) otherwise.
    let inputs = [&x.contiguous()?, &weight.contiguous()?, &bias.contiguous()?];
    apply("conv3x3-gemm", inputs, Conv3x3Op { relu })
}

/// [`conv3x3`] as Candle's `conv2d` + `broadcast_add` (+ `relu`), on any device and dtype.
pub fn conv3x3_generic(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let y = x.conv2d(weight, 1, 1, 1, 1)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?,
        None => y,
    };
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// The Candle op on (input, weight, bias), optionally followed by a ReLU.
struct Conv3x3Op {
    relu: bool,
}

impl Kernel<3> for Conv3x3Op {
    fn cpu_forward(&self, inputs: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
        let [(s1, l1), (s2, l2), (s3, l3)] = inputs;
        let g = Geometry::new(l1.dims(), l2.dims(), l3.dims())?;
        let out = with_float!("conv3x3", s1.dtype(), T => T::to_cpu_storage_owned(
            forward::<T>(g, self.relu, data(s1, l1)?, data(s2, l2)?, data(s3, l3)?),
        ));
        Ok((out, Shape::from((g.batch, g.c_out, g.h, g.w))))
    }

    fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
        let ([input, weight, bias], output, grad_out) = (g.inputs, g.output, g.grad);
        let g = Geometry::new(input.dims(), weight.dims(), bias.dims())?;
        let grad_out = grad_out.contiguous()?;
        // An input that wants no gradient (the images into the first conv) skips its GEMM.
        let need_input = input.track_op();
        // The output is only read for the ReLU's mask.
        let output = output.contiguous()?;
        let relu = self.relu;
        fn run<T: WithDType>(
            g: Geometry,
            (need_input, relu): (bool, bool),
            [input, weight, grad_out, output]: [&Tensor; 4],
            bias: &Tensor,
        ) -> Result<[Tensor; 3]> {
            let (gi, gw, gb) =
                with_slices::<T, _, 4>([input, weight, grad_out, output], |[x, w, go, o]| {
                    let inputs = Backward {
                        x,
                        weight: w,
                        grad_out: go,
                        relu_out: relu.then_some(o),
                        need_input,
                    };
                    Ok(backward::<T>(g, inputs))
                })?;
            Ok([
                Tensor::from_vec(gi, input.shape(), input.device())?,
                Tensor::from_vec(gw, weight.shape(), weight.device())?,
                Tensor::from_vec(gb, bias.shape(), bias.device())?,
            ])
        }
        let args = [input, weight, &grad_out, &output];
        let [gi, gw, gb] = with_float!("conv3x3", input.dtype(), T => run::<T>(g, (need_input, relu), args, bias)?);
        let wanted = |t: Tensor, arg: &Tensor| arg.track_op().then_some(t);
        Ok([wanted(gi, input), wanted(gw, weight), wanted(gb, bias)])
    }
}

/// Shapes, and how the batch is cut into tiles.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
}

impl Geometry {
    fn new(input: &[usize], weight: &[usize], bias: &[usize]) -> Result<Self> {
        match (input, weight, bias) {
            (&[batch, c_in, h, w], &[c_out, wc_in, 3, 3], &[bc_out])
                if c_in > 0 && wc_in == c_in && bc_out == c_out =>
            {
                Ok(Self {
                    batch,
                    c_in,
                    c_out,
                    h,
                    w,
                })
            }
            _ => bail!("conv3x3: bad shapes, input {input:?}, weight {weight:?}, bias {bias:?}"),
        }
    }

    fn hw(&self) -> usize {
        self.h * self.w
    }

    /// The geometry of the input gradient as a convolution of the output gradient.
    fn transposed(&self) -> Self {
        Self {
            c_in: self.c_out,
            c_out: self.c_in,
            ..*self
        }
    }

    /// Rows of the im2col matrix (the GEMMs' inner dimension in the forward).
    fn k(&self) -> usize {
        9 * self.c_in
    }

    /// Images per rayon task: enough that small feature maps still give wide GEMMs, but at
    /// least one task per thread while the batch allows.
    fn images_per_task(&self, threads: usize) -> usize {
        let by_size = (TILE_PIXELS / self.hw().max(1)).max(1);
        by_size.min(self.batch.div_ceil(threads)).max(1)
    }

    /// Output rows per tile: whole images unless one image alone exceeds the tile size.
    fn rows_per_tile(&self) -> usize {
        (TILE_PIXELS / self.w.max(1)).clamp(1, self.h.max(1))
    }
}

/// How a pass is split: tasks of `images` whole images run in parallel; each walks its images
/// in tiles of `rows` output rows. With fewer tasks than threads (a batch of one) the
/// parallelism moves inside gemm instead, so the two never oversubscribe the cores.
struct Plan {
    images: usize,
    rows: usize,
    /// Tasks per rayon job: one job per thread, so that the backward keeps one partial weight
    /// gradient per thread (and adds them in a fixed order), not one per job rayon would
    /// otherwise split off.
    tasks_per_job: usize,
    gemm_par: gemm::Parallelism,
}

impl Plan {
    fn new(g: Geometry) -> Self {
        let threads = rayon::current_num_threads();
        let images = g.images_per_task(threads);
        let tasks = g.batch.div_ceil(images);
        let gemm_par = if tasks >= threads || threads == 1 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        let mut rows = g.rows_per_tile();
        if tasks < threads && g.h >= threads {
            // Row tiles will be spread over the threads (`forward_by_rows`): as many tiles
            // as a multiple of the thread count, of equal height, so none waits on a short one.
            let tiles = g.h.div_ceil(rows).next_multiple_of(threads);
            rows = g.h.div_ceil(tiles);
        }
        Self {
            images,
            rows,
            tasks_per_job: tasks.div_ceil(threads),
            gemm_par,
        }
    }

    /// A task's tiles: ranges of output rows, each taken across all of the task's images.
    fn tiles(&self, g: Geometry) -> impl Iterator<Item = Range<usize>> {
        let rows = self.rows;
        (0..g.h)
            .step_by(rows)
            .map(move |y0| y0..(y0 + rows).min(g.h))
    }

    /// The backward's plan for layers whose weight is large next to their maps (VGG's block 4
    /// on 32x32 images): one task over the whole batch, gemm splitting each product over the
    /// threads, instead of a partial weight gradient per thread. Those partials, each as large
    /// as the weight, and their sum cost more there than one GEMM per thread gains. `None`
    /// where the maps are larger, so that the batch's im2col stays within 4x the weight.
    fn whole_batch(g: Geometry) -> Option<Self> {
        let threads = rayon::current_num_threads();
        (threads > 1 && g.batch * g.hw() <= 4 * g.c_out).then_some(Self {
            images: g.batch,
            rows: g.h,
            tasks_per_job: 1,
            gemm_par: gemm::Parallelism::Rayon(threads),
        })
    }

    /// Whether the steps around the GEMMs (im2col, col2im, gathers) should themselves run in
    /// parallel: when gemm does, since the tasks then don't.
    fn par(&self) -> bool {
        !matches!(self.gemm_par, gemm::Parallelism::None)
    }

    /// Columns of the largest tile, for sizing the buffers.
    fn max_columns(&self, g: Geometry) -> usize {
        self.images.min(g.batch) * self.rows * g.w
    }
}

fn forward<T: WithDType>(g: Geometry, relu: bool, x: &[T], weight: &[T], bias: &[T]) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let mut out = vec![zero; g.batch * g.c_out * g.hw()];
    if out.is_empty() {
        return out;
    }
    if small::applies(g) {
        return small::forward(g, relu, x, weight, bias);
    }
    if winograd::applies_to_forward(g) {
        let u = winograd::transform_weight(weight, g.c_out, g.c_in, false);
        return winograd::conv(g, x, &u, Some(bias), relu);
    }
    let plan = Plan::new(g);
    let threads = rayon::current_num_threads();
    if !matches!(plan.gemm_par, gemm::Parallelism::None) && plan.tiles(g).count() >= threads {
        forward_by_rows(g, relu, x, weight, bias, &plan, &mut out);
        return out;
    }
    let n_max = plan.max_columns(g);
    let par = plan.par();
    let w_mat = Mat::row_major(weight, g.c_out, g.k());
    out.par_chunks_mut(plan.images * g.c_out * g.hw())
        .zip(x.par_chunks(plan.images * g.c_in * g.hw()))
        .with_min_len(plan.tasks_per_job)
        .for_each(|(out, x)| {
            scratch::with((g.k() + g.c_out) * n_max, |buffer: &mut [T]| {
                let (cols, tile) = buffer.split_at_mut(g.k() * n_max);
                let images = x.len() / (g.c_in * g.hw());
                for rows in plan.tiles(g) {
                    let n = images * rows.len() * g.w;
                    let cols = &mut cols[..g.k() * n];
                    let tile = &mut tile[..g.c_out * n];
                    im2col(g, x, rows.clone(), cols, par);
                    matmul(
                        tile,
                        false,
                        w_mat,
                        Mat::row_major(cols, g.k(), n),
                        plan.gemm_par,
                    );
                    tile_to_images(g, rows, tile, bias, relu, out);
                }
            })
        });
    out
}

/// [`forward`] for a batch smaller than the thread count (inference on one large image):
/// the row tiles of each image run in parallel, each GEMM on one thread, instead of one
/// tile at a time with gemm splitting it. Otherwise im2col and the output writes, a third of
/// the time at 224x224, ran on one thread while the other waited.
fn forward_by_rows<T: WithDType>(
    g: Geometry,
    relu: bool,
    x: &[T],
    weight: &[T],
    bias: &[T],
    plan: &Plan,
    out: &mut [T],
) {
    let zero = T::from_f64(0.0);
    let w_mat = Mat::row_major(weight, g.c_out, g.k());
    let tiles: Vec<Range<usize>> = plan.tiles(g).collect();
    let max_n = plan.rows * g.w;
    for (x, out) in x
        .chunks_exact(g.c_in * g.hw())
        .zip(out.chunks_exact_mut(g.c_out * g.hw()))
    {
        let results: Vec<(Range<usize>, Vec<T>)> = tiles
            .par_iter()
            .map_init(
                || vec![zero; g.k() * max_n],
                |cols, rows| {
                    let n = rows.len() * g.w;
                    let cols = &mut cols[..g.k() * n];
                    im2col(g, x, rows.clone(), cols, false);
                    let mut tile = vec![zero; g.c_out * n];
                    let cols = Mat::row_major(cols, g.k(), n);
                    matmul(&mut tile, false, w_mat, cols, gemm::Parallelism::None);
                    (rows.clone(), tile)
                },
            )
            .collect();
        // Each channel plane gathers its rows from every tile, plus the bias (and ReLU).
        out.par_chunks_mut(g.hw())
            .enumerate()
            .for_each(|(c, plane)| {
                let b = bias[c];
                for (rows, tile) in &results {
                    let n = rows.len() * g.w;
                    let pairs = plane[rows.start * g.w..][..n]
                        .iter_mut()
                        .zip(&tile[c * n..][..n]);
                    if relu {
                        pairs.for_each(|(o, &t)| *o = if t + b < zero { zero } else { t + b });
                    } else {
                        pairs.for_each(|(o, &t)| *o = t + b);
                    }
                }
            });
    }
}

/// What a backward pass reads: the op's input and weight, the gradient of its output, and
/// for a conv + ReLU that output: the gradient is zeroed where it is zero.
#[derive(Clone, Copy)]
struct Backward<'a, T> {
    x: &'a [T],
    weight: &'a [T],
    grad_out: &'a [T],
    relu_out: Option<&'a [T]>,
    /// Whether the input gradient is wanted (not for the images into the first conv).
    need_input: bool,
}

impl<'a, T: WithDType> Backward<'a, T> {
    /// The output gradient through the ReLU's mask, in one parallel pass (borrowed as it is
    /// when there is no ReLU).
    fn masked_grad(&self) -> Cow<'a, [T]> {
        let zero = T::from_f64(0.0);
        match self.relu_out {
            Some(out) => Cow::Owned(
                self.grad_out
                    .par_iter()
                    .zip(out)
                    .map(|(&d, &y)| if y > zero { d } else { zero })
                    .collect(),
            ),
            None => Cow::Borrowed(self.grad_out),
        }
    }
}

/// (grad_input, grad_weight, grad_bias) in the layouts of input, weight and bias.
type Grads<T> = (Vec<T>, Vec<T>, Vec<T>);

/// The gradients; grad_input stays zero unless `need_input`.
fn backward<T: WithDType>(g: Geometry, b: Backward<T>) -> Grads<T> {
    if small::applies(g) {
        return small::backward(g, b);
    }
    let zero = T::from_f64(0.0);
    if b.x.is_empty() || b.grad_out.is_empty() {
        return (
            vec![zero; b.x.len()],
            vec![zero; g.c_out * g.k()],
            vec![zero; g.c_out],
        );
    }
    // Winograd where it is faster: for the input gradient (a convolution of the output
    // gradient) rather than dcols = W^T x dout and col2im, and for the weight gradient rather
    // than cols x dout^T, except where the whole batch runs as one task (block 4 at 32x32:
    // there the per-thread partial sums, 16/9 of the weight each, cost more than they save).
    // The ReLU's mask is then applied once, up front.
    let dx_by_winograd = b.need_input && winograd::applies(g.transposed());
    let dw_by_winograd =
        winograd::applies(g) && Plan::whole_batch(g).is_none() && (dx_by_winograd || !b.need_input);
    if !(dx_by_winograd || dw_by_winograd) {
        return backward_tiles(g, b);
    }
    let grad_out = b.masked_grad();
    let grad_in = if dx_by_winograd {
        let u = winograd::transform_weight(b.weight, g.c_out, g.c_in, true);
        winograd::conv(g.transposed(), &grad_out, &u, None, false)
    } else {
        vec![zero; b.x.len()]
    };
    let (grad_weight, grad_bias) = if dw_by_winograd {
        let grad_weight = winograd::weight_grad(g, b.x, &grad_out);
        (grad_weight, bias_grad(g, &grad_out))
    } else {
        let masked = Backward {
            grad_out: &grad_out,
            relu_out: None,
            need_input: false,
            ..b
        };
        let (_, grad_weight, grad_bias) = backward_tiles(g, masked);
        (grad_weight, grad_bias)
    };
    (grad_in, grad_weight, grad_bias)
}

/// The bias gradient: `grad_out` [batch, c_out, h, w] summed over all but the channels; one
/// partial per thread's share of the images, added in a fixed order (reproducible runs).
fn bias_grad<T: WithDType>(g: Geometry, grad_out: &[T]) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let per_thread = g.batch.div_ceil(rayon::current_num_threads()).max(1);
    let parts: Vec<Vec<T>> = grad_out
        .par_chunks(per_thread * g.c_out * g.hw())
        .map(|images| {
            let mut sums = vec![zero; g.c_out];
            for image in images.chunks_exact(g.c_out * g.hw()) {
                for (s, plane) in sums.iter_mut().zip(image.chunks_exact(g.hw())) {
                    *s += plane.iter().fold(zero, |a, &v| a + v);
                }
            }
            sums
        })
        .collect();
    let mut sums = vec![zero; g.c_out];
    for part in &parts {
        sums.iter_mut().zip(part).for_each(|(a, &b)| *a += b);
    }
    sums
}

/// [`backward`] through im2col, a tile of the batch at a time.
fn backward_tiles<T: WithDType>(g: Geometry, b: Backward<T>) -> Grads<T> {
    let Backward {
        x,
        weight,
        grad_out,
        relu_out,
        need_input,
    } = b;
    let zero = T::from_f64(0.0);
    let mut grad_in = vec![zero; g.batch * g.c_in * g.hw()];
    let weight_len = g.c_out * g.k();
    let plan = Plan::whole_batch(g).unwrap_or_else(|| Plan::new(g));
    let par = plan.par();
    let n_max = plan.max_columns(g);
    // W^T [9 c_in, c_out], read in place from W [c_out, 9 c_in].
    let w_t = Mat::row_major(weight, g.c_out, g.k()).t();
    // One job per thread, each a fixed run of `tasks_per_job` tasks with its own partial sums
    // of dW^T and the bias gradient; the parts are then added in job order, so a run gives
    // the same gradients every time.
    let (in_task, out_task) = (
        plan.images * g.c_in * g.hw(),
        plan.images * g.c_out * g.hw(),
    );
    let job = plan.tasks_per_job;
    let (grad_weight_t, grad_bias_parts): (Vec<_>, Vec<_>) = grad_in
        .par_chunks_mut(job * in_task)
        .zip(x.par_chunks(job * in_task))
        .zip(grad_out.par_chunks(job * out_task))
        .enumerate()
        .map(|(j, ((grad_in, x), grad_out))| {
            let mut grad_weight_t = vec![zero; weight_len];
            let mut grad_bias = vec![zero; g.c_out];
            let relu_out = relu_out.map(|o| &o[j * job * out_task..][..grad_out.len()]);
            scratch::with((g.k() + g.c_out) * n_max, |buffer: &mut [T]| {
                let (cols_buffer, dout_buffer) = buffer.split_at_mut(g.k() * n_max);
                let tasks = grad_in
                    .chunks_mut(in_task)
                    .zip(x.chunks(in_task))
                    .zip(grad_out.chunks(out_task))
                    .enumerate();
                for (t, ((grad_in, x), grad_out)) in tasks {
                    let images = x.len() / (g.c_in * g.hw());
                    let relu_out = relu_out.map(|o| &o[t * out_task..][..grad_out.len()]);
                    for rows in plan.tiles(g) {
                        let n = images * rows.len() * g.w;
                        let cols = &mut cols_buffer[..g.k() * n];
                        let dout_t = &mut dout_buffer[..g.c_out * n];
                        pixels_of_grad(g, rows.clone(), grad_out, relu_out, dout_t, par);
                        for row in dout_t.chunks_exact(g.c_out) {
                            grad_bias.iter_mut().zip(row).for_each(|(b, &d)| *b += d);
                        }
                        im2col(g, x, rows.clone(), cols, par);
                        // dW^T += cols x dout^T, summed over tiles and tasks. With the gradient
                        // tile pixel-major, both operands are row-major, the orientation gemm
                        // runs fastest at VGG's shapes (dW += dout x cols^T is up to 3x slower
                        // on one thread for the 64-channel layers, a column-major dout^T 1.3x:
                        // `examples/gemm_orient.rs`).
                        let dout_t = Mat::row_major(dout_t, n, g.c_out);
                        let cols_mat = Mat::row_major(cols, g.k(), n);
                        matmul(&mut grad_weight_t, true, cols_mat, dout_t, plan.gemm_par);
                        if need_input {
                            // dcols = W^T x dout, reusing the cols buffer now that dW has it.
                            matmul(cols, false, w_t, dout_t.t(), plan.gemm_par);
                            col2im(g, cols, rows, grad_in, par);
                        }
                    }
                }
            });
            (grad_weight_t, grad_bias)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .unzip();
    let mut grad_bias = vec![zero; g.c_out];
    for part in &grad_bias_parts {
        grad_bias.iter_mut().zip(part).for_each(|(a, &b)| *a += b);
    }
    // The threads' [9 c_in, c_out] sums, added and turned into the weight's [c_out, 9 c_in].
    let grad_weight = transpose_sum(&grad_weight_t, g.k(), g.c_out);
    (grad_in, grad_weight, grad_bias)
}
