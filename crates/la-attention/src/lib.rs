//! Spatial attention for CNN feature maps.
//!
//! [`SpatialAttention`] maps a [b, c, h, w] feature map to one of the same shape: each of the
//! N = h*w positions is a token, projected to queries and keys (c/r channels) and values (c),
//! mixed by one of the [`AttentionKind`]s, projected back by `out` and added to the input.
//! `softmax` is the article's module with its intended meaning, exact but computed in
//! O(N) memory; `linear`, `efficient` and `relu-linear` are O(N) in time as well.
//! The ops themselves (fused CPU kernels and their device-generic forms) are in `la-kernels`;
//! this crate holds the modules, their configuration and their cost.

use candle_core::{Module, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use la_kernels::activation;
use la_kernels::bias::add_bias;
use la_kernels::efficient;
use la_kernels::linear;
use la_kernels::softmax_attention::softmax_attention;
use serde::{Deserialize, Serialize};

/// Errors from building an attention module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("attention over {channels} channels with reduction {reduction}: {reason}")]
    InvalidConfig {
        channels: usize,
        reduction: usize,
        reason: &'static str,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How the N tokens of a feature map attend to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionKind {
    /// softmax(Q K^T / sqrt(c/r)) V, exact; O(N^2) time, O(N) memory (tiled).
    Softmax,
    /// Katharopoulos et al. 2020, phi = elu + 1; O(N) time and memory.
    Linear,
    /// Shen et al. 2021, softmax over channels (queries) and positions (keys); O(N).
    Efficient,
    /// EfficientViT, phi = relu; O(N).
    ReluLinear,
}

impl AttentionKind {
    pub const ALL: [AttentionKind; 4] = [
        AttentionKind::Softmax,
        AttentionKind::Linear,
        AttentionKind::Efficient,
        AttentionKind::ReluLinear,
    ];

    /// The short name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            AttentionKind::Softmax => "softmax",
            AttentionKind::Linear => "linear",
            AttentionKind::Efficient => "efficient",
            AttentionKind::ReluLinear => "relu-linear",
        }
    }
}

impl std::fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AttentionKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown attention kind {s:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// How a new module starts, when it is inserted into a network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionInit {
    /// The output projection at zero: the module is the identity at first, so a pretrained
    /// network's predictions are unchanged until training moves it.
    #[default]
    Identity,
    /// Every projection Kaiming-normal (fan in), the article's advice: each module adds a
    /// large random residual at step 0.
    Kaiming,
}

impl AttentionInit {
    pub const ALL: [AttentionInit; 2] = [AttentionInit::Identity, AttentionInit::Kaiming];

    pub fn name(self) -> &'static str {
        match self {
            AttentionInit::Identity => "identity",
            AttentionInit::Kaiming => "kaiming",
        }
    }

    /// Whether the output projection starts at zero ([`AttentionConfig::zero_init_out`]).
    pub fn zero_init_out(self) -> bool {
        self == AttentionInit::Identity
    }
}

impl std::fmt::Display for AttentionInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AttentionInit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown attention init {s:?} (expected identity or kaiming)"))
    }
}

/// Everything needed to build one module besides its channel count.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionConfig {
    pub kind: AttentionKind,
    /// Queries and keys have `channels / reduction` channels (at least one), as the article's c/8.
    #[serde(default = "default_reduction")]
    pub reduction: usize,
    /// Start the output projection at zero so that a module inserted into a pretrained
    /// network is the identity at first.
    #[serde(default)]
    pub zero_init_out: bool,
}

/// The article's c/8 query and key width.
pub const DEFAULT_REDUCTION: usize = 8;

fn default_reduction() -> usize {
    DEFAULT_REDUCTION
}

impl AttentionConfig {
    pub fn new(kind: AttentionKind) -> Self {
        Self {
            kind,
            reduction: default_reduction(),
            zero_init_out: false,
        }
    }

    /// Query/key width for a map of `channels` channels.
    pub fn key_channels(&self, channels: usize) -> usize {
        (channels / self.reduction).max(1)
    }

