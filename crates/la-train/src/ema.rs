//! An exponential moving average of the model's weights, as timm's `ModelEmaV3`: after each
//! optimiser step every tensor (parameters and BatchNorm's running statistics) moves to
//! `decay * ema + (1 - decay) * current`. With warm-up the decay starts small and grows,
//! `1 - (1 + step)^(-2/3)` capped at `decay`, so the average does not stay near the
//! initial weights.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use la_vgg::{Vgg, VggConfig};
use serde::{Deserialize, Serialize};

use crate::Result;

/// How the average is kept.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// timm's default for `--model-ema-decay` is 0.9998.
    pub decay: f64,
    pub warmup: bool,
}

impl EmaConfig {
    pub const DEFAULT_DECAY: f64 = 0.9998;

    /// The decay used after optimiser step `step` (0-based).
    pub fn decay_at(&self, step: usize) -> f64 {
        if self.warmup {
            let warm = 1.0 - (1.0 + step as f64).powf(-2.0 / 3.0);
            warm.clamp(0.0, self.decay)
        } else {
            self.decay
        }
    }
}

/// The averaged tensors, by the model's variable names.
pub struct ModelEma {
    pub config: EmaConfig,
    tensors: HashMap<String, Tensor>,
}

impl ModelEma {
    /// An average that starts at the model's current weights (or at `saved`, a resumed
    /// run's average).
    pub fn new(config: EmaConfig, varmap: &VarMap, saved: HashMap<String, Tensor>) -> Result<Self> {
        let tensors = if saved.is_empty() {
            let data = varmap.data().lock().expect("varmap lock");
            data.iter()
                .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?)))
                .collect::<Result<_>>()?
        } else {
            saved
        };
        Ok(Self { config, tensors })
    }

    /// Moves the average towards the model's weights after optimiser step `step`.
    pub fn update(&mut self, varmap: &VarMap, step: usize) -> Result<()> {
        let decay = self.config.decay_at(step);
        let data = varmap.data().lock().expect("varmap lock");
        for (name, average) in self.tensors.iter_mut() {
            if let Some(var) = data.get(name) {
                let current = var.as_tensor().detach();
                *average = ((&*average * decay)? + (current * (1.0 - decay))?)?;
            }
        }
        Ok(())
    }

    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    /// The averaged model, for evaluation.
    pub fn model(&self, config: &VggConfig, device: &Device) -> Result<Vgg> {
        let vb = candle_nn::VarBuilder::from_tensors(self.tensors.clone(), DType::F32, device);
        Ok(Vgg::new(config.clone(), vb)?)
    }
}
