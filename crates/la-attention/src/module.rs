//! The attention module: projections, the kind's token mixing, the residual.

use candle_core::{Module, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use la_kernels::activation;
use la_kernels::efficient;
use la_kernels::linear;
use la_kernels::projection::{project, Order};
use la_kernels::softmax_attention::softmax_attention;

use crate::{linformer, performer, AttentionConfig, AttentionKind, Error, Result};

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
    own: KindParams,
}

/// What a kind has besides the four projections.
#[derive(Clone, Debug)]
enum KindParams {
    None,
    /// Performer's random features [m, d] (a buffer, not a parameter).
    Performer {
        features: Tensor,
    },
    /// Linformer's E and F [k, n], for maps of `tokens` positions.
    Linformer {
        key_tokens: Tensor,
        value_tokens: Tensor,
        tokens: usize,
    },
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
        if config.kind == AttentionKind::Performer && config.random_features == 0 {
            return Err(Error::InvalidConfig {
                channels,
                reduction: config.reduction,
                reason: "performer attention needs at least one random feature",
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
        let own = match config.kind {
            AttentionKind::Performer => KindParams::Performer {
                features: performer::features_tensor(
                    config.random_features,
                    d,
                    config.feature_seed,
                    vb.dtype(),
                    vb.device(),
                )?,
            },
            AttentionKind::Linformer => {
                let tokens = config.tokens.ok_or(Error::InvalidConfig {
                    channels,
                    reduction: config.reduction,
                    reason: "linformer attention is defined for one map size; build it for the map's positions",
                })?;
                let k = config.projected_length(tokens);
                // LeCun normal (std 1/sqrt(n)): a projected key is then about as large as a key.
                let init = Init::Randn {
                    mean: 0.0,
                    stdev: (tokens as f64).powf(-0.5),
                };
                let [key_tokens, value_tokens] = linformer::TOKEN_PROJECTIONS
                    .map(|name| vb.pp(name).get_with_hints((k, tokens), "weight", init));
                KindParams::Linformer {
                    key_tokens: key_tokens?,
                    value_tokens: value_tokens?,
                    tokens,
                }
            }
            _ => KindParams::None,
        };
        Ok(Self {
            kind: config.kind,
            query: query?,
            key: key?,
            value: value?,
            out: out?,
            scale: (d as f64).powf(-0.5),
            own,
        })
    }

    /// Draws Performer's random features afresh from `seed` (the only way they change). A
    /// model saved afterwards rebuilds its features from the config's `feature_seed`, so a
    /// caller that keeps a redraw records `seed` there.
    pub fn redraw_features(&mut self, seed: u64) -> candle_core::Result<()> {
        if let KindParams::Performer { features } = &mut self.own {
            let (m, d) = features.dims2()?;
            *features =
                performer::features_tensor(m, d, seed, features.dtype(), features.device())?;
            Ok(())
        } else {
            candle_core::bail!("{} attention has no random features", self.kind)
        }
    }

    /// Performer's random features [m, d], if the module has them.
    pub fn random_features(&self) -> Option<&Tensor> {
        match &self.own {
            KindParams::Performer { features } => Some(features),
            _ => None,
        }
    }

    /// Linformer's E and F, for an h x w map: they are defined for the positions the module
    /// was built for, and no other.
    fn token_projections(&self, h: usize, w: usize) -> candle_core::Result<(&Tensor, &Tensor)> {
        let KindParams::Linformer {
            key_tokens,
            value_tokens,
            tokens,
        } = &self.own
        else {
            candle_core::bail!("{} attention has no token projections", self.kind)
        };
        if h * w != *tokens {
            candle_core::bail!(
                "linformer attention is built for maps of {tokens} positions (the model's input size), got a {h}x{w} map: run it at the size it was built for"
            )
        }
        Ok((key_tokens, value_tokens))
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
    /// [b, h*w]. Softmax and efficient attention's rows sum to one; the linear kinds' and
    /// Performer's to just under one (their epsilon is in the normaliser); Linformer's are its
    /// weights over the k projected positions taken back through F, and may be negative.
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
            AttentionKind::Performer => {
                let features = self.random_features().expect("a performer has features");
                let phi_q = performer::positive_features(&q.t()?, features, true)?; // [b, m, 1]
                let phi_k = performer::positive_features(&k.t()?, features, false)?; // [b, m, n]
                let similarity = phi_q.t()?.matmul(&phi_k)?; // [b, 1, n]
                similarity.broadcast_div(&(similarity.sum_keepdim(2)? + performer::EPS)?)?
            }
            AttentionKind::Linformer => {
                let (_, _, h, w) = x.dims4()?;
                let (key_tokens, value_tokens) = self.token_projections(h, w)?;
                let keys = k.t()?.broadcast_matmul(&key_tokens.t()?)?; // [b, d, k]
                let weights = activation::softmax(&(q.matmul(&keys)? * self.scale)?, 2)?;
                weights.broadcast_matmul(value_tokens)? // [b, 1, n]
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

/// `lin` applied to every position of a batch of maps, read in order `from`, written in `to`.
fn project_with(lin: &Linear, x: &Tensor, from: Order, to: Order) -> candle_core::Result<Tensor> {
    project(x, lin.weight(), &bias_of(lin)?, from, to)
}

/// `lin` applied to every position of a channel-first map [b, c_in, n] -> [b, c_out, n].
fn project_channels(lin: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    project_with(lin, x, Order::Channels, Order::Channels)
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
        let map = x.reshape((b, c, h * w))?;
        if self.kind == AttentionKind::Softmax {
            // The fused kernel works on token-major rows: the projections write them.
            let [q, k, v] = [&self.query, &self.key, &self.value]
                .map(|lin| project_with(lin, &map, Order::Channels, Order::Tokens));
            let mixed = softmax_attention(&q?, &k?, &v?, self.scale)?;
            let out = project_with(&self.out, &mixed, Order::Tokens, Order::Channels)?;
            return x + out.reshape((b, c, h, w))?;
        }
        // The other kinds stay channel-first: a [b, c, h, w] map is already [b, c, n].
        let folded = match self.kind {
            AttentionKind::Linear => Some((linear::FeatureMap::EluPlusOne, linear::ELU_EPS)),
            AttentionKind::ReluLinear => Some((linear::FeatureMap::Relu, linear::RELU_EPS)),
            _ => None,
        };
        // Folding the value and output projections costs 2 c^2 d per image where projecting
        // the tokens costs 2 n c^2: it pays where the map has more positions than the keys
        // have channels (VGG16's blocks 4 and 5 at 32x32 have 16 and 4 against 64).
        let d = self.query.weight().dim(0)?;
        if let Some((phi, eps)) = folded {
            if h * w > d && la_kernels::fast_path(&[x])? {
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
            AttentionKind::Performer => performer::performer_attention(
                &qkv.narrow(1, 0, d)?,
                &qkv.narrow(1, d, d)?,
                &qkv.narrow(1, 2 * d, c)?,
                self.random_features().expect("a performer has features"),
            )?,
            AttentionKind::Linformer => {
                let (key_tokens, value_tokens) = self.token_projections(h, w)?;
                linformer::linformer_attention(
                    &qkv.narrow(1, 0, d)?,
                    &qkv.narrow(1, d, d)?,
                    &qkv.narrow(1, 2 * d, c)?,
                    key_tokens,
                    value_tokens,
                    self.scale,
                )?
            }
            AttentionKind::Softmax => unreachable!("handled above"),
        };
        x + project_channels(&self.out, &mixed)?.reshape((b, c, h, w))?
    }
}