    /// The module's four projections on a map of `channels` channels: (name, output width);
    /// each reads `channels` inputs and has a weight [width, channels] and a bias [width].
    pub fn projections(&self, channels: usize) -> [(&'static str, usize); 4] {
        let d = self.key_channels(channels);
        [
            ("query", d),
            ("key", d),
            ("value", channels),
            ("out", channels),
        ]
    }
}

/// Multiply-accumulates of one module on a map of `n` tokens of `c` channels with `d`-channel
/// queries and keys: the four projections plus the token mixing of the chosen kind.
pub fn macs(kind: AttentionKind, n: usize, c: usize, d: usize) -> u64 {
    let quadratic = quadratic_macs(kind, n, c, d);
    let (n, c, d) = (n as u64, c as u64, d as u64);
    let projections = n * c * (2 * d + 2 * c);
    let mixing = match kind {
        AttentionKind::Softmax => quadratic,
        // phi(K)^T V, phi(Q) context and the normaliser phi(Q) . sum phi(K).
        AttentionKind::Linear | AttentionKind::ReluLinear => 2 * n * d * c + n * d,
        // softmax(K)^T V and softmax(Q) context.
        AttentionKind::Efficient => 2 * n * d * c,
    };
    projections + mixing
}

/// The part of [`macs`] that grows as N^2: Q K^T and A V of softmax attention, none for the
/// linear kinds.
pub fn quadratic_macs(kind: AttentionKind, n: usize, c: usize, d: usize) -> u64 {
    match kind {
        AttentionKind::Softmax => (n as u64).pow(2) * (d + c) as u64,
        AttentionKind::Linear | AttentionKind::ReluLinear | AttentionKind::Efficient => 0,
    }
}

/// One attention module over a [b, c, h, w] map, residual included:
/// y = x + out(mix(query(x), key(x), value(x))) applied per position.
#[derive(Clone, Debug)]
pub struct SpatialAttention {
    kind: AttentionKind,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    scale: f64,
}

impl SpatialAttention {
    /// Builds (or loads) a module for `channels` channels from `vb` with sub-paths
    /// `query`, `key`, `value`, `out`. New weights are Kaiming-normal (fan in), biases zero;
    /// with `zero_init_out` the output projection starts at zero.
    pub fn new(channels: usize, config: AttentionConfig, vb: VarBuilder) -> Result<Self> {
        if config.reduction == 0 {
            return Err(Error::InvalidConfig {
                channels,
                reduction: 0,
                reason: "the reduction must be at least 1",
            });
        }
        if channels == 0 {
            return Err(Error::InvalidConfig {
                channels,
                reduction: config.reduction,
                reason: "a feature map needs at least one channel",
            });
        }
        let d = config.key_channels(channels);
        let kaiming = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let out_init = if config.zero_init_out {
            Init::Const(0.0)
        } else {
            kaiming
        };
        let [query, key, value, out] = config.projections(channels).map(|(name, out_dim)| {
            let init = if name == "out" { out_init } else { kaiming };
            let vb = vb.pp(name);
            let weight = vb.get_with_hints((out_dim, channels), "weight", init)?;
            let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
            Ok::<_, Error>(Linear::new(weight, Some(bias)))
        });
        Ok(Self {
            kind: config.kind,
            query: query?,
            key: key?,
            value: value?,
            out: out?,
            scale: (d as f64).powf(-0.5),
        })
    }

    pub fn kind(&self) -> AttentionKind {
        self.kind
    }

    /// [b, c, h, w] -> tokens [b, h*w, c].
    fn tokens(x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
    }

