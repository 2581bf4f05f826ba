//! The host-side decisions of the CUDA form, kept apart from the launches so that they are
//! tested on machines without a GPU: launch grids, the bias gradient's chunks, and which of
//! cuDNN's measured convolution algorithms runs.

// Used by the launches, which only a `cuda` build compiles; the tests run everywhere.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use crate::map_order::Order;

/// Threads per block of every kernel here; `bias_act.cu`'s reduction assumes it (`BLOCK`).
pub(crate) const BLOCK: u32 = 256;

/// Blocks of a grid-stride launch at most: enough to fill any current GPU many times over,
/// while each thread of a very large tensor loops over several elements.
const MAX_BLOCKS: usize = 1 << 16;

/// The grid of a one-thread-per-element kernel over `total` elements (grid-stride loops).
pub(crate) fn elementwise_blocks(total: usize) -> u32 {
    total.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32
}

/// A contiguous tensor of `dims` viewed as [outer, len, inner] around `axis`: the layout every
/// bias kernel (CPU and CUDA) works in.
pub(crate) fn split_at_axis(dims: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = dims[..axis].iter().product();
    let inner = dims[axis + 1..].iter().product();
    (outer, dims[axis], inner)
}

/// How the bias gradient splits each channel's `count` elements among blocks: a block sums
/// `per_chunk` consecutive elements (at least a few per thread), and at most 4096 chunks a
/// channel, so the second pass over the partial sums stays short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Chunks {
    pub chunks: usize,
    pub per_chunk: usize,
}

pub(crate) fn channel_chunks(count: usize) -> Chunks {
    const TARGET: usize = 8 * BLOCK as usize;
    const MAX_CHUNKS: usize = 4096;
    let per_chunk = TARGET.max(count.div_ceil(MAX_CHUNKS));
    Chunks {
        chunks: count.div_ceil(per_chunk).max(1),
        per_chunk,
    }
}

/// `attention.cu`'s tile (queries and keys a block takes at once) and its widest query/key
/// rows: wider ones run the generic form.
pub(crate) const ATTENTION_TILE: usize = 16;
pub(crate) const ATTENTION_D_MAX: usize = 64;

/// The value columns one pass of `attention.cu` takes for values `c` wide with elements of
/// `elem_bytes`: a power of two from 16 (so a block's 256 threads cover at most the tile's 16
/// rows) to 512 / `elem_bytes` (128 for f32, 64 for f64: the kernels' shared memory then stays
/// under 48 KiB), the largest that is no wider than c.
pub(crate) fn attention_chunk(c: usize, elem_bytes: usize) -> usize {
    let widest = 512 / elem_bytes;
    let fit = if c == 0 { 1 } else { 1 << c.ilog2() };
    fit.clamp(16, widest)
}

/// One product of `gemm.cu` (its fields mean what they mean there):
/// `C[z][i][j] = start + sum over (ko, ki) of A(z, i, ko, ki) B(z, ko, ki, j)`, for z < the
/// launch's batch, i < m, j < n, ko < k_outer, ki < k_inner, each operand at its strides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct GemmShape {
    pub m: i64,
    pub n: i64,
    pub k_outer: i64,
    pub k_inner: i64,
    pub a_batch: i64,
    pub a_row: i64,
    pub a_k_outer: i64,
    pub a_k_inner: i64,
    pub b_batch: i64,
    pub b_k_outer: i64,
    pub b_k_inner: i64,
    pub b_col: i64,
    pub c_batch: i64,
    pub c_row: i64,
    pub c_col: i64,
    /// 1: C starts at the bias of its row.
    pub bias_rows: i32,
    /// 1: C starts at its old value.
    pub accumulate: i32,
}

/// `gemm.cu`'s tile of C per block.
pub(crate) const GEMM_TILE: usize = 64;

impl GemmShape {
    /// The grid: one block per 64 x 64 tile of C, per batch entry.
    pub fn blocks(&self, batch: usize) -> (u32, u32, u32) {
        let tiles = |v: i64| (v as usize).div_ceil(GEMM_TILE).max(1) as u32;
        (tiles(self.n), tiles(self.m), batch.max(1) as u32)
    }

