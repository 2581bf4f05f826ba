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
mod attention;
#[cfg(feature = "cuda")]
mod batch_norm;
#[cfg(feature = "cuda")]
mod cross_entropy;
#[cfg(feature = "cuda")]
mod cudnn;
#[cfg(feature = "cuda")]
mod gemm;
#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
mod many;

#[cfg(feature = "cuda")]
pub(crate) use attention::fits as softmax_attention_fits;
#[cfg(feature = "cuda")]
pub(crate) use ops::{
    adamw_many, adamw_moment, adamw_weight, add_bias, batch_norm_relu_eval, batch_norm_relu_train,
    conv3x3, cross_entropy, max_pool_2x2, project, sgd_many, sgd_pass, softmax_attention,
    sums_of_squares, update_running_stats,
};

#[cfg(feature = "cuda")]
mod ops {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{bail, CpuStorage, CudaStorage, Result, Shape, Tensor};

    use std::sync::{Arc, Mutex};

    use candle_core::{InplaceOp2, Layout};

    use super::attention;
    use super::batch_norm::{self, Map};
    use super::cross_entropy as ce;
    use super::cudnn;
    use super::gemm::gemm;
    use super::kernels::{self, view};
    use super::plan::projection_products;
    use crate::cpu::with_float;
    use crate::kernel::{apply, Grad, Input, Kernel};
    use crate::map_order::Order;

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

    /// AdamW's moment pass (`crate::adamw`) on CUDA, in place on `dst`.
    pub(crate) fn adamw_moment(
        (dst, dst_layout): (&mut CudaStorage, &candle_core::Layout),
        (grad, grad_layout): Input<CudaStorage>,
        beta: f64,
        square: bool,
    ) -> Result<()> {
        with_float!("adamw", dst.dtype(), T => kernels::adamw_moment::<T>(
            (dst, dst_layout),
            &view(grad, grad_layout)?,
            beta,
            square,
        ))
    }

    /// AdamW's weight pass (`crate::adamw`) on CUDA, in place on `w`: `factors` are the
    /// decay, the step size, sqrt(1 - b2^t) and eps.
    pub(crate) fn adamw_weight(
        (w, w_layout): (&mut CudaStorage, &candle_core::Layout),
        (m, m_layout): Input<CudaStorage>,
        (v, v_layout): Input<CudaStorage>,
        factors: [f64; 4],
    ) -> Result<()> {
        with_float!("adamw", w.dtype(), T => kernels::adamw_weight::<T>(
            (w, w_layout),
            [&view(m, m_layout)?, &view(v, v_layout)?],
            factors,
        ))
    }

    /// [`crate::squares::sums_of_squares`] on CUDA, for contiguous f32/f64 tensors of one
    /// dtype on one device.
    pub(crate) fn sums_of_squares(tensors: &[&Tensor]) -> Result<Vec<f64>> {
        let Some(first) = tensors.first() else {
            return Ok(vec![]);
        };
        with_float!("sums of squares", first.dtype(), T => super::many::sums_of_squares::<T>(tensors))
    }

    /// [`crate::sgd::apply_many`] on CUDA, for contiguous f32/f64 tensors of one dtype on one
    /// device: each parameter's (weight, gradient, buffer) and (learning rate, weight decay).
    pub(crate) fn sgd_many(
        params: &[[&Tensor; 3]],
        rates: &[[f64; 2]],
        momentum: f64,
        nesterov: bool,
    ) -> Result<()> {
        let Some([w, _, _]) = params.first() else {
            return Ok(());
        };
        with_float!("sgd", w.dtype(), T =>
            super::many::sgd_many::<T>(params, rates, momentum, nesterov))
    }

