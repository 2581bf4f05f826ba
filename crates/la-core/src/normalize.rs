//! Per-channel input normalisation: `(x / 255 - mean) / std`.

use serde::{Deserialize, Serialize};

/// The normalisation a model's inputs get. Weights files record the one they were trained
/// with; data pipelines apply it as their last step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// A normalisation that cannot be applied.
#[derive(Debug, thiserror::Error)]
#[error("normalisation mean {mean:?} std {std:?}: values must be finite and std positive")]
pub struct InvalidNormalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// torchvision's ImageNet statistics, which the pretrained VGG weights expect.
    pub const IMAGENET: Normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    pub const CIFAR10: Normalize = Normalize {
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2470, 0.2435, 0.2616],
    };
    pub const CIFAR100: Normalize = Normalize {
        mean: [0.5071, 0.4865, 0.4409],
        std: [0.2673, 0.2564, 0.2762],
    };
    pub const FASHION_MNIST: Normalize = Normalize {
        mean: [0.2860; 3],
        std: [0.3530; 3],
    };
    /// Computed over the 1797 embedded digits images after scaling to 0..255 (population
    /// statistics of all 1797 x 64 pixels in [0, 1]: mean 0.30531, std 0.37589).
    pub const DIGITS: Normalize = Normalize {
        mean: [0.3053; 3],
        std: [0.3759; 3],
    };
    /// Only the scaling to [0, 1].
    pub const UNIT: Normalize = Normalize {
        mean: [0.0; 3],
        std: [1.0; 3],
    };

    /// Fails on a standard deviation that is zero, negative or not finite.
    pub fn validate(&self) -> Result<(), InvalidNormalize> {
        if self.std.iter().chain(&self.mean).any(|v| !v.is_finite())
            || self.std.iter().any(|&s| s <= 0.0)
        {
            return Err(InvalidNormalize {
                mean: self.mean,
                std: self.std,
            });
        }
        Ok(())
    }

    /// Per channel, the 256 normalised values a byte can map to.
    pub fn byte_table(&self) -> [[f32; 256]; 3] {
        let mut t = [[0f32; 256]; 3];
        for (c, row) in t.iter_mut().enumerate() {
            for (v, out) in row.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        t
    }
}
