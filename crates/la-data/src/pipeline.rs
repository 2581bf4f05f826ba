//! A [`Pipeline`]: per-sample transforms, then normalisation, then an optional
//! batch-level [`Mix`] (MixUp / CutMix) that turns hard labels into soft targets.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Beta, Distribution};

use crate::erasing::RandomErasing;
use crate::rng::SampleRng;
use crate::transforms::{
    CenterCrop, ColorJitter, HorizontalFlip, RandomCrop, RandomResizedCrop, Resize, Transform,
};
use crate::{Error, Image, Normalize, Result};

/// The standard training augmentation of a data set (see [`Pipeline::train_preset`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    Cifar10,
    Cifar100,
    FashionMnist,
    Digits,
    ImageNet,
    /// The article's recipe: RandomResizedCrop + HorizontalFlip + ColorJitter
    /// (CutMix/MixUp are added with [`Pipeline::with_mix`]).
    ArticleRecipe,
}

impl Preset {
    pub const ALL: [Preset; 6] = [
        Preset::Cifar10,
        Preset::Cifar100,
        Preset::FashionMnist,
        Preset::Digits,
        Preset::ImageNet,
        Preset::ArticleRecipe,
    ];

    /// The normalisation statistics that go with the data set.
    pub fn normalization(self) -> Normalize {
        match self {
            Preset::Cifar10 => Normalize::CIFAR10,
            Preset::Cifar100 => Normalize::CIFAR100,
            Preset::FashionMnist => Normalize::FASHION_MNIST,
            Preset::Digits => Normalize::DIGITS,
            Preset::ImageNet | Preset::ArticleRecipe => Normalize::IMAGENET,
        }
    }

    /// The input size usually trained at: 32 for the small sets (a VGG's five poolings
    /// need at least 32), 224 for ImageNet-style data.
    pub fn default_size(self) -> usize {
        match self {
            Preset::ImageNet | Preset::ArticleRecipe => 224,
            _ => 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Cifar10 => "cifar10",
            Preset::Cifar100 => "cifar100",
            Preset::FashionMnist => "fashion-mnist",
            Preset::Digits => "digits",
            Preset::ImageNet => "imagenet",
            Preset::ArticleRecipe => "article",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let key: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        Ok(match key.as_str() {
            "cifar10" => Preset::Cifar10,
            "cifar100" => Preset::Cifar100,
            "fashionmnist" | "fashion" => Preset::FashionMnist,
            "digits" => Preset::Digits,
            "imagenet" => Preset::ImageNet,
            // "seed": the name before it was "article".
            "article" | "articlerecipe" | "seed" | "seedrecipe" => Preset::ArticleRecipe,
            _ => {
                return Err(Error::Config(format!(
                    "unknown preset `{s}` (one of: cifar10, cifar100, fashion-mnist, digits, imagenet, article)"
                )))
            }
        })
    }
}

/// Batch-level mixing; produces soft targets (`lambda` of one label, `1 - lambda` of
/// another). Partners are a random permutation of the batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mix {
    /// Pixel-wise blend with `lambda ~ Beta(alpha, alpha)`.
    MixUp { alpha: f32 },
    /// A box from the partner pasted in; `lambda` is corrected to the box's actual area
    /// after clipping to the image (timm's `correct_lam`).
    CutMix { alpha: f32 },
    /// CutMix with probability `prob_cutmix`, MixUp otherwise (per batch).
    Either {
        mixup_alpha: f32,
        cutmix_alpha: f32,
        prob_cutmix: f32,
    },
}

/// What a mix did to one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct MixOutcome {
    /// `[b, num_classes]` row-major, each row summing to 1.
    pub soft: Vec<f32>,
    /// Per sample, the label with the larger weight (its own when `lambda >= 0.5`).
    pub dominant: Vec<usize>,
    /// Weight of each sample's own label.
    pub lambda: f32,
    /// Partner of each sample.
    pub partners: Vec<usize>,
}

