//! The 3x3 convolution (stride 1, padding 1) on CUDA through cuDNN: the forward, the input
//! gradient and the weight gradient. Each shape gets one plan, made on first use and kept:
//! its descriptors and, for each of the three passes, the algorithm `cudnnFind*` measured
//! fastest among the deterministic ones (PyTorch's `cudnn.benchmark` with
//! `cudnn.deterministic`), so a run repeats to the digit. The math follows the precision
//! (`crate::precision`): FMA-only for f32, so `fp32` means no TF32 rounding on tensor cores;
//! tensor-op math for TF32, each pass then run in the math type its algorithm was measured
//! with. One workspace per device grows to the largest a plan needs and is reused.
//!
//! Why not Candle's `cudnn` feature: in Candle 0.11 it serves only the forward, rebuilds its
//! descriptors, picks its algorithm and allocates its workspace on every call, and leaves the
//! math type at cuDNN's default (TF32 on Hopper), while the input gradient stays a naive
//! kernel; the raw bindings of cudarc (which Candle builds on) give the whole set.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;

use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{bail, DType, Result, Shape, Tensor};
use cudarc::cudnn::{result, sys};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

use super::kernels::{bias_act_into, tensor, with_view, Float};
use super::plan::{fastest, ConvKey, Measured};

fn cudnn_error(what: &'static str) -> impl Fn(result::CudnnError) -> candle_core::Error {
    move |e| candle_core::Error::Msg(format!("cuDNN {what}: {:?}", e.0))
}

