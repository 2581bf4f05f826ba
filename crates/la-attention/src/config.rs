//! What a module is built from besides its channel count, and what it costs.

use serde::{Deserialize, Serialize};

use crate::AttentionKind;

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
    /// Performer: how many positive random features estimate the softmax kernel.
    #[serde(
        default = "default_random_features",
        skip_serializing_if = "is_default_random_features"
    )]
    pub random_features: usize,
    /// Performer: the seed its random features are drawn from (a network gives each module
    /// its own, see [`AttentionConfig::for_module`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub feature_seed: u64,
    /// Linformer: the k positions keys and values are projected to (at most the map's).
    #[serde(
        default = "default_projected_tokens",
        skip_serializing_if = "is_default_projected_tokens"
    )]
    pub projected_tokens: usize,
    /// The positions of the map one module is built for: set per module by the network for
    /// the kinds defined for one map size (Linformer), never stored.
    #[serde(skip)]
    pub tokens: Option<usize>,
}

/// The article's c/8 query and key width.
pub const DEFAULT_REDUCTION: usize = 8;
/// Performer's random features by default (its paper uses d log d; 64 covers our d <= 64).
pub const DEFAULT_RANDOM_FEATURES: usize = 64;
/// Linformer's projected length by default (its paper's k for n = 512 is 64 to 256).
pub const DEFAULT_PROJECTED_TOKENS: usize = 64;

fn default_reduction() -> usize {
    DEFAULT_REDUCTION
}

fn default_random_features() -> usize {
    DEFAULT_RANDOM_FEATURES
}

fn default_projected_tokens() -> usize {
    DEFAULT_PROJECTED_TOKENS
}

fn is_default_random_features(v: &usize) -> bool {
    *v == DEFAULT_RANDOM_FEATURES
}

fn is_default_projected_tokens(v: &usize) -> bool {
    *v == DEFAULT_PROJECTED_TOKENS
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl AttentionConfig {
    pub fn new(kind: AttentionKind) -> Self {
        Self {
            kind,
            reduction: default_reduction(),
            zero_init_out: false,
            random_features: DEFAULT_RANDOM_FEATURES,
            feature_seed: 0,
            projected_tokens: DEFAULT_PROJECTED_TOKENS,
            tokens: None,
        }
    }

    /// The config of module number `index` of a network, on a map of `tokens` positions:
    /// its own random-feature seed, and its map size.
    pub fn for_module(&self, index: usize, tokens: Option<usize>) -> Self {
        Self {
            feature_seed: self.feature_seed.wrapping_add(index as u64),
            tokens,
            ..*self
        }
    }

    /// Query/key width for a map of `channels` channels.
    pub fn key_channels(&self, channels: usize) -> usize {
        (channels / self.reduction).max(1)
    }

    /// Linformer's k on a map of `tokens` positions.
    pub fn projected_length(&self, tokens: usize) -> usize {
        self.projected_tokens.min(tokens).max(1)
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

    /// Every tensor of a module on `channels` channels: (path, shape). Linformer's token
    /// projections [k, n] need the map size ([`AttentionConfig::tokens`]).
    pub fn tensors(&self, channels: usize) -> Vec<(String, Vec<usize>)> {
        let mut tensors: Vec<(String, Vec<usize>)> = self
            .projections(channels)
            .into_iter()
            .flat_map(|(name, rows)| {
                [
                    (format!("{name}.weight"), vec![rows, channels]),
                    (format!("{name}.bias"), vec![rows]),
                ]
            })
            .collect();
        if let (AttentionKind::Linformer, Some(n)) = (self.kind, self.tokens) {
            let k = self.projected_length(n);
            for name in crate::linformer::TOKEN_PROJECTIONS {
                tensors.push((format!("{name}.weight"), vec![k, n]));
            }
        }
        tensors
    }
}

/// Multiply-accumulates of one module on a map of `n` tokens of `c` channels: the four
/// projections plus the token mixing of the chosen kind.
pub fn macs(config: &AttentionConfig, n: usize, c: usize) -> u64 {
    let d = config.key_channels(c);
    let quadratic = quadratic_macs(config, n, c);
    let (n, c, d) = (n as u64, c as u64, d as u64);
    let projections = n * c * (2 * d + 2 * c);
    let mixing = match config.kind {
        AttentionKind::Softmax => quadratic,
        // phi(K)^T V, phi(Q) context and the normaliser phi(Q) . sum phi(K).
        AttentionKind::Linear | AttentionKind::ReluLinear => 2 * n * d * c + n * d,
        // softmax(K)^T V and softmax(Q) context.
        AttentionKind::Efficient => 2 * n * d * c,
        // The random features of Q and K, then linear attention over m features.
        AttentionKind::Performer => {
            let m = config.random_features as u64;
            2 * n * m * d + 2 * n * m * c + n * m
        }
        // K E^T and V F^T, then softmax attention over k positions.
        AttentionKind::Linformer => {
            let k = config.projected_length(n as usize) as u64;
            2 * k * n * (d + c)
        }
    };
    projections + mixing
}

/// The part of [`macs`] that grows as N^2: Q K^T and A V of softmax attention, none for the
/// other kinds.
pub fn quadratic_macs(config: &AttentionConfig, n: usize, c: usize) -> u64 {
    match config.kind {
        AttentionKind::Softmax => (n as u64).pow(2) * (config.key_channels(c) + c) as u64,
        _ => 0,
    }
}
