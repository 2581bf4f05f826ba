//! A Linear layer applied at every position of a batch of maps, from either of two orders to
//! either: channel-first `[b, c, n]` (a conv's map, flattened) or token rows `[b, n, c]` (what
//! the softmax attention kernel reads).
//!
//! Why not a transpose, a matmul and a bias add: Candle's graph keeps each of those tensors
//! alive until the backward pass, and the softmax module held seven map-sized tensors for its
//! four projections (0.9 GB at block 1 at 224x224, batch 8). Here the change of order is in
//! the product's strides, and the bias is written into the destination before the product
//! adds to it: one tensor and one pass per projection.

use candle_core::{CpuStorage, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu::{data, sum_lanes, with_float, with_slices};
use crate::gemm::{matmul_strided, Mat};
use crate::kernel::{apply, Grad, Input, Kernel};

pub use crate::map_order::Order;

impl Order {
    /// One map (`data`, this order) as its `[channels, positions]` matrix.
    fn matrix<T>(self, data: &[T], channels: usize, positions: usize) -> Mat<'_, T> {
        let (rs, cs) = self.strides(channels, positions);
        Mat {
            data,
            rows: channels,
            cols: positions,
            rs,
            cs,
        }
    }
}

/// `weight x + bias` at every position of `x`, read in order `from` and written in order
/// `to`: `x` `[b, c_in, n]` or `[b, n, c_in]`, `weight` `[c_out, c_in]`, `bias` `[c_out]`;
/// returns `[b, c_out, n]` or `[b, n, c_out]`. The CPU kernel for f32/f64 on the CPU, the
/// CUDA kernels (`cuda/gemm.cu`) for f32/f64 on CUDA, otherwise [`project_generic`].
pub fn project(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    from: Order,
    to: Order,
) -> Result<Tensor> {
    let (c_out, c_in) = weight.dims2()?;
    let (_, rows, cols) = x.dims3()?;
    let channels = if from == Order::Channels { rows } else { cols };
    if channels != c_in || bias.dims() != [c_out] {
        candle_core::bail!(
            "project: weight {:?} and bias {:?} do not fit {from:?}-order input {:?} (want [c_out, {channels}] and [c_out])",
            weight.dims(),
            bias.dims(),
            x.dims()
        )
    }
    #[cfg(feature = "cuda")]
    if crate::cuda_path(&[x, weight, bias])? {
        return crate::cuda::project(x, weight, bias, from, to);
    }
    if !crate::fast_path(&[x, weight, bias])? {
        return project_generic(x, weight, bias, from, to);
    }
    let inputs = [&x.contiguous()?, &weight.contiguous()?, &bias.contiguous()?];
    apply("project", inputs, Projection { from, to })
}

/// [`project`] as Candle ops (a broadcast matmul, `broadcast_add` and transposes), on any
/// device and dtype.
pub fn project_generic(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    from: Order,
    to: Order,
) -> Result<Tensor> {
    let channel_first = match from {
        Order::Channels => x.clone(),
        Order::Tokens => x.transpose(1, 2)?,
    };
    let y = weight
        .broadcast_left(x.dim(0)?)?
        .matmul(&channel_first.contiguous()?)?
        .broadcast_add(&bias.reshape((1, (), 1))?)?;
    match to {
        Order::Channels => Ok(y),
        Order::Tokens => y.transpose(1, 2)?.contiguous(),
    }
}

struct Projection {
    from: Order,
    to: Order,
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Shapes {
    batch: usize,
    c_in: usize,
    c_out: usize,
    positions: usize,
    from: Order,
    to: Order,
}

impl Shapes {
    fn new(op: &Projection, x: &[usize], weight: &[usize]) -> Self {
        let (c_in, positions) = op.from.channels_positions(x);
        Self {
            batch: x[0],
            c_in,
            c_out: weight[0],
            positions,
            from: op.from,
            to: op.to,
        }
    }

    /// Maps per product: enough positions that the product pays for packing the weight,
    /// which gemm does on every call (VGG16's block 5 at 32x32 has 4 positions a map, and
    /// one product per map spent 20 times its arithmetic), but no fewer groups than threads.
    fn maps_per_product(self) -> usize {
        let per_thread = self.batch.div_ceil(rayon::current_num_threads().max(1));
        (POSITIONS_PER_PRODUCT / self.positions.max(1)).clamp(1, per_thread.max(1))
    }

