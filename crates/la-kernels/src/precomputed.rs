//! Differentiable ops on any device whose output is computed outside Candle's graph.
//!
//! Why: an exact attention in O(chunk x N) memory must not keep each chunk's scores for the
//! backward pass, which is what Candle's autograd would do with the same tensor ops. Here the
//! forward result is computed from detached inputs (chunk by chunk, no graph), handed to
//! Candle as the output of a custom op (its storage cloned through
//! `BackendStorage::try_clone` on whichever device it lives), and the op's backward is a
//! closure of tensor ops, so it runs on every device too. Max-pool uses the same wrapper for
//! a gradient that goes to the window's first maximum, as PyTorch's does.
//!
//! The backward closures get detached tensors: an incoming gradient may itself carry a graph
//! (it is computed from variables), and every tensor made from it would then keep the
//! chunks' temporaries alive until the whole backward pass ends.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Result, Shape, Storage, Tensor};

use crate::kernel::{apply, Applied, Grad, Input, Kernel, Op};

type Backward<const N: usize> =
    dyn Fn([&Tensor; N], &Tensor, &Tensor) -> Result<[Option<Tensor>; N]> + Send + Sync;

/// `output` (computed from `x` without a graph) as a tensor whose gradient with respect to
/// `x` is `backward(x, output, grad_output)`.
pub(crate) fn unary(
    name: &'static str,
    x: &Tensor,
    output: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    precomputed(name, [x], output, move |[x], out, grad| {
        Ok([Some(backward(x, out, grad)?)])
    })
}

/// As [`unary`] for three inputs; `backward` returns the gradient of each input.
pub(crate) fn ternary(
    name: &'static str,
    inputs: [&Tensor; 3],
    output: Tensor,
    backward: impl Fn([&Tensor; 3], &Tensor, &Tensor) -> Result<[Option<Tensor>; 3]>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    precomputed(name, inputs, output, backward)
}

fn precomputed<const N: usize>(
    name: &'static str,
    inputs: [&Tensor; N],
    output: Tensor,
    backward: impl Fn([&Tensor; N], &Tensor, &Tensor) -> Result<[Option<Tensor>; N]>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor>
where
    Op<Precomputed<N>>: Applied<N>,
{
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(output);
    }
    let op = Precomputed {
        output: Output::new(output)?,
        backward: Arc::new(backward),
    };
    apply(name, inputs, op)
}

/// A computed result, laid out so that a clone of its storage is the result itself.
struct Output(Tensor);

impl Output {
    fn new(t: Tensor) -> Result<Self> {
        let t = t.detach();
        let fresh = t.is_contiguous() && t.layout().start_offset() == 0;
        Ok(Self(if fresh { t } else { t.copy()? }))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.0.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, self.0.shape().clone())),
            _ => candle_core::bail!("precomputed op: the result is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let (storage, layout) = self.0.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, self.0.shape().clone())),
            _ => candle_core::bail!("precomputed op: the result is not on the CUDA device"),
        }
    }
}

struct Precomputed<const N: usize> {
    output: Output,
    backward: Arc<Backward<N>>,
}

impl<const N: usize> Kernel<N> for Precomputed<N> {
    fn cpu_forward(&self, _: [Input<CpuStorage>; N]) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(
        &self,
        _: [Input<candle_core::CudaStorage>; N],
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn backward(&self, g: Grad<N>) -> Result<[Option<Tensor>; N]> {
        let inputs = g.inputs.map(Tensor::detach);
        (self.backward)(
            std::array::from_fn(|i| &inputs[i]),
            &g.output.detach(),
            &g.grad.detach(),
        )
    }
}
