//! Loading a model for inference: the weights file's config, normalisation, input size and
//! class names, and images prepared as the model expects them.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use la_data::transforms::Resize;
use la_data::{Image, Normalize, Pipeline};

use crate::heatmap::Region;
use la_vgg::Vgg;

pub struct LoadedModel {
    pub model: Vgg,
    pub normalization: Normalize,
    pub input_size: usize,
    pub classes: Vec<String>,
    pub device: Device,
}

/// Loads `path` (any format `la_vgg::load_weights` reads). The input size is `size`, else the
/// file's `input_size`, else 224; class names are the file's, else their indices.
pub fn load_model(path: &Path, size: Option<usize>, device: &Device) -> Result<LoadedModel> {
    let weights = la_vgg::load_weights(path, &Device::Cpu)?;
    let model = Vgg::from_weights(&weights, DType::F32, device)
        .with_context(|| format!("{}: cannot build the model", path.display()))?;
    let metadata = &weights.metadata;
    Ok(LoadedModel {
        model,
        normalization: metadata.normalization.unwrap_or(Normalize::IMAGENET),
        input_size: size.or(metadata.input_size).unwrap_or(224),
        classes: metadata.class_names(),
        device: device.clone(),
    })
}

impl LoadedModel {
    fn pipeline(&self) -> Pipeline {
        Pipeline::eval(self.input_size, self.normalization)
    }

    /// Decodes an image file and prepares it: Resize + CenterCrop to the input size (an image
    /// of that size is only scaled and normalised). Returns the batch [1, 3, s, s], the image
    /// as decoded, and the part of it the model sees.
    pub fn prepare(&self, path: &Path) -> Result<(Tensor, Image, Region)> {
        let original = la_data::folder::decode_image(path)?;
        let pipeline = self.pipeline();
        // The evaluation transforms draw nothing at random; the generator only fills the slot.
        let mut rng = la_data::rng::sample_rng(0, 0, 0);
        let seen = pipeline.augment(original.clone(), &mut rng)?;
        let (chw, h, w) = (
            seen.to_chw(&pipeline.normalization()),
            seen.height,
            seen.width,
        );
        let tensor = Tensor::from_vec(chw, (1, 3, h, w), &Device::Cpu)?.to_device(&self.device)?;
        self.model.check_input(&tensor)?;
        let region = self.seen_region(original.height, original.width);
        Ok((tensor, original, region))
    }

    /// Where the centre crop of the resized image lies in an image of height x width.
    fn seen_region(&self, height: usize, width: usize) -> Region {
        let size = self.input_size;
        let (rh, rw) = Resize::shorter_side(size).target(height, width);
        let (sy, sx) = (height as f64 / rh as f64, width as f64 / rw as f64);
        // CenterCrop's offsets, rounded as torchvision (and la-data) do.
        let top = ((rh as f64 - size as f64) / 2.0).round();
        let left = ((rw as f64 - size as f64) / 2.0).round();
        Region {
            top: top * sy,
            left: left * sx,
            height: size as f64 * sy,
            width: size as f64 * sx,
        }
    }
}