    /// The gemm's own threads: none when every thread has `tasks` of its own.
    fn inner_parallelism(tasks: usize) -> gemm::Parallelism {
        match rayon::current_num_threads() {
            threads if threads <= 1 || tasks >= threads => gemm::Parallelism::None,
            threads => gemm::Parallelism::Rayon(threads),
        }
    }
}

/// See [`Shapes::maps_per_product`].
const POSITIONS_PER_PRODUCT: usize = 256;

/// `maps` consecutive maps (`data`, in `order`) as one `[channels, maps x positions]`
/// matrix: a view where the order allows (token rows, or a single map), else a copy in token
/// order into `buffer`.
fn group_matrix<'a, T: WithDType>(
    order: Order,
    data: &'a [T],
    (channels, positions, maps): (usize, usize, usize),
    buffer: &'a mut Vec<T>,
) -> Mat<'a, T> {
    let cols = maps * positions;
    let map = channels * positions;
    if order == Order::Tokens || maps == 1 || map == 0 {
        return order.matrix(data, channels, cols);
    }
    buffer.clear();
    buffer.resize(cols * channels, T::zero());
    for (map, tokens) in data.chunks_exact(map).zip(buffer.chunks_exact_mut(map)) {
        for (position, token) in tokens.chunks_exact_mut(channels).enumerate() {
            token
                .iter_mut()
                .enumerate()
                .for_each(|(c, t)| *t = map[c * positions + position]);
        }
    }
    Order::Tokens.matrix(buffer, channels, cols)
}

/// Where a product for `maps` maps in `order` is written: `dst` itself, with its strides
/// (token rows, or a single map), or `buffer` in token order, to be copied to `dst` by
/// [`scatter`] afterwards (then the flag is true).
fn group_destination<'a, T: WithDType>(
    order: Order,
    dst: &'a mut [T],
    (channels, positions, maps): (usize, usize, usize),
    buffer: &'a mut Vec<T>,
) -> (&'a mut [T], (usize, usize), bool) {
    let cols = maps * positions;
    if order == Order::Tokens || maps == 1 {
        return (dst, order.strides(channels, cols), false);
    }
    buffer.clear();
    buffer.resize(cols * channels, T::zero());
    (buffer, Order::Tokens.strides(channels, cols), true)
}

/// Token-order `tokens` of `maps` maps copied into channel-first `dst`.
fn scatter<T: WithDType>(tokens: &[T], dst: &mut [T], channels: usize, positions: usize) {
    let map = channels * positions;
    if map == 0 {
        return;
    }
    for (tokens, dst) in tokens.chunks_exact(map).zip(dst.chunks_exact_mut(map)) {
        for (position, token) in tokens.chunks_exact(channels).enumerate() {
            token
                .iter()
                .enumerate()
                .for_each(|(c, &t)| dst[c * positions + position] = t);
        }
    }
}

fn forward<T: WithDType>(s: Shapes, x: &[T], weight: &[T], bias: &[T]) -> Vec<T> {
    let (map_in, map_out) = (s.c_in * s.positions, s.c_out * s.positions);
    let mut out = vec![T::zero(); s.batch * map_out];
    if out.is_empty() {
        return out;
    }
    let weight = Mat::row_major(weight, s.c_out, s.c_in);
    let maps = s.maps_per_product();
    let par = Shapes::inner_parallelism(s.batch.div_ceil(maps));
    out.par_chunks_mut(maps * map_out)
        .enumerate()
        .for_each(|(group, y)| {
            let count = y.len() / map_out;
            let (mut x_buffer, mut y_buffer) = (Vec::new(), Vec::new());
            let sizes = |channels| (channels, s.positions, count);
            let (dst, (rs, cs), copy) = group_destination(s.to, y, sizes(s.c_out), &mut y_buffer);
            // The bias first: the product adds to it.
            for column in 0..count * s.positions {
                for (row, &b) in bias.iter().enumerate() {
                    dst[row * rs + column * cs] = b;
                }
            }
            if s.c_in > 0 {
                let x = &x[group * maps * map_in..][..count * map_in];
                let x = group_matrix(s.from, x, sizes(s.c_in), &mut x_buffer);
                matmul_strided(dst, (rs, cs), true, T::one(), weight, x, par);
            }
            if copy {
                scatter(&y_buffer, y, s.c_out, s.positions);
            }
        });
    out
}

/// What the backward pass reads: the input, the weight and the output's gradient.
struct Backward<'a, T> {
    x: &'a [T],
    weight: &'a [T],
    grad: &'a [T],
}