    /// The same product with its two k loops as one where both operands step through them
    /// evenly (tokens of several images in a row), so that tiles of k are not cut at each
    /// image's end.
    pub fn merged(self) -> Self {
        let even = |outer: i64, inner: i64| outer == inner * self.k_inner;
        if self.k_outer > 1
            && even(self.a_k_outer, self.a_k_inner)
            && even(self.b_k_outer, self.b_k_inner)
        {
            Self {
                k_inner: self.k_outer * self.k_inner,
                k_outer: 1,
                a_k_outer: 0,
                b_k_outer: 0,
                ..self
            }
        } else {
            self
        }
    }
}

/// A projection's three products (`crate::projection::project` on CUDA): the forward
/// `y = W x + bias`, the input gradient `W^T dy` (both batched over the images) and the weight
/// gradient `sum over images and positions of dy x^T` (one product).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProjectionProducts {
    pub forward: GemmShape,
    pub input_grad: GemmShape,
    pub weight_grad: GemmShape,
}

/// (image, channel, position) strides of a batch of maps of `channels` x `positions`.
fn map_strides(order: Order, channels: usize, positions: usize) -> [i64; 3] {
    let (c, n) = (channels as i64, positions as i64);
    match order {
        Order::Channels => [c * n, n, 1],
        Order::Tokens => [n * c, 1, c],
    }
}

pub(crate) fn projection_products(
    [batch, c_in, c_out, positions]: [usize; 4],
    from: Order,
    to: Order,
) -> ProjectionProducts {
    let x = map_strides(from, c_in, positions);
    let y = map_strides(to, c_out, positions);
    let (c_in, c_out, n) = (c_in as i64, c_out as i64, positions as i64);
    let forward = GemmShape {
        m: c_out,
        n,
        k_outer: 1,
        k_inner: c_in,
        a_row: c_in,
        a_k_inner: 1,
        b_batch: x[0],
        b_k_inner: x[1],
        b_col: x[2],
        c_batch: y[0],
        c_row: y[1],
        c_col: y[2],
        bias_rows: 1,
        ..GemmShape::default()
    };
    let input_grad = GemmShape {
        m: c_in,
        n,
        k_outer: 1,
        k_inner: c_out,
        a_row: 1,
        a_k_inner: c_in,
        b_batch: y[0],
        b_k_inner: y[1],
        b_col: y[2],
        c_batch: x[0],
        c_row: x[1],
        c_col: x[2],
        ..GemmShape::default()
    };
    let weight_grad = GemmShape {
        m: c_out,
        n: c_in,
        k_outer: batch as i64,
        k_inner: n,
        a_row: y[1],
        a_k_outer: y[0],
        a_k_inner: y[2],
        b_k_outer: x[0],
        b_k_inner: x[2],
        b_col: x[1],
        c_row: c_in,
        c_col: 1,
        ..GemmShape::default()
    }
    .merged();
    ProjectionProducts {
        forward,
        input_grad,
        weight_grad,
    }
}

/// The table through which one launch reaches many tensors (`squares.cu`, `sgd.cu`'s
/// `sgd_many`): `columns` device pointers per tensor (left at 0 for the caller: column k's
/// pointer of tensor t at `k * lens.len() + t`), then each tensor split into chunks of at most
/// `SQUARES_CHUNK` elements (an empty one gets none) as [chunk's tensor | chunk's start |
/// chunk's end | first chunk of each tensor], all i64; and the number of chunks.
pub(crate) fn chunk_table(lens: &[usize], columns: usize) -> (Vec<i64>, usize) {
    let n = lens.len();
    let (mut tensor, mut start, mut end, mut first) = (vec![], vec![], vec![], vec![0i64]);
    for (t, &len) in lens.iter().enumerate() {
        for s in (0..len).step_by(SQUARES_CHUNK) {
            tensor.push(t as i64);
            start.push(s as i64);
            end.push((s + SQUARES_CHUNK).min(len) as i64);
        }
        first.push(tensor.len() as i64);
    }
    let chunks = tensor.len();
    let table = [vec![0; columns * n], tensor, start, end, first].concat();
    (table, chunks)
}

/// Elements a block of `squares.cu` or `sgd_many` takes at most.
pub(crate) const SQUARES_CHUNK: usize = 1 << 16;

