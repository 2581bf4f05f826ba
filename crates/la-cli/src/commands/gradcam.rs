//! `la-cli gradcam`: the CAM family's maps of one image, side by side over the original, and
//! how faithful each is.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use la_vgg::explain::{CamMethod, CamMetric};

use crate::device::parse_device;
use crate::heatmap::{draw, Panel, Picture, Region};
use crate::model_file::{load_model, LoadedModel};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  la-cli gradcam --weights runs/x/best.safetensors --image shirt.png --out cam.png
  la-cli gradcam --weights runs/x/best.safetensors --image shirt.png --method all --metric road,confidence-change")]
pub struct GradcamArgs {
    #[command(flatten)]
    pub(super) input: ModelAndImage,
    /// Methods, comma-separated, or `all`: grad-cam, grad-cam++, xgrad-cam, layer-cam,
    /// hires-cam, eigen-cam, score-cam (pytorch-grad-cam's definitions).
    #[arg(long, value_delimiter = ',', default_value = "grad-cam")]
    method: Vec<String>,
    /// Faithfulness scores to print and draw, comma-separated: confidence-change (the image
    /// times the map), road (ROADCombined), road-morf[=P] (most relevant first, P = 80),
    /// road-lerf[=P] (least relevant first, P = 20). Each is the change in the class's
    /// probability.
    #[arg(long, value_delimiter = ',', value_parser = CamMetric::parse)]
    metric: Vec<CamMetric>,
    /// Seed of ROAD's imputation noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Block (1-based) whose output is explained [default: the last].
    #[arg(long)]
    block: Option<usize>,
    /// Class index to explain [default: the predicted class].
    #[arg(long)]
    class: Option<usize>,
    #[arg(long, default_value = "gradcam.png")]
    out: PathBuf,
    /// Weight of the heat map in the blend.
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
}

/// The model and the image a picture starts from.
#[derive(clap::Args)]
pub(super) struct ModelAndImage {
    #[arg(long)]
    pub weights: PathBuf,
    #[arg(long)]
    pub image: PathBuf,
    /// The model's input side [default: the weights file's, else 224]; the picture keeps the
    /// image's own resolution.
    #[arg(long)]
    pub size: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// What [`ModelAndImage::load`] gives: the model, its input batch, the decoded image and the
/// part of it the model sees.
pub(super) struct Loaded {
    pub model: LoadedModel,
    pub input: Tensor,
    pub original: la_data::Image,
    pub region: Region,
}

impl ModelAndImage {
    pub fn load(&self) -> Result<Loaded> {
        let device = parse_device(&self.device)?;
        let model = load_model(&self.weights, self.size, &device)?;
        let (input, original, region) = model.prepare(&self.image)?;
        Ok(Loaded {
            model,
            input,
            original,
            region,
        })
    }

    pub fn file_name(&self) -> String {
        self.image.file_name().map_or_else(
            || self.image.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }
}

pub(super) fn block_index(block: Option<usize>, blocks: usize) -> Result<usize> {
    match block {
        None => Ok(blocks - 1),
        Some(b) if (1..=blocks).contains(&b) => Ok(b - 1),
        Some(b) => bail!("--block {b}: the model has blocks 1 to {blocks}"),
    }
}

pub(super) fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2()?)
}

fn methods(names: &[String]) -> Result<Vec<CamMethod>> {
    let mut methods = Vec::new();
    for name in names {
        let chosen = if name == "all" {
            CamMethod::ALL.to_vec()
        } else {
            vec![name.parse::<CamMethod>().map_err(anyhow::Error::msg)?]
        };
        for m in chosen {
            if !methods.contains(&m) {
                methods.push(m);
            }
        }
    }
    Ok(methods)
}

fn metric_name(metric: &CamMetric) -> String {
    match metric {
        CamMetric::ConfidenceChange => "confidence-change".into(),
        CamMetric::RoadCombined => "road".into(),
        CamMetric::RoadMostRelevantFirst { percentile } => format!("road-morf={percentile}"),
        CamMetric::RoadLeastRelevantFirst { percentile } => format!("road-lerf={percentile}"),
    }
}

pub fn run_gradcam(args: GradcamArgs) -> Result<()> {
    let methods = methods(&args.method)?;
    let loaded = args.input.load()?;
    let vgg = &loaded.model.model;
    let block = block_index(args.block, vgg.config().blocks.len())?;
    let (_, _, height, width) = loaded.input.dims4()?;

    let mut panels = vec![Panel {
        title: "image".into(),
        note: Some(format!(
            "{}x{}",
            loaded.original.width, loaded.original.height
        )),
        map: None,
        marker: None,
    }];
    let mut scores: Vec<Vec<f64>> = Vec::new();
    let mut heading = String::new();
    for &method in &methods {
        let cam = vgg.cam(&loaded.input, block, args.class, method)?;
        let map = cam.upsampled(height, width)?;
        let row: Vec<f64> = args
            .metric
            .iter()
            .map(|&metric| vgg.cam_metric(&loaded.input, &map, cam.class, metric, args.seed))
            .collect::<std::result::Result<_, _>>()?;
        if heading.is_empty() {
            let probs: Vec<f32> = candle_nn::ops::softmax(&cam.logits, 1)?
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            heading = format!(
                "{}: class {} ({}), p = {:.3}; block {} ({}x{} map)",
                args.input.file_name(),
                cam.class,
                loaded.model.classes[cam.class],
                probs[cam.class],
                block + 1,
                cam.map.dim(0)?,
                cam.map.dim(1)?,
            );
            println!("{heading}");
        }
        let note = args
            .metric
            .iter()
            .zip(&row)
            .map(|(m, s)| format!("{} {s:+.3}", metric_name(m)))
            .collect::<Vec<_>>()
            .join("  ");
        panels.push(Panel {
            title: method.title().into(),
            note: (!note.is_empty()).then_some(note),
            map: Some(rows(&cam.map)?),
            marker: None,
        });
        scores.push(row);
    }
    if !args.metric.is_empty() {
        print!("  {:<12}", "method");
        for m in &args.metric {
            print!(" {:>18}", metric_name(m));
        }
        println!();
        for (method, row) in methods.iter().zip(&scores) {
            print!("  {:<12}", method.title());
            for s in row {
                print!(" {s:>+18.4}");
            }
            println!();
        }
        for m in &args.metric {
            println!("  {}: {}", metric_name(m), m.describe());
        }
    }
    let picture = Picture {
        original: &loaded.original,
        region: loaded.region,
        heading,
        columns: panels.len().min(4),
        panels,
        alpha: args.alpha,
    };
    draw(&picture, &args.out)?;
    println!("picture: {}", args.out.display());
    Ok(())
}
