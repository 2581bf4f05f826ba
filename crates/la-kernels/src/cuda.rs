//! The CUDA form of the ops: for f32/f64 tensors on a CUDA device (unless `LA_KERNELS=generic`
//! forces the generic form), the 3x3 conv runs through cuDNN and the max-pool, the biases and
//! SGD's update through this crate's own kernels, each pass one launch (a reduction two) instead of the
//! generic form's many small Candle kernels. Each op is a Candle custom op ([`Kernel`]) whose
//! CUDA forward writes the output in place of a copy, and whose backward runs the matching
//! kernels.
//!
//! - `plan.rs`: the host-side decisions (launch grids, the bias gradient's chunks, which of
//!   cuDNN's measured algorithms runs), tested on any machine;
//! - `kernels.rs` and `*.cu` (compiled to PTX by build.rs): the own kernels, whose code
//!   `crate::emulated_cuda`'s tests also run on the CPU (through `emulation/`);
//! - `cudnn.rs`: the conv's three passes, with plans and workspace kept per shape.
//!
//! `la_kernels::parity` checks every op here against the fast CPU kernels on the GPU.

pub(crate) mod plan;

#[cfg(feature = "cuda")]
mod cudnn;
#[cfg(feature = "cuda")]
mod kernels;

#[cfg(feature = "cuda")]
pub(crate) use ops::{add_bias, conv3x3, max_pool_2x2, sgd_pass};

#[cfg(feature = "cuda")]
mod ops {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{bail, CpuStorage, CudaStorage, Result, Shape, Tensor};

    use super::cudnn;
    use super::kernels::{self, view};
    use crate::cpu::with_float;
    use crate::kernel::{apply, Grad, Input, Kernel};

    /// One of SGD's in-place passes (`crate::sgd`) on CUDA: the momentum buffer when
    /// `buffer`, else the weight; `rates` are the learning rate, momentum and weight decay.
    pub(crate) fn sgd_pass(
        buffer: bool,
        rates: [f64; 3],
        nesterov: bool,
        (dst, dst_layout): (&mut CudaStorage, &candle_core::Layout),
        (grad, grad_layout): Input<CudaStorage>,
        (other, other_layout): Input<CudaStorage>,
    ) -> Result<()> {
        with_float!("sgd", dst.dtype(), T => kernels::sgd_pass::<T>(
            buffer,
            rates,
            nesterov,
            (dst, dst_layout),
            &view(grad, grad_layout)?,
            &view(other, other_layout)?,
        ))
    }

    fn on_cpu<R>(name: &str) -> Result<R> {
        bail!("{name}: the CUDA kernel got CPU tensors")
    }

    /// [`crate::pool::max_pool_2x2`] on CUDA, for a non-empty x.
    pub(crate) fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
        apply("max-pool-2x2-cuda", [&x.contiguous()?], MaxPool)
    }

    struct MaxPool;

    impl Kernel<1> for MaxPool {
        fn cpu_forward(&self, _: [Input<CpuStorage>; 1]) -> Result<(CpuStorage, Shape)> {
            on_cpu("max_pool_2x2")
        }

        fn cuda_forward(&self, [(s, l)]: [Input<CudaStorage>; 1]) -> Result<(CudaStorage, Shape)> {
            let (b, c, h, w) = l.shape().dims4()?;
            let dev = s.device();
            let y = with_float!("max_pool_2x2", s.dtype(), T => T::wrap_cuda_slice(
                kernels::max_pool_2x2_forward::<T>(&view(s, l)?, [b, c, h, w], dev)?,
                dev.clone(),
            ));
            Ok((y, Shape::from((b, c, h / 2, w / 2))))
        }

        fn backward(&self, g: Grad<1>) -> Result<[Option<Tensor>; 1]> {
            let (x, grad) = (g.inputs[0], g.grad.contiguous()?);
            let grad_x = with_float!("max_pool_2x2", x.dtype(), T =>
                kernels::max_pool_2x2_backward::<T>(x, &grad)?);
            Ok([Some(grad_x)])
        }
    }

    /// [`crate::bias::add_bias`] on CUDA, for a non-empty x.
    pub(crate) fn add_bias(x: &Tensor, bias: &Tensor, axis: usize) -> Result<Tensor> {
        apply(
            "add-bias-cuda",
            [&x.contiguous()?, &bias.contiguous()?],
            AddBias { axis },
        )
    }

    struct AddBias {
        axis: usize,
    }

    impl Kernel<2> for AddBias {
        fn cpu_forward(&self, _: [Input<CpuStorage>; 2]) -> Result<(CpuStorage, Shape)> {
            on_cpu("add_bias")
        }

        fn cuda_forward(
            &self,
            [(xs, xl), (bs, bl)]: [Input<CudaStorage>; 2],
        ) -> Result<(CudaStorage, Shape)> {
            let dev = xs.device();
            let y = with_float!("add_bias", xs.dtype(), T => T::wrap_cuda_slice(
                kernels::add_bias::<T>(&view(xs, xl)?, xl.dims(), &view(bs, bl)?, self.axis, dev)?,
                dev.clone(),
            ));
            Ok((y, xl.shape().clone()))
        }

        fn backward(&self, g: Grad<2>) -> Result<[Option<Tensor>; 2]> {
            let grad = g.grad.contiguous()?;
            let (grad_x, grad_bias) = with_float!("add_bias", grad.dtype(), T =>
                kernels::bias_act_backward::<T>(&grad, None, self.axis)?);
            Ok([Some(grad_x), Some(grad_bias)])
        }
    }

    /// [`crate::conv::conv3x3`] on CUDA, for a non-empty x and a bias (zeros when the layer
    /// has none).
    pub(crate) fn conv3x3(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        relu: bool,
    ) -> Result<Tensor> {
        let inputs = [&x.contiguous()?, &weight.contiguous()?, &bias.contiguous()?];
        apply("conv3x3-cudnn", inputs, Conv { relu })
    }

    struct Conv {
        relu: bool,
    }

    impl Kernel<3> for Conv {
        fn cpu_forward(&self, _: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
            on_cpu("conv3x3")
        }

        fn cuda_forward(
            &self,
            [(xs, xl), (ws, wl), (bs, bl)]: [Input<CudaStorage>; 3],
        ) -> Result<(CudaStorage, Shape)> {
            let (b, c_in, h, w) = xl.shape().dims4()?;
            let c_out = wl.dims()[0];
            let dev = xs.device();
            let y = with_float!("conv3x3", xs.dtype(), T => T::wrap_cuda_slice(
                cudnn::forward::<T>(
                    &view(xs, xl)?,
                    [b, c_in, h, w],
                    &view(ws, wl)?,
                    &view(bs, bl)?,
                    self.relu,
                    dev,
                )?,
                dev.clone(),
            ));
            Ok((y, Shape::from((b, c_out, h, w))))
        }

        fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
            let [x, weight, _] = g.inputs;
            let grad = g.grad.contiguous()?;
            let output = g.output.contiguous()?;
            let mask = self.relu.then_some(&output);
            with_float!("conv3x3", x.dtype(), T => {
                let (grad, grad_bias) = kernels::bias_act_backward::<T>(&grad, mask, 1)?;
                // The images into the first conv want no gradient: skip that pass.
                let grad_input = match x.track_op() {
                    true => Some(cudnn::input_grad::<T>(&grad, weight)?),
                    false => None,
                };
                let grad_weight = cudnn::weight_grad::<T>(x, &grad)?;
                Ok([grad_input, Some(grad_weight), Some(grad_bias)])
            })
        }
    }
}