impl Mix {
    /// Fails on an alpha that is not positive and finite or a probability outside [0, 1].
    pub fn validate(&self) -> Result<()> {
        let alpha_ok = |a: f32| a.is_finite() && a > 0.0;
        let ok = match *self {
            Mix::MixUp { alpha } | Mix::CutMix { alpha } => alpha_ok(alpha),
            Mix::Either {
                mixup_alpha,
                cutmix_alpha,
                prob_cutmix,
            } => {
                alpha_ok(mixup_alpha)
                    && alpha_ok(cutmix_alpha)
                    && (0.0..=1.0).contains(&prob_cutmix)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "{self:?}: alphas must be positive and finite, prob_cutmix in [0, 1]"
            )))
        }
    }

    /// Mixes a batch in place: `images` is `[b, c, h, w]` (`dims` = (c, h, w)),
    /// `labels` the hard labels. Deterministic in `rng`.
    pub fn apply(
        &self,
        images: &mut [f32],
        dims: (usize, usize, usize),
        labels: &[usize],
        num_classes: usize,
        rng: &mut SampleRng,
    ) -> Result<MixOutcome> {
        self.validate()?;
        let (c, h, w) = dims;
        let b = labels.len();
        let per = c * h * w;
        if images.len() != b * per {
            return Err(Error::Config(format!(
                "mix: {} values for {b} images of {c}x{h}x{w}",
                images.len()
            )));
        }
        if let Some(&l) = labels.iter().find(|&&l| l >= num_classes) {
            return Err(Error::Config(format!(
                "mix: label {l} is not below the class count {num_classes}"
            )));
        }
        let (cutmix, alpha) = match *self {
            Mix::MixUp { alpha } => (false, alpha),
            Mix::CutMix { alpha } => (true, alpha),
            Mix::Either {
                mixup_alpha,
                cutmix_alpha,
                prob_cutmix,
            } => {
                if rng.random::<f32>() < prob_cutmix {
                    (true, cutmix_alpha)
                } else {
                    (false, mixup_alpha)
                }
            }
        };
        let beta = Beta::new(alpha as f64, alpha as f64)
            .map_err(|e| Error::Config(format!("mix: Beta({alpha}, {alpha}): {e}")))?;
        let mut lambda = beta.sample(rng) as f32;
        let mut partners: Vec<usize> = (0..b).collect();
        partners.shuffle(rng);
        let original = images.to_vec();
        if cutmix {
            let (y0, y1, x0, x1) = cutmix_box(h, w, lambda, rng);
            for (i, &j) in partners.iter().enumerate() {
                for ch in 0..c {
                    for y in y0..y1 {
                        let row = i * per + ch * h * w + y * w;
                        let prow = j * per + ch * h * w + y * w;
                        images[row + x0..row + x1].copy_from_slice(&original[prow + x0..prow + x1]);
                    }
                }
            }
            if h * w > 0 {
                lambda = 1.0 - ((y1 - y0) * (x1 - x0)) as f32 / (h * w) as f32;
            }
        } else {
            for (i, &j) in partners.iter().enumerate() {
                let dst = &mut images[i * per..(i + 1) * per];
                let src = &original[j * per..(j + 1) * per];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = lambda * *d + (1.0 - lambda) * s;
                }
            }
        }
        let mut soft = vec![0f32; b * num_classes];
        let mut dominant = Vec::with_capacity(b);
        for (i, &j) in partners.iter().enumerate() {
            soft[i * num_classes + labels[i]] += lambda;
            soft[i * num_classes + labels[j]] += 1.0 - lambda;
            dominant.push(if lambda >= 0.5 { labels[i] } else { labels[j] });
        }
        Ok(MixOutcome {
            soft,
            dominant,
            lambda,
            partners,
        })
    }
}

/// CutMix's box (y0, y1, x0, x1) for area fraction `1 - lambda`, centred uniformly in
/// the image and clipped to it, as timm's `rand_bbox`.
fn cutmix_box(
    h: usize,
    w: usize,
    lambda: f32,
    rng: &mut SampleRng,
) -> (usize, usize, usize, usize) {
    if h == 0 || w == 0 {
        return (0, 0, 0, 0);
    }
    let cut = (1.0 - lambda).clamp(0.0, 1.0).sqrt();
    let (ch, cw) = ((h as f32 * cut) as isize, (w as f32 * cut) as isize);
    let cy = rng.random_range(0..h) as isize;
    let cx = rng.random_range(0..w) as isize;
    let clip = |v: isize, n: usize| v.clamp(0, n as isize) as usize;
    (
        clip(cy - ch / 2, h),
        clip(cy + ch / 2, h),
        clip(cx - cw / 2, w),
        clip(cx + cw / 2, w),
    )
}

/// Per-sample transforms, then normalisation, then an optional batch-level mix.
///
/// Build one with [`Pipeline::new`] and [`Pipeline::then`], or take a preset.
#[derive(Clone, Debug)]
pub struct Pipeline {
    transforms: Vec<Arc<dyn Transform>>,
    normalize: Normalize,
    erasing: Option<RandomErasing>,
    mix: Option<Mix>,
    /// The first epoch (0-based) without the mix (timm's `--mixup-off-epoch`).
    mix_off_epoch: Option<usize>,
}

impl Pipeline {
    /// No transforms yet: only scaling to [0, 1] and `normalize`.
    pub fn new(normalize: Normalize) -> Self {
        Pipeline {
            transforms: Vec::new(),
            normalize,
            erasing: None,
            mix: None,
            mix_off_epoch: None,
        }
    }

    /// Appends a transform.
    pub fn then(mut self, transform: impl Transform + 'static) -> Self {
        self.transforms.push(Arc::new(transform));
        self
    }

    /// Appends a shared transform.
    pub fn then_shared(mut self, transform: Arc<dyn Transform>) -> Self {
        self.transforms.push(transform);
        self
    }

