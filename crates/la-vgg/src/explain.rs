//! Explaining a prediction, with the definitions of pytorch-grad-cam so that maps and scores
//! carry over:
//!
//! - [`cam`]: the class-activation-map family (Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM,
//!   HiResCAM, EigenCAM, Score-CAM) on any block's output.
//! - [`metric`]: how faithful a map is: the confidence change when the image is multiplied by
//!   the map, and ROAD (remove and debias, most or least relevant pixels first).
//! - [`imputer`]: ROAD's noisy linear imputation of removed pixels.

pub mod cam;
pub mod imputer;
pub mod metric;

pub use cam::{Cam, CamMethod};
pub use imputer::NoisyLinearImputer;
pub use metric::CamMetric;
