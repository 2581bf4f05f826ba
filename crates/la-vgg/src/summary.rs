//! The layer table: every layer's output shape, parameters and multiply-accumulates
//! (MACs; a "FLOP" count of 2x these is also common). Convs, Linear layers and the
//! attention's projections and token mixing are counted, the N^2 terms of softmax
//! attention included; ReLU, BatchNorm, pooling and softmax exponentials are not.

use la_attention::AttentionKind;

use crate::config::VggConfig;

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

/// The layer table of `config` on `size` x `size` inputs.
pub fn summarize(config: &VggConfig, size: usize) -> Summary {
    let mut rows = Vec::new();
    let (mut c, mut h, mut w) = (config.in_channels, size, size);
    let (mut attention_macs, mut quadratic) = (0u64, 0u64);
    for (i, widths) in config.blocks.iter().enumerate() {
        for (j, &width) in widths.iter().enumerate() {
            let params = (width * c * 9 + width) as u64;
            let macs = (h * w * width * c * 9) as u64;
            rows.push(LayerRow {
                name: format!("blocks.{i}.convs.{j}"),
                layer: "conv 3x3 + ReLU".into(),
                output: vec![width, h, w],
                params,
                macs,
            });
            if config.batch_norm {
                rows.push(LayerRow {
                    name: format!("blocks.{i}.norms.{j}"),
                    layer: "batch norm".into(),
                    output: vec![width, h, w],
                    params: 2 * width as u64,
                    macs: 0,
                });
            }
            c = width;
        }
        if let (Some(a), true) = (&config.attention, config.has_attention(i)) {
            let d = a.key_channels(c);
            let n = h * w;
            let macs = la_attention::macs(a.kind, n, c, d);
            attention_macs += macs;
            if a.kind == AttentionKind::Softmax {
                quadratic += (n * n * (d + c)) as u64;
            }
            rows.push(LayerRow {
                name: format!("blocks.{i}.attention"),
                layer: format!("{} attention, N={n}, d={d}", a.kind),
                output: vec![c, h, w],
                params: (2 * (c * d + d) + 2 * (c * c + c)) as u64,
                macs,
            });
        }
        h /= 2;
        w /= 2;
        rows.push(LayerRow {
            name: format!("blocks.{i}.pool"),
            layer: "max-pool 2x2".into(),
            output: vec![c, h, w],
            params: 0,
            macs: 0,
        });
    }
    let p = config.head.pool;
    let mut features = c * p * p;
    rows.push(LayerRow {
        name: "head.pool".into(),
        layer: format!("adaptive avg-pool {p}x{p} + flatten"),
        output: vec![features],
        params: 0,
        macs: 0,
    });
    let linear = |name: String, inputs: usize, outputs: usize, layer: &str| LayerRow {
        name,
        layer: layer.into(),
        output: vec![outputs],
        params: (inputs * outputs + outputs) as u64,
        macs: (inputs * outputs) as u64,
    };
    for (k, &width) in config.head.hidden.iter().enumerate() {
        rows.push(linear(
            format!("head.fc{}", k + 1),
            features,
            width,
            "linear + ReLU + dropout",
        ));
        features = width;
    }
    rows.push(linear(
        "head.logits".into(),
        features,
        config.num_classes,
        "linear",
    ));
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
