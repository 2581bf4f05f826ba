//! Launches of this crate's own CUDA kernels (`pool.cu`, `bias_act.cu`, compiled to PTX by
//! build.rs): each function takes contiguous CUDA tensors, runs one kernel (two for a
//! reduction) on the tensors' device and stream, and returns untracked tensors.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, Layout, Result, Shape, Storage, Tensor, WithDType};

use super::plan::{channel_chunks, elementwise_blocks, split_at_axis, Chunks, BLOCK, MAX_CHANNELS};

/// The PTX of one `.cu` file, under the name the device caches its module by.
pub(super) struct Module {
    pub name: &'static str,
    pub ptx: &'static str,
}

const POOL: Module = Module {
    name: "la_kernels_pool",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/pool.ptx")),
};
const BIAS_ACT: Module = Module {
    name: "la_kernels_bias_act",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/bias_act.ptx")),
};

/// The element types the kernels are instantiated for, with their names' suffix.
pub(crate) trait Float: WithDType + DeviceRepr + CudaDType {
    const SUFFIX: &'static str;
}
impl Float for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Float for f64 {
    const SUFFIX: &'static str = "f64";
}

/// The elements of contiguous CUDA storage under `layout`, from its offset on.
pub(crate) fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    if !layout.is_contiguous() {
        bail!("expected a contiguous CUDA tensor")
    }
    let start = layout.start_offset();
    Ok(s.as_cuda_slice::<T>()?
        .slice(start..start + layout.shape().elem_count()))
}

/// `f` on a contiguous CUDA tensor's elements and its device.
pub(crate) fn with_view<T: CudaDType + DeviceRepr, R>(
    t: &Tensor,
    f: impl FnOnce(&CudaView<T>, &CudaDevice) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        bail!(
            "expected a CUDA tensor, got one on {:?}",
            t.device().location()
        )
    };
    f(&view(s, layout)?, s.device())
}

/// A freshly written device buffer as an untracked tensor of `shape`.
pub(crate) fn tensor<T: Float>(data: CudaSlice<T>, dev: &CudaDevice, shape: Shape) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(data, dev.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

pub(super) fn grid(blocks: (u32, u32), shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.0, blocks.1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes,
    }
}

pub(super) fn elementwise(total: usize) -> LaunchConfig {
    grid((elementwise_blocks(total), 1), 0)
}

pub(super) fn function(
    dev: &CudaDevice,
    module: &Module,
    name: &str,
    suffix: &str,
) -> Result<CudaFunction> {
    let f = dev.get_or_load_custom_func(&format!("{name}_{suffix}"), module.name, module.ptx)?;
    Ok(f.into_cuda_function())
}

/// 2x2 max-pooling of contiguous, non-empty x [b, c, h, w] into [b, c, h / 2, w / 2].
pub(crate) fn max_pool_2x2_forward<T: Float>(
    x: &CudaView<T>,
    [b, c, h, w]: [usize; 4],
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let total = b * c * (h / 2) * (w / 2);
    let mut y = unsafe { dev.alloc::<T>(total) }?;
    let (planes, h, w) = ((b * c) as i64, h as i64, w as i64);
    let f = function(dev, &POOL, "max_pool_2x2_forward", T::SUFFIX)?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    launch.arg(x).arg(&mut y).arg(&planes).arg(&h).arg(&w);
    unsafe { launch.launch(elementwise(total)) }.w()?;
    Ok(y)
}

/// The gradient of [`max_pool_2x2_forward`] with respect to its input `x`, given the output's
/// gradient `grad` (both contiguous).
pub(crate) fn max_pool_2x2_backward<T: Float>(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if grad.dims() != [b, c, h / 2, w / 2] {
        bail!(
            "max-pool backward: gradient {:?} for input {:?}",
            grad.dims(),
            x.dims()
        )
    }
    with_view::<T, _>(x, |xs, dev| {
        with_view::<T, _>(grad, |gy, _| {
            let mut gx = unsafe { dev.alloc::<T>(x.elem_count()) }?;
            let (planes, h, w) = ((b * c) as i64, h as i64, w as i64);
            let f = function(dev, &POOL, "max_pool_2x2_backward", T::SUFFIX)?;
            let stream = dev.cuda_stream();
            let mut launch = stream.launch_builder(&f);
            launch
                .arg(xs)
                .arg(gy)
                .arg(&mut gx)
                .arg(&planes)
                .arg(&h)
                .arg(&w);
            unsafe { launch.launch(elementwise(x.elem_count())) }.w()?;
            Ok(tensor(gx, dev, x.shape().clone()))
        })
    })
}

