//! `--precision`: f32; TF32 products on a CUDA GPU's tensor cores (the default there, as
//! PyTorch's for convs); or bf16 products with f32 weights, statistics and optimiser state.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::ValueEnum;
use la_kernels::Precision;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrecisionArg {
    /// tf32 on a CUDA GPU (PyTorch's default for convs), f32 elsewhere.
    #[default]
    Auto,
    /// f32 throughout (on a GPU: no tensor-core rounding, PyTorch with TF32 off).
    #[value(alias = "fp32")]
    F32,
    /// On a CUDA GPU, the convs' and matmuls' operands rounded to TF32 on the tensor cores,
    /// sums and everything else f32.
    Tf32,
    /// The convs' and matmuls' operands in bf16, their sums in f32 (as PyTorch's bf16
    /// autocast); needs a CPU with AVX512_BF16.
    Bf16,
}

impl PrecisionArg {
    /// The precision this argument means on `device`.
    pub fn on(self, device: &Device) -> Precision {
        match self {
            PrecisionArg::Auto if device.is_cuda() => Precision::Tf32,
            PrecisionArg::Auto | PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Tf32 => Precision::Tf32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

/// Puts `precision` in force for the process's products on `device` and returns it, or says
/// why it cannot.
pub fn apply_precision(precision: PrecisionArg, device: &Device) -> Result<Precision> {
    let precision = precision.on(device);
    match precision {
        Precision::Tf32 if !device.is_cuda() => bail!(
            "--precision tf32 is the tensor-core math of CUDA GPUs; on {} use f32 (or bf16 on a \
             CPU with AVX512_BF16)",
            crate::device::describe(device)
        ),
        Precision::Bf16 if !device.is_cpu() => bail!(
            "--precision bf16: built for the CPU only so far; on {} use f32 or tf32",
            crate::device::describe(device)
        ),
        Precision::Bf16 if la_kernels::form()? == la_kernels::Form::Generic => bail!(
            "--precision bf16 runs in the fast CPU kernels, which {}=generic turns off",
            la_kernels::form::ENV
        ),
        _ => {}
    }
    la_kernels::set_precision(precision).with_context(|| format!("--precision {precision}"))?;
    Ok(precision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_f32_on_the_cpu_and_tf32_is_refused_there() {
        let cpu = Device::Cpu;
        assert_eq!(PrecisionArg::Auto.on(&cpu), Precision::F32);
        let err = apply_precision(PrecisionArg::Tf32, &cpu).unwrap_err();
        assert!(format!("{err:#}").contains("CUDA"), "{err:#}");
        assert_eq!(
            apply_precision(PrecisionArg::Auto, &cpu).unwrap(),
            Precision::F32
        );
        assert_eq!(
            PrecisionArg::from_str("fp32", true).unwrap(),
            PrecisionArg::F32
        );
    }
}
