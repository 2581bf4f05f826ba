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

use crate::kernel::{apply, Grad, Input, Kernel};

type Backward1 = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;
type Backward3 =
    dyn Fn([&Tensor; 3], &Tensor, &Tensor) -> Result<[Option<Tensor>; 3]> + Send + Sync;

/// `output` (computed from `x` without a graph) as a tensor whose gradient with respect to
/// `x` is `backward(x, output, grad_output)`.
pub(crate) fn unary(
    name: &'static str,
    x: &Tensor,
    output: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(output);
    }
    let op = Unary {
        output: Output::new(output)?,
        backward: Arc::new(backward),
    };
    apply(name, [x], op)
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
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(output);
    }
    let op = Ternary {
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

struct Unary {
    output: Output,
    backward: Arc<Backward1>,
}

impl Kernel<1> for Unary {
    fn cpu_forward(&self, _: [Input<CpuStorage>; 1]) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(
        &self,
        _: [Input<candle_core::CudaStorage>; 1],
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn backward(&self, g: Grad<1>) -> Result<[Option<Tensor>; 1]> {
        let x = g.inputs[0].detach();
        Ok([Some((self.backward)(
            &x,
            &g.output.detach(),
            &g.grad.detach(),
        )?)])
    }
}

struct Ternary {
    output: Output,
    backward: Arc<Backward3>,
}

impl Kernel<3> for Ternary {
    fn cpu_forward(&self, _: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(
        &self,
        _: [Input<candle_core::CudaStorage>; 3],
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
        let [a, b, c] = g.inputs.map(Tensor::detach);
        (self.backward)([&a, &b, &c], &g.output.detach(), &g.grad.detach())
    }
}