/// `act(x + bias)` along `axis` of a contiguous tensor of `dims` (`act` a ReLU when `relu`,
/// else the identity), written into `out`; read from `x`, or from `out` itself when `x` is
/// `None`.
pub(crate) fn bias_act_into<T: Float>(
    x: Option<&CudaView<T>>,
    out: &mut CudaSlice<T>,
    dims: &[usize],
    bias: &CudaView<T>,
    axis: usize,
    relu: bool,
    dev: &CudaDevice,
) -> Result<()> {
    let (_, len, inner) = split_at_axis(dims, axis);
    let total: usize = dims.iter().product();
    let null = 0u64;
    let (len, inner, total_i, relu) = (len as i64, inner as i64, total as i64, relu as i32);
    let f = function(dev, &BIAS_ACT, "bias_act_forward", T::SUFFIX)?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    match x {
        Some(x) => launch.arg(x),
        None => launch.arg(&null),
    };
    launch
        .arg(out)
        .arg(bias)
        .arg(&len)
        .arg(&inner)
        .arg(&total_i)
        .arg(&relu);
    unsafe { launch.launch(elementwise(total)) }.w()?;
    Ok(())
}

/// `x + bias` along `axis` of contiguous, non-empty x of `dims`, into a new buffer.
pub(crate) fn add_bias<T: Float>(
    x: &CudaView<T>,
    dims: &[usize],
    bias: &CudaView<T>,
    axis: usize,
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let mut out = unsafe { dev.alloc::<T>(dims.iter().product()) }?;
    bias_act_into(Some(x), &mut out, dims, bias, axis, false, dev)?;
    Ok(out)
}

/// The backward of `act(x + bias)` along `axis`, from the output's gradient `grad` (and,
/// when `relu`, the output itself for the mask): the gradient of x (the masked gradient;
/// `grad` itself without a ReLU) and of the bias (the sum over every other axis).
pub(crate) fn bias_act_backward<T: Float>(
    grad: &Tensor,
    output: Option<&Tensor>,
    axis: usize,
) -> Result<(Tensor, Tensor)> {
    let dims = grad.dims().to_vec();
    let (outer, len, inner) = split_at_axis(&dims, axis);
    if len > MAX_CHANNELS {
        bail!("bias gradient on CUDA: {len} channels, more than {MAX_CHANNELS}")
    }
    if let Some(output) = output {
        if output.dims() != grad.dims() {
            bail!(
                "bias backward: output {:?}, gradient {:?}",
                output.dims(),
                grad.dims()
            )
        }
    }
    let Chunks { chunks, per_chunk } = channel_chunks(outer * inner);
    with_view::<T, _>(grad, |gy, dev| {
        let mut partials = unsafe { dev.alloc::<T>(chunks * len) }?;
        let mut masked = match output {
            Some(_) => Some(unsafe { dev.alloc::<T>(grad.elem_count()) }?),
            None => None,
        };
        let mut run = |out: Option<&CudaView<T>>| -> Result<()> {
            let f = function(dev, &BIAS_ACT, "bias_act_backward", T::SUFFIX)?;
            let null = 0u64;
            let (outer, len_i, inner, per_chunk, relu) = (
                outer as i64,
                len as i64,
                inner as i64,
                per_chunk as i64,
                out.is_some() as i32,
            );
            let stream = dev.cuda_stream();
            let mut launch = stream.launch_builder(&f);
            launch.arg(gy);
            match out {
                Some(out) => launch.arg(out),
                None => launch.arg(&null),
            };
            match masked.as_mut() {
                Some(m) => launch.arg(m),
                None => launch.arg(&null),
            };
            launch
                .arg(&mut partials)
                .arg(&outer)
                .arg(&len_i)
                .arg(&inner)
                .arg(&per_chunk)
                .arg(&relu);
            let blocks = (chunks as u32, len as u32);
            unsafe { launch.launch(grid(blocks, 0)) }.w()?;
            Ok(())
        };
        match output {
            Some(output) => with_view::<T, _>(output, |o, _| run(Some(o)))?,
            None => run(None)?,
        }
        let mut bias_grad = unsafe { dev.alloc::<T>(len) }?;
        let f = function(dev, &BIAS_ACT, "sum_rows", T::SUFFIX)?;
        let (rows, cols) = (len as i64, chunks as i64);
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(&partials)
            .arg(&mut bias_grad)
            .arg(&rows)
            .arg(&cols);
        unsafe { launch.launch(elementwise(len)) }.w()?;
        let grad_x = match masked {
            Some(m) => tensor(m, dev, grad.shape().clone()),
            None => grad.clone(),
        };
        Ok((grad_x, tensor(bias_grad, dev, Shape::from(len))))
    })
}