struct Handle(sys::cudnnHandle_t);
impl Drop for Handle {
    fn drop(&mut self) {
        // At thread exit the context may be gone already; nothing useful to do on failure.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

struct TensorDesc(sys::cudnnTensorDescriptor_t);
impl Drop for TensorDesc {
    fn drop(&mut self) {
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

struct FilterDesc(sys::cudnnFilterDescriptor_t);
impl Drop for FilterDesc {
    fn drop(&mut self) {
        let _ = unsafe { result::destroy_filter_descriptor(self.0) };
    }
}

struct ConvDesc(sys::cudnnConvolutionDescriptor_t);
impl Drop for ConvDesc {
    fn drop(&mut self) {
        let _ = unsafe { result::destroy_convolution_descriptor(self.0) };
    }
}

/// One shape's descriptors and chosen algorithms (with their workspace sizes).
struct Plan {
    x: TensorDesc,
    y: TensorDesc,
    w: FilterDesc,
    conv: ConvDesc,
    forward: Measured<(sys::cudnnConvolutionFwdAlgo_t, sys::cudnnMathType_t)>,
    backward_data: Measured<(sys::cudnnConvolutionBwdDataAlgo_t, sys::cudnnMathType_t)>,
    backward_filter: Measured<(sys::cudnnConvolutionBwdFilterAlgo_t, sys::cudnnMathType_t)>,
}

/// cuDNN's state for one device on this thread (a cuDNN handle is not shared across threads).
struct State {
    handle: Handle,
    plans: HashMap<ConvKey, Rc<Plan>>,
    workspace: Option<CudaSlice<u8>>,
}

thread_local! {
    static STATES: RefCell<HashMap<DeviceId, State>> = RefCell::new(HashMap::new());
}

fn data_type(key: &ConvKey) -> sys::cudnnDataType_t {
    if key.f64 {
        sys::cudnnDataType_t::CUDNN_DATA_DOUBLE
    } else {
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT
    }
}

fn tensor_desc(dt: sys::cudnnDataType_t, dims: [i32; 4]) -> Result<TensorDesc> {
    let desc = TensorDesc(result::create_tensor_descriptor().map_err(cudnn_error("tensor"))?);
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    unsafe { result::set_tensor4d_descriptor(desc.0, nchw, dt, dims) }
        .map_err(cudnn_error("tensor"))?;
    Ok(desc)
}

fn ran(status: sys::cudnnStatus_t) -> bool {
    status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
}

fn deterministic(d: sys::cudnnDeterminism_t) -> bool {
    d == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC
}

/// Runs one of cuDNN's `cudnnFind*` functions on the descriptors and returns the [`fastest`]
/// of what it measured (the three perf structs differ in type, not in fields).
macro_rules! find_fastest {
    ($find:path, $perf:ty, $pass:expr, $key:expr, $handle:expr, $($desc:expr),+) => {{
        const MAX_ALGOS: usize = 8;
        let mut count = 0;
        let mut perf = [unsafe { std::mem::zeroed::<$perf>() }; MAX_ALGOS];
        unsafe { $find($handle, $($desc),+, MAX_ALGOS as i32, &mut count, perf.as_mut_ptr()) }
            .result()
            .map_err(cudnn_error(concat!("find ", $pass, " algorithm")))?;
        let measured: Vec<_> = perf[..count as usize]
            .iter()
            .map(|p| Measured {
                algo: (p.algo, p.mathType),
                ran: ran(p.status),
                time_ms: p.time,
                workspace: p.memory,
                deterministic: deterministic(p.determinism),
            })
            .collect();
        fastest(&measured).ok_or_else(|| no_algorithm($pass, $key))?
    }};
}

fn make_plan(handle: sys::cudnnHandle_t, key: &ConvKey) -> Result<Plan> {
    let [batch, c_in, c_out, h, w] = key.dims().map_err(candle_core::Error::Msg)?;
    let dt = data_type(key);
    let x = tensor_desc(dt, [batch, c_in, h, w])?;
    let y = tensor_desc(dt, [batch, c_out, h, w])?;
    let wd = FilterDesc(result::create_filter_descriptor().map_err(cudnn_error("filter"))?);
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    unsafe { result::set_filter4d_descriptor(wd.0, dt, nchw, [c_out, c_in, 3, 3]) }
        .map_err(cudnn_error("filter"))?;
    let conv = ConvDesc(result::create_convolution_descriptor().map_err(cudnn_error("conv"))?);
    let mode = sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION;
    unsafe { result::set_convolution2d_descriptor(conv.0, 1, 1, 1, 1, 1, 1, mode, dt) }
        .map_err(cudnn_error("conv"))?;
    // What cudnnFind may try: FMA only in f32 (and f64), tensor cores too under TF32.
    let math = if key.tf32 {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    };
    unsafe { result::set_convolution_math_type(conv.0, math) }.map_err(cudnn_error("math type"))?;
    let forward = find_fastest!(
        sys::cudnnFindConvolutionForwardAlgorithm,
        sys::cudnnConvolutionFwdAlgoPerf_t,
        "forward",
        key,
        handle,
        x.0,
        wd.0,
        conv.0,
        y.0
    );
    let backward_data = find_fastest!(
        sys::cudnnFindConvolutionBackwardDataAlgorithm,
        sys::cudnnConvolutionBwdDataAlgoPerf_t,
        "input-gradient",
        key,
        handle,
        wd.0,
        y.0,
        conv.0,
        x.0
    );
    let backward_filter = find_fastest!(
        sys::cudnnFindConvolutionBackwardFilterAlgorithm,
        sys::cudnnConvolutionBwdFilterAlgoPerf_t,
        "weight-gradient",
        key,
        handle,
        x.0,
        y.0,
        conv.0,
        wd.0
    );
    Ok(Plan {
        x,
        y,
        w: wd,
        conv,
        forward,
        backward_data,
        backward_filter,
    })
}

fn no_algorithm(pass: &str, key: &ConvKey) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "cuDNN has no deterministic {pass} algorithm for the 3x3 conv {key:?} within the workspace limit"
    ))
}

/// Runs `f` with this thread's cuDNN handle for `dev`, the plan for `key` and a workspace of
/// at least `bytes(plan)` bytes.
fn with_plan<R>(
    dev: &CudaDevice,
    key: ConvKey,
    bytes: impl Fn(&Plan) -> usize,
    f: impl FnOnce(sys::cudnnHandle_t, &Plan, &mut CudaSlice<u8>) -> Result<R>,
) -> Result<R> {
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    STATES.with(|states| {
        let mut states = states.borrow_mut();
        let state = match states.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let handle = Handle(result::create_handle().map_err(cudnn_error("handle"))?);
                unsafe { result::set_stream(handle.0, stream.cu_stream() as sys::cudaStream_t) }
                    .map_err(cudnn_error("stream"))?;
                e.insert(State {
                    handle,
                    plans: HashMap::new(),
                    workspace: None,
                })
            }
        };
        let plan = match state.plans.get(&key) {
            Some(plan) => plan.clone(),
            None => {
                let plan = Rc::new(make_plan(state.handle.0, &key)?);
                state.plans.insert(key, plan.clone());
                plan
            }
        };
        let need = bytes(&plan).max(1);
        if state.workspace.as_ref().is_none_or(|w| w.len() < need) {
            state.workspace = None; // free the old one first
            state.workspace = Some(unsafe { dev.alloc::<u8>(need) }?);
        }
        let workspace = state.workspace.as_mut().expect("allocated above");
        f(state.handle.0, &plan, workspace)
    })
}

