//! The precision of the products of f32 convs and matmuls: f32; TF32 on a CUDA GPU's tensor
//! cores (`--precision tf32`: operands rounded to TF32's 10-bit mantissa, sums in f32, what
//! PyTorch does for convs by default); or bf16 operands with f32 sums (`--precision bf16`,
//! what PyTorch's `torch.autocast(dtype=torch.bfloat16)` gives its convs and matmuls; so far
//! on the CPU). Only the products change: tensors, weights, gradients, BatchNorm statistics
//! and the optimiser's state stay f32, and f64 products stay f64.
//!
//! One setting for the process, since the products run on the kernels' worker threads.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::Result;

/// The precision of the f32 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 operands and sums.
    #[default]
    F32,
    /// On a CUDA GPU, operands rounded to TF32 on the tensor cores (cuDNN's tensor-op math,
    /// cuBLAS's fast-TF32 compute), sums in f32.
    Tf32,
    /// Operands rounded to bf16 (to nearest even), sums in f32.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!(
                "unknown precision {s:?} (expected f32, tf32 or bf16)"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

const ALL: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];

/// Whether this CPU runs bf16 products (AVX-512 F and BW with AVX512_BF16; checked once,
/// cached by `std`).
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Sets the precision of the process's f32 products. bf16 on a CPU without AVX512_BF16 is
/// an error that says so, not a slow emulation; TF32 is a GPU's (the CPU kernels keep f32
/// products under it) and also switches Candle's cuBLAS matmuls to TF32.
pub fn set_precision(precision: Precision) -> Result<()> {
    if precision == Precision::Bf16 && !bf16_supported() {
        candle_core::bail!(
            "bf16 precision on the CPU needs a processor with AVX512_BF16 (vdpbf16ps), \
             which this one lacks; use f32"
        );
    }
    #[cfg(feature = "cuda")]
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(precision == Precision::Tf32);
    let index = ALL.iter().position(|&p| p == precision).unwrap_or(0);
    PRECISION.store(index as u8, Ordering::Relaxed);
    Ok(())
}

/// The precision of the process's f32 products ([`Precision::F32`] until set).
pub fn precision() -> Precision {
    ALL[usize::from(PRECISION.load(Ordering::Relaxed)).min(ALL.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precisions_parse_and_print_by_the_same_names() {
        for p in ALL {
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
        }
        assert_eq!("fp32".parse::<Precision>(), Ok(Precision::F32));
        assert!("fp16".parse::<Precision>().unwrap_err().contains("tf32"));
    }
}
