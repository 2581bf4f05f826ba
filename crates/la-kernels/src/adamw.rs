//! AdamW's update of one parameter, in place: PyTorch's `torch.optim.AdamW` rule as three
//! passes over the parameter's memory (the first moment, the second, then the weight), on the
//! CPU (parallel chunks) and on CUDA (one launch each, `cuda/adamw.cu`); [`apply_many`]
//! updates many parameters in one launch on CUDA.
//!
//! Why in place: as Candle tensor ops an AdamW step was about a dozen passes over every
//! parameter, each into a fresh allocation (on a GPU a launch each). The caller (la-train's
//! optimiser) keeps the tensor form for what [`AdamWStep::applies`] rejects.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu::{contiguous_range, data};

/// One step's hyper-parameters for one parameter; `step` counts from 1.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: i32,
}

impl AdamWStep {
    /// Whether the in-place passes run for weight `w` and its gradient: the fast form on the
    /// CPU or on CUDA (f32/f64, one dtype and device), both contiguous and of one shape.
    pub fn applies(w: &Tensor, grad: &Tensor) -> Result<bool> {
        crate::sgd::SgdStep::applies(w, grad)
    }

    /// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`, then
    /// `w = w (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`, all in
    /// place (`m` and `v` start at zero). Needs [`AdamWStep::applies`].
    pub fn apply(&self, w: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> Result<()> {
        m.inplace_op2(
            grad,
            &Moment {
                beta: self.beta1,
                square: false,
            },
        )?;
        v.inplace_op2(
            grad,
            &Moment {
                beta: self.beta2,
                square: true,
            },
        )?;
        w.inplace_op3(m, v, &WeightPass(self.factors()))
    }

    fn factors(&self) -> WeightFactors {
        WeightFactors {
            decay: 1.0 - self.lr * self.weight_decay,
            step: self.lr / (1.0 - self.beta1.powi(self.step)),
            sqrt_bias2: (1.0 - self.beta2.powi(self.step)).sqrt(),
            eps: self.eps,
        }
    }
}

/// One parameter's update for [`apply_many`].
#[derive(Clone, Copy)]
pub struct AdamWUpdate<'a> {
    pub step: AdamWStep,
    pub w: &'a Tensor,
    pub grad: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
}

/// [`AdamWStep::apply`] for many parameters (one beta1 and beta2, each its own rates): on
/// CUDA one launch for all of them, the three passes fused element by element; elsewhere each
/// in turn. Each needs [`AdamWStep::applies`].
pub fn apply_many(updates: &[AdamWUpdate]) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(first) = updates.first() {
        let tensors: Vec<&Tensor> = updates
            .iter()
            .flat_map(|u| [u.w, u.grad, u.m, u.v])
            .collect();
        let betas = [first.step.beta1, first.step.beta2];
        let same_betas = updates
            .iter()
            .all(|u| [u.step.beta1, u.step.beta2] == betas);
        if same_betas && crate::form::cuda_contiguous(&tensors)? {
            let params: Vec<[&Tensor; 4]> =
                updates.iter().map(|u| [u.w, u.grad, u.m, u.v]).collect();
            let factors: Vec<[f64; 4]> = updates
                .iter()
                .map(|u| {
                    let f = u.step.factors();
                    [f.decay, f.step, f.sqrt_bias2, f.eps]
                })
                .collect();
            return crate::cuda::adamw_many(&params, &factors, betas);
        }
    }
    for u in updates {
        u.step.apply(u.w, u.grad, u.m, u.v)?;
    }
    Ok(())
}

/// A moment's pass: `dst = beta dst + (1 - beta) (square ? g^2 : g)`.
pub(crate) struct Moment {
    pub beta: f64,
    pub square: bool,
}

/// The weight pass's factors: `w = w decay - step m / (sqrt(v) / sqrt_bias2 + eps)`.
#[derive(Clone, Copy)]
pub(crate) struct WeightFactors {
    pub decay: f64,
    pub step: f64,
    pub sqrt_bias2: f64,
    pub eps: f64,
}

pub(crate) struct WeightPass(pub WeightFactors);

const CHUNK: usize = 1 << 16;

fn moment<T: WithDType + num_traits::Float>(dst: &mut [T], g: &[T], beta: f64, square: bool) {
    let (beta, one) = (T::from_f64(beta), T::from_f64(1.0));
    dst.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .for_each(|(dst, g)| {
            for (d, &g) in dst.iter_mut().zip(g) {
                let x = if square { g * g } else { g };
                *d = *d * beta + x * (one - beta);
            }
        });
}

fn weight<T: WithDType + num_traits::Float>(w: &mut [T], m: &[T], v: &[T], f: WeightFactors) {
    let (decay, step) = (T::from_f64(f.decay), T::from_f64(f.step));
    let (sqrt_bias2, eps) = (T::from_f64(f.sqrt_bias2), T::from_f64(f.eps));
    w.par_chunks_mut(CHUNK)
        .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
        .for_each(|(w, (m, v))| {
            for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                *w = *w * decay - m / (v.sqrt() / sqrt_bias2 + eps) * step;
            }
        });
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let r = contiguous_range(l1)?;
        match s1 {
            CpuStorage::F32(d) => moment::<f32>(&mut d[r], data(s2, l2)?, self.beta, self.square),
            CpuStorage::F64(d) => moment::<f64>(&mut d[r], data(s2, l2)?, self.beta, self.square),
            _ => candle_core::bail!("adamw: expected f32 or f64 parameters"),
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
    ) -> Result<()> {
        crate::cuda::adamw_moment((s1, l1), (s2, l2), self.beta, self.square)
    }
}

impl InplaceOp3 for WeightPass {
    fn name(&self) -> &'static str {
        "adamw-weight"
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
            CpuStorage::F32(w) => weight::<f32>(&mut w[r], data(s2, l2)?, data(s3, l3)?, self.0),
            CpuStorage::F64(w) => weight::<f64>(&mut w[r], data(s2, l2)?, data(s3, l3)?, self.0),
            _ => candle_core::bail!("adamw: expected f32 or f64 parameters"),
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
        let f = self.0;
        let factors = [f.decay, f.step, f.sqrt_bias2, f.eps];
        crate::cuda::adamw_weight((s1, l1), (s2, l2), (s3, l3), factors)
    }
}