fn key<T: Float>(batch: usize, c_in: usize, c_out: usize, h: usize, w: usize) -> ConvKey {
    let f64 = T::DTYPE == DType::F64;
    ConvKey {
        f64,
        tf32: !f64 && crate::precision() == crate::Precision::Tf32,
        batch,
        c_in,
        c_out,
        h,
        w,
    }
}

fn ptr<T>(view: &CudaView<T>, stream: &cudarc::driver::CudaStream) -> *const c_void {
    // The event guard only matters for multi-stream use; everything here is on one stream.
    view.device_ptr(stream).0 as *const c_void
}

/// What one of cuDNN's three calls gets: the handle, the plan, the workspace, the output and
/// the scaling factors (1 for the product, 0 for the output's old contents).
struct Call<'a> {
    handle: sys::cudnnHandle_t,
    plan: &'a Plan,
    stream: &'a cudarc::driver::CudaStream,
    workspace: *mut c_void,
    workspace_bytes: usize,
    out: *mut c_void,
    one: *const c_void,
    zero: *const c_void,
}

/// One pass's choice in a plan: its workspace bytes and the math type its algorithm was
/// measured with.
type Pass = fn(&Plan) -> (usize, sys::cudnnMathType_t);

/// Allocates `len` elements and writes them with `call` (one of cuDNN's passes) under the
/// plan for `key`, with the pass's workspace and math type.
fn run<T: Float>(
    dev: &CudaDevice,
    key: ConvKey,
    len: usize,
    pass: Pass,
    what: &'static str,
    call: impl FnOnce(Call) -> std::result::Result<(), result::CudnnError>,
) -> Result<CudaSlice<T>> {
    let mut out = unsafe { dev.alloc::<T>(len) }?;
    let stream = dev.cuda_stream();
    with_plan(
        dev,
        key,
        |p| pass(p).0,
        |handle, plan, ws| {
            unsafe { result::set_convolution_math_type(plan.conv.0, pass(plan).1) }
                .map_err(cudnn_error("math type"))?;
            let (one, zero) = (T::one(), T::zero());
            let workspace_bytes = ws.len();
            let (ws_ptr, _ws) = ws.device_ptr_mut(&stream);
            let (out_ptr, _out) = out.device_ptr_mut(&stream);
            call(Call {
                handle,
                plan,
                stream: &stream,
                workspace: ws_ptr as *mut c_void,
                workspace_bytes,
                out: out_ptr as *mut c_void,
                one: &one as *const T as *const c_void,
                zero: &zero as *const T as *const c_void,
            })
            .map_err(cudnn_error(what))
        },
    )?;
    Ok(out)
}