    /// [`crate::adamw::apply_many`] on CUDA, for contiguous f32/f64 tensors of one dtype on
    /// one device: each parameter's (weight, gradient, moments) and (decay, step, sqrt(1 -
    /// b2^t), eps).
    pub(crate) fn adamw_many(
        params: &[[&Tensor; 4]],
        factors: &[[f64; 4]],
        betas: [f64; 2],
    ) -> Result<()> {
        let Some([w, ..]) = params.first() else {
            return Ok(());
        };
        with_float!("adamw", w.dtype(), T =>
            super::many::adamw_many::<T>(params, factors, betas))
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

    /// [`crate::norm::batch_norm_relu_train`]'s op on CUDA: `relu(bn(x))` with the batch's
    /// statistics, and those statistics (f64 [2c]: the means, then the biased variances).
    pub(crate) fn batch_norm_relu_train(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        let stats = Arc::new(Mutex::new(None));
        let op = BatchNormReluTrain {
            eps,
            stats: stats.clone(),
        };
        let inputs = [&x.contiguous()?, &weight.contiguous()?, &bias.contiguous()?];
        let y = apply("batch-norm-relu-cuda", inputs, op)?;
        let stats = stats.lock().expect("poisoned stats lock").clone();
        let stats =
            stats.ok_or_else(|| candle_core::Error::Msg("batch norm: no statistics".into()))?;
        Ok((y, stats))
    }

    /// The op on (x, weight, bias); its forward leaves the batch statistics in `stats`, for the
    /// caller's running statistics and for the backward.
    struct BatchNormReluTrain {
        eps: f64,
        stats: Arc<Mutex<Option<Tensor>>>,
    }

    impl Kernel<3> for BatchNormReluTrain {
        fn cpu_forward(&self, _: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
            on_cpu("batch_norm_relu_train")
        }

        fn cuda_forward(
            &self,
            [(xs, xl), (ws, wl), (bs, bl)]: [Input<CudaStorage>; 3],
        ) -> Result<(CudaStorage, Shape)> {
            let map = Map::of(xl.dims())?;
            if wl.dims() != [map.c] || bl.dims() != [map.c] {
                bail!("batch norm: {} channels, parameters {:?}", map.c, wl.dims())
            }
            let dev = xs.device();
            let (y, stats) = with_float!("batch_norm", xs.dtype(), T => {
                let (y, stats) = batch_norm::train_forward::<T>(
                    &view(xs, xl)?,
                    map,
                    &view(ws, wl)?,
                    &view(bs, bl)?,
                    self.eps,
                    dev,
                )?;
                (T::wrap_cuda_slice(y, dev.clone()), stats)
            });
            let stats = kernels::tensor(stats, dev, Shape::from(2 * map.c));
            *self.stats.lock().expect("poisoned stats lock") = Some(stats);
            Ok((y, xl.shape().clone()))
        }

        fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
            let [x, weight, _] = g.inputs;
            let stats = self.stats.lock().expect("poisoned stats lock").clone();
            let stats = stats.ok_or_else(|| {
                candle_core::Error::Msg("batch norm: backward before forward".into())
            })?;
            let (y, grad) = (g.output.contiguous()?, g.grad.contiguous()?);
            let [dx, dw, db] = with_float!("batch_norm", x.dtype(), T =>
                batch_norm::train_backward::<T>([x, weight, &y, &grad], &stats, self.eps)?);
            Ok([Some(dx), Some(dw), Some(db)])
        }
    }

    /// Updates BatchNorm's running statistics in place from the batch's `stats` (as
    /// [`batch_norm_relu_train`] returns them): `(1 - momentum) r + momentum s`, the variance
    /// scaled by `unbiased` (n / (n - 1)).
    pub(crate) fn update_running_stats(
        running_mean: &Tensor,
        running_var: &Tensor,
        stats: &Tensor,
        momentum: f64,
        unbiased: f64,
    ) -> Result<()> {
        for (running, variance, factor) in
            [(running_mean, false, 1.0), (running_var, true, unbiased)]
        {
            let op = RunningUpdate {
                variance,
                momentum,
                factor,
            };
            running.inplace_op2(stats, &op)?;
        }
        Ok(())
    }

    struct RunningUpdate {
        variance: bool,
        momentum: f64,
        factor: f64,
    }

    impl InplaceOp2 for RunningUpdate {
        fn name(&self) -> &'static str {
            "batch-norm-running-update-cuda"
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            on_cpu("batch norm's running statistics")
        }

