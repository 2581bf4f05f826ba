//! The network: blocks of 3x3 conv (+ BatchNorm) + ReLU, an optional attention module, a
//! 2x2 max-pool; then the head.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{BatchNorm, Init, Linear, VarBuilder};
use la_attention::SpatialAttention;
use la_kernels::norm::ReplicaSum;
use rand::Rng;

use crate::config::VggConfig;
use crate::conv::Conv3x3;
use crate::layers::LayerKind;
use crate::{Error, Result};

/// One conv of a block: 3x3 conv, BatchNorm when the model has it, ReLU.
#[derive(Clone, Debug)]
pub struct ConvBnRelu {
    conv: Conv3x3,
    norm: Option<BatchNorm>,
}

impl ConvBnRelu {
    /// `forward_t`, with the training-mode BatchNorm statistics taken over every replica
    /// when `replicas` is given.
    fn forward_synced(
        &self,
        x: &Tensor,
        train: bool,
        replicas: Option<&Arc<dyn ReplicaSum>>,
    ) -> candle_core::Result<Tensor> {
        match (&self.norm, replicas) {
            (Some(bn), Some(replicas)) if train => la_kernels::norm::batch_norm_relu_train_synced(
                bn,
                &self.conv.forward(x)?,
                Arc::clone(replicas),
            ),
            _ => self.forward_t(x, train),
        }
    }
}

impl ModuleT for ConvBnRelu {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match &self.norm {
            Some(bn) if train => {
                la_kernels::norm::batch_norm_relu_train(bn, &self.conv.forward(x)?)
            }
            Some(bn) => la_kernels::norm::batch_norm_relu_eval(bn, &self.conv.forward(x)?),
            None => self.conv.forward_relu(x),
        }
    }
}

/// One block: its conv units, then its attention module if it has one (the pool follows).
#[derive(Clone, Debug, Default)]
struct Block {
    units: Vec<ConvBnRelu>,
    attention: Option<SpatialAttention>,
}

/// VGG with optional spatial attention. Variables live under the paths of
/// [`VggConfig::layers`]: `blocks.{i}.convs.{j}`, `blocks.{i}.norms.{j}`,
/// `blocks.{i}.attention.{query,key,value,out}`, `head.fc{k}` and `head.logits`.
#[derive(Clone, Debug)]
pub struct Vgg {
    config: VggConfig,
    blocks: Vec<Block>,
    hidden: Vec<Linear>,
    logits: Linear,
    /// Seed of the next dropout masks; see [`Vgg::set_dropout_seed`].
    dropout_seed: Arc<AtomicU64>,
    /// The row of the whole batch a replica's shard starts at; see
    /// [`Vgg::set_dropout_first_row`].
    dropout_first_row: Arc<AtomicU64>,
    /// Where training-mode BatchNorm takes its statistics over every replica of a
    /// data-parallel run (`--sync-bn`); `None`: each its own batch.
    batch_norm_replicas: Option<Arc<dyn ReplicaSum>>,
}

/// One block's intermediate maps, both before its pool.
#[derive(Clone, Debug)]
pub struct BlockTaps {
    pub block: usize,
    /// The last conv + ReLU output: the input of the attention module (the output itself
    /// when the block has none).
    pub attention_input: Tensor,
    /// The block's output (after its attention module): what Grad-CAM explains.
    pub output: Tensor,
}

/// What [`Vgg::forward_intermediates`] returns: the conv stack's output and the blocks asked for.
#[derive(Clone, Debug)]
pub struct Intermediates {
    pub features: Tensor,
    pub blocks: Vec<BlockTaps>,
}

/// Called after each layer of [`Vgg::forward_observed`] with the layer's name and output.
pub type Observer<'a> = &'a mut dyn FnMut(&str, &Tensor) -> candle_core::Result<()>;

