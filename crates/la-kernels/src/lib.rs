//! The ops under the models: each public function runs a fast CPU kernel for f32/f64 tensors
//! on the CPU, a CUDA kernel (cuDNN's conv, this crate's own kernels) for f32/f64 tensors on
//! a CUDA device where it has one (the `cuda` feature), and otherwise a device-generic form
//! written in Candle ops, with correct gradients in every form. `LA_KERNELS=generic` (see
//! [`form`]) forces the generic form everywhere, so that each fast form is tested against it.
//!
//! - [`conv`]: the 3x3 conv (im2col, Winograd, dense forms); [`norm`]: BatchNorm + ReLU;
//!   [`pool`]: 2x2 max-pool, adaptive average pool; [`bias`]: a bias along one axis;
//!   [`projection`]: a Linear layer at every position, between channel-first maps and tokens.
//! - [`sgd`], [`adamw`]: the optimisers' updates of a parameter, in place; [`loss`]: the
//!   label-smoothed cross-entropy; [`squares`]: the sums of squares of many tensors at once.
//! - [`softmax_attention`]: exact softmax attention in O(N) memory (tiled on the CPU, chunked
//!   elsewhere); [`linear`]: the linear-attention ops; [`efficient`]: Shen et al.'s;
//!   [`activation`]: softmax and elu + 1 as differentiable ops.
//! - `cuda`: the CUDA form (`cuda/*.cu` compiled by build.rs, cuDNN's conv, and the host-side
//!   plans tested on any machine).
//! - Plumbing: [`form`] (which form runs), [`precision`] (f32, TF32 or bf16 products),
//!   [`device_memory`] (the GPU's peak memory in use), [`cpu`]
//!   (CPU slices, float trait, lane sums), `gemm` (strided views into the gemm crate) and
//!   `gemm/bf16.rs` (the bf16 products), `simd` (AVX-512/AVX2 dispatch), `kernel` (the one
//!   bridge to Candle's custom-op traits), `precomputed` (generic ops whose backward is a
//!   closure of tensor ops).
//! - [`parity`]: each op's generic form against its fast CPU form, for tests and selftests.

pub mod activation;
pub mod adamw;
pub mod bias;
pub mod conv;
pub mod cpu;
mod cuda;
pub mod device_memory;
pub mod efficient;
#[cfg(test)]
mod emulated_cuda;
pub mod form;
mod gemm;
mod kernel;
pub mod linear;
pub mod loss;
mod map_order;
pub mod norm;
pub mod parity;
pub mod pool;
pub mod precision;
mod precomputed;
pub mod projection;
pub mod sgd;
mod simd;
pub mod softmax_attention;
pub mod squares;

pub use form::{cuda_path, fast_path, form, set_form, with_form, Form};
pub use precision::{precision, set_precision, Precision};