    /// How much the token at `query_index` (= row * w + col) takes from each token's value:
    /// [b, h*w]. Softmax and efficient attention's rows sum to one; the linear kinds' to
    /// just under one (their epsilon is in the normaliser).
    pub fn attention_row(&self, x: &Tensor, query_index: usize) -> candle_core::Result<Tensor> {
        let tokens = Self::tokens(x)?;
        let n = tokens.dim(1)?;
        if query_index >= n {
            candle_core::bail!(
                "query position {query_index} is outside the {n} positions of the map"
            )
        }
        let q = self.query.forward(&tokens.narrow(1, query_index, 1)?)?; // [b, 1, d]
        let k = self.key.forward(&tokens)?; // [b, n, d]
        let row = match self.kind {
            AttentionKind::Softmax => activation::softmax(&(q.matmul(&k.t()?)? * self.scale)?, 2)?,
            AttentionKind::Linear | AttentionKind::ReluLinear => {
                let (phi, eps) = if self.kind == AttentionKind::Linear {
                    (linear::FeatureMap::EluPlusOne, linear::ELU_EPS)
                } else {
                    (linear::FeatureMap::Relu, linear::RELU_EPS)
                };
                let similarity = phi.apply(&q)?.matmul(&phi.apply(&k)?.t()?)?; // [b, 1, n]
                similarity.broadcast_div(&(similarity.sum_keepdim(2)? + eps)?)?
            }
            AttentionKind::Efficient => {
                let q = activation::softmax(&q, 2)?; // over channels
                let k = activation::softmax(&k, 1)?; // over positions
                q.matmul(&k.t()?)?
            }
        };
        row.squeeze(1)
    }
}

/// A layer's bias, or zeros where it has none.
fn bias_of(lin: &Linear) -> candle_core::Result<Tensor> {
    match lin.bias() {
        Some(b) => Ok(b.clone()),
        None => Tensor::zeros(
            lin.weight().dim(0)?,
            lin.weight().dtype(),
            lin.weight().device(),
        ),
    }
}

/// `lin` applied to every position of a channel-first map [b, c_in, n] -> [b, c_out, n]:
/// W x + b as one batched product, without moving the channels last.
fn project_channels(lin: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    let b = x.dim(0)?;
    let y = lin.weight().broadcast_left(b)?.matmul(x)?;
    match lin.bias() {
        Some(bias) => add_bias(&y, bias, 1),
        None => Ok(y),
    }
}

/// `lin` on tokens [b, n, c_in] -> [b, n, c_out], as candle-nn's `Linear::forward` but with
/// [`add_bias`], whose gradient is far cheaper than `broadcast_add`'s.
fn project_tokens(lin: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, n, c_in) = x.dims3()?;
    // One [b n, c_in] x [c_in, c_out] product: a batched product with a broadcast weight
    // is slower, and its weight gradient is a slow sum over the batch.
    let y = x
        .contiguous()?
        .reshape((b * n, c_in))?
        .matmul(&lin.weight().t()?)?;
    let y = match lin.bias() {
        Some(bias) => add_bias(&y, bias, 1)?,
        None => y,
    };
    y.reshape((b, n, ()))
}