        fn cuda_fwd(
            &self,
            running: &mut CudaStorage,
            running_layout: &Layout,
            stats: &CudaStorage,
            stats_layout: &Layout,
        ) -> Result<()> {
            let stats = view::<f64>(stats, stats_layout)?;
            let (variance, momentum, factor) = (self.variance, self.momentum, self.factor);
            with_float!("batch_norm", running.dtype(), T => batch_norm::running_update::<T>(
                (running, running_layout),
                &stats,
                variance,
                momentum,
                factor,
            ))
        }
    }

    /// [`crate::norm::batch_norm_relu_eval`] on CUDA: `relu(bn(x))` with the running
    /// statistics, one pass (and one tiny one for the per-channel factors).
    pub(crate) fn batch_norm_relu_eval(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        [running_mean, running_var]: [&Tensor; 2],
        eps: f64,
    ) -> Result<Tensor> {
        let op = BatchNormReluEval {
            eps,
            running_mean: running_mean.detach().contiguous()?,
            running_var: running_var.detach().contiguous()?,
        };
        let inputs = [&x.contiguous()?, &weight.contiguous()?, &bias.contiguous()?];
        apply("batch-norm-relu-eval-cuda", inputs, op)
    }

    struct BatchNormReluEval {
        eps: f64,
        running_mean: Tensor,
        running_var: Tensor,
    }

    impl Kernel<3> for BatchNormReluEval {
        fn cpu_forward(&self, _: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
            on_cpu("batch_norm_relu_eval")
        }

        fn cuda_forward(
            &self,
            [(xs, xl), (ws, wl), (bs, bl)]: [Input<CudaStorage>; 3],
        ) -> Result<(CudaStorage, Shape)> {
            let map = Map::of(xl.dims())?;
            let channels = [
                wl.dims(),
                bl.dims(),
                self.running_mean.dims(),
                self.running_var.dims(),
            ];
            if channels.iter().any(|d| *d != [map.c]) {
                bail!("batch norm: {} channels, parameters {channels:?}", map.c)
            }
            let dev = xs.device();
            let y = with_float!("batch_norm", xs.dtype(), T => {
                kernels::with_view::<T, _>(&self.running_mean, |mean, _| {
                    kernels::with_view::<T, _>(&self.running_var, |var, _| {
                        let (w, b) = (&view(ws, wl)?, &view(bs, bl)?);
                        let y = batch_norm::eval_forward::<T>(
                            &view(xs, xl)?,
                            map,
                            [w, b, mean, var],
                            self.eps,
                            dev,
                        )?;
                        Ok(T::wrap_cuda_slice(y, dev.clone()))
                    })
                })?
            });
            Ok((y, xl.shape().clone()))
        }

        /// Rarely taken (Grad-CAM through an evaluation-mode model), so as tensor ops: with
        /// g' the gradient masked by the ReLU and x_hat = (x - mean) / sqrt(var + eps),
        /// dx = g' w / sqrt(var + eps), dweight = sum g' x_hat, dbias = sum g'.
        fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
            let [x, weight, _] = g.inputs;
            let c = weight.elem_count();
            let per_channel = |t: &Tensor| t.reshape((1, c, 1, 1));
            let masked = g.grad.mul(&g.output.gt(0.0)?.to_dtype(x.dtype())?)?;
            let inv_std = (&self.running_var + self.eps)?.sqrt()?.recip()?;
            let x_hat = x
                .broadcast_sub(&per_channel(&self.running_mean)?)?
                .broadcast_mul(&per_channel(&inv_std)?)?;
            let dbias = masked.sum((0, 2, 3))?;
            let dweight = (&masked * x_hat)?.sum((0, 2, 3))?;
            let dx = masked.broadcast_mul(&per_channel(&(weight * inv_std)?)?)?;
            Ok([Some(dx), Some(dweight), Some(dbias)])
        }
    }

    /// [`crate::loss::cross_entropy`] on CUDA, for logits [rows, k] and targets of the same
    /// shape and dtype, or (`labels`) hard labels, u32 [rows]; the targets get no gradient.
    pub(crate) fn cross_entropy(
        logits: &Tensor,
        against: &Tensor,
        labels: bool,
        smoothing: f64,
    ) -> Result<Tensor> {
        let op = CrossEntropy {
            smoothing,
            labels,
            row_stats: Arc::new(Mutex::new(None)),
        };
        let inputs = [&logits.contiguous()?, &against.detach().contiguous()?];
        apply("cross-entropy-cuda", inputs, op)
    }

    /// The op on (logits, targets or labels); its forward leaves the rows' statistics for the
    /// backward.
    struct CrossEntropy {
        smoothing: f64,
        labels: bool,
        row_stats: Arc<Mutex<Option<Tensor>>>,
    }

    impl Kernel<2> for CrossEntropy {
        fn cpu_forward(&self, _: [Input<CpuStorage>; 2]) -> Result<(CpuStorage, Shape)> {
            on_cpu("cross_entropy")
        }

        fn cuda_forward(
            &self,
            [(xs, xl), (ts, tl)]: [Input<CudaStorage>; 2],
        ) -> Result<(CudaStorage, Shape)> {
            let (rows, k) = xl.shape().dims2()?;
            let expected: &[usize] = if self.labels { &[rows] } else { &[rows, k] };
            if tl.dims() != expected {
                bail!(
                    "cross-entropy: logits {:?}, targets {:?}",
                    xl.dims(),
                    tl.dims()
                )
            }
            let dev = xs.device();
            let (loss, row_stats) = with_float!("cross_entropy", xs.dtype(), T => {
                let x = view::<T>(xs, xl)?;
                let (loss, row_stats) = if self.labels {
                    let labels = view::<u32>(ts, tl)?;
                    let against = ce::Against::Labels(&labels);
                    ce::forward::<T>(&x, &against, [rows, k], self.smoothing, dev)?
                } else {
                    let targets = view::<T>(ts, tl)?;
                    let against = ce::Against::Targets(&targets);
                    ce::forward::<T>(&x, &against, [rows, k], self.smoothing, dev)?
                };
                (T::wrap_cuda_slice(loss, dev.clone()), row_stats)
            });
            let row_stats = kernels::tensor(row_stats, dev, Shape::from(3 * rows));
            *self.row_stats.lock().expect("poisoned row statistics lock") = Some(row_stats);
            Ok((loss, Shape::from(())))
        }

        fn backward(&self, g: Grad<2>) -> Result<[Option<Tensor>; 2]> {
            let [logits, against] = g.inputs;
            let row_stats = self
                .row_stats
                .lock()
                .expect("poisoned row statistics lock")
                .clone();
            let row_stats = row_stats.ok_or_else(|| {
                candle_core::Error::Msg("cross-entropy: backward before forward".into())
            })?;
            let grad = g.grad.contiguous()?;
            let (labels, smoothing) = (self.labels, self.smoothing);
            let dlogits = with_float!("cross_entropy", logits.dtype(), T =>
                ce::backward::<T>([logits, against, &grad], labels, &row_stats, smoothing)?);
            Ok([Some(dlogits), None])
        }
    }

    /// [`crate::softmax_attention::softmax_attention`] on CUDA, for sizes that
    /// `softmax_attention_fits`.
    pub(crate) fn softmax_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let op = SoftmaxAttention {
            scale,
            log_sum_exp: Arc::new(Mutex::new(None)),
        };
        let inputs = [&q.contiguous()?, &k.contiguous()?, &v.contiguous()?];
        apply("softmax-attention-cuda", inputs, op)
    }

    /// The op on (q, k, v); its forward leaves the rows' log-sum-exp for the backward.
    struct SoftmaxAttention {
        scale: f64,
        log_sum_exp: Arc<Mutex<Option<Tensor>>>,
    }

    impl Kernel<3> for SoftmaxAttention {
        fn cpu_forward(&self, _: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
            on_cpu("softmax_attention")
        }

        fn cuda_forward(
            &self,
            [(qs, ql), (ks, kl), (vs, vl)]: [Input<CudaStorage>; 3],
        ) -> Result<(CudaStorage, Shape)> {
            let (b, n, d) = ql.shape().dims3()?;
            let c = vl.shape().dims3()?.2;
            if kl.dims() != [b, n, d] || vl.dims()[..2] != [b, n] {
                bail!(
                    "softmax attention: q {:?}, k {:?}, v {:?}",
                    ql.dims(),
                    kl.dims(),
                    vl.dims()
                )
            }
            let dev = qs.device();
            let (out, lse) = with_float!("softmax_attention", qs.dtype(), T => {
                let (out, lse) = attention::forward::<T>(
                    [&view(qs, ql)?, &view(ks, kl)?, &view(vs, vl)?],
                    [b, n, d, c],
                    self.scale,
                    dev,
                )?;
                (
                    T::wrap_cuda_slice(out, dev.clone()),
                    kernels::tensor(lse, dev, Shape::from((b, n))),
                )
            });
            *self.log_sum_exp.lock().expect("poisoned lse lock") = Some(lse);
            Ok((out, Shape::from((b, n, c))))
        }

        fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
            let [q, k, v] = g.inputs;
            let lse = self.log_sum_exp.lock().expect("poisoned lse lock").clone();
            let lse = lse.ok_or_else(|| {
                candle_core::Error::Msg("softmax attention: backward before forward".into())
            })?;
            let (out, grad) = (g.output.contiguous()?, g.grad.contiguous()?);
            let [dq, dk, dv] = with_float!("softmax_attention", q.dtype(), T =>
                attention::backward::<T>([q, k, v, &out, &grad], &lse, self.scale)?);
            Ok([Some(dq), Some(dk), Some(dv)])
        }
    }

    /// [`crate::projection::project`] on CUDA: one strided product forward (the bias written
    /// as C's start), and backward one each for the input and the weight (summed over the
    /// images in the product) plus the bias kernels' two launches.
    pub(crate) fn project(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        from: Order,
        to: Order,
    ) -> Result<Tensor> {
        let inputs = [&x.contiguous()?, &weight.contiguous()?, &bias.contiguous()?];
        apply("project-cuda", inputs, Project { from, to })
    }

    struct Project {
        from: Order,
        to: Order,
    }

    impl Project {
        /// [batch, c_in, c_out, positions] of an input of `x_dims` and a weight of `w_dims`.
        fn sizes(&self, x_dims: &[usize], w_dims: &[usize]) -> Result<[usize; 4]> {
            let (&[batch, _, _], &[c_out, c_in]) = (x_dims, w_dims) else {
                bail!("project: input {x_dims:?}, weight {w_dims:?}")
            };
            let (channels, positions) = self.from.channels_positions(x_dims);
            if channels != c_in {
                bail!(
                    "project: input {x_dims:?} in {:?} order, weight {w_dims:?}",
                    self.from
                )
            }
            Ok([batch, c_in, c_out, positions])
        }
    }

    impl Kernel<3> for Project {
        fn cpu_forward(&self, _: [Input<CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
            on_cpu("project")
        }

        fn cuda_forward(
            &self,
            [(xs, xl), (ws, wl), (bs, bl)]: [Input<CudaStorage>; 3],
        ) -> Result<(CudaStorage, Shape)> {
            let sizes @ [batch, _, c_out, positions] = self.sizes(xl.dims(), wl.dims())?;
            let products = projection_products(sizes, self.from, self.to);
            let dev = xs.device();
            let y = with_float!("project", xs.dtype(), T => {
                let mut y = unsafe { dev.alloc::<T>(batch * c_out * positions) }?;
                let (w, x) = (view::<T>(ws, wl)?, view::<T>(xs, xl)?);
                gemm([&w, &x], &mut y, Some(&view(bs, bl)?), products.forward, batch, dev)?;
                T::wrap_cuda_slice(y, dev.clone())
            });
            Ok((
                y,
                Shape::from(self.to.dims(batch, c_out, positions).to_vec()),
            ))
        }

        fn backward(&self, g: Grad<3>) -> Result<[Option<Tensor>; 3]> {
            let [x, weight, bias] = g.inputs;
            let sizes @ [batch, c_in, c_out, positions] = self.sizes(x.dims(), weight.dims())?;
            let products = projection_products(sizes, self.from, self.to);
            let grad = g.grad.contiguous()?;
            let bias_axis = match self.to {
                Order::Channels => 1,
                Order::Tokens => 2,
            };
            with_float!("project", x.dtype(), T => {
                let (dx, dw) = kernels::with_view::<T, _>(&grad, |gy, dev| {
                    kernels::with_view::<T, _>(weight, |w, _| {
                        kernels::with_view::<T, _>(x, |xv, _| {
                            let mut dx = unsafe { dev.alloc::<T>(batch * c_in * positions) }?;
                            gemm([w, gy], &mut dx, None, products.input_grad, batch, dev)?;
                            let mut dw = unsafe { dev.alloc::<T>(c_out * c_in) }?;
                            gemm([gy, xv], &mut dw, None, products.weight_grad, 1, dev)?;
                            Ok((
                                kernels::tensor(dx, dev, x.shape().clone()),
                                kernels::tensor(dw, dev, weight.shape().clone()),
                            ))
                        })
                    })
                })?;
                let (_, dbias) = kernels::bias_act_backward::<T>(&grad, None, bias_axis)?;
                Ok([Some(dx), Some(dw), Some(dbias.reshape(bias.shape())?)])
            })
        }
    }
}
