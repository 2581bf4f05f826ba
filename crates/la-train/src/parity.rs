//! One training step of a whole model in the generic form on a chosen device against the
//! same step in the fast form on the CPU: the check that a GPU trains the network the CPU
//! trains. Run by the tests (generic against fast, both on the CPU) and by
//! `la-cli selftest --device cuda`.

use std::collections::HashMap;

use candle_core::{DType, Device, ModuleT, Tensor};
use la_kernels::parity::{relative_error, uniform};
use la_kernels::{with_form, Form};
use la_vgg::VggConfig;

use crate::optim::{param_groups, GroupRules, Optimizer, OptimizerConfig};

/// How far the two steps are apart, each error relative to the reference's magnitude.
#[derive(Clone, Debug)]
pub struct StepComparison {
    pub loss_fast: f64,
    pub loss_generic: f64,
    pub loss_error: f64,
    /// The largest gradient error, and the parameter it belongs to.
    pub grad_error: f64,
    pub worst_grad: String,
    /// The largest error of the parameters after the SGD step.
    pub param_error: f64,
    /// In f32 (else zero): each form's largest gradient error against the fast form's step in
    /// f64, the best answer at hand: how far f32 rounding takes each form from the truth.
    pub fast_error_vs_f64: f64,
    pub generic_error_vs_f64: f64,
}

impl StepComparison {
    pub fn within(&self, tolerance: f64) -> bool {
        self.loss_error <= tolerance
            && self.grad_error <= tolerance
            && self.param_error <= tolerance
    }
}

/// The loss, every parameter's gradient and every parameter after one step.
struct Step {
    loss: f64,
    grads: HashMap<String, Tensor>,
    params: HashMap<String, Tensor>,
}

fn train_step(
    config: &VggConfig,
    initial: &HashMap<String, Tensor>,
    images: &Tensor,
    labels: &[usize],
    device: &Device,
) -> crate::Result<Step> {
    let initial = initial
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(device)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    let (model, varmap) = la_vgg::trainable(config.clone(), initial, 0, images.dtype(), device)?;
    model.set_dropout_seed(11);
    let logits = model.forward_t(&images.to_device(device)?, true)?;
    let loss = crate::loss::cross_entropy(&logits, labels, 0.1)?;
    let grads = loss.backward()?;
    let params = param_groups(&varmap, &GroupRules::default());
    let mut grad_map = HashMap::new();
    for p in &params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            grad_map.insert(p.name.clone(), g.to_device(&Device::Cpu)?);
        }
    }
    let mut optimizer = Optimizer::new(
        OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
        },
        params,
    );
    optimizer.step(&grads, 0.05)?;
    let params = optimizer
        .params()
        .iter()
        .map(|p| Ok((p.name.clone(), p.var.as_tensor().to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    Ok(Step {
        loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        grads: grad_map,
        params,
    })
}

/// One SGD step (momentum, Nesterov, weight decay, label smoothing) of `config` on a
/// deterministic batch of `batch` images of `size` pixels, from the same initial weights:
/// the generic form on `device` against the fast form on the CPU, in `dtype`.
pub fn compare_training_step(
    config: &VggConfig,
    batch: usize,
    size: usize,
    dtype: DType,
    device: &Device,
) -> crate::Result<StepComparison> {
    compare_training_step_in(Form::Generic, config, batch, size, dtype, device)
}

/// [`compare_training_step`] with `form` on `device` (the `generic` fields of the result are
/// that form's): on a GPU, [`Form::Fast`] is its own kernels (cuDNN, this project's CUDA
/// kernels) against the CPU's.
pub fn compare_training_step_in(
    form: Form,
    config: &VggConfig,
    batch: usize,
    size: usize,
    dtype: DType,
    device: &Device,
) -> crate::Result<StepComparison> {
    let (_, varmap) = la_vgg::trainable(config.clone(), HashMap::new(), 7, dtype, &Device::Cpu)?;
    let initial: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect::<candle_core::Result<_>>()?;
    let images =
        uniform(&[batch, config.in_channels, size, size], -2.0, 2.0, 5)?.to_dtype(dtype)?;
    let labels: Vec<usize> = (0..batch).map(|i| (i * 7) % config.num_classes).collect();
    let fast = with_form(Form::Fast, || {
        train_step(config, &initial, &images, &labels, &Device::Cpu)
    })?;
    let generic = with_form(form, || {
        train_step(config, &initial, &images, &labels, device)
    })?;
    let (mut grad_error, mut worst_grad) = (0f64, String::new());
    for (name, reference) in &fast.grads {
        let Some(ours) = generic.grads.get(name) else {
            return Err(crate::Error::Data(format!(
                "the generic step has no gradient for {name}"
            )));
        };
        let error = relative_error(ours, reference)?;
        if worst_grad.is_empty() || error > grad_error {
            (grad_error, worst_grad) = (error, name.clone());
        }
    }
    if generic.grads.len() != fast.grads.len() {
        return Err(crate::Error::Data(format!(
            "{} gradients in the generic step, {} in the fast one",
            generic.grads.len(),
            fast.grads.len()
        )));
    }
    let (mut fast_error_vs_f64, mut generic_error_vs_f64) = (0f64, 0f64);
    if dtype != DType::F64 {
        let to64 = |t: &Tensor| t.to_dtype(DType::F64);
        let initial64 = initial
            .iter()
            .map(|(k, v)| Ok((k.clone(), to64(v)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        let truth = with_form(Form::Fast, || {
            train_step(config, &initial64, &to64(&images)?, &labels, &Device::Cpu)
        })?;
        for (name, reference) in &truth.grads {
            fast_error_vs_f64 =
                fast_error_vs_f64.max(relative_error(&fast.grads[name], reference)?);
            generic_error_vs_f64 =
                generic_error_vs_f64.max(relative_error(&generic.grads[name], reference)?);
        }
    }
    let mut param_error = 0f64;
    for (name, reference) in &fast.params {
        param_error = param_error.max(relative_error(&generic.params[name], reference)?);
    }
    Ok(StepComparison {
        loss_fast: fast.loss,
        loss_generic: generic.loss,
        loss_error: (generic.loss - fast.loss).abs() / fast.loss.abs().max(1.0),
        grad_error,
        worst_grad,
        param_error,
        fast_error_vs_f64,
        generic_error_vs_f64,
    })
}