pub(super) const SGD: Module = Module {
    name: "la_kernels_sgd",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/sgd.ptx")),
};

/// One of SGD's in-place passes (`crate::sgd`) over contiguous storage: the momentum buffer
/// (`dst` the buffer, `other` the weight) when `buffer`, else the weight (`dst` the weight,
/// `other` the buffer).
pub(crate) fn sgd_pass<T: Float>(
    buffer: bool,
    [lr, momentum, weight_decay]: [f64; 3],
    nesterov: bool,
    (dst, dst_layout): (&mut CudaStorage, &Layout),
    grad: &CudaView<T>,
    other: &CudaView<T>,
) -> Result<()> {
    let n = dst_layout.shape().elem_count();
    if !dst_layout.is_contiguous() || grad.len() != n || other.len() != n {
        bail!("sgd on CUDA: expected contiguous tensors of {n} elements")
    }
    if n == 0 {
        return Ok(());
    }
    let dev = dst.device().clone();
    let start = dst_layout.start_offset();
    let mut dst = dst.as_cuda_slice_mut::<T>()?.slice_mut(start..start + n);
    let (n_i, nesterov) = (n as i64, nesterov as i32);
    let (lr, momentum, weight_decay) = (
        T::from_f64(lr),
        T::from_f64(momentum),
        T::from_f64(weight_decay),
    );
    let name = if buffer { "sgd_buffer" } else { "sgd_weight" };
    let f = function(&dev, &SGD, name, T::SUFFIX)?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    launch.arg(&mut dst).arg(grad).arg(other).arg(&n_i);
    if buffer {
        launch.arg(&momentum).arg(&weight_decay);
    } else {
        launch
            .arg(&lr)
            .arg(&momentum)
            .arg(&weight_decay)
            .arg(&nesterov);
    }
    unsafe { launch.launch(elementwise(n)) }.w()?;
    Ok(())
}

pub(super) const ADAMW: Module = Module {
    name: "la_kernels_adamw",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx")),
};

/// `dst` (contiguous storage) and its element count, as a mutable view.
fn target<'a, T: Float>(
    dst: &'a mut CudaStorage,
    layout: &Layout,
    n: usize,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, T>> {
    if !layout.is_contiguous() || layout.shape().elem_count() != n {
        bail!("{what} on CUDA: expected contiguous tensors of {n} elements")
    }
    let start = layout.start_offset();
    Ok(dst.as_cuda_slice_mut::<T>()?.slice_mut(start..start + n))
}

/// One of AdamW's moment passes (`crate::adamw`) in place: `dst = beta dst + (1 - beta) g`
/// (`g * g` when `square`).
pub(crate) fn adamw_moment<T: Float>(
    (dst, dst_layout): (&mut CudaStorage, &Layout),
    grad: &CudaView<T>,
    beta: f64,
    square: bool,
) -> Result<()> {
    let n = grad.len();
    if n == 0 {
        return Ok(());
    }
    let dev = dst.device().clone();
    let mut dst = target::<T>(dst, dst_layout, n, "adamw")?;
    let (n_i, beta, square) = (n as i64, T::from_f64(beta), square as i32);
    let f = function(&dev, &ADAMW, "adamw_moment", T::SUFFIX)?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&mut dst)
        .arg(grad)
        .arg(&n_i)
        .arg(&beta)
        .arg(&square);
    unsafe { launch.launch(elementwise(n)) }.w()?;
    Ok(())
}

/// AdamW's weight pass in place: `w = w decay - step m / (sqrt(v) / sqrt_bias2 + eps)`.
pub(crate) fn adamw_weight<T: Float>(
    (w, w_layout): (&mut CudaStorage, &Layout),
    [m, v]: [&CudaView<T>; 2],
    [decay, step, sqrt_bias2, eps]: [f64; 4],
) -> Result<()> {
    let n = m.len();
    if v.len() != n {
        bail!("adamw on CUDA: moments of {n} and {} elements", v.len())
    }
    if n == 0 {
        return Ok(());
    }
    let dev = w.device().clone();
    let mut w = target::<T>(w, w_layout, n, "adamw")?;
    let n_i = n as i64;
    let [decay, step, sqrt_bias2, eps] = [decay, step, sqrt_bias2, eps].map(T::from_f64);
    let f = function(&dev, &ADAMW, "adamw_weight", T::SUFFIX)?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&mut w)
        .arg(m)
        .arg(v)
        .arg(&n_i)
        .arg(&decay)
        .arg(&step)
        .arg(&sqrt_bias2)
        .arg(&eps);
    unsafe { launch.launch(elementwise(n)) }.w()?;
    Ok(())
}
