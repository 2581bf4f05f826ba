//! The ways N tokens can attend to each other, and their names.

use serde::{Deserialize, Serialize};

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
    /// Choromanski et al. 2021 (FAVOR+): the softmax kernel estimated with positive
    /// orthogonal random features, then linear attention; O(N).
    Performer,
    /// Wang et al. 2020: softmax attention over keys and values projected along the token
    /// axis to k positions; O(N k). Defined for one map size.
    Linformer,
}

impl AttentionKind {
    pub const ALL: [AttentionKind; 6] = [
        AttentionKind::Softmax,
        AttentionKind::Linear,
        AttentionKind::Efficient,
        AttentionKind::ReluLinear,
        AttentionKind::Performer,
        AttentionKind::Linformer,
    ];

    /// The short name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            AttentionKind::Softmax => "softmax",
            AttentionKind::Linear => "linear",
            AttentionKind::Efficient => "efficient",
            AttentionKind::ReluLinear => "relu-linear",
            AttentionKind::Performer => "performer",
            AttentionKind::Linformer => "linformer",
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
