//! Launches of `attention.cu`: exact softmax attention over contiguous q, k [b, n, d] and
//! v [b, n, c] in O(n) memory, one launch forward and three backward (the rows' delta, then dq,
//! then dk and dv). The rows' log-sum-exp travels from the forward to the backward.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, Result, Tensor};

use super::kernels::{elementwise, function, grid, tensor, with_view, Float, Module};
use super::plan::{attention_chunk, ATTENTION_D_MAX, ATTENTION_TILE, MAX_CHANNELS};

const ATTENTION: Module = Module {
    name: "la_kernels_attention",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")),
};

/// Whether the kernels take these sizes: query/key rows at most `ATTENTION_D_MAX` wide and a
/// batch that fits the grid's y dimension.
pub(crate) fn fits(b: usize, n: usize, d: usize) -> bool {
    d <= ATTENTION_D_MAX && b <= MAX_CHANNELS && n > 0 && d > 0
}

/// The sizes as the kernels take them: (n, d, cc) and the grid of one block a tile per image.
struct Sizes {
    n: i64,
    d: i32,
    c: i64,
    cc: i32,
    blocks: (u32, u32),
}

fn sizes<T: Float>([b, n, d, c]: [usize; 4]) -> Result<Sizes> {
    if !fits(b, n, d) || c == 0 {
        bail!("softmax attention on CUDA: q, k [{b}, {n}, {d}], v [{b}, {n}, {c}] do not fit")
    }
    let tiles = n.div_ceil(ATTENTION_TILE);
    Ok(Sizes {
        n: n as i64,
        d: d as i32,
        c: c as i64,
        cc: attention_chunk(c, std::mem::size_of::<T>()) as i32,
        blocks: (
            u32::try_from(tiles).map_err(|_| {
                candle_core::Error::Msg(format!(
                    "softmax attention on CUDA: {n} positions are too many"
                ))
            })?,
            b as u32,
        ),
    })
}

/// The output [b, n, c] and the rows' log-sum-exp [b, n].
pub(crate) fn forward<T: Float>(
    [q, k, v]: [&CudaView<T>; 3],
    dims: [usize; 4],
    scale: f64,
    dev: &CudaDevice,
) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
    let s = sizes::<T>(dims)?;
    let [b, n, _, c] = dims;
    let mut out = unsafe { dev.alloc::<T>(b * n * c) }?;
    let mut lse = unsafe { dev.alloc::<T>(b * n) }?;
    let scale = T::from_f64(scale);
    let f = function(dev, &ATTENTION, "attn_forward", T::SUFFIX)?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(&mut out)
        .arg(&mut lse)
        .arg(&s.n)
        .arg(&s.d)
        .arg(&s.c)
        .arg(&s.cc)
        .arg(&scale);
    unsafe { launch.launch(grid(s.blocks, 0)) }.w()?;
    Ok((out, lse))
}

/// The gradients of q, k and v from the inputs, the forward's output and log-sum-exp, and the
/// output's gradient (all contiguous).
pub(crate) fn backward<T: Float>(
    [q, k, v, out, grad_out]: [&Tensor; 5],
    lse: &Tensor,
    scale: f64,
) -> Result<[Tensor; 3]> {
    let (b, n, d) = q.dims3()?;
    let c = v.dim(2)?;
    if out.dims() != [b, n, c] || grad_out.dims() != [b, n, c] || lse.elem_count() != b * n {
        bail!(
            "softmax attention backward on CUDA: out {:?}, gradient {:?} for v {:?}",
            out.dims(),
            grad_out.dims(),
            v.dims()
        )
    }
    let s = sizes::<T>([b, n, d, c])?;
    let scale = T::from_f64(scale);
    with_view::<T, _>(q, |qs, dev| {
        with_view::<T, _>(k, |ks, _| {
            with_view::<T, _>(v, |vs, _| {
                with_view::<T, _>(out, |os, _| {
                    with_view::<T, _>(grad_out, |gs, _| {
                        with_view::<T, _>(lse, |ls, _| {
                            let stream = dev.cuda_stream();
                            let mut delta = unsafe { dev.alloc::<T>(b * n) }?;
                            let (rows, c_i) = ((b * n) as i64, c as i64);
                            let f = function(dev, &ATTENTION, "attn_delta", T::SUFFIX)?;
                            let mut launch = stream.launch_builder(&f);
                            launch.arg(os).arg(gs).arg(&mut delta).arg(&rows).arg(&c_i);
                            unsafe { launch.launch(elementwise(b * n)) }.w()?;

                            let mut dq = unsafe { dev.alloc::<T>(b * n * d) }?;
                            let f = function(dev, &ATTENTION, "attn_backward_dq", T::SUFFIX)?;
                            let mut launch = stream.launch_builder(&f);
                            launch
                                .arg(qs)
                                .arg(ks)
                                .arg(vs)
                                .arg(gs)
                                .arg(ls)
                                .arg(&delta)
                                .arg(&mut dq)
                                .arg(&s.n)
                                .arg(&s.d)
                                .arg(&s.c)
                                .arg(&s.cc)
                                .arg(&scale);
                            unsafe { launch.launch(grid(s.blocks, 0)) }.w()?;

                            let mut dk = unsafe { dev.alloc::<T>(b * n * d) }?;
                            let mut dv = unsafe { dev.alloc::<T>(b * n * c) }?;
                            let f = function(dev, &ATTENTION, "attn_backward_dkv", T::SUFFIX)?;
                            let mut launch = stream.launch_builder(&f);
                            launch
                                .arg(qs)
                                .arg(ks)
                                .arg(vs)
                                .arg(gs)
                                .arg(ls)
                                .arg(&delta)
                                .arg(&mut dk)
                                .arg(&mut dv)
                                .arg(&s.n)
                                .arg(&s.d)
                                .arg(&s.c)
                                .arg(&s.cc)
                                .arg(&scale);
                            unsafe { launch.launch(grid(s.blocks, 0)) }.w()?;
                            Ok([
                                tensor(dq, dev, q.shape().clone()),
                                tensor(dk, dev, k.shape().clone()),
                                tensor(dv, dev, v.shape().clone()),
                            ])
                        })
                    })
                })
            })
        })
    })
}
