//! Learning-rate schedules, evaluated per iteration (fractional epochs), with linear warm-up.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Schedule {
    Constant,
    /// StepLR: times `gamma` every `step_epochs` (the article: 30, 0.1).
    Step {
        step_epochs: usize,
        gamma: f64,
    },
    /// MultiStepLR: times `gamma` at each milestone epoch.
    MultiStep {
        milestones: Vec<usize>,
        gamma: f64,
    },
    /// Cosine annealing from the base rate to `min_lr` over the whole run.
    Cosine {
        min_lr: f64,
    },
}

impl Schedule {
    /// StepLR's usual setting, as the article: times 0.1 every 30 epochs.
    pub const DEFAULT_STEP_EPOCHS: usize = 30;
    pub const DEFAULT_GAMMA: f64 = 0.1;
    /// MultiStepLR's usual CIFAR milestones (of a 200-epoch run).
    pub const DEFAULT_MILESTONES: [usize; 3] = [60, 120, 160];
    /// Cosine annealing's usual floor.
    pub const DEFAULT_MIN_LR: f64 = 0.0;
}

/// A schedule with a linear warm-up from zero over the first `warmup_epochs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_epochs: f64,
    pub epochs: usize,
}

impl LrSchedule {
    /// The rate at iteration `step` (0-based) of a run with `steps_per_epoch` iterations per epoch.
    pub fn lr_at(&self, step: usize, steps_per_epoch: usize) -> f64 {
        let spe = steps_per_epoch.max(1) as f64;
        // The rate of an iteration is that of the moment it starts.
        let epoch = step as f64 / spe;
        let scheduled = match &self.schedule {
            Schedule::Constant => self.base_lr,
            Schedule::Step { step_epochs, gamma } => {
                self.base_lr * gamma.powi((epoch / (*step_epochs).max(1) as f64).floor() as i32)
            }
            Schedule::MultiStep { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| epoch >= m as f64).count();
                self.base_lr * gamma.powi(passed as i32)
            }
            Schedule::Cosine { min_lr } => {
                let total = (self.epochs as f64 * spe).max(1.0);
                let t = (step as f64 / total).min(1.0);
                min_lr + (self.base_lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        };
        if epoch < self.warmup_epochs {
            scheduled * (step as f64 + 1.0) / (self.warmup_epochs * spe)
        } else {
            scheduled
        }
    }
}
