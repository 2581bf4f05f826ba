//! SGD with momentum's update of one parameter, in place: PyTorch's rule (dampening 0) as two
//! passes over the parameter's memory, on the CPU (parallel chunks) and on CUDA (one kernel
//! launch each, `cuda/sgd.cu`); [`apply_many`] updates many parameters in one launch on CUDA.
//!
//! Why in place: as Candle tensor ops an SGD step was five passes over every parameter, each
//! into a fresh allocation (on a GPU, about ten kernel launches a parameter); here it is two,
//! bound by memory bandwidth. The caller (la-train's optimiser) keeps the tensor form for
//! what [`SgdStep::applies`] rejects.

use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu::{contiguous_range, data};

/// One step's hyper-parameters for one parameter.
#[derive(Clone, Copy, Debug)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl SgdStep {
    /// Whether the in-place passes run for weight `w` and its gradient: the fast form on the
    /// CPU or on CUDA (f32/f64, one dtype and device), both contiguous and of one shape.
    pub fn applies(w: &Tensor, grad: &Tensor) -> Result<bool> {
        let kernels = crate::fast_path(&[w, grad])? || crate::cuda_path(&[w, grad])?;
        Ok(kernels && w.is_contiguous() && grad.is_contiguous() && grad.dims() == w.dims())
    }

    /// `buf = momentum * buf + g` and then `w -= lr * (nesterov ? g + momentum * buf : buf)`,
    /// with `g = grad + weight_decay * w`, both in place (`buf` starts at zero, so the first
    /// step's buffer is `g`, as PyTorch's). Needs [`SgdStep::applies`].
    pub fn apply(&self, w: &Tensor, grad: &Tensor, buf: &Tensor) -> Result<()> {
        buf.inplace_op3(grad, w, &self.pass(SgdTarget::Buffer))?;
        w.inplace_op3(grad, buf, &self.pass(SgdTarget::Weight))
    }

    fn pass(&self, target: SgdTarget) -> SgdPass {
        SgdPass {
            step: *self,
            target,
        }
    }
}

/// One parameter's update for [`apply_many`].
#[derive(Clone, Copy)]
pub struct SgdUpdate<'a> {
    pub step: SgdStep,
    pub w: &'a Tensor,
    pub grad: &'a Tensor,
    pub buf: &'a Tensor,
}

/// [`SgdStep::apply`] for many parameters (one momentum and Nesterov setting, each its own
/// learning rate and weight decay): on CUDA one launch for all of them (PyTorch's foreach
/// form), elsewhere each in turn. Each needs [`SgdStep::applies`].
pub fn apply_many(updates: &[SgdUpdate]) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(first) = updates.first() {
        let tensors: Vec<&Tensor> = updates.iter().flat_map(|u| [u.w, u.grad, u.buf]).collect();
        let one_setting = updates.iter().all(|u| {
            u.step.momentum == first.step.momentum && u.step.nesterov == first.step.nesterov
        });
        if one_setting && crate::form::cuda_contiguous(&tensors)? {
            let params: Vec<[&Tensor; 3]> = updates.iter().map(|u| [u.w, u.grad, u.buf]).collect();
            let rates: Vec<[f64; 2]> = updates
                .iter()
                .map(|u| [u.step.lr, u.step.weight_decay])
                .collect();
            let s = first.step;
            return crate::cuda::sgd_many(&params, &rates, s.momentum, s.nesterov);
        }
    }
    for u in updates {
        u.step.apply(u.w, u.grad, u.buf)?;
    }
    Ok(())
}

/// One of the two passes, as a Candle in-place op.
pub(crate) struct SgdPass {
    pub step: SgdStep,
    pub target: SgdTarget,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SgdTarget {
    /// On (buf; grad, w): `buf = momentum * buf + (grad + weight_decay * w)`.
    Buffer,
    /// On (w; grad, buf), after `Buffer`: `w -= lr * (nesterov ? g + momentum * buf : buf)`
    /// with `g = grad + weight_decay * w`.
    Weight,
}

impl SgdPass {
    fn run<T: WithDType>(&self, dst: &mut [T], grad: &[T], other: &[T]) {
        let s = self.step;
        let (lr, m, wd) = (
            T::from_f64(s.lr),
            T::from_f64(s.momentum),
            T::from_f64(s.weight_decay),
        );
        let (nesterov, target) = (s.nesterov, self.target);
        dst.par_chunks_mut(1 << 16)
            .zip(grad.par_chunks(1 << 16).zip(other.par_chunks(1 << 16)))
            .for_each(|(dst, (grad, other))| {
                let items = dst.iter_mut().zip(grad).zip(other);
                match target {
                    SgdTarget::Buffer => {
                        for ((b, &g), &w) in items {
                            *b = *b * m + (g + w * wd);
                        }
                    }
                    SgdTarget::Weight => {
                        for ((w, &g), &b) in items {
                            let step = if nesterov { (g + *w * wd) + b * m } else { b };
                            *w -= step * lr;
                        }
                    }
                }
            });
    }
}

impl InplaceOp3 for SgdPass {
    fn name(&self) -> &'static str {
        "sgd-pass"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let r = contiguous_range(l1)?;
        match s1 {
            CpuStorage::F32(v) => self.run::<f32>(&mut v[r], data(s2, l2)?, data(s3, l3)?),
            CpuStorage::F64(v) => self.run::<f64>(&mut v[r], data(s2, l2)?, data(s3, l3)?),
            _ => candle_core::bail!("sgd: expected f32 or f64 parameters"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let s = self.step;
        let rates = [s.lr, s.momentum, s.weight_decay];
        let buffer = self.target == SgdTarget::Buffer;
        crate::cuda::sgd_pass(buffer, rates, s.nesterov, (s1, l1), (s2, l2), (s3, l3))
    }
}
