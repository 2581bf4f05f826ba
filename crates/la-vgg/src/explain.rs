//! Grad-CAM (Selvaraju et al. 2017) on a block's output.

use candle_core::{DType, Tensor, Var};

use crate::{Error, Result, Vgg};

/// A class-activation map and what produced it.
pub struct GradCam {
    /// [h, w] of the block's map, ReLU'd and scaled to [0, 1] (all zeros if nothing is positive).
    pub map: Tensor,
    /// The un-normalised map: relu(sum_c weight_c A_c).
    pub raw: Tensor,
    /// The class explained, and the model's logits for the image.
    pub class: usize,
    pub logits: Tensor,
}

impl Vgg {
    /// Grad-CAM of `class` (default: the predicted class) for a single image [1, 3, h, w] on
    /// block `block`'s output (after its attention module, before its pool): channel
    /// weights are the spatial means of d score / d activation, the map is the ReLU of the
    /// weighted sum of the activation's channels.
    pub fn grad_cam(&self, image: &Tensor, block: usize, class: Option<usize>) -> Result<GradCam> {
        self.check_input(image)?;
        if image.dim(0)? != 1 {
            return Err(Error::Input("Grad-CAM explains one image at a time".into()));
        }
        // Candle keeps gradients only for variables (those of intermediate tensors are freed
        // as the backward pass consumes them), so the block's output becomes a leaf variable
        // and the rest of the network is run from it.
        let taps = self.forward_intermediates(image, &[block], false)?;
        let activation = Var::from_tensor(&taps.blocks[0].output.detach())?;
        let logits = self.forward_from_block(block, activation.as_tensor())?;
        let classes = logits.dim(1)?;
        let class = match class {
            Some(c) if c < classes => c,
            Some(c) => {
                return Err(Error::Input(format!(
                    "class {c} does not exist (the model has {classes})"
                )))
            }
            None => logits.argmax(1)?.to_vec1::<u32>()?[0] as usize,
        };
        let score = logits.narrow(1, class, 1)?.sum_all()?;
        let grads = score.backward()?;
        let activation = activation.as_tensor();
        let grad = grads
            .get(activation)
            .ok_or_else(|| Error::Input("no gradient reached the chosen block".into()))?;
        let weights = grad.mean_keepdim(3)?.mean_keepdim(2)?; // [1, c, 1, 1]
        let raw = activation
            .detach()
            .broadcast_mul(&weights)?
            .sum(1)?
            .squeeze(0)?
            .relu()?; // [h, w]
        let max = raw.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let map = if max > 0.0 {
            (&raw / max)?
        } else {
            raw.clone()
        };
        Ok(GradCam {
            map,
            raw,
            class,
            logits: logits.detach(),
        })
    }
}