/// The gradients of the input (empty unless `need_input`), the weight and the bias.
fn backward<T: WithDType>(s: Shapes, b: Backward<T>, need_input: bool) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (map_in, map_out) = (s.c_in * s.positions, s.c_out * s.positions);
    let zero = T::zero();
    let need_input = need_input && map_in > 0;
    let mut grad_x = vec![zero; if need_input { s.batch * map_in } else { 0 }];
    if s.batch == 0 || s.positions == 0 {
        return (grad_x, vec![zero; s.c_out * s.c_in], vec![zero; s.c_out]);
    }
    // Each task runs consecutive groups of maps and keeps its own partial sums of the weight's
    // and the bias's gradients, added in order afterwards so that a run is reproducible.
    let maps = s.maps_per_product();
    let groups = s.batch.div_ceil(maps);
    let maps_per_task = maps * groups.div_ceil(rayon::current_num_threads().max(1));
    let tasks = s.batch.div_ceil(maps_per_task);
    let par = Shapes::inner_parallelism(tasks);
    let weight_t = Mat::row_major(b.weight, s.c_out, s.c_in).t();
    let task = |task: usize, mut grad_x: Option<&mut [T]>| {
        let mut grad_w = vec![zero; s.c_out * s.c_in];
        let mut grad_b = vec![zero; s.c_out];
        let first = task * maps_per_task;
        let (mut x_buffer, mut grad_buffer, mut dx_buffer) = (Vec::new(), Vec::new(), Vec::new());
        for start in (first..(first + maps_per_task).min(s.batch)).step_by(maps) {
            let count = maps.min(s.batch - start);
            let sizes = |channels| (channels, s.positions, count);
            let grad = &b.grad[start * map_out..][..count * map_out];
            let grad = group_matrix(s.to, grad, sizes(s.c_out), &mut grad_buffer);
            // dX [c_in, n] = W^T [c_in, c_out] x dY [c_out, n].
            if let Some(grad_x) = grad_x.as_deref_mut() {
                let dx = &mut grad_x[(start - first) * map_in..][..count * map_in];
                let (dst, strides, copy) =
                    group_destination(s.from, dx, sizes(s.c_in), &mut dx_buffer);
                if s.c_out > 0 {
                    matmul_strided(dst, strides, false, T::one(), weight_t, grad, par);
                }
                if copy {
                    scatter(&dx_buffer, dx, s.c_in, s.positions);
                }
            }
            // dW [c_out, c_in] += dY [c_out, n] x X^T [n, c_in]; the bias's, the sum of dY.
            if s.c_in > 0 {
                let x = &b.x[start * map_in..][..count * map_in];
                let x_t = group_matrix(s.from, x, sizes(s.c_in), &mut x_buffer).t();
                matmul_strided(&mut grad_w, (s.c_in, 1), true, T::one(), grad, x_t, par);
            }
            if grad.cs == 1 {
                for (row, sum) in grad_b.iter_mut().enumerate() {
                    *sum += sum_lanes(&grad.data[row * grad.rs..][..grad.cols]);
                }
            } else if s.c_out > 0 {
                // Token rows: add each position's gradient, one contiguous row at a time.
                for token in grad.data.chunks_exact(grad.cs).take(grad.cols) {
                    grad_b.iter_mut().zip(token).for_each(|(sum, &g)| *sum += g);
                }
            }
        }
        (grad_w, grad_b)
    };
    let partials: Vec<(Vec<T>, Vec<T>)> = if need_input {
        grad_x
            .par_chunks_mut(maps_per_task * map_in)
            .enumerate()
            .map(|(t, dx)| task(t, Some(dx)))
            .collect()
    } else {
        (0..tasks).into_par_iter().map(|t| task(t, None)).collect()
    };
    let add = |mut acc: Vec<T>, part: &[T]| {
        acc.iter_mut().zip(part).for_each(|(a, &p)| *a += p);
        acc
    };
    let grad_w = partials
        .iter()
        .fold(vec![zero; s.c_out * s.c_in], |acc, p| add(acc, &p.0));
    let grad_b = partials
        .iter()
        .fold(vec![zero; s.c_out], |acc, p| add(acc, &p.1));
    (grad_x, grad_w, grad_b)
}

impl Kernel<3> for Projection {
    fn cpu_forward(&self, inputs: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
        let [(s1, l1), (s2, l2), (s3, l3)] = inputs;
        let s = Shapes::new(self, l1.dims(), l2.dims());
        let out = with_float!("project", s1.dtype(), T => T::to_cpu_storage_owned(
            forward::<T>(s, data(s1, l1)?, data(s2, l2)?, data(s3, l3)?),
        ));
        Ok((
            out,
            Shape::from(s.to.dims(s.batch, s.c_out, s.positions).to_vec()),
        ))
    }

    fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
        let [x, weight, bias] = g.inputs;
        let s = Shapes::new(self, x.dims(), weight.dims());
        let grad = g.grad.contiguous()?;
        let need_input = x.track_op();
        fn run<T: WithDType>(
            s: Shapes,
            need_input: bool,
            [x, weight, bias, grad]: [&Tensor; 4],
        ) -> Result<[Tensor; 3]> {
            let (gx, gw, gb) = with_slices::<T, _, 3>([x, weight, grad], |[x, weight, grad]| {
                Ok(backward(s, Backward { x, weight, grad }, need_input))
            })?;
            // An input that wants no gradient gets none computed: an empty placeholder.
            let x_shape = if need_input {
                x.shape().clone()
            } else {
                Shape::from(0)
            };
            Ok([
                Tensor::from_vec(gx, x_shape, x.device())?,
                Tensor::from_vec(gw, weight.shape(), weight.device())?,
                Tensor::from_vec(gb, bias.shape(), bias.device())?,
            ])
        }
        let args = [x, weight, bias, &grad];
        let [gx, gw, gb] = with_float!("project", x.dtype(), T => run::<T>(s, need_input, args)?);
        let wanted = |t: Tensor, arg: &Tensor| arg.track_op().then_some(t);
        Ok([wanted(gx, x), wanted(gw, weight), wanted(gb, bias)])
    }
}