impl SpatialAttention {
    /// The module's output (`map` plus the projected attention) for linear attention on
    /// `map` [b, c, n], with the value and output projections folded into d x c matrices
    /// (see [`linear::folded_output`]): the same function as projecting v and the output
    /// over all n tokens, at a fraction of the cost. Differentiable: Candle ops plus the
    /// ops' own backward passes; when nothing tracks a gradient (inference), the queries and
    /// the key side come from [`linear::project_context`], one pass without a backward.
    fn linear_folded(
        &self,
        map: &Tensor,
        phi: linear::FeatureMap,
        eps: f64,
    ) -> candle_core::Result<Tensor> {
        let d = self.query.weight().dim(0)?;
        let b = map.dim(0)?;
        // The query and key projections stacked: [2d, c] and [2d].
        let w_qk = Tensor::cat(&[self.query.weight(), self.key.weight()], 0)?;
        let b_qk = Tensor::cat(&[bias_of(&self.query)?, bias_of(&self.key)?], 0)?;
        let weights = [&self.query, &self.key, &self.value, &self.out];
        let tracked = map.track_op()
            || weights
                .iter()
                .any(|l| l.weight().track_op() || l.bias().is_some_and(|b| b.track_op()));
        // phi(K) x^T [b, d, c], s = sum_n phi(K) [b, d], and the queries [b, d, n].
        let (q, key_context, key_sum) = if tracked {
            let qk = project_channels(&Linear::new(w_qk, Some(b_qk)), map)?; // [b, 2d, n]
            let phi_k = phi.apply(&qk.narrow(1, d, d)?)?; // [b, d, n]
            let key_context = linear::token_context(&phi_k, map)?;
            (qk.narrow(1, 0, d)?, key_context, phi_k.sum(2)?)
        } else {
            // Inference: one pass over the map for all three.
            linear::project_context(map, &w_qk, &b_qk, phi)?
        };

        // A^T = (phi(K) v^T)^T = W_v (phi(K) x^T)^T + b_v s^T   [b, c, d], and M = W_o A^T
        // [b, c, d]. In this orientation both products have row-major operands, which gemm
        // runs about twice as fast as with a transposed weight (blocks 4 and 5).
        let context_t = self
            .value
            .weight()
            .broadcast_left(b)?
            .matmul(&key_context.transpose(1, 2)?.contiguous()?)?
            .add(
                &bias_of(&self.value)?
                    .reshape((1, (), 1))?
                    .broadcast_mul(&key_sum.unsqueeze(1)?)?,
            )?;
        let m = self.out.weight().broadcast_left(b)?.matmul(&context_t)?;
        linear::folded_output_residual(&q, &m, &key_sum, &bias_of(&self.out)?, map, phi, eps)
    }
}

impl Module for SpatialAttention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if self.kind == AttentionKind::Softmax {
            // The fused kernel works on token-major rows.
            let tokens = Self::tokens(x)?;
            let q = project_tokens(&self.query, &tokens)?;
            let k = project_tokens(&self.key, &tokens)?;
            let v = project_tokens(&self.value, &tokens)?;
            let mixed = softmax_attention(&q, &k, &v, self.scale)?;
            let out = project_tokens(&self.out, &mixed)?; // [b, n, c]
            return x + out.transpose(1, 2)?.reshape((b, c, h, w))?;
        }
        // The linear kinds stay channel-first: a [b, c, h, w] map is already [b, c, n].
        let map = x.reshape((b, c, h * w))?;
        let folded = match self.kind {
            AttentionKind::Linear => Some((linear::FeatureMap::EluPlusOne, linear::ELU_EPS)),
            AttentionKind::ReluLinear => Some((linear::FeatureMap::Relu, linear::RELU_EPS)),
            _ => None,
        };
        if let Some((phi, eps)) = folded {
            if la_kernels::fast_path(&[x])? {
                return self.linear_folded(&map, phi, eps)?.reshape((b, c, h, w));
            }
        }
        // One product for the three projections: their weights stacked [2d + c, c].
        let fused = Linear::new(
            Tensor::cat(
                &[self.query.weight(), self.key.weight(), self.value.weight()],
                0,
            )?,
            Some(Tensor::cat(
                &[
                    bias_of(&self.query)?,
                    bias_of(&self.key)?,
                    bias_of(&self.value)?,
                ],
                0,
            )?),
        );
        let qkv = project_channels(&fused, &map)?;
        let d = self.query.weight().dim(0)?;
        let mixed = match self.kind {
            AttentionKind::Linear => linear::linear_attention_packed(
                &qkv,
                d,
                linear::FeatureMap::EluPlusOne,
                linear::ELU_EPS,
            )?,
            AttentionKind::ReluLinear => linear::linear_attention_packed(
                &qkv,
                d,
                linear::FeatureMap::Relu,
                linear::RELU_EPS,
            )?,
            AttentionKind::Efficient => efficient::efficient_attention(
                &qkv.narrow(1, 0, d)?,
                &qkv.narrow(1, d, d)?,
                &qkv.narrow(1, 2 * d, c)?,
            )?,
            AttentionKind::Softmax => unreachable!("handled above"),
        };
        x + project_channels(&self.out, &mixed)?.reshape((b, c, h, w))?
    }
}
