//! torchvision's automatic augmentation policies: [`AutoAugment::trivial_augment_wide`]
//! (one operation at a random magnitude per image, Müller & Hutter 2021) and
//! [`AutoAugment::rand_augment`] (N operations at a fixed magnitude M, Cubuk et al. 2020),
//! with torchvision's operation lists and magnitude tables. The operations are in
//! [`crate::augment_ops`].

use rand::Rng;

use crate::augment_ops::AugmentOp;
use crate::rng::SampleRng;
use crate::transforms::Transform;
use crate::{Error, Image, Result};

/// Which policy, with its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// One uniformly chosen operation at a uniformly chosen magnitude bin.
    TrivialAugmentWide,
    /// `num_ops` uniformly chosen operations, each at magnitude bin `magnitude`.
    RandAugment { num_ops: usize, magnitude: usize },
}

/// A policy as a per-sample [`Transform`].
#[derive(Clone, Debug, PartialEq)]
pub struct AutoAugment {
    policy: Policy,
    num_bins: usize,
}

/// torchvision's defaults.
pub const NUM_MAGNITUDE_BINS: usize = 31;
pub const RAND_AUGMENT_NUM_OPS: usize = 2;
pub const RAND_AUGMENT_MAGNITUDE: usize = 9;

impl AutoAugment {
    pub fn trivial_augment_wide() -> Self {
        AutoAugment {
            policy: Policy::TrivialAugmentWide,
            num_bins: NUM_MAGNITUDE_BINS,
        }
    }

    /// RandAugment(num_ops, magnitude), the magnitude a bin of 0..31.
    pub fn rand_augment(num_ops: usize, magnitude: usize) -> Result<Self> {
        let policy = AutoAugment {
            policy: Policy::RandAugment { num_ops, magnitude },
            num_bins: NUM_MAGNITUDE_BINS,
        };
        policy.validate()?;
        Ok(policy)
    }

    /// A different number of magnitude bins (torchvision's `num_magnitude_bins`).
    pub fn with_num_bins(mut self, num_bins: usize) -> Result<Self> {
        self.num_bins = num_bins;
        self.validate()?;
        Ok(self)
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    fn validate(&self) -> Result<()> {
        if self.num_bins < 2 {
            return Err(Error::Config(format!(
                "automatic augmentation needs at least 2 magnitude bins, not {}",
                self.num_bins
            )));
        }
        if let Policy::RandAugment { magnitude, .. } = self.policy {
            if magnitude >= self.num_bins {
                return Err(Error::Config(format!(
                    "RandAugment magnitude {magnitude} is not below the {} magnitude bins",
                    self.num_bins
                )));
            }
        }
        Ok(())
    }

    /// The magnitudes of `op` for a `height` x `width` image, and whether a magnitude's
    /// sign is drawn; `None` for the operations without a magnitude.
    pub fn magnitudes(
        &self,
        op: AugmentOp,
        height: usize,
        width: usize,
    ) -> Option<(Vec<f32>, bool)> {
        let n = self.num_bins;
        let wide = self.policy == Policy::TrivialAugmentWide;
        let pick = |wide_value: f64, rand_value: f64| if wide { wide_value } else { rand_value };
        let signed = |end: f64| Some((linspace(0.0, end, n), true));
        match op {
            AugmentOp::Identity | AugmentOp::AutoContrast | AugmentOp::Equalize => None,
            AugmentOp::ShearX | AugmentOp::ShearY => signed(pick(0.99, 0.3)),
            AugmentOp::TranslateX => signed(pick(32.0, 150.0 / 331.0 * width as f64)),
            AugmentOp::TranslateY => signed(pick(32.0, 150.0 / 331.0 * height as f64)),
            AugmentOp::Rotate => signed(pick(135.0, 30.0)),
            AugmentOp::Brightness
            | AugmentOp::Color
            | AugmentOp::Contrast
            | AugmentOp::Sharpness => signed(pick(0.99, 0.9)),
            AugmentOp::Posterize => {
                let levels = pick(6.0, 4.0) as f32;
                let step = (n - 1) as f32 / levels;
                let bits = (0..n).map(|i| 8.0 - (i as f32 / step).round_ties_even());
                Some((bits.collect(), false))
            }
            AugmentOp::Solarize => Some((linspace(255.0, 0.0, n), false)),
        }
    }

    /// Draws one operation and its magnitude (the bin given, or a random one), as the
    /// policies' `forward` does.
    fn draw(&self, image: &Image, bin: Option<usize>, rng: &mut SampleRng) -> (AugmentOp, f32) {
        let op = AugmentOp::ALL[rng.random_range(0..AugmentOp::ALL.len())];
        let magnitude = match self.magnitudes(op, image.height, image.width) {
            None => 0.0,
            Some((table, signed)) => {
                let m = table[bin.unwrap_or_else(|| rng.random_range(0..table.len()))];
                if signed && rng.random_bool(0.5) {
                    -m
                } else {
                    m
                }
            }
        };
        (op, magnitude)
    }
}

impl Transform for AutoAugment {
    fn apply(&self, mut image: Image, rng: &mut SampleRng) -> Result<Image> {
        match self.policy {
            Policy::TrivialAugmentWide => {
                let (op, magnitude) = self.draw(&image, None, rng);
                op.apply(image, magnitude)
            }
            Policy::RandAugment { num_ops, magnitude } => {
                for _ in 0..num_ops {
                    let (op, m) = self.draw(&image, Some(magnitude), rng);
                    image = op.apply(image, m)?;
                }
                Ok(image)
            }
        }
    }
}

/// `torch.linspace` in float32: the first half counted up from `start`, the second down
/// from `end`, so both ends are exact.
fn linspace(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_at_both_ends_and_the_middle() {
        let v = linspace(0.0, 32.0, 31);
        assert_eq!((v[0], v[15], v[30]), (0.0, 16.0, 32.0));
        assert!((v[1] - 32.0 / 30.0).abs() < 1e-6);
    }

    #[test]
    fn posterize_bits_follow_torchvision() {
        let wide = AutoAugment::trivial_augment_wide();
        let (bits, signed) = wide.magnitudes(AugmentOp::Posterize, 32, 32).unwrap();
        assert!(!signed);
        // 8 - round(i / 5): 8 for bins 0-2, 2 for bins 28-30.
        assert_eq!(&bits[..4], &[8.0, 8.0, 8.0, 7.0]);
        assert_eq!(bits[30], 2.0);
        let rand = AutoAugment::rand_augment(2, 9).unwrap();
        // 8 - round(9 / 7.5) = 7
        assert_eq!(
            rand.magnitudes(AugmentOp::Posterize, 32, 32).unwrap().0[9],
            7.0
        );
    }

    #[test]
    fn rand_augment_translation_scales_with_the_image() {
        let rand = AutoAugment::rand_augment(2, 9).unwrap();
        let (x, _) = rand.magnitudes(AugmentOp::TranslateX, 32, 331).unwrap();
        assert!((x[30] - 150.0).abs() < 1e-4);
        let (y, _) = rand.magnitudes(AugmentOp::TranslateY, 331 * 2, 32).unwrap();
        assert!((y[30] - 300.0).abs() < 1e-3);
    }

    #[test]
    fn a_magnitude_outside_the_bins_is_refused() {
        let err = AutoAugment::rand_augment(2, 31).unwrap_err().to_string();
        assert!(err.contains("31"), "{err}");
    }
}