impl Vgg {
    /// Builds the model from `vb`, layer by layer from [`VggConfig::layers`]. Missing
    /// variables are created with torchvision's VGG initialisation (convs Kaiming-normal
    /// fan-out, Linear N(0, 0.01), biases zero; the attention modules initialise themselves).
    pub fn new(config: VggConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let conv_init = Init::Kaiming {
            dist: candle_nn::init::NormalOrUniform::Normal,
            fan: candle_nn::init::FanInOut::FanOut,
            non_linearity: candle_nn::init::NonLinearity::ReLU,
        };
        let linear_init = Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        };
        let mut blocks: Vec<Block> = vec![Block::default(); config.blocks.len()];
        let mut hidden = Vec::new();
        let mut logits = None;
        for layer in config.layers() {
            let vb = vb.pp(&layer.name);
            let block = layer.block.map(|i| &mut blocks[i]);
            match (layer.kind, block) {
                (LayerKind::Conv { inputs, outputs }, Some(block)) => {
                    let weight = vb.get_with_hints((outputs, inputs, 3, 3), "weight", conv_init)?;
                    let bias = vb.get_with_hints(outputs, "bias", Init::Const(0.0))?;
                    block.units.push(ConvBnRelu {
                        conv: Conv3x3::new(weight, Some(bias)),
                        norm: None,
                    });
                }
                (LayerKind::BatchNorm { channels }, Some(block)) => {
                    let unit = block.units.last_mut().ok_or_else(|| {
                        Error::Config(format!("{}: a BatchNorm before any conv", layer.name))
                    })?;
                    unit.norm = Some(candle_nn::batch_norm(channels, 1e-5, vb)?);
                }
                (LayerKind::Attention { channels, config }, Some(block)) => {
                    block.attention = Some(SpatialAttention::new(channels, config, vb)?);
                }
                (
                    LayerKind::Linear {
                        inputs,
                        outputs,
                        hidden: is_hidden,
                    },
                    None,
                ) => {
                    let weight = vb.get_with_hints((outputs, inputs), "weight", linear_init)?;
                    let bias = vb.get_with_hints(outputs, "bias", Init::Const(0.0))?;
                    let linear = Linear::new(weight, Some(bias));
                    if is_hidden {
                        hidden.push(linear);
                    } else {
                        logits = Some(linear);
                    }
                }
                (LayerKind::MaxPool | LayerKind::AvgPool { .. }, _) => {}
                (kind, _) => {
                    return Err(Error::Config(format!(
                        "{}: a {kind:?} cannot sit there",
                        layer.name
                    )))
                }
            }
        }
        let logits = logits.ok_or_else(|| Error::Config("the head has no logits layer".into()))?;
        Ok(Self {
            config,
            blocks,
            hidden,
            logits,
            dropout_seed: Arc::new(AtomicU64::new(0)),
            dropout_first_row: Arc::new(AtomicU64::new(0)),
            batch_norm_replicas: None,
        })
    }

    pub fn config(&self) -> &VggConfig {
        &self.config
    }

    /// The attention module of block `i`, if it has one.
    pub fn attention(&self, block: usize) -> Option<&SpatialAttention> {
        self.blocks.get(block).and_then(|b| b.attention.as_ref())
    }

    /// Block `i` up to its pool: (attention input, block output).
    fn block_forward(
        &self,
        i: usize,
        mut x: Tensor,
        train: bool,
        observe: Observer,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let block = &self.blocks[i];
        for (j, unit) in block.units.iter().enumerate() {
            x = unit.forward_synced(&x, train, self.batch_norm_replicas.as_ref())?;
            observe(&format!("blocks.{i}.convs.{j}"), &x)?;
        }
        match &block.attention {
            Some(a) => {
                let y = a.forward(&x)?;
                observe(&format!("blocks.{i}.attention"), &y)?;
                Ok((x, y))
            }
            None => Ok((x.clone(), x)),
        }
    }

    /// Blocks `from..` with their pools, from block `from`'s input.
    fn blocks_from(
        &self,
        from: usize,
        mut x: Tensor,
        train: bool,
        observe: Observer,
    ) -> candle_core::Result<Tensor> {
        for i in from..self.blocks.len() {
            let (_, body) = self.block_forward(i, x, train, observe)?;
            x = la_kernels::pool::max_pool_2x2(&body)?;
            observe(&format!("blocks.{i}.pool"), &x)?;
        }
        Ok(x)
    }

    /// The conv stack, as timm's `forward_features`: [b, 3, h, w] -> [b, c, h/32, w/32].
    pub fn forward_features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.blocks_from(0, x.clone(), train, &mut |_, _| Ok(()))
    }

    /// The head on the conv stack's output, as timm's `forward_head`: pool, hidden layers
    /// (with dropout when training), logits.
    pub fn forward_head(&self, features: &Tensor, train: bool) -> candle_core::Result<Tensor> {
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

    /// The whole forward pass, calling `observe` after each conv unit, attention module and
    /// pool (with the layer's name from [`VggConfig::layers`]) and after the head (`head`):
    /// for per-layer timings and probes.
    pub fn forward_observed(
        &self,
        x: &Tensor,
        train: bool,
        observe: Observer,
    ) -> candle_core::Result<Tensor> {
        let features = self.blocks_from(0, x.clone(), train, observe)?;
        let logits = self.forward_head(&features, train)?;
        observe("head", &logits)?;
        Ok(logits)
    }

    /// The conv stack's output and the maps of the chosen blocks (0-based, any order), as
    /// timm's `forward_intermediates`. A block that does not exist is an error.
    pub fn forward_intermediates(
        &self,
        x: &Tensor,
        blocks: &[usize],
        train: bool,
    ) -> Result<Intermediates> {
        let count = self.blocks.len();
        if let Some(&b) = blocks.iter().find(|&&b| b >= count) {
            return Err(Error::Input(format!(
                "block {b} does not exist: the model has {count} blocks, 0 to {}",
                count - 1
            )));
        }
        let mut taps = Vec::with_capacity(blocks.len());
        let mut x = x.clone();
        for i in 0..count {
            let (attention_input, output) = self.block_forward(i, x, train, &mut |_, _| Ok(()))?;
            x = la_kernels::pool::max_pool_2x2(&output)?;
            if blocks.contains(&i) {
                taps.push(BlockTaps {
                    block: i,
                    attention_input,
                    output,
                });
            }
        }
        taps.sort_by_key(|t| blocks.iter().position(|&b| b == t.block));
        Ok(Intermediates {
            features: x,
            blocks: taps,
        })
    }

    /// The rest of the network (evaluation mode) from block `block`'s output before its
    /// pool: the pool, the following blocks and the head.
    pub fn forward_from_block(&self, block: usize, output: &Tensor) -> Result<Tensor> {
        if block >= self.blocks.len() {
            return Err(Error::Input(format!(
                "block {block} does not exist: the model has {} blocks",
                self.blocks.len()
            )));
        }
        let x = la_kernels::pool::max_pool_2x2(output)?;
        let features = self.blocks_from(block + 1, x, false, &mut |_, _| Ok(()))?;
        Ok(self.forward_head(&features, false)?)
    }

    /// Synchronises training-mode BatchNorm over the replicas of a data-parallel run (PyTorch's
    /// `SyncBatchNorm`): the batch statistics and their gradients are summed through
    /// `replicas`, so N replicas fed shards of a batch normalise as one process fed the whole
    /// batch. `None` returns to per-replica statistics.
    pub fn set_batch_norm_replicas(&mut self, replicas: Option<Arc<dyn ReplicaSum>>) {
        self.batch_norm_replicas = replicas;
    }

    /// Seeds the dropout masks of the next training forward passes. Candle's CPU generator
    /// has no seed, so the masks come from our own; a trainer sets this once per step to make
    /// runs (and resumed runs) reproducible.
    pub fn set_dropout_seed(&self, seed: u64) {
        self.dropout_seed.store(seed, Ordering::Relaxed);
    }

    /// Tells the next training forward passes where the input starts in a batch split over
    /// the replicas of a data-parallel run: its first row is row `first` of the whole batch.
    /// The dropout masks are drawn as for the whole batch from that row on, so N replicas
    /// drop what one process given the whole batch drops.
    pub fn set_dropout_first_row(&self, first: usize) {
        self.dropout_first_row
            .store(first as u64, Ordering::Relaxed);
    }

    /// Inverted dropout with a mask drawn from (dropout seed, layer).
    fn dropout(&self, x: &Tensor, layer: usize) -> candle_core::Result<Tensor> {
        let p = self.config.head.dropout as f64;
        let seed = self.dropout_seed.load(Ordering::Relaxed);
        let mut rng = la_core::rng::labelled(seed, &format!("dropout.{layer}"));
        let keep = (1.0 / (1.0 - p)) as f32;
        // The draws of the rows before this replica's shard are skipped, not left out.
        let first_row = self.dropout_first_row.load(Ordering::Relaxed) as usize;
        let per_row = x.elem_count() / x.dim(0)?.max(1);
        for _ in 0..first_row * per_row {
            rng.random::<f64>();
        }
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), &candle_core::Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())?;
        x * mask
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
        self.forward_head(&self.forward_features(x, train)?, train)
    }
}