/// The channels of one bias launch at most: they are the grid's y dimension.
pub(crate) const MAX_CHANNELS: usize = 65_535;

/// One algorithm as cuDNN's `cudnnFind*` measured it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Measured<A> {
    pub algo: A,
    /// cuDNN ran it (CUDNN_STATUS_SUCCESS).
    pub ran: bool,
    pub time_ms: f32,
    pub workspace: usize,
    pub deterministic: bool,
}

/// The workspace an algorithm may ask for at most (the largest of VGG16's at 224x224,
/// batch 32, needs well under this).
pub(crate) const MAX_WORKSPACE: usize = 1 << 30;

/// The fastest algorithm that ran, is deterministic (so a run repeats to the digit, as on the
/// CPU; what PyTorch does with `cudnn.deterministic`) and fits [`MAX_WORKSPACE`]; ties go to
/// cuDNN's own order. `None` when none qualifies.
pub(crate) fn fastest<A: Copy>(measured: &[Measured<A>]) -> Option<Measured<A>> {
    measured
        .iter()
        .filter(|m| m.ran && m.deterministic && m.workspace <= MAX_WORKSPACE)
        .fold(None, |best: Option<Measured<A>>, m| match best {
            Some(b) if b.time_ms <= m.time_ms => Some(b),
            _ => Some(*m),
        })
}

/// A convolution's shape, dtype and math, the key of its cached cuDNN plan: descriptors, the
/// three chosen algorithms and their workspace sizes are found once per key, as PyTorch's
/// `cudnn.benchmark` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConvKey {
    pub f64: bool,
    /// f32 data with TF32 products allowed (`--precision tf32`).
    pub tf32: bool,
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
}