    /// Replaces the normalisation.
    pub fn with_normalize(mut self, normalize: Normalize) -> Self {
        self.normalize = normalize;
        self
    }

    /// Sets or clears random erasing, which runs after the normalisation.
    pub fn with_random_erasing(mut self, erasing: Option<RandomErasing>) -> Self {
        self.erasing = erasing;
        self
    }

    /// Mixes only the epochs before `epoch` (0-based), as timm's `--mixup-off-epoch`.
    pub fn with_mix_off_epoch(mut self, epoch: Option<usize>) -> Self {
        self.mix_off_epoch = epoch;
        self
    }

    /// The mix applied to the batches of `epoch`.
    pub fn mix_at(&self, epoch: usize) -> Option<Mix> {
        self.mix
            .filter(|_| self.mix_off_epoch.is_none_or(|off| epoch < off))
    }

    /// Sets or clears the batch-level mix.
    pub fn with_mix(mut self, mix: Option<Mix>) -> Self {
        self.mix = mix;
        self
    }

    /// The standard training augmentation of a data set at `size` x `size`:
    /// - CIFAR-10/100: RandomCrop(size, padding size/8, i.e. 4 at 32) + HorizontalFlip;
    /// - Fashion-MNIST: bilinear resize to `size` + RandomCrop(size, size/8) + HorizontalFlip;
    /// - digits: the same without the flip (a mirrored 2 is no longer a 2);
    /// - ImageNet: RandomResizedCrop(size) + HorizontalFlip;
    /// - ArticleRecipe: RandomResizedCrop(size) + HorizontalFlip + ColorJitter(0.4, 0.4, 0.4, 0.1).
    ///
    /// The small-set presets resize first only when an image is not already `size`.
    pub fn train_preset(preset: Preset, size: usize) -> Pipeline {
        let p = Pipeline::new(preset.normalization());
        let pad = size / 8;
        match preset {
            Preset::Cifar10 | Preset::Cifar100 | Preset::FashionMnist => p
                .then(Resize::exact(size, size))
                .then(RandomCrop::new(size, pad))
                .then(HorizontalFlip::default()),
            Preset::Digits => p
                .then(Resize::exact(size, size))
                .then(RandomCrop::new(size, pad)),
            Preset::ImageNet => p
                .then(RandomResizedCrop::new(size))
                .then(HorizontalFlip::default()),
            Preset::ArticleRecipe => p
                .then(RandomResizedCrop::new(size))
                .then(HorizontalFlip::default())
                .then(ColorJitter::new(0.4, 0.4, 0.4, 0.1)),
        }
    }

    /// Evaluation: resize the shorter side to `size` (bilinear) and take the central
    /// `size` x `size`; an image already `size` x `size` is left as it is, so it is
    /// only scaled to [0, 1] and normalised.
    pub fn eval(size: usize, normalization: Normalize) -> Pipeline {
        Pipeline::new(normalization)
            .then(Resize::shorter_side(size))
            .then(CenterCrop::new(size))
    }

    /// ImageNet-style evaluation: resize the shorter side to `resize` (e.g. 256), then
    /// the central `size` (e.g. 224).
    pub fn eval_resize_crop(size: usize, resize: usize, normalization: Normalize) -> Pipeline {
        Pipeline::new(normalization)
            .then(Resize::shorter_side(resize))
            .then(CenterCrop::new(size))
    }

    pub fn transforms(&self) -> &[Arc<dyn Transform>] {
        &self.transforms
    }

    pub fn normalization(&self) -> Normalize {
        self.normalize
    }

    pub fn mix(&self) -> Option<Mix> {
        self.mix
    }

    /// Checks what can be checked before running: normalisation and mix parameters.
    pub fn validate(&self) -> Result<()> {
        self.normalize.validate()?;
        if let Some(e) = &self.erasing {
            e.validate()?;
        }
        if let Some(m) = &self.mix {
            m.validate()?;
        }
        Ok(())
    }

    /// Runs the per-sample transforms.
    pub fn augment(&self, mut image: Image, rng: &mut SampleRng) -> Result<Image> {
        for t in &self.transforms {
            image = t.apply(image, rng)?;
        }
        Ok(image)
    }

    /// Runs the per-sample transforms and normalises: CHW `f32` and (height, width).
    pub fn process(&self, image: Image, rng: &mut SampleRng) -> Result<(Vec<f32>, usize, usize)> {
        let image = self.augment(image, rng)?;
        if !image.is_consistent() {
            return Err(Error::Config(format!(
                "a transform produced {} bytes for a {}x{} image",
                image.data.len(),
                image.height,
                image.width
            )));
        }
        let (h, w) = (image.height, image.width);
        let mut chw = image.to_chw(&self.normalize);
        if let Some(erasing) = &self.erasing {
            erasing.apply(&mut chw, (3, h, w), rng);
        }
        Ok((chw, h, w))
    }
}
