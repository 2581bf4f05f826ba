//! The precision of the CPU kernels' products: f32, or bf16 operands with f32 sums
//! (`--precision bf16`, what PyTorch's `torch.autocast(dtype=torch.bfloat16)` gives its convs
//! and matmuls). Only the products change: tensors, weights, gradients, BatchNorm statistics
//! and the optimiser's state stay f32, and f64 products stay f64.
//!
//! One setting for the process, since the products run on the kernels' worker threads.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Result;

/// The precision of the f32 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 operands and sums.
    #[default]
    F32,
    /// Operands rounded to bf16 (to nearest even), sums in f32.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision {s:?} (expected f32 or bf16)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

static BF16_PRODUCTS: AtomicBool = AtomicBool::new(false);

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
/// an error that says so, not a slow emulation.
pub fn set_precision(precision: Precision) -> Result<()> {
    if precision == Precision::Bf16 && !bf16_supported() {
        candle_core::bail!(
            "bf16 precision on the CPU needs a processor with AVX512_BF16 (vdpbf16ps), \
             which this one lacks; use f32"
        );
    }
    BF16_PRODUCTS.store(precision == Precision::Bf16, Ordering::Relaxed);
    Ok(())
}

/// The precision of the process's f32 products ([`Precision::F32`] until set).
pub fn precision() -> Precision {
    if BF16_PRODUCTS.load(Ordering::Relaxed) {
        Precision::Bf16
    } else {
        Precision::F32
    }
}