impl ConvKey {
    /// The dims as cuDNN's C ints, or an error naming the dim that does not fit.
    pub fn dims(&self) -> Result<[i32; 5], String> {
        let fit = |v: usize, name: &str| {
            i32::try_from(v)
                .map_err(|_| format!("conv3x3 on CUDA: {name} = {v} exceeds cuDNN's int"))
        };
        Ok([
            fit(self.batch, "batch")?,
            fit(self.c_in, "c_in")?,
            fit(self.c_out, "c_out")?,
            fit(self.h, "h")?,
            fit(self.w, "w")?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_grids_cover_every_element_and_stay_bounded() {
        assert_eq!(elementwise_blocks(0), 1);
        assert_eq!(elementwise_blocks(1), 1);
        assert_eq!(elementwise_blocks(256), 1);
        assert_eq!(elementwise_blocks(257), 2);
        // VGG16's largest map at 224x224, batch 32: grid-stride beyond the cap.
        let total = 32 * 64 * 224 * 224;
        assert_eq!(elementwise_blocks(total) as usize, MAX_BLOCKS);
    }

    /// What the two launches of the bias gradient compute, replayed on the CPU: partial sums
    /// of each chunk, then the chunks in order.
    fn chunked_sum(values: &[f64]) -> f64 {
        let Chunks { chunks, per_chunk } = channel_chunks(values.len());
        (0..chunks)
            .map(|k| {
                let end = values.len().min((k + 1) * per_chunk);
                values[(k * per_chunk).min(end)..end].iter().sum::<f64>()
            })
            .sum()
    }

    #[test]
    fn channel_chunks_split_every_count_without_gaps_or_overlap() {
        for count in [0, 1, 255, 2048, 2049, 100_000, 32 * 224 * 224, 1 << 28] {
            let c = channel_chunks(count);
            assert!(c.chunks >= 1 && c.chunks <= 4096, "{count}: {c:?}");
            assert!(c.chunks * c.per_chunk >= count, "{count}: {c:?}");
            assert!(
                count == 0 || (c.chunks - 1) * c.per_chunk < count,
                "{count}: {c:?}"
            );
        }
        let values: Vec<f64> = (0..10_001).map(|i| (i % 7) as f64).collect();
        assert_eq!(chunked_sum(&values), values.iter().sum::<f64>());
    }

    fn m(algo: u8, ran: bool, time_ms: f32, workspace: usize, deterministic: bool) -> Measured<u8> {
        Measured {
            algo,
            ran,
            time_ms,
            workspace,
            deterministic,
        }
    }

    #[test]
    fn the_fastest_deterministic_algorithm_that_ran_and_fits_is_chosen() {
        let measured = [
            m(0, true, 0.5, 0, false),                // faster, but not deterministic
            m(1, false, 0.1, 0, true),                // did not run
            m(2, true, 0.2, MAX_WORKSPACE + 1, true), // needs too much memory
            m(3, true, 0.9, 0, true),
            m(4, true, 0.7, 1 << 20, true),
            m(5, true, 0.7, 0, true), // a tie: cuDNN's order decides
        ];
        assert_eq!(fastest(&measured).map(|m| m.algo), Some(4));
        assert!(fastest(&measured[..3]).is_none());
        assert!(fastest::<u8>(&[]).is_none());
    }

    #[test]
    fn attention_chunks_are_powers_of_two_within_the_shared_memory() {
        // VGG's value widths, the digits' width-0.25 ones, and odd ones.
        for (c, f32_chunk, f64_chunk) in [
            (512, 128, 64),
            (256, 128, 64),
            (64, 64, 64),
            (32, 32, 32),
            (16, 16, 16),
            (8, 16, 16),
            (96, 64, 64),
            (24, 16, 16),
        ] {
            assert_eq!(attention_chunk(c, 4), f32_chunk, "c = {c}");
            assert_eq!(attention_chunk(c, 8), f64_chunk, "c = {c}");
            // A block's threads cover the tile's rows: 256 / chunk rows at a time, at most 16.
            assert!(256 / attention_chunk(c, 4) <= ATTENTION_TILE);
        }
    }

    #[test]
    fn a_weight_gradient_over_token_rows_is_one_run_of_k() {
        // Tokens: each image's rows follow the last one's, so the sum over images and
        // positions is one k loop; channel-first maps keep the two loops.
        let tokens = projection_products([8, 16, 32, 49], Order::Tokens, Order::Tokens);
        assert_eq!(
            (tokens.weight_grad.k_outer, tokens.weight_grad.k_inner),
            (1, 8 * 49)
        );
        let maps = projection_products([8, 16, 32, 49], Order::Channels, Order::Tokens);
        assert_eq!(
            (maps.weight_grad.k_outer, maps.weight_grad.k_inner),
            (8, 49)
        );
        assert_eq!(maps.forward.blocks(8), (1, 1, 8));
        assert_eq!(maps.weight_grad.blocks(1), (1, 1, 1));
        let wide = projection_products([2, 512, 512, 3136], Order::Channels, Order::Channels);
        assert_eq!(wide.forward.blocks(2), (49, 8, 2));
    }

    #[test]
    fn the_squares_table_chunks_every_tensor_in_order() {
        let lens = [3, 0, SQUARES_CHUNK + 1, SQUARES_CHUNK];
        let (table, chunks) = chunk_table(&lens, 1);
        assert_eq!(chunks, 4);
        let n = lens.len();
        let part = |k: usize| &table[n + k * chunks..n + (k + 1) * chunks];
        assert_eq!(part(0), [0, 2, 2, 3]); // the chunks' tensors: none for the empty one
        assert_eq!(part(1), [0, 0, SQUARES_CHUNK as i64, 0]);
        assert_eq!(
            part(2),
            [
                3,
                SQUARES_CHUNK as i64,
                SQUARES_CHUNK as i64 + 1,
                SQUARES_CHUNK as i64
            ]
        );
        assert_eq!(&table[n + 3 * chunks..], [0, 1, 1, 3, 4]);
        assert_eq!(table.len(), n + 3 * chunks + n + 1);
        // Three pointers a tensor (SGD's weight, gradient and buffer) shift the rest.
        let (three, _) = chunk_table(&lens, 3);
        assert_eq!(&three[3 * n..], &table[n..]);
    }

    #[test]
    fn conv_keys_name_a_dim_that_does_not_fit_cudnn() {
        let key = ConvKey {
            f64: false,
            tf32: false,
            batch: 32,
            c_in: 64,
            c_out: 128,
            h: 224,
            w: 224,
        };
        assert_eq!(key.dims(), Ok([32, 64, 128, 224, 224]));
        let big = ConvKey {
            batch: 1 << 31,
            ..key
        };
        assert!(big.dims().unwrap_err().contains("batch"));
    }
}
