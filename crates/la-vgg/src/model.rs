//! The network: blocks of 3x3 conv (+ BatchNorm) + ReLU, an optional attention module, a
//! 2x2 max-pool; then the head.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{BatchNorm, Init, Linear, VarBuilder};
use la_attention::SpatialAttention;
use rand::Rng;

use crate::config::VggConfig;
use crate::conv::Conv3x3;
use crate::{Error, Result};

/// One block: convs, optional attention, then the pool.
#[derive(Clone, Debug)]
struct Block {
    convs: Vec<Conv3x3>,
    norms: Vec<BatchNorm>,
    attention: Option<SpatialAttention>,
}

/// VGG with optional spatial attention. Variables live under `blocks.{i}.convs.{j}`,
/// `blocks.{i}.norms.{j}`, `blocks.{i}.attention.{query,key,value,out}` and `head.fc{k}` /
/// `head.logits`.
#[derive(Clone, Debug)]
pub struct Vgg {
    config: VggConfig,
    blocks: Vec<Block>,
    hidden: Vec<Linear>,
    logits: Linear,
    /// Seed of the next dropout masks; see [`Vgg::set_dropout_seed`].
    dropout_seed: Arc<AtomicU64>,
}

/// What [`Vgg::forward_with_taps`] returns: the logits and each block's output before its
/// pool (after the attention module), for Grad-CAM and attention maps.
pub struct Taps {
    pub logits: Tensor,
    pub blocks: Vec<Tensor>,
}

impl Vgg {
    /// Builds the model from `vb`. Missing variables are created with torchvision's VGG
    /// initialisation (convs Kaiming-normal fan-out, Linear N(0, 0.01), biases zero; the
    /// attention modules initialise themselves).
    pub fn new(config: VggConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let conv_init = Init::Kaiming {
            dist: candle_nn::init::NormalOrUniform::Normal,
            fan: candle_nn::init::FanInOut::FanOut,
            non_linearity: candle_nn::init::NonLinearity::ReLU,
        };
        let mut blocks = Vec::with_capacity(config.blocks.len());
        let mut channels = config.in_channels;
        for (i, widths) in config.blocks.iter().enumerate() {
            let vb_block = vb.pp(format!("blocks.{i}"));
            let mut convs = Vec::new();
            let mut norms = Vec::new();
            for (j, &width) in widths.iter().enumerate() {
                let vb_conv = vb_block.pp(format!("convs.{j}"));
                let weight =
                    vb_conv.get_with_hints((width, channels, 3, 3), "weight", conv_init)?;
                let bias = vb_conv.get_with_hints(width, "bias", Init::Const(0.0))?;
                convs.push(Conv3x3::new(weight, Some(bias)));
                if config.batch_norm {
                    let bn = candle_nn::batch_norm(width, 1e-5, vb_block.pp(format!("norms.{j}")))?;
                    norms.push(bn);
                }
                channels = width;
            }
            let attention = match config.attention {
                Some(a) if config.attention_blocks.contains(&i) => Some(SpatialAttention::new(
                    channels,
                    a,
                    vb_block.pp("attention"),
                )?),
                _ => None,
            };
            blocks.push(Block {
                convs,
                norms,
                attention,
            });
        }
        let vb_head = vb.pp("head");
        let linear = |inputs: usize, outputs: usize, name: &str| -> Result<Linear> {
            let vb = vb_head.pp(name);
            let w = vb.get_with_hints(
                (outputs, inputs),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.01,
                },
            )?;
            let b = vb.get_with_hints(outputs, "bias", Init::Const(0.0))?;
            Ok(Linear::new(w, Some(b)))
        };
        let mut features = channels * config.head.pool * config.head.pool;
        let mut hidden = Vec::new();
        for (k, &width) in config.head.hidden.iter().enumerate() {
            hidden.push(linear(features, width, &format!("fc{}", k + 1))?);
            features = width;
        }
        let logits = linear(features, config.num_classes, "logits")?;
        Ok(Self {
            config,
            blocks,
            hidden,
            logits,
            dropout_seed: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn config(&self) -> &VggConfig {
        &self.config
    }

    /// The attention module of block `i`, if it has one.
    pub fn attention(&self, block: usize) -> Option<&SpatialAttention> {
        self.blocks.get(block).and_then(|b| b.attention.as_ref())
    }

    /// Block `i`'s convs (+ BatchNorm) + ReLUs: the input of its attention module.
    pub fn block_convs(&self, i: usize, mut x: Tensor, train: bool) -> candle_core::Result<Tensor> {
        let block = &self.blocks[i];
        for (j, conv) in block.convs.iter().enumerate() {
            x = match block.norms.get(j) {
                Some(bn) if train => {
                    la_kernels::norm::batch_norm_relu_train(bn, &conv.forward(&x)?)?
                }
                Some(bn) => bn.forward_t(&conv.forward(&x)?, false)?.relu()?,
                None => conv.forward_relu(&x)?,
            };
        }
        Ok(x)
    }

    /// Block `i`'s output before its pool, in evaluation mode.
    pub fn block_output(&self, i: usize, x: Tensor) -> candle_core::Result<Tensor> {
        self.block_body(i, x, false)
    }

    /// Runs block `i` up to (not including) its pool.
    fn block_body(&self, i: usize, x: Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = self.block_convs(i, x, train)?;
        match &self.blocks[i].attention {
            Some(a) => a.forward(&x),
            None => Ok(x),
        }
    }

    /// The input of block `i`'s attention module (its last conv + ReLU output) for an image
    /// batch, in evaluation mode, for attention maps.
    pub fn attention_input(&self, x: &Tensor, block: usize) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for i in 0..block {
            x = la_kernels::pool::max_pool_2x2(&self.block_body(i, x, false)?)?;
        }
        self.block_convs(block, x, false)
    }

    /// The conv stack: [b, 3, h, w] -> [b, c, h/32, w/32].
    pub fn features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for i in 0..self.blocks.len() {
            x = la_kernels::pool::max_pool_2x2(&self.block_body(i, x, train)?)?;
        }
        Ok(x)
    }

