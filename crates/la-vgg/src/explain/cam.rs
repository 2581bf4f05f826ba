//! The class-activation-map family on a block's output (after its attention module, before
//! its pool), as pytorch-grad-cam defines each method for a classifier's raw class score.
//! One difference: EigenCAM's projection is sign-corrected (pytorch-grad-cam's
//! `get_2d_projection_with_sign_correction`), since a plain SVD's sign is arbitrary.

use candle_core::{DType, Tensor, Var, D};
use candle_nn::ModuleT;

use crate::{Error, Result, Vgg};

/// How a map is made from the block's activation A [c, h, w] and the gradient G of the class
/// score with respect to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CamMethod {
    /// Selvaraju et al. 2017: channel weights are the spatial means of G.
    GradCam,
    /// Chattopadhyay et al. 2018: weights sum relu(G) * a, a = G^2 / (2 G^2 + sum(A) G^3).
    GradCamPlusPlus,
    /// Fu et al. 2020: weights sum G * A / sum(A).
    XGradCam,
    /// Jiang et al. 2021: relu(G) * A summed over channels, no spatial pooling.
    LayerCam,
    /// Draelos and Carin 2020: G * A summed over channels, faithful to the score.
    HiResCam,
    /// Muhammad and Yeasin 2020: the activation's first principal component; no gradient and
    /// no class.
    EigenCam,
    /// Wang et al. 2020: each channel, min-max scaled at the input's size, masks the image;
    /// weights are the softmax over channels of the class scores of the masked images.
    ScoreCam,
}

impl CamMethod {
    pub const ALL: [CamMethod; 7] = [
        CamMethod::GradCam,
        CamMethod::GradCamPlusPlus,
        CamMethod::XGradCam,
        CamMethod::LayerCam,
        CamMethod::HiResCam,
        CamMethod::EigenCam,
        CamMethod::ScoreCam,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CamMethod::GradCam => "grad-cam",
            CamMethod::GradCamPlusPlus => "grad-cam++",
            CamMethod::XGradCam => "xgrad-cam",
            CamMethod::LayerCam => "layer-cam",
            CamMethod::HiResCam => "hires-cam",
            CamMethod::EigenCam => "eigen-cam",
            CamMethod::ScoreCam => "score-cam",
        }
    }

    /// The name in pictures, as the papers write it.
    pub fn title(self) -> &'static str {
        match self {
            CamMethod::GradCam => "Grad-CAM",
            CamMethod::GradCamPlusPlus => "Grad-CAM++",
            CamMethod::XGradCam => "XGrad-CAM",
            CamMethod::LayerCam => "LayerCAM",
            CamMethod::HiResCam => "HiResCAM",
            CamMethod::EigenCam => "EigenCAM",
            CamMethod::ScoreCam => "Score-CAM",
        }
    }

    pub fn uses_gradients(self) -> bool {
        !matches!(self, CamMethod::EigenCam | CamMethod::ScoreCam)
    }
}