/// `act(conv(x, weight) + bias)` for contiguous, non-empty x [b, c_in, h, w], weight
/// [c_out, c_in, 3, 3] and bias [c_out]: cuDNN's forward, then one pass for the bias and the
/// ReLU, in place.
pub(crate) fn forward<T: Float>(
    x: &CudaView<T>,
    [b, c_in, h, w]: [usize; 4],
    weight: &CudaView<T>,
    bias: &CudaView<T>,
    relu: bool,
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let c_out = bias.len();
    let key = key::<T>(b, c_in, c_out, h, w);
    let forward: Pass = |p| (p.forward.workspace, p.forward.algo.1);
    let mut y = run::<T>(
        dev,
        key,
        b * c_out * h * w,
        forward,
        "convolution forward",
        |c| unsafe {
            result::convolution_forward(
                c.handle,
                c.one,
                c.plan.x.0,
                ptr(x, c.stream),
                c.plan.w.0,
                ptr(weight, c.stream),
                c.plan.conv.0,
                c.plan.forward.algo.0,
                c.workspace,
                c.workspace_bytes,
                c.zero,
                c.plan.y.0,
                c.out,
            )
        },
    )?;
    bias_act_into(None, &mut y, &[b, c_out, h, w], bias, 1, relu, dev)?;
    Ok(y)
}

/// The input gradient [b, c_in, h, w] from the output gradient (contiguous, [b, c_out, h, w])
/// and the weight.
pub(crate) fn input_grad<T: Float>(grad_y: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (b, c_out, h, w) = grad_y.dims4()?;
    let c_in = weight.dim(1)?;
    let shape = Shape::from((b, c_in, h, w));
    let key = key::<T>(b, c_in, c_out, h, w);
    let pass: Pass = |p| (p.backward_data.workspace, p.backward_data.algo.1);
    with_view::<T, _>(grad_y, |gy, dev| {
        with_view::<T, _>(weight, |wv, _| {
            let what = "convolution input gradient";
            let gx = run::<T>(dev, key, shape.elem_count(), pass, what, |c| unsafe {
                result::convolution_backward_data(
                    c.handle,
                    c.one,
                    c.plan.w.0,
                    ptr(wv, c.stream),
                    c.plan.y.0,
                    ptr(gy, c.stream),
                    c.plan.conv.0,
                    c.plan.backward_data.algo.0,
                    c.workspace,
                    c.workspace_bytes,
                    c.zero,
                    c.plan.x.0,
                    c.out,
                )
            })?;
            Ok(tensor(gx, dev, shape.clone()))
        })
    })
}

/// The weight gradient [c_out, c_in, 3, 3] from the input x and the output gradient (both
/// contiguous).
pub(crate) fn weight_grad<T: Float>(x: &Tensor, grad_y: &Tensor) -> Result<Tensor> {
    let (b, c_in, h, w) = x.dims4()?;
    let c_out = grad_y.dim(1)?;
    if grad_y.dims() != [b, c_out, h, w] {
        bail!(
            "conv3x3 weight gradient: output gradient {:?} for input {:?}",
            grad_y.dims(),
            x.dims()
        )
    }
    let shape = Shape::from((c_out, c_in, 3, 3));
    let key = key::<T>(b, c_in, c_out, h, w);
    let pass: Pass = |p| (p.backward_filter.workspace, p.backward_filter.algo.1);
    with_view::<T, _>(x, |xs, dev| {
        with_view::<T, _>(grad_y, |gy, _| {
            let what = "convolution weight gradient";
            let gw = run::<T>(dev, key, shape.elem_count(), pass, what, |c| unsafe {
                result::convolution_backward_filter(
                    c.handle,
                    c.one,
                    c.plan.x.0,
                    ptr(xs, c.stream),
                    c.plan.y.0,
                    ptr(gy, c.stream),
                    c.plan.conv.0,
                    c.plan.backward_filter.algo.0,
                    c.workspace,
                    c.workspace_bytes,
                    c.zero,
                    c.plan.w.0,
                    c.out,
                )
            })?;
            Ok(tensor(gw, dev, shape.clone()))
        })
    })
}
