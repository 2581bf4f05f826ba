//! Optimisers with PyTorch's update rules. candle-nn's SGD has no momentum, Nesterov or
//! weight decay, and its AdamW keeps no per-parameter learning rate, so both are written here.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use la_kernels::adamw::{AdamWStep, AdamWUpdate};
use la_kernels::sgd::{SgdStep, SgdUpdate};
use serde::{Deserialize, Serialize};

use crate::Result;

/// Which optimiser, with its hyper-parameters (the learning rate comes from the schedule).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// torch.optim.SGD (dampening 0).
    Sgd {
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    /// torch.optim.AdamW.
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

impl OptimizerConfig {
    /// SGD, momentum 0.9, weight decay 5e-4: the usual CIFAR recipe.
    pub fn sgd() -> Self {
        OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
        }
    }

    /// AdamW with PyTorch's defaults (weight decay 0.01).
    pub fn adamw() -> Self {
        OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One trainable tensor and how it is updated.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Multiplies the scheduled learning rate (e.g. 0.1 for pretrained layers).
    pub lr_scale: f64,
    /// Whether weight decay applies (commonly off for biases and norm parameters).
    pub decay: bool,
}

/// An optimiser over a fixed list of parameters, with its state by parameter name.
pub struct Optimizer {
    config: OptimizerConfig,
    params: Vec<Param>,
    /// SGD: `momentum.{name}`; AdamW: `exp_avg.{name}`, `exp_avg_sq.{name}`.
    state: HashMap<String, Tensor>,
    steps: u64,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig, params: Vec<Param>) -> Self {
        Self {
            config,
            params,
            state: HashMap::new(),
            steps: 0,
        }
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with learning rate `lr` (times each parameter's scale). Parameters without
    /// a gradient are left alone, as PyTorch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        // The in-place updates, gathered so that a GPU runs each optimiser's in one launch.
        let mut sgd_updates: Vec<(usize, Tensor, SgdStep)> = Vec::new();
        let mut adamw_updates: Vec<(usize, Tensor, AdamWStep)> = Vec::new();
        for (index, p) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // Gradients built from variables are themselves tracked tensors: without detaching,
            // each step's buffers would keep the previous steps' graphs alive.
            let grad = &grad.detach();
            let lr = lr * p.lr_scale;
            let w = &p.var.as_tensor().detach();
            let fast = SgdStep::applies(w, grad)?;
            let updated = match self.config {
                OptimizerConfig::Sgd {
                    momentum,
                    nesterov,
                    weight_decay,
                } if momentum != 0.0 && fast => {
                    let key = format!("momentum.{}", p.name);
                    if !self.state.contains_key(&key) {
                        // momentum * 0 + g = g: the first step's buffer, as PyTorch's.
                        self.state.insert(key.clone(), w.zeros_like()?);
                    }
                    let step = SgdStep {
                        lr,
                        momentum,
                        weight_decay: if p.decay { weight_decay } else { 0.0 },
                        nesterov,
                    };
                    sgd_updates.push((index, grad.clone(), step));
                    continue;
                }
                OptimizerConfig::Sgd {
                    momentum,
                    nesterov,
                    weight_decay,
                } => {
                    let mut g = grad.clone();
                    if p.decay && weight_decay != 0.0 {
                        g = (g + (w * weight_decay)?)?;
                    }
                    if momentum != 0.0 {
                        let key = format!("momentum.{}", p.name);
                        let buf = match self.state.get(&key) {
                            Some(buf) => ((buf * momentum)? + &g)?,
                            None => g.clone(),
                        };
                        g = if nesterov {
                            (g + (&buf * momentum)?)?
                        } else {
                            buf.clone()
                        };
                        self.state.insert(key, buf);
                    }
                    (w - (g * lr)?)?
                }
                OptimizerConfig::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } if fast => {
                    let (k1, k2) = (
                        format!("exp_avg.{}", p.name),
                        format!("exp_avg_sq.{}", p.name),
                    );
                    for key in [&k1, &k2] {
                        if !self.state.contains_key(key) {
                            // b m + (1 - b) g from zero: the first step's moments, as PyTorch's.
                            self.state.insert(key.clone(), w.zeros_like()?);
                        }
                    }
                    let step = AdamWStep {
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay: if p.decay { weight_decay } else { 0.0 },
                        step: t,
                    };
                    adamw_updates.push((index, grad.clone(), step));
                    continue;
                }
                OptimizerConfig::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let w = if p.decay && weight_decay != 0.0 {
                        (w * (1.0 - lr * weight_decay))?
                    } else {
                        w.clone()
                    };
                    let (k1, k2) = (
                        format!("exp_avg.{}", p.name),
                        format!("exp_avg_sq.{}", p.name),
                    );
                    let m = match self.state.get(&k1) {
                        Some(m) => ((m * beta1)? + (grad * (1.0 - beta1))?)?,
                        None => (grad * (1.0 - beta1))?,
                    };
                    let v = match self.state.get(&k2) {
                        Some(v) => ((v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?,
                        None => (grad.sqr()? * (1.0 - beta2))?,
                    };
                    let bias1 = 1.0 - beta1.powi(t);
                    let bias2 = 1.0 - beta2.powi(t);
                    let denom = ((v.sqrt()? / bias2.sqrt())? + eps)?;
                    let update = (m.div(&denom)? * (lr / bias1))?;
                    self.state.insert(k1, m);
                    self.state.insert(k2, v);
                    (w - update)?
                }
            };
            p.var.set(&updated)?;
        }
        let updates = sgd_updates
            .iter()
            .map(|(index, grad, step)| {
                let p = &self.params[*index];
                SgdUpdate {
                    step: *step,
                    w: p.var.as_tensor(),
                    grad,
                    buf: &self.state[&format!("momentum.{}", p.name)],
                }
            })
            .collect::<Vec<_>>();
        la_kernels::sgd::apply_many(&updates)?;
        let updates = adamw_updates
            .iter()
            .map(|(index, grad, step)| {
                let p = &self.params[*index];
                AdamWUpdate {
                    step: *step,
                    w: p.var.as_tensor(),
                    grad,
                    m: &self.state[&format!("exp_avg.{}", p.name)],
                    v: &self.state[&format!("exp_avg_sq.{}", p.name)],
                }
            })
            .collect::<Vec<_>>();
        la_kernels::adamw::apply_many(&updates)?;
        Ok(())
    }

    /// The state to checkpoint: buffers by name, plus the step count.
    pub fn state(&self) -> (&HashMap<String, Tensor>, u64) {
        (&self.state, self.steps)
    }

    /// Restores what [`Optimizer::state`] returned; buffers must belong to known parameters.
    pub fn load_state(&mut self, state: HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for (key, t) in &state {
            let name = key.split_once('.').map(|(_, n)| n).unwrap_or("");
            let Some(p) = self.params.iter().find(|p| p.name == name) else {
                return Err(crate::Error::Checkpoint(format!(
                    "optimizer state `{key}` belongs to no trainable parameter"
                )));
            };
            if t.dims() != p.var.as_tensor().dims() {
                return Err(crate::Error::Checkpoint(format!(
                    "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                    t.dims(),
                    p.var.as_tensor().dims()
                )));
            }
        }
        self.state = state;
        self.steps = steps;
        Ok(())
    }
}

