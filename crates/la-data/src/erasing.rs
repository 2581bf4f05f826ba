//! Random erasing (Zhong et al. 2017) as timm's `RandomErasing` in its per-pixel mode: with
//! probability `p`, one rectangle of 2 % to 1/3 of the image, of aspect ratio 0.3 to 3.3
//! (log-uniform), is filled with N(0, 1) noise. It runs on the normalised CHW image, as in
//! timm, so the noise has the statistics of normalised pixels.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::rng::SampleRng;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomErasing {
    pub probability: f64,
    /// Fraction of the image area, as timm's `min_area`, `max_area`.
    pub area: (f64, f64),
    /// Aspect ratios (height / width), sampled log-uniformly.
    pub aspect: (f64, f64),
}

impl RandomErasing {
    /// timm's defaults with probability `probability` (`--reprob`).
    pub fn new(probability: f64) -> Self {
        Self {
            probability,
            area: (0.02, 1.0 / 3.0),
            aspect: (0.3, 1.0 / 0.3),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = self.area;
        let ok = (0.0..=1.0).contains(&self.probability)
            && 0.0 < lo
            && lo <= hi
            && hi <= 1.0
            && 0.0 < self.aspect.0
            && self.aspect.0 <= self.aspect.1;
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!("random erasing {self:?}: probability must be in [0, 1], areas in (0, 1] and ordered, aspect ratios positive and ordered")))
        }
    }

    /// Erases (or not) one rectangle of `chw` ([channels, height, width], row-major).
    pub fn apply(
        &self,
        chw: &mut [f32],
        (channels, height, width): (usize, usize, usize),
        rng: &mut SampleRng,
    ) {
        if self.probability <= 0.0 || rng.random::<f64>() >= self.probability {
            return;
        }
        let area = (height * width) as f64;
        let (log_lo, log_hi) = (self.aspect.0.ln(), self.aspect.1.ln());
        // As timm: up to 10 tries at a rectangle that fits strictly inside.
        for _ in 0..10 {
            let target = rng.random_range(self.area.0..=self.area.1) * area;
            let ratio = rng.random_range(log_lo..=log_hi).exp();
            let h = (target * ratio).sqrt().round() as usize;
            let w = (target / ratio).sqrt().round() as usize;
            if h == 0 || w == 0 || h >= height || w >= width {
                continue;
            }
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            for c in 0..channels {
                for y in top..top + h {
                    let row = &mut chw[(c * height + y) * width + left..][..w];
                    for v in row {
                        *v = StandardNormal.sample(rng);
                    }
                }
            }
            return;
        }
    }
}
