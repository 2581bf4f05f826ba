//! How faithful a map is, as pytorch-grad-cam's metrics measure it: perturb the image by the
//! map, and see how the model's confidence (the softmax probability of the class,
//! `ClassifierOutputSoftmaxTarget`) changes. Every score is "after minus before".

use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;

use super::imputer::NoisyLinearImputer;
use crate::{Error, Result, Vgg};

/// The percentiles ROAD's averaged scores run over (pytorch-grad-cam's default).
pub const ROAD_PERCENTILES: [f64; 9] = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CamMetric {
    /// `CamMultImageConfidenceChange`: the image multiplied by the map. A faithful map keeps
    /// the confidence (a small drop, or a rise).
    ConfidenceChange,
    /// `ROADMostRelevantFirst`: the pixels at or above the map's `percentile` are removed and
    /// imputed. A faithful map makes the confidence fall (more negative is better).
    RoadMostRelevantFirst { percentile: f64 },
    /// `ROADLeastRelevantFirst`: all but the pixels above the `100 - percentile` percentile
    /// are removed. A faithful map keeps the confidence (closer to 0 is better).
    RoadLeastRelevantFirst { percentile: f64 },
    /// `ROADCombined`: (LeRF - MoRF) / 2, each averaged over [`ROAD_PERCENTILES`]; higher is
    /// better.
    RoadCombined,
}

impl CamMetric {
    /// The names on the command line: `confidence-change`, `road-morf[=P]`, `road-lerf[=P]`,
    /// `road`.
    pub fn parse(s: &str) -> std::result::Result<CamMetric, String> {
        let (name, value) = match s.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (s, None),
        };
        let percentile = |default: f64| -> std::result::Result<f64, String> {
            let p = match value {
                None => default,
                Some(v) => v
                    .parse::<f64>()
                    .map_err(|_| format!("`{s}`: the percentile must be a number"))?,
            };
            if p > 0.0 && p < 100.0 {
                Ok(p)
            } else {
                Err(format!("`{s}`: the percentile must be between 0 and 100"))
            }
        };
        match name {
            "confidence-change" | "confidence" if value.is_none() => {
                Ok(CamMetric::ConfidenceChange)
            }
            "road-morf" | "road-most" => Ok(CamMetric::RoadMostRelevantFirst {
                percentile: percentile(80.0)?,
            }),
            "road-lerf" | "road-least" => Ok(CamMetric::RoadLeastRelevantFirst {
                percentile: percentile(20.0)?,
            }),
            "road" if value.is_none() => Ok(CamMetric::RoadCombined),
            _ => Err(format!(
                "unknown metric `{s}` (expected confidence-change, road, road-morf[=P] or road-lerf[=P])"
            )),
        }
    }

    /// What the score means, for a printed line.
    pub fn describe(&self) -> String {
        match self {
            CamMetric::ConfidenceChange => "confidence change (image x map)".into(),
            CamMetric::RoadMostRelevantFirst { percentile } => {
                format!("ROAD most relevant first, percentile {percentile} (lower is better)")
            }
            CamMetric::RoadLeastRelevantFirst { percentile } => {
                format!("ROAD least relevant first, percentile {percentile} (higher is better)")
            }
            CamMetric::RoadCombined => {
                "ROAD combined, (LeRF - MoRF) / 2 over percentiles 10..90 (higher is better)".into()
            }
        }
    }
}

impl Vgg {
    /// The metric's score for `map` [h, w] (the map at the input's size, in [0, 1]) explaining
    /// `class` of `image` [1, 3, h, w]. ROAD's noise is drawn from `seed`.
    pub fn cam_metric(
        &self,
        image: &Tensor,
        map: &Tensor,
        class: usize,
        metric: CamMetric,
        seed: u64,
    ) -> Result<f64> {
        if image.dim(0)? != 1 {
            return Err(Error::Input("a metric scores one image at a time".into()));
        }
        let classes = self.config().num_classes;
        if class >= classes {
            return Err(Error::Input(format!(
                "class {class} does not exist (the model has {classes})"
            )));
        }
        let before = self.confidence(image, class)?;
        let after = |perturbed: Tensor| -> Result<f64> { self.confidence(&perturbed, class) };
        let mut rng = la_core::rng::labelled(seed, "road");
        Ok(match metric {
            CamMetric::ConfidenceChange => after(multiply_by_map(image, map)?)? - before,
            CamMetric::RoadMostRelevantFirst { percentile } => {
                after(road_perturbed(image, map, percentile, false, &mut rng)?)? - before
            }
            CamMetric::RoadLeastRelevantFirst { percentile } => {
                after(road_perturbed(image, map, percentile, true, &mut rng)?)? - before
            }
            CamMetric::RoadCombined => {
                let average = |least: bool, rng: &mut _| -> Result<f64> {
                    let mut sum = 0.0;
                    for p in ROAD_PERCENTILES {
                        sum += after(road_perturbed(image, map, p, least, rng)?)? - before;
                    }
                    Ok(sum / ROAD_PERCENTILES.len() as f64)
                };
                let least = average(true, &mut rng)?;
                let most = average(false, &mut rng)?;
                (least - most) / 2.0
            }
        })
    }

    /// The softmax probability of `class` for a single image.
    fn confidence(&self, image: &Tensor, class: usize) -> Result<f64> {
        let logits = self.forward_t(image, false)?;
        let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F64)?, 1)?;
        Ok(probs.get(0)?.get(class)?.to_scalar::<f64>()?)
    }
}

/// pytorch-grad-cam's `multiply_tensor_with_cam`: the normalised image times the map.
pub fn multiply_by_map(image: &Tensor, map: &Tensor) -> Result<Tensor> {
    check_map(image, map)?;
    Ok(image.broadcast_mul(&map.to_dtype(image.dtype())?.unsqueeze(0)?.unsqueeze(0)?)?)
}

fn check_map(image: &Tensor, map: &Tensor) -> Result<()> {
    let (_, _, h, w) = image.dims4()?;
    if map.dims() != [h, w] {
        return Err(Error::Input(format!(
            "the map is {:?}, the image {h}x{w}: upsample the map to the image first",
            map.dims()
        )));
    }
    Ok(())
}

/// pytorch-grad-cam's `RemoveMostRelevantFirst` (or `RemoveLeastRelevantFirst`, which ranks
/// 1 - map): pixels whose value is below the `percentile` stay, the others are imputed.
pub fn road_perturbed(
    image: &Tensor,
    map: &Tensor,
    percentile: f64,
    least_relevant_first: bool,
    rng: &mut impl rand::Rng,
) -> Result<Tensor> {
    check_map(image, map)?;
    let (_, channels, h, w) = image.dims4()?;
    let mut ranked: Vec<f64> = map.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    if least_relevant_first {
        ranked.iter_mut().for_each(|v| *v = 1.0 - *v);
    }
    let threshold = percentile_of(&ranked, percentile);
    let keep: Vec<bool> = ranked.iter().map(|&v| v < threshold).collect();
    let pixels: Vec<f64> = image.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let planes: Vec<Vec<f64>> = pixels.chunks(h * w).map(<[f64]>::to_vec).collect();
    let imputed = NoisyLinearImputer::default().impute(&planes, h, w, &keep, rng);
    let flat: Vec<f64> = imputed.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, (1, channels, h, w), &Device::Cpu)?
        .to_dtype(image.dtype())?
        .to_device(image.device())?)
}

/// numpy's `percentile` with its default linear interpolation.
pub fn percentile_of(values: &[f64], percentile: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let position = percentile / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (position.floor() as usize, position.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (position - lo as f64)
}