/// How to split a model's variables into parameter groups.
#[derive(Clone, Debug, Default)]
pub struct GroupRules {
    /// Names loaded from pretrained weights: they get `pretrained_lr_scale`.
    pub pretrained: std::collections::HashSet<String>,
    pub pretrained_lr_scale: f64,
    /// Per tensor name, a further multiplier of pretrained tensors' rate (layer-wise decay,
    /// [`layer_decay_scales`]); a name not in it keeps 1.
    pub pretrained_layer_scale: HashMap<String, f64>,
    /// Leave the conv backbone (convs and norms) out of the optimiser altogether.
    pub freeze_backbone: bool,
    /// No weight decay on biases and norm parameters.
    pub no_decay_bias_norm: bool,
}

/// The trainable parameters of a model's `VarMap`, in name order (BatchNorm running
/// statistics are buffers, not parameters).
pub fn param_groups(varmap: &candle_nn::VarMap, rules: &GroupRules) -> Vec<Param> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter(|name| !name.contains("running_"))
        .filter(|name| !(rules.freeze_backbone && is_backbone(name)))
        .map(|name| {
            let is_norm_or_bias = name.ends_with(".bias") || name.contains(".norms.");
            Param {
                name: name.clone(),
                var: data[name].clone(),
                lr_scale: if rules.pretrained.contains(name) {
                    let layer = rules.pretrained_layer_scale.get(name.as_str());
                    rules.pretrained_lr_scale * layer.copied().unwrap_or(1.0)
                } else {
                    1.0
                },
                decay: !(rules.no_decay_bias_norm && is_norm_or_bias),
            }
        })
        .collect()
}

/// timm's layer-wise learning-rate decay over the model's layer walk: the layers are the
/// conv units in forward order (a conv and its BatchNorm are one) and the attention modules,
/// then the head; of L + 1 layers, layer l's tensors get `decay^(L - l)` (the head 1, the first
/// conv `decay^L`), so early, general features move least.
pub fn layer_decay_scales(config: &la_vgg::VggConfig, decay: f64) -> HashMap<String, f64> {
    use la_vgg::LayerKind;
    let mut ids: Vec<(String, Option<usize>)> = Vec::new();
    let mut layer = 0usize;
    for spec in config.layers() {
        let id = match spec.kind {
            LayerKind::Conv { .. } | LayerKind::Attention { .. } => {
                layer += 1;
                Some(layer)
            }
            LayerKind::BatchNorm { .. } => Some(layer),
            LayerKind::Linear { .. } => None,
            LayerKind::MaxPool | LayerKind::AvgPool { .. } => continue,
        };
        for (leaf, _) in spec.tensors() {
            ids.push((format!("{}.{leaf}", spec.name), id));
        }
    }
    let head = layer + 1;
    ids.into_iter()
        .map(|(name, id)| (name, decay.powi((head - id.unwrap_or(head)) as i32)))
        .collect()
}

/// Convs and their norms: the part of VGG that ImageNet pretraining provides.
pub fn is_backbone(name: &str) -> bool {
    name.starts_with("blocks.") && (name.contains(".convs.") || name.contains(".norms."))
}