    /// The head on the conv stack's output.
    pub fn head(&self, features: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = la_kernels::pool::adaptive_avg_pool2d(features, self.config.head.pool)?
            .flatten_from(1)?;
        for (k, fc) in self.hidden.iter().enumerate() {
            x = fc.forward(&x)?.relu()?;
            if train && self.config.head.dropout > 0.0 {
                x = self.dropout(&x, k)?;
            }
        }
        self.logits.forward(&x)
    }

    /// Seeds the dropout masks of the next training forward passes. Candle's CPU generator
    /// has no seed, so the masks come from our own; a trainer sets this once per step to make
    /// runs (and resumed runs) reproducible.
    pub fn set_dropout_seed(&self, seed: u64) {
        self.dropout_seed.store(seed, Ordering::Relaxed);
    }

    /// Inverted dropout with a mask drawn from (dropout seed, layer).
    fn dropout(&self, x: &Tensor, layer: usize) -> candle_core::Result<Tensor> {
        let p = self.config.head.dropout as f64;
        let seed = self.dropout_seed.load(Ordering::Relaxed);
        let mut rng = crate::params::rng_for(seed, &format!("dropout.{layer}"));
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), &candle_core::Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())?;
        x * mask
    }

    /// Logits plus each block's pre-pool output.
    pub fn forward_with_taps(&self, x: &Tensor, train: bool) -> candle_core::Result<Taps> {
        let mut taps = Vec::with_capacity(self.blocks.len());
        let mut x = x.clone();
        for i in 0..self.blocks.len() {
            let body = self.block_body(i, x, train)?;
            x = la_kernels::pool::max_pool_2x2(&body)?;
            taps.push(body);
        }
        Ok(Taps {
            logits: self.head(&x, train)?,
            blocks: taps,
        })
    }

    /// Checks an input batch before running it: [b, in_channels, h, w] with h, w large
    /// enough for the pools.
    pub fn check_input(&self, x: &Tensor) -> Result<()> {
        let min = 1usize << self.blocks.len();
        match x.dims() {
            &[_, c, h, w] if c == self.config.in_channels && h >= min && w >= min => Ok(()),
            dims => Err(Error::Input(format!(
                "expected images [batch, {}, h, w] with h, w >= {min}, got {dims:?}",
                self.config.in_channels
            ))),
        }
    }
}

/// Like candle-nn's BatchNorm, `ModuleT` only: `forward_t(x, true)` uses batch statistics and
/// dropout, `forward_t(x, false)` is evaluation. (A `Module` impl would pick up candle's
/// blanket `ModuleT` that ignores the flag.)
impl ModuleT for Vgg {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.head(&self.features(x, train)?, train)
    }
}
