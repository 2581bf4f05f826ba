//! The layer table: every layer's output shape, parameters and multiply-accumulates
//! (MACs; a "FLOP" count of 2x these is also common). Convs, Linear layers and the
//! attention's projections and token mixing are counted, the N^2 terms of softmax
//! attention included; ReLU, BatchNorm, pooling and softmax exponentials are not.

use crate::config::VggConfig;
use crate::layers::LayerKind;

/// One row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRow {
    pub name: String,
    pub layer: String,
    /// [c, h, w] for maps, [features] after the flatten.
    pub output: Vec<usize>,
    pub params: u64,
    pub macs: u64,
}

/// The table and its totals.
#[derive(Clone, Debug)]
pub struct Summary {
    pub rows: Vec<LayerRow>,
    pub params: u64,
    pub macs: u64,
    /// MACs spent by the attention modules, and of those the ones that grow as N^2.
    pub attention_macs: u64,
    pub attention_quadratic_macs: u64,
}

/// The layer table of `config` on `size` x `size` inputs, one row per layer of
/// [`VggConfig::layers`].
pub fn summarize(config: &VggConfig, size: usize) -> Summary {
    let mut rows = Vec::new();
    let mut shape = vec![config.in_channels, size, size];
    let (mut attention_macs, mut quadratic) = (0u64, 0u64);
    for layer in config.layers() {
        let macs = layer.macs(&shape);
        let description = match &layer.kind {
            LayerKind::Conv { .. } => "conv 3x3 + ReLU".to_string(),
            LayerKind::BatchNorm { .. } => "batch norm".to_string(),
            LayerKind::Attention { channels, config } => {
                attention_macs += macs;
                quadratic += layer.quadratic_macs(&shape);
                format!(
                    "{} attention, N={}, d={}",
                    config.kind,
                    shape[1..].iter().product::<usize>(),
                    config.key_channels(*channels)
                )
            }
            LayerKind::MaxPool => "max-pool 2x2".to_string(),
            LayerKind::AvgPool { side } => format!("adaptive avg-pool {side}x{side} + flatten"),
            LayerKind::Linear { hidden: true, .. } => "linear + ReLU + dropout".to_string(),
            LayerKind::Linear { hidden: false, .. } => "linear".to_string(),
        };
        shape = layer.output_shape(&shape);
        rows.push(LayerRow {
            params: layer.params(),
            name: layer.name,
            layer: description,
            output: shape.clone(),
            macs,
        });
    }
    Summary {
        params: rows.iter().map(|r| r.params).sum(),
        macs: rows.iter().map(|r| r.macs).sum(),
        rows,
        attention_macs,
        attention_quadratic_macs: quadratic,
    }
}

/// 138357544 -> "138,357,544".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<22} {:<34} {:>16} {:>13} {:>17}",
            "layer", "kind", "output", "params", "MACs"
        )?;
        for r in &self.rows {
            let shape: Vec<String> = r.output.iter().map(|x| x.to_string()).collect();
            writeln!(
                f,
                "{:<22} {:<34} {:>16} {:>13} {:>17}",
                r.name,
                r.layer,
                shape.join("x"),
                thousands(r.params),
                thousands(r.macs)
            )?;
        }
        writeln!(f, "total parameters: {}", thousands(self.params))?;
        write!(
            f,
            "total MACs: {} ({:.2} GMAC)",
            thousands(self.macs),
            self.macs as f64 / 1e9
        )?;
        if self.attention_macs > 0 {
            write!(
                f,
                "\nattention MACs: {:.2} GMAC, of which N^2 terms: {:.2} GMAC",
                self.attention_macs as f64 / 1e9,
                self.attention_quadratic_macs as f64 / 1e9
            )?;
        }
        Ok(())
    }
}
