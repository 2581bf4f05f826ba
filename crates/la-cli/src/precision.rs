//! `--precision`: f32, or bf16 products with f32 weights, statistics and optimiser state.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::ValueEnum;
use la_kernels::Precision;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrecisionArg {
    /// f32 throughout.
    #[default]
    F32,
    /// The convs' and matmuls' operands in bf16, their sums in f32 (as PyTorch's bf16
    /// autocast); needs a CPU with AVX512_BF16.
    Bf16,
}

impl PrecisionArg {
    pub fn precision(self) -> Precision {
        match self {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

/// Puts `precision` in force for the process's products on `device`, or says why it cannot.
pub fn apply_precision(precision: PrecisionArg, device: &Device) -> Result<()> {
    if precision == PrecisionArg::Bf16 {
        if !device.is_cpu() {
            bail!(
                "--precision bf16: built for the CPU only so far; on {device:?} use --precision f32"
            );
        }
        if la_kernels::form()? == la_kernels::Form::Generic {
            bail!(
                "--precision bf16 runs in the fast CPU kernels, which {}=generic turns off",
                la_kernels::form::ENV
            );
        }
    }
    la_kernels::set_precision(precision.precision())
        .with_context(|| format!("--precision {}", precision.precision()))
}