impl std::fmt::Display for CamMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CamMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let wanted = s.to_ascii_lowercase().replace('_', "-");
        Self::ALL
            .into_iter()
            .find(|m| m.name() == wanted || m.name().replace('-', "") == wanted)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown CAM method `{s}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// A class-activation map and what produced it.
pub struct Cam {
    pub method: CamMethod,
    /// [h, w] at the block's resolution: the ReLU of the method's map, min-max scaled to
    /// [0, 1] as pytorch-grad-cam's `scale_cam_image` does (all zeros if the map is flat).
    pub map: Tensor,
    /// The ReLU of the method's map, unscaled.
    pub raw: Tensor,
    /// The class explained, and the model's logits for the image.
    pub class: usize,
    pub logits: Tensor,
}

/// Channels of masked images that Score-CAM runs through the model at once.
const SCORE_CAM_BATCH: usize = 32;

impl Vgg {
    /// Grad-CAM of `class` (default: the predicted class); see [`Vgg::cam`].
    pub fn grad_cam(&self, image: &Tensor, block: usize, class: Option<usize>) -> Result<Cam> {
        self.cam(image, block, class, CamMethod::GradCam)
    }

    /// The map of `method` for `class` (default: the predicted class) of a single image
    /// [1, 3, h, w], on block `block`'s output (0-based). The class score is the raw logit,
    /// pytorch-grad-cam's `ClassifierOutputTarget`.
    pub fn cam(
        &self,
        image: &Tensor,
        block: usize,
        class: Option<usize>,
        method: CamMethod,
    ) -> Result<Cam> {
        self.check_input(image)?;
        if image.dim(0)? != 1 {
            return Err(Error::Input(format!(
                "{} explains one image at a time",
                method.title()
            )));
        }
        let taps = self.forward_intermediates(image, &[block], false)?;
        let activation = taps.blocks[0].output.detach();
        let logits = self.forward_head(&taps.features, false)?;
        let class = check_class(&logits, class)?;
        let a = activation.squeeze(0)?; // [c, h, w]
        let weighted_sum = |weights: &Tensor| -> Result<Tensor> {
            Ok(a.broadcast_mul(&weights.reshape(((), 1, 1))?)?.sum(0)?)
        };
        let map = match method {
            CamMethod::EigenCam => first_principal_component(&a)?,
            CamMethod::ScoreCam => weighted_sum(&self.score_cam_weights(image, &a, class)?)?,
            _ => {
                let g = self.score_gradient(block, &activation, class)?.squeeze(0)?;
                match method {
                    CamMethod::GradCam => weighted_sum(&g.mean(D::Minus1)?.mean(D::Minus1)?)?,
                    CamMethod::GradCamPlusPlus => weighted_sum(&grad_cam_plus_plus(&a, &g)?)?,
                    CamMethod::XGradCam => {
                        let sum_a = spatial_sum_keepdim(&a)?;
                        let w = (&g * &a)?.broadcast_div(&(sum_a + 1e-7)?)?;
                        weighted_sum(&w.sum(D::Minus1)?.sum(D::Minus1)?)?
                    }
                    CamMethod::LayerCam => (g.relu()? * &a)?.sum(0)?,
                    CamMethod::HiResCam => (g * &a)?.sum(0)?,
                    CamMethod::EigenCam | CamMethod::ScoreCam => unreachable!(),
                }
            }
        };
        let raw = map.relu()?;
        Ok(Cam {
            method,
            map: min_max_scaled(&raw)?,
            raw,
            class,
            logits,
        })
    }

    /// d logit[class] / d block output, [1, c, h, w].
    fn score_gradient(&self, block: usize, activation: &Tensor, class: usize) -> Result<Tensor> {
        // Candle keeps gradients only for variables (those of intermediate tensors are freed
        // as the backward pass consumes them), so the block's output becomes a leaf variable
        // and the rest of the network is run from it.
        let leaf = Var::from_tensor(activation)?;
        let logits = self.forward_from_block(block, leaf.as_tensor())?;
        let grads = logits.narrow(1, class, 1)?.sum_all()?.backward()?;
        grads
            .get(leaf.as_tensor())
            .cloned()
            .ok_or_else(|| Error::Input("no gradient reached the chosen block".into()))
    }

    /// Score-CAM's channel weights [c] for activation `a` [c, h, w].
    fn score_cam_weights(&self, image: &Tensor, a: &Tensor, class: usize) -> Result<Tensor> {
        let (_, _, height, width) = image.dims4()?;
        let (c, _, _) = a.dims3()?;
        // torch.nn.UpsamplingBilinear2d, which pytorch-grad-cam uses, aligns corners.
        let up = a
            .unsqueeze(0)?
            .upsample_bilinear2d(height, width, true)?
            .squeeze(0)?;
        let flat = up.flatten_from(1)?;
        let min = flat.min_keepdim(1)?.unsqueeze(2)?;
        let max = flat.max_keepdim(1)?.unsqueeze(2)?;
        let masks = up
            .broadcast_sub(&min)?
            .broadcast_div(&((max - &min)? + 1e-8)?)?;
        let mut scores = Vec::with_capacity(c);
        for start in (0..c).step_by(SCORE_CAM_BATCH) {
            let len = SCORE_CAM_BATCH.min(c - start);
            let masked = masks
                .narrow(0, start, len)?
                .unsqueeze(1)?
                .broadcast_mul(image)?;
            scores.push(
                self.forward_t(&masked, false)?
                    .narrow(1, class, 1)?
                    .squeeze(1)?,
            );
        }
        Ok(candle_nn::ops::softmax(&Tensor::cat(&scores, 0)?, 0)?)
    }
}

/// The class to explain: `class` if the model has it, else the predicted one.
pub(crate) fn check_class(logits: &Tensor, class: Option<usize>) -> Result<usize> {
    let classes = logits.dim(1)?;
    match class {
        Some(c) if c < classes => Ok(c),
        Some(c) => Err(Error::Input(format!(
            "class {c} does not exist (the model has {classes})"
        ))),
        None => Ok(logits.argmax(1)?.to_vec1::<u32>()?[0] as usize),
    }
}

fn spatial_sum_keepdim(t: &Tensor) -> Result<Tensor> {
    Ok(t.sum_keepdim((D::Minus2, D::Minus1))?)
}

/// Grad-CAM++'s channel weights [c] (pytorch-grad-cam's form of the paper's equation 19,
/// with its eps of 1e-6 and a = 0 where the gradient is 0).
fn grad_cam_plus_plus(a: &Tensor, g: &Tensor) -> Result<Tensor> {
    let g2 = g.sqr()?;
    let g3 = (&g2 * g)?;
    let sum_a = spatial_sum_keepdim(a)?;
    let denominator = ((&g2 * 2.0)? + g3.broadcast_mul(&sum_a)?)? + 1e-6;
    let aij = (&g2 / denominator?)?;
    let aij = g.ne(0.0)?.where_cond(&aij, &aij.zeros_like()?)?;
    Ok((g.relu()? * aij)?.sum(D::Minus1)?.sum(D::Minus1)?)
}

/// The projection [h, w] of the tokens of `a` [c, h, w], centred over positions, on their
/// first right singular vector (pytorch-grad-cam's `get_2d_projection`). An SVD's sign is
/// arbitrary, so the map is flipped when its most negative value outweighs its largest
/// (`get_2d_projection_with_sign_correction`), which makes it the same on every machine.
fn first_principal_component(a: &Tensor) -> Result<Tensor> {
    let (c, h, w) = a.dims3()?;
    let n = h * w;
    let values: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let mut tokens = nalgebra::DMatrix::from_fn(n, c, |p, ch| values[ch * n + p]);
    for mut column in tokens.column_iter_mut() {
        let mean = column.mean();
        column.add_scalar_mut(-mean);
    }
    let svd = tokens.clone().svd(false, true);
    let v_t = svd
        .v_t
        .ok_or_else(|| Error::Input("the SVD of the activation did not converge".into()))?;
    let first = svd.singular_values.imax();
    let mut projection: Vec<f64> = (&tokens * v_t.row(first).transpose())
        .iter()
        .copied()
        .collect();
    let (min, max) = projection
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if min.abs() > max.abs() {
        projection.iter_mut().for_each(|v| *v = -*v);
    }
    Ok(
        Tensor::from_vec(projection, (h, w), &candle_core::Device::Cpu)?
            .to_dtype(a.dtype())?
            .to_device(a.device())?,
    )
}

/// (x - min) / (max - min + 1e-7), pytorch-grad-cam's `scale_cam_image`.
pub fn min_max_scaled(map: &Tensor) -> Result<Tensor> {
    let shifted = map.broadcast_sub(&map.min_all()?)?;
    Ok(shifted.broadcast_div(&(shifted.max_all()? + 1e-7)?)?)
}

impl Cam {
    /// The map at the input's size [height, width], as pytorch-grad-cam returns it: the scaled
    /// map resized bilinearly with half-pixel centres (`cv2.resize`), then scaled again.
    pub fn upsampled(&self, height: usize, width: usize) -> Result<Tensor> {
        let up = self
            .map
            .unsqueeze(0)?
            .unsqueeze(0)?
            .upsample_bilinear2d(height, width, false)?
            .squeeze(0)?
            .squeeze(0)?;
        min_max_scaled(&up)
    }
}
